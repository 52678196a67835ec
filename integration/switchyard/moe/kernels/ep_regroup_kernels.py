"""Triton kernels for the EP exchange's integers (see ep_regroup.py): two launches instead of ~15 small ops.

    _plan_counts_kernel     one program: the [R, L] sent and received counts as 2-D tiles; row and column
                            sums, and the two exclusive prefix sums (source-major and expert-major) of the
                            received chunks
    _regroup_index_kernel   per block of received rows: its chunk by binary search over the chunk starts,
                            the expert-major row, and the inverse written at that row

Integers only, no atomics: the result equals the PyTorch route's exactly. Imported only where Triton is
installed (see ep_regroup.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchyard.moe.kernels.launch import fast_launch


@fast_launch
@triton.jit
def _plan_counts_kernel(send_ptr, recv_ptr, splits_ptr, per_local_ptr, offsets_ptr, src_start_ptr, shift_ptr,
                        R, L, R_P: tl.constexpr, L_P: tl.constexpr):
    r = tl.arange(0, R_P)[:, None]
    c = tl.arange(0, L_P)[None, :]
    inside = (r < R) & (c < L)
    send = tl.load(send_ptr + r * L + c, mask=inside, other=0).to(tl.int64)
    recv = tl.load(recv_ptr + r * L + c, mask=inside, other=0).to(tl.int64)
    sent_R = tl.sum(send, axis=1)
    received_R = tl.sum(recv, axis=1)
    per_local_L = tl.sum(recv, axis=0)
    ranks, locals_ = tl.arange(0, R_P), tl.arange(0, L_P)
    tl.store(splits_ptr + ranks, sent_R, mask=ranks < R)
    tl.store(splits_ptr + R + ranks, received_R, mask=ranks < R)
    tl.store(per_local_ptr + locals_, per_local_L, mask=locals_ < L)
    tl.store(offsets_ptr + locals_, tl.zeros([L_P], dtype=tl.int32), mask=locals_ == 0)  # a leading 0
    tl.store(offsets_ptr + 1 + locals_, tl.cumsum(per_local_L, axis=0).to(tl.int32), mask=locals_ < L)
    # chunk (r, l) starts, as delivered: every row of the ranks before r, then r's chunks before l
    src_start = (tl.cumsum(received_R, axis=0) - received_R)[:, None] + tl.cumsum(recv, axis=1) - recv
    # and as the experts want them: every row of the experts before l, then l's chunks from ranks before r
    expert_start = (tl.cumsum(per_local_L, axis=0) - per_local_L)[None, :] + tl.cumsum(recv, axis=0) - recv
    tl.store(src_start_ptr + r * L + c, src_start, mask=inside)
    tl.store(shift_ptr + r * L + c, expert_start - src_start, mask=inside)


@fast_launch
@triton.jit
def _regroup_index_kernel(src_start_ptr, shift_ptr, dest_ptr, regroup_ptr, rows, C,
                          C_P: tl.constexpr, LOG_C: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = m < rows
    m = m.to(tl.int64)
    # the last chunk starting at or before m (empty chunks share the next one's start and lose to it)
    chunk = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(LOG_C):
        cand = chunk + (C_P >> (i + 1))
        start = tl.load(src_start_ptr + cand, mask=valid & (cand < C), other=0)
        chunk = tl.where((cand < C) & (start <= m), cand, chunk)
    dest = m + tl.load(shift_ptr + chunk, mask=valid, other=0)
    tl.store(dest_ptr + m, dest, mask=valid)
    tl.store(regroup_ptr + dest, m, mask=valid)


def plan_counts(send_E: torch.Tensor, recv_E: torch.Tensor, ep: int) -> tuple[torch.Tensor, ...]:
    """(splits_2R, per_local_L, local_cu_offsets_L1, src_start_C, shift_C); see ep_regroup.py."""
    num_local = recv_E.numel() // ep
    device = recv_E.device
    splits = torch.empty((2, ep), dtype=torch.int64, device=device)
    per_local = torch.empty(num_local, dtype=torch.int64, device=device)
    offsets = torch.empty(num_local + 1, dtype=torch.int32, device=device)
    src_start = torch.empty(recv_E.numel(), dtype=torch.int64, device=device)
    shift = torch.empty(recv_E.numel(), dtype=torch.int64, device=device)
    _plan_counts_kernel[(1,)](send_E, recv_E, splits, per_local, offsets, src_start, shift, ep, num_local,
                              R_P=triton.next_power_of_2(ep), L_P=triton.next_power_of_2(num_local))
    return splits, per_local, offsets, src_start, shift


def regroup_index(src_start_C: torch.Tensor, shift_C: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = src_start_C.numel()
    c_p = triton.next_power_of_2(chunks)
    dest = torch.empty(rows, dtype=torch.int64, device=shift_C.device)
    regroup = torch.empty_like(dest)
    block = 1024
    _regroup_index_kernel[(triton.cdiv(rows, block),)](src_start_C, shift_C, dest, regroup, rows, chunks,
                                                       C_P=c_p, LOG_C=c_p.bit_length() - 1, BLOCK=block)
    return dest, regroup
