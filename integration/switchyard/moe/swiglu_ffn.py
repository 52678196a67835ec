"""The experts' SwiGLU FFN (``down(silu(gate(x)) * up(x))``, no bias) as one autograd Function, for training.

Autograd's composition of GEMM 1 → SwiGLU → GEMM 2 keeps three activations per layer for the backward:
the permuted input ``x_NH``, GEMM 1's output ``h_NO`` (for the SwiGLU backward) and the SwiGLU output
``a_NF`` (for GEMM 2's weight gradient). This Function keeps ``x_NH`` and ``h_NO`` only and recomputes
``a_NF`` in the backward (one element-wise pass over ``h``): ``N·F`` elements less per MoE layer, held
from the forward until that layer's backward, which is where a fine-tune's peak memory sits. The SwiGLU
gradient is then written over ``h_NO`` in place, so ``h`` and its gradient never coexist either.

Two GEMM backends, same math and the same saved tensors:

    grouped     one grouped GEMM per product (2 forward, 4 backward); no host sync
    per_expert  one cuBLAS ``mm`` per expert and product, written into slices of the outputs; needs the
                counts on the host (one sync per forward); the backward walks the experts one by one,
                so the recomputed ``a`` and its gradient exist for one expert at a time

Tensor suffixes: N rows sorted by expert, E local experts, H hidden, F expert width, O = 2F.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from switchyard.moe.kernels.ops import silu_mul_backward_, silu_mul_forward

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_forward(x_NH: Tensor, w1_EOH: Tensor, w2_EHF: Tensor, offs_E: Tensor) -> tuple[Tensor, Tensor]:
    h_NO = _GROUPED_MM(x_NH, w1_EOH.transpose(-2, -1), offs=offs_E)
    y_NH = _GROUPED_MM(silu_mul_forward(h_NO), w2_EHF.transpose(-2, -1), offs=offs_E)
    return h_NO, y_NH


def _grouped_backward(grad_NH: Tensor, x_NH: Tensor, h_NO: Tensor, w1_EOH: Tensor, w2_EHF: Tensor,
                      offs_E: Tensor, need: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
    grad_w2 = _GROUPED_MM(grad_NH.t(), silu_mul_forward(h_NO), offs=offs_E) if need[2] else None
    grad_a_NF = _GROUPED_MM(grad_NH, w2_EHF, offs=offs_E)
    grad_h_NO = silu_mul_backward_(h_NO, grad_a_NF)  # over h: it is dead from here on
    del grad_a_NF
    grad_w1 = _GROUPED_MM(grad_h_NO.t(), x_NH, offs=offs_E) if need[1] else None
    grad_x = _GROUPED_MM(grad_h_NO, w1_EOH, offs=offs_E) if need[0] else None
    return grad_x, grad_w1, grad_w2


def _per_expert_forward(x_NH: Tensor, w1_EOH: Tensor, w2_EHF: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    h_NO = x_NH.new_empty((x_NH.shape[0], w1_EOH.shape[1]))
    y_NH = x_NH.new_empty((x_NH.shape[0], w2_EHF.shape[1]))
    for e, (x_nH, h_nO) in enumerate(zip(x_NH.split(counts), h_NO.split(counts))):
        torch.mm(x_nH, w1_EOH[e].t(), out=h_nO)
    a_NF = silu_mul_forward(h_NO)
    for e, (a_nF, y_nH) in enumerate(zip(a_NF.split(counts), y_NH.split(counts))):
        torch.mm(a_nF, w2_EHF[e].t(), out=y_nH)
    return h_NO, y_NH


def _per_expert_backward(grad_NH: Tensor, x_NH: Tensor, h_NO: Tensor, w1_EOH: Tensor, w2_EHF: Tensor,
                         counts: list[int], need: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
    grad_x = torch.empty_like(x_NH) if need[0] else None
    grad_w1 = torch.empty_like(w1_EOH) if need[1] else None
    grad_w2 = torch.empty_like(w2_EHF) if need[2] else None
    rows = zip(grad_NH.split(counts), x_NH.split(counts), h_NO.split(counts),
               grad_x.split(counts) if grad_x is not None else [None] * len(counts))
    for e, (g_nH, x_nH, h_nO, gx_nH) in enumerate(rows):
        if grad_w2 is not None:  # an empty expert gets zeros: mm over 0 rows
            torch.mm(g_nH.t(), silu_mul_forward(h_nO), out=grad_w2[e])
        grad_h_nO = silu_mul_backward_(h_nO, g_nH @ w2_EHF[e])
        if grad_w1 is not None:
            torch.mm(grad_h_nO.t(), x_nH, out=grad_w1[e])
        if gx_nH is not None:
            torch.mm(grad_h_nO, w1_EOH[e], out=gx_nH)
    return grad_x, grad_w1, grad_w2


class _SwiGLUFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH: Tensor, w1_EOH: Tensor, w2_EHF: Tensor, counts_E: Tensor,  # type: ignore[override]
                backend: str) -> Tensor:
        if backend == "grouped":
            groups = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            h_NO, y_NH = _grouped_forward(x_NH, w1_EOH, w2_EHF, groups)
        else:
            groups = counts_E.tolist()
            h_NO, y_NH = _per_expert_forward(x_NH, w1_EOH, w2_EHF, groups)
        ctx.save_for_backward(x_NH, h_NO, w1_EOH, w2_EHF, groups if backend == "grouped" else counts_E)
        ctx.backend, ctx.counts, ctx.h_consumed = backend, groups, False
        return y_NH

    @staticmethod
    def backward(ctx, grad_NH: Tensor):  # type: ignore[override]
        if ctx.h_consumed:
            raise RuntimeError("the SwiGLU expert FFN's backward ran twice (retain_graph=True): its first backward "
                               "overwrote the saved activations; set GroupedExperts.impl='grouped_mm' for that")
        x_NH, h_NO, w1_EOH, w2_EHF, offs_or_counts = ctx.saved_tensors
        ctx.h_consumed = True
        need = tuple(ctx.needs_input_grad[:3])
        grad_NH = grad_NH.contiguous()  # y.sum().backward() sends an expanded (stride-0) grad
        if ctx.backend == "grouped":
            grads = _grouped_backward(grad_NH, x_NH, h_NO, w1_EOH, w2_EHF, offs_or_counts, need)
        else:
            grads = _per_expert_backward(grad_NH, x_NH, h_NO, w1_EOH, w2_EHF, ctx.counts, need)
        return (*grads, None, None)


BACKENDS = ("grouped", "per_expert")
_NO_GRAD_FORWARDS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "grouped": lambda x, w1, w2, counts: _grouped_forward(x, w1, w2, torch.cumsum(counts, 0, dtype=torch.int32)),
    "per_expert": lambda x, w1, w2, counts: _per_expert_forward(x, w1, w2, counts.tolist()),
}


def swiglu_ffn(x_NH: Tensor, w1_EOH: Tensor, w2_EHF: Tensor, counts_E: Tensor, backend: str) -> Tensor:
    """``down(silu(gate(x)) * up(x))`` per expert over rows sorted by expert; ``counts_E`` rows each."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    if torch.is_grad_enabled() and (x_NH.requires_grad or w1_EOH.requires_grad or w2_EHF.requires_grad):
        return _SwiGLUFFN.apply(x_NH, w1_EOH, w2_EHF, counts_E, backend)
    return _NO_GRAD_FORWARDS[backend](x_NH, w1_EOH, w2_EHF, counts_E)[1]
