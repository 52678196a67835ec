"""Triton kernels for small-batch inference: gated-SiLU experts run on the unsorted (token, k) copies.

Imported only where Triton is installed (see routed.py). Two launches replace the sort-based path's
permutation, grouped GEMMs, SwiGLU and combine (~25 small kernels at decode sizes):

    gate/up:          a[r, :] = silu(x[t] @ W1[e, :F].T) * (x[t] @ W1[e, F:].T)      r = t * K + k, e = idx[t, k]
    down + combine:   out[t, :] = sum_k w[t, k] * (a[t * K + k] @ W2[e_tk].T)

Both are GEMVs per copy (CUDA-core FMAs, fp32 accumulators reduced once at the end): at 1–8 tokens the
step is bound by reading each routed expert's weights, not by arithmetic. ``a`` is rounded once to the
weights' dtype; ``out`` once to x's. Copies whose expert is not in ``[first, first + L)`` (another EP
rank's) or whose keep flag is 0 are skipped before any weight address is formed.

Grid order: the copy (or token) index is program_id(0), the fastest-varying one, and the weight tile
program_id(1); programs that read the same tile of the same expert run side by side and share it in
L2 when copies share an expert.

Tensor suffixes: T tokens, K top-k, R = T*K copies, L local experts, H hidden, F expert width, O = 2F.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchyard.moe.kernels.launch import fast_launch

# (BLOCK_F, BLOCK_H, num_warps) of the gate/up kernel and (BLOCK_H, BLOCK_F, num_warps) of the down
# kernel: tiles wide along the contiguous dimension and a few rows deep, so one token still launches
# several programs per SM. Best overall of five candidates each on an H200 (bf16; mixtral, olmoe and
# qwen3 shapes at 1 and 8 tokens; docs/moe-layer.md "Small-batch path").
GATE_UP_BLOCKS = (16, 256, 4)
DOWN_BLOCKS = (4, 512, 4)


@fast_launch
@triton.jit
def _gate_up_kernel(x_ptr, idx_ptr, keep_ptr, w1_ptr, a_ptr, counts_ptr, H, F, first, num_local,
                    stride_x, stride_we, stride_wo, stride_a,
                    K: tl.constexpr, HAS_KEEP: tl.constexpr, COUNT: tl.constexpr,
                    BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0)
    fb = tl.program_id(1)
    expert = tl.load(idx_ptr + r)
    skip = expert < 0  # never true for top-k ids; starts the 0-d flag the other conditions join
    if HAS_KEEP:
        skip = skip | (tl.load(keep_ptr + r) == 0)
    if COUNT:  # kept copies per global expert (every rank's, like the sort path's counts)
        if fb == 0:
            tl.atomic_add(counts_ptr + expert, 1, mask=skip == 0)
    local = expert - first
    skip = skip | (local < 0) | (local >= num_local)
    if skip:
        return
    offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    gate_rows = w1_ptr + local.to(tl.int64) * stride_we + offs_f[:, None] * stride_wo
    up_rows = gate_rows + F * stride_wo
    x_row = x_ptr + (r // K).to(tl.int64) * stride_x
    acc_g = tl.zeros([BLOCK_F, BLOCK_H], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        xv = tl.load(x_row + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
        m = fmask[:, None] & hmask[None, :]
        acc_g += tl.load(gate_rows + offs_h[None, :], mask=m, other=0.0).to(tl.float32) * xv
        acc_u += tl.load(up_rows + offs_h[None, :], mask=m, other=0.0).to(tl.float32) * xv
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + r.to(tl.int64) * stride_a + offs_f, a.to(a_ptr.dtype.element_ty), mask=fmask)


@fast_launch
@triton.jit
def _down_combine_kernel(a_ptr, idx_ptr, keep_ptr, wt_ptr, w2_ptr, out_ptr, H, F, first, num_local,
                         stride_a, stride_we, stride_wh, stride_out,
                         K: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    acc = tl.zeros([BLOCK_H, BLOCK_F], dtype=tl.float32)
    for k in tl.static_range(K):
        r = t * K + k
        local = tl.load(idx_ptr + r) - first
        ok = (local >= 0) & (local < num_local)
        if HAS_KEEP:
            ok = ok & (tl.load(keep_ptr + r) != 0)
        wt = tl.where(ok, tl.load(wt_ptr + r).to(tl.float32), 0.0)
        rows = w2_ptr + tl.where(ok, local, 0).to(tl.int64) * stride_we + offs_h[:, None] * stride_wh
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            fmask = (offs_f < F) & ok  # a skipped copy loads nothing: neither its a row nor weights
            av = tl.load(a_ptr + r * stride_a + offs_f, mask=fmask, other=0.0).to(tl.float32) * wt
            w = tl.load(rows + offs_f[None, :], mask=hmask[:, None] & fmask[None, :], other=0.0)
            acc += w.to(tl.float32) * av[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + t * stride_out + offs_h, out.to(out_ptr.dtype.element_ty), mask=hmask)


def routed_swiglu_combine(x_TH: torch.Tensor, w1_LOH: torch.Tensor, w2_LHF: torch.Tensor, idx_TK: torch.Tensor,
                          weight_TK: torch.Tensor, keep_TK: torch.Tensor | None, first_expert: int,
                          counts_E: torch.Tensor | None) -> torch.Tensor:
    """``out_TH`` (x's dtype); adds each kept copy to ``counts_E[idx]`` when given. Inputs contiguous, T > 0."""
    num_tokens, top_k = idx_TK.shape
    num_local, width2, hidden = w1_LOH.shape
    width = width2 // 2
    assert w1_LOH[0].numel() < 2**31 and w2_LHF[0].numel() < 2**31, "one expert's offsets must fit int32"
    keep = keep_TK.view(torch.uint8) if keep_TK is not None else idx_TK
    a_RF = torch.empty((num_tokens * top_k, width), dtype=w1_LOH.dtype, device=x_TH.device)
    block_f, block_h, warps = GATE_UP_BLOCKS
    _gate_up_kernel[(num_tokens * top_k, triton.cdiv(width, block_f))](
        x_TH, idx_TK, keep, w1_LOH, a_RF, counts_E if counts_E is not None else idx_TK, hidden, width,
        first_expert, num_local, x_TH.stride(0), w1_LOH.stride(0), w1_LOH.stride(1), a_RF.stride(0),
        K=top_k, HAS_KEEP=keep_TK is not None, COUNT=counts_E is not None,
        BLOCK_F=block_f, BLOCK_H=block_h, num_warps=warps)
    out_TH = torch.empty((num_tokens, hidden), dtype=x_TH.dtype, device=x_TH.device)
    block_h, block_f, warps = DOWN_BLOCKS
    _down_combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        a_RF, idx_TK, keep, weight_TK, w2_LHF, out_TH, hidden, width, first_expert, num_local,
        a_RF.stride(0), w2_LHF.stride(0), w2_LHF.stride(1), out_TH.stride(0),
        K=top_k, HAS_KEEP=keep_TK is not None, BLOCK_H=block_h, BLOCK_F=block_f, num_warps=warps)
    return out_TH
