"""Triton counting sort of the (token, k) slots by expert: two launches instead of ~10 ops and cub's sort.

    _slot_hist_kernel    per block of BLOCK slots: histogram of its bucket ids
    _slot_place_kernel   per block: each bucket's global start (the histograms of every block, summed),
                         the slots sorted within the block by (bucket, slot), each written to its place

Buckets: expert id for a kept slot, E for a dropped one, PAD = NB - 1 (> E) for lanes past the end. The
result is the stable sort by bucket (blocks in order; inside a block, sorted by slot), so it equals
``torch.sort(bucket, stable=True)`` bit for bit, and the run is deterministic (no atomics).

Imported only where Triton is installed (see expert_sort.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchyard.moe.kernels.launch import fast_launch


@triton.jit
def _bucket(expert_ptr, keep_ptr, offs, n, E, HAS_KEEP: tl.constexpr, NB: tl.constexpr):
    m = offs < n
    bucket = tl.load(expert_ptr + offs, mask=m, other=0).to(tl.int32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offs, mask=m, other=0)
        bucket = tl.where(keep != 0, bucket, E)
    return tl.where(m, bucket, NB - 1)


@fast_launch
@triton.jit
def _slot_hist_kernel(expert_ptr, keep_ptr, hist_ptr, n, E,
                      HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)
    bucket = _bucket(expert_ptr, keep_ptr, pid * BLOCK + tl.arange(0, BLOCK), n, E, HAS_KEEP, NB)
    tl.store(hist_ptr + pid * NB + tl.arange(0, NB), tl.histogram(bucket, NB))


@fast_launch
@triton.jit
def _slot_place_kernel(expert_ptr, keep_ptr, hist_ptr, adj_ptr, slot_order_ptr, token_ptr, row_of_slot_ptr,
                       bounds_ptr, offsets_ptr, counts_ptr, n, E, num_blocks, top_k,
                       HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, NB)
    total = tl.zeros([NB], dtype=tl.int32)  # slots per bucket, all blocks
    before = tl.zeros([NB], dtype=tl.int32)  # slots per bucket in the blocks before this one
    for b0 in range(0, num_blocks, CHUNK):
        rows = b0 + tl.arange(0, CHUNK)
        tile = tl.load(hist_ptr + rows[:, None] * NB + cols[None, :], mask=(rows < num_blocks)[:, None], other=0)
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((rows < pid)[:, None], tile, 0), axis=0)
    start = tl.cumsum(total, axis=0) - total  # first sorted position of each bucket
    own = tl.load(hist_ptr + pid * NB + cols)
    # sorted position p inside this block, bucket b  ->  start[b] + before[b] + (p - own_start[b])
    tl.store(adj_ptr + pid * NB + cols, start + before - (tl.cumsum(own, axis=0) - own))
    if pid == 0:
        tl.store(bounds_ptr + cols, start.to(tl.int64), mask=cols <= E)
        tl.store(offsets_ptr + cols, start, mask=cols <= E)  # bounds as int32
        tl.store(counts_ptr + cols, total.to(tl.int64), mask=cols < E)
    tl.debug_barrier()  # adj is read back below by other threads of this program

    lane = tl.arange(0, BLOCK)
    bucket = _bucket(expert_ptr, keep_ptr, pid * BLOCK + lane, n, E, HAS_KEEP, NB)
    packed = tl.sort(bucket * BLOCK + lane)  # by (bucket, slot): stable within the block
    sorted_bucket = packed // BLOCK
    real = sorted_bucket < NB - 1
    dest = tl.load(adj_ptr + pid * NB + sorted_bucket, mask=real, other=0) + lane
    dest = dest.to(tl.int64)
    slot = (pid * BLOCK + packed % BLOCK).to(tl.int64)
    tl.store(slot_order_ptr + dest, slot, mask=real)
    tl.store(token_ptr + dest, slot // top_k, mask=real)
    tl.store(row_of_slot_ptr + slot, tl.where(sorted_bucket < E, dest, -1), mask=real)


def sort_slots(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int
               ) -> tuple[torch.Tensor, ...]:
    """(slot_order_S, token_idx_S, row_of_slot_S, bounds_E1, cu_offsets_E1, counts_E); see expert_sort.py."""
    num_slots = expert_TK.numel()
    top_k = expert_TK.shape[-1]
    device = expert_TK.device
    block = 1024 if num_slots <= (1 << 18) else 4096
    num_blocks = triton.cdiv(num_slots, block)
    nb = triton.next_power_of_2(num_experts + 2)  # experts, the dropped bucket, the padding bucket
    hist = torch.empty((num_blocks, nb), dtype=torch.int32, device=device)
    adj = torch.empty((num_blocks, nb), dtype=torch.int32, device=device)
    slot_order = torch.empty(num_slots, dtype=torch.int64, device=device)
    token_idx = torch.empty(num_slots, dtype=torch.int64, device=device)
    row_of_slot = torch.empty(num_slots, dtype=torch.int64, device=device)
    bounds = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    experts_flat = expert_TK.reshape(-1)
    keep_flat = keep_TK.reshape(-1) if keep_TK is not None else experts_flat
    warps = 4 if block == 1024 else 16
    _slot_hist_kernel[(num_blocks,)](experts_flat, keep_flat, hist, num_slots, num_experts,
                                     HAS_KEEP=keep_TK is not None, BLOCK=block, NB=nb, num_warps=warps)
    _slot_place_kernel[(num_blocks,)](experts_flat, keep_flat, hist, adj, slot_order, token_idx, row_of_slot,
                                      bounds, offsets, counts, num_slots, num_experts, num_blocks, top_k,
                                      HAS_KEEP=keep_TK is not None, BLOCK=block, NB=nb,
                                      CHUNK=max(1, min(16, 4096 // nb)), num_warps=warps)
    return slot_order, token_idx, row_of_slot, bounds, offsets, counts
