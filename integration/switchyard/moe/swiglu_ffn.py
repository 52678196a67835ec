"""The experts' SwiGLU FFN (``down(silu(gate(x)) * up(x))``, no bias) as two autograd Functions, for training.

Autograd's composition of GEMM 1 → SwiGLU → GEMM 2 keeps three activations per layer for the backward:
the permuted input ``x_NH``, GEMM 1's output ``h_NO`` (for the SwiGLU backward) and the SwiGLU output
``a_NF`` (for GEMM 2's weight gradient). Here ``_SwiGLUDown`` (SwiGLU + GEMM 2) keeps ``h_NO`` only and
recomputes ``a_NF`` in its backward: ``N·F`` elements less per MoE layer, held from the forward until that
layer's backward, which is where a fine-tune's peak memory sits. The recompute rides along with the SwiGLU
backward (one element-wise pass reads ``h`` and ``a``'s gradient, writes the gradient over ``h`` and ``a``
over its own gradient), so ``h`` and its gradient never coexist, nor ``a`` and its gradient.
GEMM 1 is a Function of its own so that the output gradient is freed before GEMM 1's backward runs (a
single Function would hold it to the end: one more ``[N, H]`` at the layer's peak).

GEMM 2's weight gradient comes late where that keeps fewer bytes alive (few big experts: mixtral-shaped).
The layer's peak is GEMM 1's backward, where ``grad_h`` ``[N, 2F]`` and GEMM 1's new weight gradient
``[E, 2F, H]`` meet. Normally GEMM 2's weight gradient ``[E, H, F]`` is already there too. With
``late_down_grad`` it is not: ``_SwiGLUDown``'s backward leaves the output gradient and the product
(``[N, H]`` + ``[N, F]``) in a ``_LateDownGrad`` box, and ``_DownGradSink`` — an identity on ``x_NH``, so
autograd runs its backward right after GEMM 1's, when ``grad_h`` is freed — writes the weight gradient from
them. The peak falls by ``min(E·H·F − N·(H + F), N·F)`` elements (the weight gradient against the operands
kept for it; or, if smaller, what GEMM 1's backward frees before the sink runs: ``grad_h`` beyond those
operands and its saved ``x_NH``), so it pays when ``E·H·F > N·(H + F)`` (``late_down_grad_saves_memory``): at
8192 tokens mixtral keeps 0.31 GiB less at the peak (measured: 6.50 → 6.19 GB in benchmarks/moe_layer.py),
qwen3 32 MiB less; olmoe and the fine-tune benchmark's model would keep more and take the usual order. Same GEMMs, same element-wise passes, same values. Only when ``x_NH`` needs a gradient:
the sink's backward runs on it.

Two GEMM backends, same math and the same saved tensors:

    grouped     one grouped GEMM per product (2 forward, 4 backward); no host sync. The library that runs
                them (torch's grouped_mm or QuACK's) is chosen once per forward: see grouped_gemm.py
    per_expert  one cuBLAS ``mm`` per expert and product, written into slices of the outputs; needs the
                counts on the host (one sync per forward); the SwiGLU backward walks the experts one
                by one, so the recomputed ``a`` and its gradient exist for one expert at a time. Faster
                than the grouped GEMM for few large experts (mixtral-shaped), far slower for many small

Tensor suffixes: N rows sorted by expert, E local experts, H hidden, F expert width, O = 2F.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from switchyard.moe import grouped_gemm
from switchyard.moe.kernels.ops import records_graph, silu_mul_backward_, silu_mul_forward

BACKENDS = ("grouped", "per_expert")
Groups = Tensor | list[int]  # grouped: int32 cumulative offsets from 0 ([E + 1]); per_expert: counts on the host


def _matmul_by_expert(a_NI: Tensor, w_EIO: Tensor, groups: Groups, gemm: str) -> Tensor:
    """``a[rows of e] @ w[e]`` for every expert e (``w`` given as ``[E, in, out]``, any strides); ``gemm``
    names the grouped GEMMs' library (grouped_gemm.BACKENDS)."""
    if isinstance(groups, Tensor):
        return grouped_gemm.rows_by_expert(a_NI, w_EIO, groups, gemm)
    out_NO = a_NI.new_empty((a_NI.shape[0], w_EIO.shape[2]))
    for e, (a_nI, out_nO) in enumerate(zip(a_NI.split(groups), out_NO.split(groups))):
        torch.mm(a_nI, w_EIO[e], out=out_nO)
    return out_NO


