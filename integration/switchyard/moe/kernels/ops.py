"""Autograd ops for the MoE hot path: Triton on CUDA, the same math in PyTorch elsewhere.

    gather_rows(x_TH, token_idx_N, idx_TK)        x_TH[token_idx_N]; backward: each token sums its K
                                                  copies' grads through the inverse map idx_TK (a gather,
                                                  fp32 sum, one rounding) instead of an atomic index_add
    unpermute_combine(y_RH, weight_TK, idx_TK)    out[t] = sum_k weight[t, k] * y[idx[t, k]] in fp32, one
                                                  rounding; backward writes grad_y row by row (no atomics)
                                                  and grad_weight as fp32 dot products
    sum_copies(y_RH, token_idx_R, idx_TK)         out[t] = sum_k y[idx[t, k]] (rows already weighted); its
                                                  backward is the gather grad[token_idx_R]: nothing saved
    silu_mul(h_NO)                                silu(h[:, :F]) * h[:, F:] (SwiGLU) without storing
                                                  silu(gate); backward recomputes it from h

``idx_TK[t, k]`` is the permuted row of token t's k-th copy, -1 where the copy was dropped.

Versus the unfused path (index_add of ``(y * w).to(dtype)``): the same function with fp32 accumulation
over the k copies and one rounding, so bf16 results move by rounding only (they get closer to the fp32
result); fp32 results differ by summation order. No fp32 [R, H] temporaries, no atomics.

Tensor suffixes: T tokens, K top-k, R permuted rows, H hidden, N expert rows, O = 2F, F expert width.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA torch; CPU-only installs (CI) go without it
    from switchyard.moe.kernels import triton_kernels as _tk
except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot initialise here
    _tk = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ENABLED = os.environ.get("SWITCHYARD_FUSED_KERNELS", "1") != "0"


def set_fused_kernels(enabled: bool) -> None:
    """Switch the fused path (these ops, Triton where possible) on or off for the whole process."""
    global _ENABLED
    _ENABLED = bool(enabled)


def fused_kernels_enabled() -> bool:
    return _ENABLED


def triton_available() -> bool:
    return _tk is not None


def kernel_inputs_ok(*tensors: torch.Tensor) -> bool:
    """Fused kernels on, and every tensor on CUDA with a float dtype the Triton kernels take."""
    return (_ENABLED and all(t.is_cuda for t in tensors)
            and all(t.dtype in _KERNEL_DTYPES for t in tensors if t.is_floating_point()))


def _triton_ok(*tensors: torch.Tensor) -> bool:
    return _tk is not None and kernel_inputs_ok(*tensors)


# -- PyTorch fallbacks (the kernels' math) ------------------------------------------------------------------
def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or wider where an input is (float64 stays float64): what the PyTorch fallbacks and the router
    accumulate in, never a downcast."""
    acc = torch.float32
    for d in dtypes:
        acc = torch.promote_types(acc, d)
    return acc


