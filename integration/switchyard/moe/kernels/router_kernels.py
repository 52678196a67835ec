"""Triton: a softmax top-k router's forward in one launch (logits GEMM, softmax, top-k, renormalisation).

    out: logits_TE (fp32), scores_TE = softmax(logits) (fp32), idx_TK (int64, by descending score, ties to
    the lower expert id), weight_TK (fp32: the top-k scores, divided by their sum when NORMALIZE, times scale)

Each program takes BLOCK_T tokens: the logits are a bf16/fp16 ``tl.dot`` with fp32 accumulation (the
products are exact in fp32), then the softmax and K rounds of arg-max in registers. Imported only where
Triton is installed (see router_fused.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchyard.moe.kernels.launch import fast_launch


@fast_launch
@triton.jit
def _softmax_topk_kernel(x_ptr, w_ptr, logits_ptr, scores_ptr, idx_ptr, weight_ptr, T, H, E, stride_x,
                         stride_w, scale, K: tl.constexpr, KP: tl.constexpr, NORMALIZE: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        x = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + hs[:, None], mask=cmask[None, :] & hmask[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    out_mask = rmask[:, None] & cmask[None, :]
    tl.store(logits_ptr + rows[:, None] * E + cols[None, :], acc, mask=out_mask)

    logits = tl.where(cmask[None, :], acc, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    scores = p / tl.sum(p, axis=1)[:, None]
    tl.store(scores_ptr + rows[:, None] * E + cols[None, :], scores, mask=out_mask)

    left = tl.where(cmask[None, :], scores, -1.0)  # scores are >= 0: -1 marks padding and taken experts
    kcols = tl.arange(0, KP)
    top_val = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    top_idx = tl.zeros([BLOCK_T, KP], dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.max(left, axis=1)
        best_idx = tl.min(tl.where(left == best[:, None], cols[None, :], BLOCK_E), axis=1)
        top_val = tl.where(kcols[None, :] == k, best[:, None], top_val)
        top_idx = tl.where(kcols[None, :] == k, best_idx[:, None].to(tl.int64), top_idx)
        left = tl.where(cols[None, :] == best_idx[:, None], -1.0, left)
    if NORMALIZE:
        top_val = top_val / tl.sum(top_val, axis=1)[:, None]  # padding columns hold 0
    top_val = top_val * scale
    k_mask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], top_idx, mask=k_mask)
    tl.store(weight_ptr + rows[:, None] * K + kcols[None, :], top_val, mask=k_mask)


def softmax_topk(x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int, normalize: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits_TE, scores_TE, idx_TK, weight_TK) of ``x_TH`` ([T, H], unit stride in H) routed by ``weight_EH``."""
    num_tokens, hidden = x_TH.shape
    num_experts = weight_EH.shape[0]
    device = x_TH.device
    logits = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=device)
    scores = torch.empty_like(logits)
    idx = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)
    weight = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_t = 64 if block_e <= 128 else 32
    _softmax_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        x_TH, weight_EH, logits, scores, idx, weight, num_tokens, hidden, num_experts, x_TH.stride(0),
        weight_EH.stride(0), float(scale), K=top_k, KP=max(2, triton.next_power_of_2(top_k)), NORMALIZE=normalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=64, num_warps=4 if block_e <= 64 else 8)
    return logits, scores, idx, weight


@fast_launch
@triton.jit
def _softmax_topk_bwd_kernel(scores_ptr, idx_ptr, weight_ptr, gs_ptr, gw_ptr, gl_ptr, out_ptr, T, E, scale,
                             K: tl.constexpr, KP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GS: tl.constexpr,
                             HAS_GW: tl.constexpr, HAS_GL: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_E: tl.constexpr):
    # the logits' gradient of (logits, scores, weight) from the forward above, one row of E per token:
    #   g_s = grad_scores + scatter(idx, d weight / d scores · grad_weight);  g_l = s * (g_s - <g_s, s>) + grad_logits
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_E)
    mask = rmask[:, None] & (cols < E)[None, :]
    offs = rows[:, None] * E + cols[None, :]
    s = tl.load(scores_ptr + offs, mask=mask, other=0.0)
    if HAS_GS:
        g_s = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g_s = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_GW:
        kcols = tl.arange(0, KP)
        kmask = rmask[:, None] & (kcols < K)[None, :]
        koffs = rows[:, None] * K + kcols[None, :]
        idx = tl.load(idx_ptr + koffs, mask=kmask, other=-1)
        g_w = tl.load(gw_ptr + koffs, mask=kmask, other=0.0).to(tl.float32) * scale
        if NORMALIZE:  # w_k = scale * s_k / S:  d/ds_k = (g_k - sum_j g_j w_j / scale) / S
            share = tl.load(weight_ptr + koffs, mask=kmask, other=0.0) / scale
            chosen = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k in tl.static_range(K):
                idx_k = tl.sum(tl.where(kcols[None, :] == k, idx, 0), axis=1)
                chosen += tl.sum(tl.where(cols[None, :] == idx_k[:, None], s, 0.0), axis=1)
            g_w = (g_w - tl.sum(g_w * share, axis=1)[:, None]) / chosen[:, None]
        for k in tl.static_range(K):
            idx_k = tl.sum(tl.where(kcols[None, :] == k, idx, 0), axis=1)
            g_k = tl.sum(tl.where(kcols[None, :] == k, g_w, 0.0), axis=1)
            g_s += tl.where(cols[None, :] == idx_k[:, None], g_k[:, None], 0.0)
    g_l = s * (g_s - tl.sum(g_s * s, axis=1)[:, None])
    if HAS_GL:
        g_l += tl.load(gl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, g_l.to(out_ptr.dtype.element_ty), mask=mask)


def softmax_topk_backward(scores_TE: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                          grad_scores_TE: torch.Tensor | None, grad_weight_TK: torch.Tensor | None,
                          grad_logits_TE: torch.Tensor | None, normalize: bool, scale: float,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """The logits' gradient ``[T, E]`` in ``out_dtype`` (the input's 16-bit dtype for the two GEMMs that follow),
    from the gradients of the forward's three differentiable outputs (each may be None)."""
    num_tokens, num_experts = scores_TE.shape
    top_k = idx_TK.shape[1]
    out = torch.empty((num_tokens, num_experts), dtype=out_dtype, device=scores_TE.device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_t = 64 if block_e <= 128 else 32
    dummy = scores_TE  # never read where its flag is off
    _softmax_topk_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        scores_TE, idx_TK, weight_TK,
        grad_scores_TE.contiguous() if grad_scores_TE is not None else dummy,
        grad_weight_TK.contiguous() if grad_weight_TK is not None else dummy,
        grad_logits_TE.contiguous() if grad_logits_TE is not None else dummy,
        out, num_tokens, num_experts, float(scale), K=top_k, KP=max(2, triton.next_power_of_2(top_k)),
        NORMALIZE=normalize, HAS_GS=grad_scores_TE is not None, HAS_GW=grad_weight_TK is not None,
        HAS_GL=grad_logits_TE is not None, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4 if block_e <= 64 else 8)
    return out
