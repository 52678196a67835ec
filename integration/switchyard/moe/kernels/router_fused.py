"""A softmax top-k router in one Triton launch, under one autograd Function (CUDA, 16-bit inputs).

    softmax_topk(x_TH, weight_EH, top_k, normalize, scale) -> (logits_TE, scores_TE, idx_TK, weight_TK)

The same tensors as ``Router.forward``'s softmax path (fp32 logits, softmax over all experts, top-k of the
scores by descending value, optionally renormalised, times ``routed_scaling_factor``), for Mixtral / Qwen /
OLMoE routers. Why: at the start of a layer the device waits while the host issues the router's ops (a
Function, the logits GEMM, softmax, top-k, the renormalisation: ~400 µs of host time per olmoe step on an
H200 machine); here that is one Function and one launch (docs/performance.md, "Where the time goes").

The backward is the router's chain rule written out: the weights' gradient through the renormalisation
into the chosen scores, plus the scores' own gradient (balance losses), through the softmax, plus the
logits' own gradient (z-loss) — one Triton launch on CUDA (``logits_grad`` is its PyTorch form, ~15 ops of
host time otherwise); then the logits' gradient, rounded to the input dtype as a bf16 ``nn.Linear``'s
backward receives it, times ``x`` and ``w`` on tensor cores (as ``_Fp32Logits`` does).

Routing matches the unfused path up to the fp32 summation order of the logits and the exponential's
rounding; ties go to the lower expert id. GPU-tested against the unfused path (tests/unit/test_router.py).
"""

from __future__ import annotations

import torch

from switchyard.moe.kernels.ops import kernel_inputs_ok, records_graph

try:  # Triton ships with CUDA torch; CPU-only installs (CI) go without it
    from switchyard.moe.kernels import router_kernels as _rk
except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot initialise here
    _rk = None

MAX_EXPERTS = 256  # the kernel holds a [tokens, E] tile in registers


def softmax_topk_supported(x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int) -> bool:
    """Whether ``softmax_topk`` runs for these inputs: Triton on CUDA, a bf16/fp16 pair, H in unit stride."""
    return (_rk is not None and kernel_inputs_ok(x_TH, weight_EH) and x_TH.dtype in (torch.bfloat16, torch.float16)
            and weight_EH.dtype == x_TH.dtype and x_TH.dim() == 2 and x_TH.stride(-1) == 1
            and weight_EH.stride(-1) == 1 and x_TH.shape[0] > 0 and weight_EH.shape[0] <= MAX_EXPERTS
            and 0 < top_k <= weight_EH.shape[0])


def logits_grads_16bit(grad_TE: torch.Tensor, x_TH: torch.Tensor, weight_EH: torch.Tensor, need_x: bool,
                       need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_w) of fp32 logits ``x @ w.T`` for a 16-bit pair: the logits' gradient rounded to the
    input dtype, as a bf16 ``nn.Linear``'s backward receives it, then two tensor-core GEMMs (this router's
    and ``router._Fp32Logits``'s backward)."""
    grad_16 = grad_TE.to(x_TH.dtype)
    return (grad_16.mm(weight_EH) if need_x else None), (grad_16.t().mm(x_TH) if need_w else None)


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int, normalize: bool,  # type: ignore[override]
                scale: float):
        logits_TE, scores_TE, idx_TK, weight_TK = _rk.softmax_topk(x_TH, weight_EH, top_k, normalize, scale)
        ctx.save_for_backward(x_TH, weight_EH, scores_TE, idx_TK, weight_TK)
        ctx.mark_non_differentiable(idx_TK)
        ctx.normalize, ctx.scale = normalize, scale
        return logits_TE, scores_TE, idx_TK, weight_TK

    @staticmethod
    def backward(ctx, grad_logits_TE, grad_scores_TE, _grad_idx, grad_weight_TK):  # type: ignore[override]
        x_TH, weight_EH, scores_TE, idx_TK, weight_TK = ctx.saved_tensors
        if scores_TE.is_cuda and hasattr(_rk, "softmax_topk_backward"):  # one launch, in x's dtype
            grad_logits = _rk.softmax_topk_backward(scores_TE, idx_TK, weight_TK, grad_scores_TE, grad_weight_TK,
                                                    grad_logits_TE, ctx.normalize, ctx.scale, x_TH.dtype)
        else:
            grad_logits = logits_grad(scores_TE, idx_TK, weight_TK, grad_scores_TE, grad_weight_TK, grad_logits_TE,
                                      ctx.normalize, ctx.scale)
        grad_x, grad_w = logits_grads_16bit(grad_logits, x_TH, weight_EH, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None, None


def logits_grad(scores_TE: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                grad_scores_TE: torch.Tensor | None, grad_weight_TK: torch.Tensor | None,
                grad_logits_TE: torch.Tensor | None, normalize: bool, scale: float) -> torch.Tensor:
    """The logits' fp32 gradient from those of the scores, the combine weights and the logits (each may be
    None): the chain rule the Triton backward kernel runs, in PyTorch ops (CPU, and its GPU test's reference)."""
    grad_s_TE = grad_scores_TE.float() if grad_scores_TE is not None else torch.zeros_like(scores_TE)
    if grad_weight_TK is not None:
        grad_w_TK = grad_weight_TK.float() * scale
        if normalize:  # w_k = s_k / S:  dL/ds_i = (g_i - sum_k g_k w_k) / S
            chosen_TK = scores_TE.gather(1, idx_TK)
            share_TK = weight_TK / scale
            grad_w_TK = (grad_w_TK - (grad_w_TK * share_TK).sum(-1, keepdim=True)) / chosen_TK.sum(-1, keepdim=True)
        grad_s_TE = grad_s_TE.scatter_add(1, idx_TK, grad_w_TK)
    grad_logits = scores_TE * (grad_s_TE - (grad_s_TE * scores_TE).sum(-1, keepdim=True))
    if grad_logits_TE is not None:
        grad_logits = grad_logits + grad_logits_TE.float()
    return grad_logits


def softmax_topk(x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int, normalize: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits_TE, scores_TE, idx_TK, weight_TK); call where ``softmax_topk_supported``."""
    if records_graph(x_TH, weight_EH):
        return _SoftmaxTopK.apply(x_TH, weight_EH, top_k, normalize, scale)
    return _rk.softmax_topk(x_TH, weight_EH, top_k, normalize, scale)