def _gather_sum_torch(src_RH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    num_tokens, top_k = idx_TK.shape
    hidden = src_RH.shape[-1]
    if num_tokens == 0 or src_RH.shape[0] == 0:
        return src_RH.new_zeros((num_tokens, hidden), dtype=out_dtype)
    acc = accumulation_dtype(src_RH.dtype, *([w_TK.dtype] if w_TK is not None else []))
    valid_TK1 = (idx_TK >= 0).unsqueeze(-1)
    rows_TKH = src_RH.index_select(0, idx_TK.clamp_min(0).reshape(-1)).view(num_tokens, top_k, hidden).to(acc)
    if w_TK is not None:
        rows_TKH = rows_TKH * w_TK.to(acc).unsqueeze(-1)
    return rows_TKH.masked_fill(~valid_TK1, 0).sum(1).to(out_dtype)


def _combine_backward_torch(grad_TH: torch.Tensor, y_RH: torch.Tensor, idx_TK: torch.Tensor,
                            w_TK: torch.Tensor, need_w: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_tokens, top_k = idx_TK.shape
    rows, hidden = y_RH.shape
    acc = accumulation_dtype(grad_TH.dtype, y_RH.dtype, w_TK.dtype)
    flat_valid = (idx_TK >= 0).reshape(-1)
    flat_idx = idx_TK.reshape(-1)
    g_T1H = grad_TH.to(acc).unsqueeze(1)
    grad_rows = (g_T1H * w_TK.to(acc).unsqueeze(-1)).to(y_RH.dtype).reshape(num_tokens * top_k, hidden)
    grad_y_RH = y_RH.new_zeros((rows, hidden))
    grad_y_RH.index_copy_(0, flat_idx[flat_valid], grad_rows[flat_valid])
    grad_w_TK = None
    if need_w:
        if rows == 0:
            grad_w_TK = torch.zeros_like(w_TK)
        else:
            y_TKH = y_RH.index_select(0, flat_idx.clamp_min(0)).view(num_tokens, top_k, hidden).to(acc)
            dots_TK = (g_T1H * y_TKH).sum(-1)
            grad_w_TK = dots_TK.masked_fill(~flat_valid.view(num_tokens, top_k), 0).to(w_TK.dtype)
    return grad_y_RH, grad_w_TK


def _gather_sum(src_RH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    tensors = [src_RH, idx_TK] + ([w_TK] if w_TK is not None else [])
    if _triton_ok(*tensors) and idx_TK.shape[0] > 0 and src_RH.shape[0] > 0 and out_dtype in _KERNEL_DTYPES:
        return _tk.gather_sum(src_RH, idx_TK, w_TK, out_dtype)
    return _gather_sum_torch(src_RH, idx_TK, w_TK, out_dtype)


# -- autograd ops -------------------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, token_idx_N: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx_TK)
        return x_TH.index_select(0, token_idx_N)

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):  # type: ignore[override]
        (idx_TK,) = ctx.saved_tensors
        grad_TH = _gather_sum(grad_NH.contiguous(), idx_TK, None, grad_NH.dtype) if ctx.needs_input_grad[0] else None
        return grad_TH, None, None


class _UnpermuteCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RH: torch.Tensor, w_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y_RH, w_TK = y_RH.contiguous(), w_TK.contiguous()
        ctx.save_for_backward(y_RH, w_TK, idx_TK)
        return _gather_sum(y_RH, idx_TK, w_TK, y_RH.dtype)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):  # type: ignore[override]
        y_RH, w_TK, idx_TK = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_y or need_w):
            return None, None, None
        grad_TH = grad_TH.contiguous()
        if (_triton_ok(grad_TH, y_RH, idx_TK, w_TK) and idx_TK.shape[0] > 0 and y_RH.shape[0] > 0):
            grad_y, grad_w = _tk.combine_backward(grad_TH, y_RH, idx_TK, w_TK, need_w)
        else:
            grad_y, grad_w = _combine_backward_torch(grad_TH, y_RH, idx_TK, w_TK, need_w)
        return (grad_y if need_y else None), grad_w, None


class _SumCopies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RH: torch.Tensor, token_idx_R: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(token_idx_R)
        return _gather_sum(y_RH.contiguous(), idx_TK, None, y_RH.dtype)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):  # type: ignore[override]
        (token_idx_R,) = ctx.saved_tensors
        return grad_TH.index_select(0, token_idx_R), None, None


class _SiluMul(torch.autograd.Function):
    """The Triton SwiGLU under autograd: saves ``h`` only (silu(gate) is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, h_NO: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(h_NO)
        return _tk.silu_mul_fwd(h_NO)

    @staticmethod
    def backward(ctx, da_NF: torch.Tensor):  # type: ignore[override]
        (h_NO,) = ctx.saved_tensors
        return _tk.silu_mul_bwd(h_NO, da_NF.contiguous())[0]


def records_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an op on ``tensors``. When not (inference, decode), the ops below
    call their forward directly: ``Function.apply`` costs tens of µs of host time per call, which is a
    visible share of a host-bound decode step (the router and the SwiGLU experts use it the same way)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gather_rows(x_TH: torch.Tensor, token_idx_N: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """``x_TH[token_idx_N]`` whose backward sums each token's copies through ``idx_TK`` (no atomics)."""
    if not records_graph(x_TH):
        return x_TH.index_select(0, token_idx_N)
    return _GatherRows.apply(x_TH, token_idx_N, idx_TK)


