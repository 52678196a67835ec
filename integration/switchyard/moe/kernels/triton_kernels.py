"""Triton kernels for the MoE hot path (imported only where Triton is installed; see ops.py).

Every kernel accumulates in fp32 and rounds once to the output dtype. Row indices are the inverse of the
dispatch permutation: ``idx_TK[t, k]`` is the permuted row holding token t's k-th copy, or -1 if that copy
was dropped. Each permuted row belongs to exactly one (t, k), so scattering through ``idx_TK`` writes
every row once: no atomics, deterministic.

Tensor suffixes: T tokens, K top-k, R permuted rows, H hidden, N rows of the expert FFN, F its width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchyard.moe.kernels.launch import fast_launch


@fast_launch
@triton.jit
def _gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, H, stride_src, stride_out,
                       K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    # out[t, :] = sum_k w[t, k] * src[idx[t, k], :]   (idx < 0: skipped)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(idx_ptr + t * K + k).to(tl.int64)
        m = cmask & (row >= 0)
        v = tl.load(src_ptr + row * stride_src + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
        acc += v
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@fast_launch
@triton.jit
def _combine_bwd_kernel(grad_ptr, y_ptr, idx_ptr, w_ptr, grad_y_ptr, part_ptr, H, NHB,
                        stride_g, stride_y, stride_gy,
                        K: tl.constexpr, COMPUTE_GW: tl.constexpr, BLOCK_H: tl.constexpr):
    # grad_y[idx[t, k], :] = w[t, k] * grad[t, :];  part[t, k, hb] = <grad[t, block], y[idx[t, k], block]>
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    g = tl.load(grad_ptr + t * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        row = tl.load(idx_ptr + t * K + k).to(tl.int64)
        m = cmask & (row >= 0)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        tl.store(grad_y_ptr + row * stride_gy + cols, (g * w).to(grad_y_ptr.dtype.element_ty), mask=m)
        if COMPUTE_GW:
            yv = tl.load(y_ptr + row * stride_y + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(part_ptr + (t * K + k) * NHB + hb, tl.sum(g * yv, axis=0))


@fast_launch
@triton.jit
def _silu_mul_fwd_kernel(h_ptr, w_ptr, a_ptr, F, stride_h, stride_a, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    # a[n, :] = silu(h[n, :F]) * h[n, F:]  (HAS_W: times the row's weight w[n], fp32)
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(h_ptr + r * stride_h + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r * stride_h + F + cols, mask=m, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    if HAS_W:
        a = a * tl.load(w_ptr + r).to(tl.float32)
    tl.store(a_ptr + r * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=m)


@fast_launch
@triton.jit
def _silu_mul_bwd_kernel(h_ptr, da_ptr, dh_ptr, a_ptr, w_ptr, dw_ptr, F, NB, stride_h, stride_da, stride_dh,
                         stride_a, WRITE_A: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    # dh = d(silu(gate) * up) / d(gate, up) · da;  WRITE_A: also a = silu(gate) * up (the forward's value).
    # HAS_W (the forward was w[n] * silu(gate) * up): ``da`` is that product's gradient; this block's share of
    # d w[n] = <da, silu(gate) * up> goes to dw[n, block], the gate/up gradient takes w[n] * da, and WRITE_A
    # writes the weighted product (the forward's value again)
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(h_ptr + r * stride_h + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r * stride_h + F + cols, mask=m, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + r * stride_da + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    if HAS_W:
        w = tl.load(w_ptr + r).to(tl.float32)
        tl.store(dw_ptr + r * NB + tl.program_id(1), tl.sum(da * (g * sig * u), axis=0))
        da = da * w
    dg = da * u * sig * (1.0 + g * (1.0 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
    du = da * g * sig
    tl.store(dh_ptr + r * stride_dh + cols, dg.to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dh_ptr + r * stride_dh + F + cols, du.to(dh_ptr.dtype.element_ty), mask=m)
    if WRITE_A:
        a = g * tl.sigmoid(g) * u  # the forward kernel's expression: the same bits
        if HAS_W:
            a = a * w
        tl.store(a_ptr + r * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=m)


def _block(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(n, 16)))


def gather_sum(src_RH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    num_tokens, top_k = idx_TK.shape
    hidden = src_RH.shape[1]
    out_TH = torch.empty((num_tokens, hidden), dtype=out_dtype, device=src_RH.device)
    block = _block(hidden, 1024)
    grid = (num_tokens, triton.cdiv(hidden, block))
    _gather_sum_kernel[grid](src_RH, idx_TK, w_TK if w_TK is not None else src_RH, out_TH, hidden,
                             src_RH.stride(0), out_TH.stride(0), K=top_k, HAS_W=w_TK is not None,
                             BLOCK_H=block, num_warps=4)
    return out_TH


def combine_backward(grad_TH: torch.Tensor, y_RH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor,
                     need_w: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_tokens, top_k = idx_TK.shape
    rows, hidden = y_RH.shape
    block = _block(hidden, 1024)
    nhb = triton.cdiv(hidden, block)
    grad_y_RH = torch.empty((rows, hidden), dtype=y_RH.dtype, device=y_RH.device)  # every row written once
    part_TKB = torch.empty((num_tokens, top_k, nhb) if need_w else (1,), dtype=torch.float32, device=y_RH.device)
    _combine_bwd_kernel[(num_tokens, nhb)](grad_TH, y_RH, idx_TK, w_TK, grad_y_RH, part_TKB, hidden, nhb,
                                           grad_TH.stride(0), y_RH.stride(0), grad_y_RH.stride(0),
                                           K=top_k, COMPUTE_GW=need_w, BLOCK_H=block, num_warps=4)
    grad_w_TK = part_TKB.sum(-1).to(w_TK.dtype) if need_w else None
    return grad_y_RH, grad_w_TK


def silu_mul_fwd(h_NO: torch.Tensor, w_N: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``, times each row's weight ``w_N`` (fp32) where given."""
    rows, width = h_NO.shape[0], h_NO.shape[1] // 2
    a_NF = torch.empty((rows, width), dtype=h_NO.dtype, device=h_NO.device)
    block = _block(width, 2048)
    _silu_mul_fwd_kernel[(rows, triton.cdiv(width, block))](h_NO, w_N if w_N is not None else h_NO, a_NF, width,
                                                            h_NO.stride(0), a_NF.stride(0), HAS_W=w_N is not None,
                                                            BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return a_NF


def silu_mul_bwd(h_NO: torch.Tensor, da_NF: torch.Tensor, out: torch.Tensor | None = None,
                 a_out: torch.Tensor | None = None, w_N: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``dh_NO``, the row weights' fp32 gradient or None). ``out`` may be ``h_NO`` itself and ``a_out``
    ``da_NF`` itself: each program reads its elements of h and da before writing the same ones. ``a_out``
    (optional) receives the forward's value (``silu(gate) * up``, times ``w_N`` where given)."""
    rows, width = da_NF.shape
    dh_NO = torch.empty_like(h_NO) if out is None else out
    a_NF = a_out if a_out is not None else da_NF  # not written without a_out
    block = _block(width, 2048)
    blocks = triton.cdiv(width, block)
    dw_NB = torch.empty((rows, blocks), dtype=torch.float32, device=h_NO.device) if w_N is not None else None
    _silu_mul_bwd_kernel[(rows, blocks)](h_NO, da_NF, dh_NO, a_NF, w_N if w_N is not None else h_NO,
                                         dw_NB if dw_NB is not None else h_NO, width, blocks, h_NO.stride(0),
                                         da_NF.stride(0), dh_NO.stride(0), a_NF.stride(0), WRITE_A=a_out is not None,
                                         HAS_W=w_N is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    if dw_NB is None:
        return dh_NO, None
    return dh_NO, (dw_NB.view(-1) if blocks == 1 else dw_NB.sum(1))
