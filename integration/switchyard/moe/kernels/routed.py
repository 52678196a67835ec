"""Gated-SiLU experts and the weighted combine on the unsorted (token, k) copies: the small-batch path.

    routed_swiglu_combine(x_TH, w1_LOH, w2_LHF, idx_TK, weight_TK, keep_TK, first_expert, num_experts)
        -> (out_TH, tokens_per_expert_E)

    out[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t]))     e = idx[t, k]

over the copies whose expert is local (``first_expert <= e < first_expert + L``) and kept (``keep_TK``);
``tokens_per_expert_E`` counts the kept copies of every global expert. No permutation, no host sync,
no data-dependent shape: what a CUDA-graph decode step wants. Forward only (MoELayer uses it when no
autograd graph is recorded).

Two Triton launches on CUDA (routed_kernels.py). Elsewhere — CPU, no Triton, other dtypes, fused
kernels off — the same math in PyTorch: each copy's expert weights gathered and multiplied with
``bmm``, one k at a time (memory: T copies of one expert's weights), fp32 accumulation over k, ``a``
rounded once to the weights' dtype, ``out`` once to x's.

Tensor suffixes: T tokens, K top-k, E global experts, L local experts, H hidden, F expert width, O = 2F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchyard.moe.kernels.ops import accumulation_dtype, kernel_inputs_ok

try:  # Triton ships with CUDA torch; CPU-only installs (CI) go without it
    from switchyard.moe.kernels import routed_kernels as _rk
except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot initialise here
    _rk = None


def routed_kernels_apply(x_TH: torch.Tensor, w1_LOH: torch.Tensor, w2_LHF: torch.Tensor) -> bool:
    """Whether ``routed_swiglu_combine`` runs the Triton kernels for these tensors."""
    return _rk is not None and kernel_inputs_ok(x_TH, w1_LOH, w2_LHF)


def routed_swiglu_combine_torch(x_TH: torch.Tensor, w1_LOH: torch.Tensor, w2_LHF: torch.Tensor,
                                idx_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor | None,
                                first_expert: int = 0) -> torch.Tensor:
    """The kernels' math in PyTorch (any device and dtype); ``out_TH`` in x's dtype."""
    num_tokens, top_k = idx_TK.shape
    num_local = w1_LOH.shape[0]
    acc = accumulation_dtype(w1_LOH.dtype, x_TH.dtype)
    local_TK = idx_TK - first_expert
    ok_TK = (local_TK >= 0) & (local_TK < num_local)
    if keep_TK is not None:
        ok_TK = ok_TK & keep_TK
    local_TK = torch.where(ok_TK, local_TK, torch.zeros_like(local_TK))  # skipped copies read expert 0
    x_T1H = x_TH.to(acc).unsqueeze(1)
    out_TH = torch.zeros((num_tokens, x_TH.shape[-1]), dtype=acc, device=x_TH.device)
    for k in range(top_k):
        expert_T = local_TK[:, k]
        h_T1O = torch.bmm(x_T1H, w1_LOH[expert_T].to(acc).transpose(1, 2))
        gate_T1F, up_T1F = h_T1O.chunk(2, dim=-1)
        a_T1F = (F.silu(gate_T1F) * up_T1F).to(w1_LOH.dtype).to(acc)  # the kernel stores a in the weights' dtype
        y_TH = torch.bmm(a_T1F, w2_LHF[expert_T].to(acc).transpose(1, 2)).squeeze(1)
        out_TH += torch.where(ok_TK[:, k, None], weight_TK[:, k, None].to(acc) * y_TH, 0.0)
    return out_TH.to(x_TH.dtype)


def routed_swiglu_combine(x_TH: torch.Tensor, w1_LOH: torch.Tensor, w2_LHF: torch.Tensor, idx_TK: torch.Tensor,
                          weight_TK: torch.Tensor, keep_TK: torch.Tensor | None = None, first_expert: int = 0,
                          num_experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``out_TH``, ``tokens_per_expert_E`` int64 over ``num_experts`` global experts; see the module doc).

    ``w1_LOH`` is ``gate_up_proj`` [L, 2F, H] with the gate rows first, ``w2_LHF`` is ``down_proj`` [L, H, F].
    """
    num_tokens, top_k = idx_TK.shape
    num_local, width2, hidden = w1_LOH.shape
    num_experts = num_experts if num_experts is not None else first_expert + num_local
    if x_TH.shape != (num_tokens, hidden) or w2_LHF.shape != (num_local, hidden, width2 // 2) or width2 % 2:
        raise ValueError(f"shapes do not fit gated experts: x {tuple(x_TH.shape)}, idx {tuple(idx_TK.shape)}, "
                         f"gate_up {tuple(w1_LOH.shape)}, down {tuple(w2_LHF.shape)}")
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=idx_TK.device)
    if num_tokens > 0 and routed_kernels_apply(x_TH, w1_LOH, w2_LHF):
        out_TH = _rk.routed_swiglu_combine(
            x_TH.contiguous(), w1_LOH.contiguous(), w2_LHF.contiguous(), idx_TK.contiguous(),
            weight_TK.contiguous(), keep_TK.contiguous() if keep_TK is not None else None, first_expert, counts_E)
        return out_TH, counts_E
    add_kept_copies_(counts_E, idx_TK, keep_TK)
    return routed_swiglu_combine_torch(x_TH, w1_LOH, w2_LHF, idx_TK, weight_TK, keep_TK, first_expert), counts_E


def add_kept_copies_(counts_E: torch.Tensor, idx_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> torch.Tensor:
    """Add each global expert's kept copies to ``counts_E`` (int64) in place; returns it."""
    flat_idx = idx_TK.reshape(-1)
    kept = keep_TK.reshape(-1).to(torch.int64) if keep_TK is not None else torch.ones_like(flat_idx)
    return counts_E.index_add_(0, flat_idx, kept)  # not bincount: it syncs on CUDA