def unpermute_combine(y_RH: torch.Tensor, weight_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k weight[t, k] * y[idx[t, k]]`` (fp32 accumulation), in y's dtype."""
    if not records_graph(y_RH, weight_TK):
        return _gather_sum(y_RH.contiguous(), idx_TK, weight_TK.contiguous(), y_RH.dtype)
    return _UnpermuteCombine.apply(y_RH, weight_TK, idx_TK)


def sum_copies(y_RH: torch.Tensor, token_idx_R: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k y[idx[t, k]]`` (fp32 accumulation, in y's dtype) of rows that carry their weights already
    (``token_idx_R[r]``: the token of row r, the inverse of ``idx_TK``)."""
    if not records_graph(y_RH):
        return _gather_sum(y_RH.contiguous(), idx_TK, None, y_RH.dtype)
    return _SumCopies.apply(y_RH, token_idx_R, idx_TK)


def silu_mul_supported(h_NO: torch.Tensor) -> bool:
    return (_triton_ok(h_NO) and h_NO.dim() == 2 and h_NO.shape[0] > 0 and h_NO.shape[1] % 2 == 0
            and h_NO.stride(-1) == 1)


def silu_mul_forward(h_NO: torch.Tensor, row_weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``, times each row's weight ``row_weight_N`` where given (fp32, or float64 with float64
    inputs: the routing weight folded in before GEMM 2): the Triton kernel (no autograd) where it runs, else its
    math in PyTorch (at least fp32: float64 stays float64; one rounding), which autograd can differentiate."""
    if silu_mul_supported(h_NO) and (row_weight_N is None or kernel_inputs_ok(row_weight_N)):
        return _tk.silu_mul_fwd(h_NO, row_weight_N)
    acc = accumulation_dtype(h_NO.dtype, *([row_weight_N.dtype] if row_weight_N is not None else []))
    gate_NF, up_NF = h_NO.to(acc).chunk(2, dim=-1)
    a_NF = F.silu(gate_NF) * up_NF
    if row_weight_N is not None:
        a_NF = a_NF * row_weight_N.to(acc).unsqueeze(-1)
    return a_NF.to(h_NO.dtype)


def silu_mul_backward_(h_NO: torch.Tensor, da_NF: torch.Tensor, product_into_da: bool = False,
                       row_weight_N: torch.Tensor | None = None) -> torch.Tensor | None:
    """SwiGLU's input gradient written over ``h_NO`` (in place, outside autograd).

    For callers whose ``h`` is dead once its gradient exists: the two never take memory side by side.
    ``product_into_da``: in the same pass, write the forward's value (``silu_mul_forward``'s, bit for bit) over
    ``da_NF``, for a caller that needs it after the gradient (GEMM 2's weight gradient): one read of ``h``
    instead of a recompute pass before this one. ``row_weight_N``: the forward was ``w[n] · silu(gate) · up``
    and ``da_NF`` is that product's gradient; returns ``w``'s gradient ``<da[n], silu(gate[n]) · up[n]>``
    in the accumulation dtype (fp32, or float64 with float64 inputs; else None).
    """
    weighted = row_weight_N is not None
    if (silu_mul_supported(h_NO) and h_NO.is_contiguous() and da_NF.is_contiguous()
            and (not weighted or kernel_inputs_ok(row_weight_N))):
        return _tk.silu_mul_bwd(h_NO, da_NF, out=h_NO, a_out=da_NF if product_into_da else None, w_N=row_weight_N)[1]
    acc = accumulation_dtype(h_NO.dtype, da_NF.dtype, *([row_weight_N.dtype] if weighted else []))
    gate_NF, up_NF = h_NO.to(acc).chunk(2, dim=-1)
    sig_NF = torch.sigmoid(gate_NF)
    grad_NF = da_NF.to(acc)
    product_NF = F.silu(gate_NF) * up_NF  # silu_mul_forward's math
    grad_weight_N = None
    if weighted:
        weight_N1 = row_weight_N.to(acc).unsqueeze(-1)
        grad_weight_N = (grad_NF * product_NF).sum(-1)
        grad_NF = grad_NF * weight_N1
        product_NF = product_NF * weight_N1
    d_gate_NF = grad_NF * up_NF * sig_NF * (1.0 + gate_NF * (1.0 - sig_NF))
    d_up_NF = grad_NF * gate_NF * sig_NF
    if product_into_da:
        da_NF.copy_(product_NF)  # and its rounding
    h_NO.copy_(torch.cat([d_gate_NF, d_up_NF], dim=-1))
    return grad_weight_N


def silu_mul(h_NO: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``silu(gate) * up`` of the fused ``[N, 2F]`` projection (gate columns first)."""
    if silu_mul_supported(h_NO) and records_graph(h_NO):
        return _SiluMul.apply(h_NO)
    return silu_mul_forward(h_NO)  # the kernel without a graph to record, or its math in PyTorch (autograd-able)