def _weight_grad(grad_NO: Tensor, a_NI: Tensor, groups: Groups, gemm: str) -> Tensor:
    """``grad[rows of e].T @ a[rows of e]`` for every expert e: ``[E, O, I]`` (zeros for empty experts)."""
    if isinstance(groups, Tensor):
        return grouped_gemm.weight_grad(grad_NO, a_NI, groups, gemm)
    out_EOI = grad_NO.new_empty((len(groups), grad_NO.shape[1], a_NI.shape[1]))
    for e, (g_nO, a_nI) in enumerate(zip(grad_NO.split(groups), a_NI.split(groups))):
        torch.mm(g_nO.t(), a_nI, out=out_EOI[e])  # an empty expert gets zeros: mm over 0 rows
    return out_EOI


def _save(ctx, a: Tensor, w: Tensor, groups: Groups, gemm: str) -> None:
    """Save an activation and a weight, plus the groups: offsets as a saved tensor, host counts on ctx;
    the backward's GEMMs run in the forward's library."""
    ctx.save_for_backward(a, w, *([groups] if isinstance(groups, Tensor) else []))
    ctx.counts = None if isinstance(groups, Tensor) else groups
    ctx.gemm = gemm


def _saved(ctx) -> tuple[Tensor, Tensor, Groups]:
    a, w, *offs = ctx.saved_tensors
    return a, w, offs[0] if offs else ctx.counts


class _UpProj(torch.autograd.Function):
    """GEMM 1: ``h = x @ w1[e].T`` per expert."""

    @staticmethod
    def forward(ctx, x_NH: Tensor, w1_EOH: Tensor, groups: Groups, gemm: str) -> Tensor:  # type: ignore[override]
        _save(ctx, x_NH, w1_EOH, groups, gemm)
        return _matmul_by_expert(x_NH, w1_EOH.transpose(-2, -1), groups, gemm)

    @staticmethod
    def backward(ctx, grad_h_NO: Tensor):  # type: ignore[override]
        x_NH, w1_EOH, groups = _saved(ctx)
        grad_h_NO = grad_h_NO.contiguous()
        grad_w1 = _weight_grad(grad_h_NO, x_NH, groups, ctx.gemm) if ctx.needs_input_grad[1] else None
        grad_x = _matmul_by_expert(grad_h_NO, w1_EOH, groups, ctx.gemm) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w1, None, None


class _LateDownGrad:
    """What ``_SwiGLUDown``'s backward leaves for ``_DownGradSink``'s: GEMM 2's weight-gradient operands."""

    __slots__ = ("grad_NH", "a_NF", "groups", "gemm")

    def __init__(self, gemm: str) -> None:
        self.grad_NH: Tensor | None = None
        self.a_NF: Tensor | None = None
        self.groups: Groups | None = None
        self.gemm = gemm


def late_down_grad_saves_memory(rows: int, experts: int, hidden: int, width: int) -> bool:
    """Whether GEMM 2's weight gradient ``[E, H, F]`` outweighs its operands ``[N, H]`` + ``[N, F]``, which the
    late order keeps through GEMM 1's backward instead (see the module doc)."""
    return experts * hidden * width > rows * (hidden + width)


