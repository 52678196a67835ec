"""Every local expert over every token, then the weighted combine: the mid-size inference path.

    all_experts_swiglu_combine(x_TH, w1_LOH, w2_LHF, idx_TK, weight_TK, keep_TK, first_expert, num_experts)
        -> (out_TH, tokens_per_expert_E)

Same result as the sort path (``out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])``), computed
differently: GEMM 1 is one dense ``[T, H] @ [H, L*2F]`` over the whole ``gate_up_proj``, GEMM 2 one
batched ``[L, T, F] @ [L, F, H]``, and the combine gathers each token's K rows of ``y[l, t]``.

Why: between the small-batch path's few copies and a prefill's thousands, a forward of tens of tokens
routes to (nearly) every expert anyway, so its cost is reading all expert weights once. The sort path
reads them once too, but through ~25 launches (slot sort, gather, grouped GEMMs on groups of a few rows,
far below their tiles); here it is a handful of launches and two plain cuBLAS GEMMs. The extra FLOPs
(L·T rows instead of T·K) are free while T stays below the device's FLOP-per-byte ratio, which the
layer's token limit keeps it under (docs/moe-layer.md, "All-experts path"). No host sync, no
data-dependent shape: serving's CUDA graphs capture it.

Rounding is the sort path's: ``h`` and ``y`` in the weights' dtype, ``a`` rounded once, the K outputs
summed in fp32 and rounded once (``unpermute_combine``).

Tensor suffixes: T tokens, K top-k, E global experts, L local experts, H hidden, F expert width, O = 2F.
"""

from __future__ import annotations

import torch

from switchyard.moe.kernels import unpermute_combine
from switchyard.moe.kernels.ops import silu_mul_forward
from switchyard.moe.kernels.routed import add_kept_copies_


def all_experts_swiglu_combine(x_TH: torch.Tensor, w1_LOH: torch.Tensor, w2_LHF: torch.Tensor,
                               idx_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor | None = None,
                               first_expert: int = 0, num_experts: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``out_TH`` in x's dtype, ``tokens_per_expert_E`` int64 over ``num_experts`` global experts).

    ``w1_LOH`` is ``gate_up_proj`` [L, 2F, H] (gate rows first), ``w2_LHF`` is ``down_proj`` [L, H, F].
    Copies routed to other ranks' experts or dropped by ``keep_TK`` add nothing (ep > 1 with replicated
    tokens: the EP all-reduce adds the other ranks' shares). Forward only.
    """
    num_tokens, top_k = idx_TK.shape
    num_local, width2, hidden = w1_LOH.shape
    width = width2 // 2
    num_experts = num_experts if num_experts is not None else first_expert + num_local
    if x_TH.shape != (num_tokens, hidden) or w2_LHF.shape != (num_local, hidden, width) or width2 % 2:
        raise ValueError(f"shapes do not fit gated experts: x {tuple(x_TH.shape)}, idx {tuple(idx_TK.shape)}, "
                         f"gate_up {tuple(w1_LOH.shape)}, down {tuple(w2_LHF.shape)}")
    out_dtype = x_TH.dtype
    h_TLO = (x_TH.to(w1_LOH.dtype) @ w1_LOH.reshape(num_local * width2, hidden).t()).view(num_tokens * num_local, width2)
    a_LTF = silu_mul_forward(h_TLO).view(num_tokens, num_local, width).transpose(0, 1)
    y_LTH = torch.bmm(a_LTF, w2_LHF.transpose(1, 2))

    token_T1 = torch.arange(num_tokens, device=idx_TK.device).unsqueeze(1)
    if first_expert == 0 and num_local == num_experts and keep_TK is None:  # ep=1, dropless: every copy local
        rows_TK = torch.add(token_T1, idx_TK, alpha=num_tokens)  # row of y viewed as [L*T, H]
    else:
        local_TK = idx_TK - first_expert
        kept_TK = (local_TK >= 0) & (local_TK < num_local)
        if keep_TK is not None:
            kept_TK = kept_TK & keep_TK
        rows_TK = torch.where(kept_TK, local_TK * num_tokens + token_T1, -1)
    out_TH = unpermute_combine(y_LTH.reshape(num_local * num_tokens, hidden), weight_TK, rows_TK)

    counts_E = add_kept_copies_(torch.zeros(num_experts, dtype=torch.int64, device=idx_TK.device), idx_TK, keep_TK)
    return out_TH.to(out_dtype), counts_E