class _DownGradSink(torch.autograd.Function):
    """Identity on ``x_NH`` whose backward writes GEMM 2's weight gradient from the box (late order).

    It feeds GEMM 1, so autograd runs its backward after GEMM 1's, once ``grad_h`` is gone."""

    @staticmethod
    def forward(ctx, x_NH: Tensor, w2_EHF: Tensor, box: _LateDownGrad) -> Tensor:  # type: ignore[override]
        ctx.box = box
        return x_NH.view_as(x_NH)

    @staticmethod
    def backward(ctx, grad_x_NH: Tensor):  # type: ignore[override]
        box = ctx.box
        if box.grad_NH is None or box.a_NF is None or box.groups is None:
            raise RuntimeError("the SwiGLU experts' down_proj gradient has no operands: the SwiGLU backward did not "
                               "run before this one (a partial torch.autograd.grad?); set "
                               "GroupedExperts.impl='grouped_mm' for such graphs")
        grad_w2 = _weight_grad(box.grad_NH, box.a_NF, box.groups, box.gemm)
        box.grad_NH = box.a_NF = box.groups = None
        return grad_x_NH, grad_w2, None


class RowWeights(NamedTuple):
    """Each row's routing weight as a gather, ``source_S[index_N[n]]`` (the router's fp32, float64 in a float64
    model): taken inside the SwiGLU Function, after GEMM 1 is issued, so the layer's forward issues no gather of
    its own before GEMM 1."""

    source_S: Tensor  # e.g. the router's [T * K] combine weights, flat; differentiable
    index_N: Tensor  # the slot of each row (int64)

    def gather(self) -> Tensor:
        return self.source_S.detach().index_select(0, self.index_N)


class _SwiGLUDown(torch.autograd.Function):
    """SwiGLU + GEMM 2: ``y = (w[n] · silu(h[:, :F]) * h[:, F:]) @ w2[e].T``; keeps ``h``, not the product.

    ``w`` (optional, ``RowWeights``): each row's routing weight, folded in before GEMM 2 (see ``swiglu_ffn``); its
    gradient ``<da[n], silu(gate) * up>`` comes out of the SwiGLU backward's pass and goes back to the weights'
    source through the gather's inverse (each source slot at most once). With a ``box`` (late order) the backward
    returns no weight gradient for ``w2``: it leaves the operands in the box."""

    @staticmethod
    def forward(ctx, h_NO: Tensor, w2_EHF: Tensor, groups: Groups, gemm: str,  # type: ignore[override]
                box: _LateDownGrad | None = None, weight_S: Tensor | None = None,
                index_N: Tensor | None = None) -> Tensor:
        _save(ctx, h_NO, w2_EHF, groups, gemm)
        ctx.row_weight_N = RowWeights(weight_S, index_N).gather() if weight_S is not None else None
        ctx.weights_index_N, ctx.weights_source_size = index_N, (weight_S.shape[0] if weight_S is not None else 0)
        ctx.h_consumed = False
        ctx.box = box
        return _matmul_by_expert(silu_mul_forward(h_NO, ctx.row_weight_N), w2_EHF.transpose(-2, -1), groups, gemm)

    @staticmethod
    def _to_source(ctx, grad_weight_N: Tensor | None) -> Tensor | None:
        """The rows' weight gradient back on the weights' source (zeros where no row took a weight)."""
        if grad_weight_N is None:
            return None
        return grad_weight_N.new_zeros(ctx.weights_source_size).index_copy_(0, ctx.weights_index_N, grad_weight_N)

    @staticmethod
    def backward(ctx, grad_NH: Tensor):  # type: ignore[override]
        if ctx.h_consumed:
            raise RuntimeError("the SwiGLU experts' backward ran twice (retain_graph=True), but the first one "
                               "overwrote its saved activations; set GroupedExperts.impl='grouped_mm' for that")
        h_NO, w2_EHF, groups = _saved(ctx)
        ctx.h_consumed = True
        weight_N = ctx.row_weight_N
        grad_NH = grad_NH.contiguous()  # y.sum().backward() sends an expanded (stride-0) grad
        need_w2 = ctx.needs_input_grad[1]
        # one pass over h: its gradient over h, and the (weighted) product over its own gradient ``da``
        if ctx.box is not None or isinstance(groups, Tensor):
            da_NF = _matmul_by_expert(grad_NH, w2_EHF, groups, ctx.gemm)
            grad_weight_N = silu_mul_backward_(h_NO, da_NF, product_into_da=need_w2 or ctx.box is not None,
                                               row_weight_N=weight_N)
            if ctx.box is not None:
                ctx.box.grad_NH, ctx.box.a_NF, ctx.box.groups = grad_NH, da_NF, groups
                grad_w2 = None
            else:
                grad_w2 = _weight_grad(grad_NH, da_NF, groups, ctx.gemm) if need_w2 else None
            return h_NO, grad_w2, None, None, None, _SwiGLUDown._to_source(ctx, grad_weight_N), None
        grad_w2 = torch.empty_like(w2_EHF) if need_w2 else None
        grads_weight = []
        weights = weight_N.split(groups) if weight_N is not None else [None] * len(groups)
        for e, (g_nH, h_nO, w_n) in enumerate(zip(grad_NH.split(groups), h_NO.split(groups), weights)):
            da_nF = g_nH @ w2_EHF[e]
            grads_weight.append(silu_mul_backward_(h_nO, da_nF, product_into_da=need_w2, row_weight_N=w_n))
            if grad_w2 is not None:
                torch.mm(g_nH.t(), da_nF, out=grad_w2[e])
        grad_weight_N = torch.cat(grads_weight) if weight_N is not None else None
        return h_NO, grad_w2, None, None, None, _SwiGLUDown._to_source(ctx, grad_weight_N), None


def swiglu_ffn(x_NH: Tensor, w1_EOH: Tensor, w2_EHF: Tensor, counts_E: Tensor, backend: str,
               cu_offsets_E1: Tensor | None = None, row_weights: RowWeights | None = None) -> Tensor:
    """``down(silu(gate(x)) * up(x))`` per expert over rows sorted by expert; ``counts_E`` rows each
    (``cu_offsets_E1``: 0 then their int32 cumulative sum, if the caller has it).

    ``row_weights`` (optional): each row's routing weight, multiplied into the SwiGLU's output before GEMM 2
    (``y = (w · a) @ down``, which is ``w · (a @ down)``): the combine is then a plain sum over a token's rows and
    keeps nothing for its backward, where a weighted combine keeps ``y`` (``[N, H]``) to take ``w``'s gradient;
    here that gradient comes from the SwiGLU backward's pass, which reads ``a``'s operands anyway."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    groups: Groups
    gemm = "torch"
    if backend == "grouped":
        groups = (cu_offsets_E1 if cu_offsets_E1 is not None
                  else F.pad(torch.cumsum(counts_E, 0, dtype=torch.int32), (1, 0)))
        gemm = grouped_gemm.backend_for(x_NH, w1_EOH, w2_EHF)
    else:
        groups = counts_E.tolist()
    if records_graph(x_NH, w1_EOH, w2_EHF, *([row_weights.source_S] if row_weights is not None else [])):
        num_experts, hidden, width = w2_EHF.shape
        box = None
        if (x_NH.requires_grad and w2_EHF.requires_grad
                and late_down_grad_saves_memory(x_NH.shape[0], num_experts, hidden, width)):
            box = _LateDownGrad(gemm)
            x_NH = _DownGradSink.apply(x_NH, w2_EHF, box)
        weights = row_weights if row_weights is not None else (None, None)
        return _SwiGLUDown.apply(_UpProj.apply(x_NH, w1_EOH, groups, gemm), w2_EHF, groups, gemm, box, *weights)
    h_NO = _matmul_by_expert(x_NH, w1_EOH.transpose(-2, -1), groups, gemm)
    weight_N = row_weights.gather() if row_weights is not None else None
    return _matmul_by_expert(silu_mul_forward(h_NO, weight_N), w2_EHF.transpose(-2, -1), groups, gemm)
