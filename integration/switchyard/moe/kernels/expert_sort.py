"""The (token, k) slots sorted by expert: everything the dispatcher needs to permute, in one call.

    sort_slots_by_expert(expert_TK, keep_TK, num_experts) -> SortedSlots
        slot_order_S    flat slots (t * K + k) in stable order of expert, dropped slots last
        token_idx_S     slot_order_S // K: the source token of each sorted row
        row_of_slot_TK  the sorted row of each slot, -1 where dropped (the inverse permutation)
        bounds_E1       bounds[e] = first sorted row whose expert is >= e (bounds[E] = kept slots)
        cu_offsets_E1   bounds as int32 (a leading 0, then the cumulative row counts): the grouped GEMMs' offsets
        counts_E        kept slots per expert (bounds.diff())

On CUDA a two-launch Triton counting sort (expert_sort_kernels.py); elsewhere, or with the fused kernels
off, ``torch.sort`` (stable) and a binary search. Both give the same integers. The Triton version
exists for the host, not the device: the torch route is ~10 ops plus cub's radix sort, and at the start
of a layer's forward the GPU waits for the host to issue them (docs/performance.md, "Where the time goes").
No host sync on either route.

Tensor suffixes: T tokens, K top-k, S = T * K slots, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from switchyard.moe.kernels.ops import kernel_inputs_ok

try:  # Triton ships with CUDA torch; CPU-only installs (CI) go without it
    from switchyard.moe.kernels import expert_sort_kernels as _sk
except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot initialise here
    _sk = None


class SortedSlots(NamedTuple):
    slot_order_S: torch.Tensor
    token_idx_S: torch.Tensor
    row_of_slot_TK: torch.Tensor
    bounds_E1: torch.Tensor
    cu_offsets_E1: torch.Tensor
    counts_E: torch.Tensor


def sort_slots_torch(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> SortedSlots:
    """The reference route: stable ``torch.sort`` of the bucket ids (int32 keys: half the radix passes)."""
    num_tokens, top_k = expert_TK.shape
    bucket_S = expert_TK.reshape(-1).to(torch.int32)
    if keep_TK is not None:
        bucket_S = torch.where(keep_TK.reshape(-1), bucket_S, torch.full_like(bucket_S, num_experts))
    sorted_bucket_S, slot_order_S = torch.sort(bucket_S, stable=True)
    experts = torch.arange(num_experts + 1, device=bucket_S.device, dtype=torch.int32)
    bounds_E1 = torch.searchsorted(sorted_bucket_S, experts)
    rows_S = torch.arange(slot_order_S.numel(), device=slot_order_S.device)
    row_of_slot_S = torch.empty_like(slot_order_S).scatter_(0, slot_order_S, rows_S)
    if keep_TK is not None:
        row_of_slot_S = torch.where(row_of_slot_S < bounds_E1[-1], row_of_slot_S, torch.full_like(row_of_slot_S, -1))
    token_idx_S = torch.div(slot_order_S, top_k, rounding_mode="floor")
    return SortedSlots(slot_order_S, token_idx_S, row_of_slot_S.view(num_tokens, top_k), bounds_E1,
                       bounds_E1.to(torch.int32), bounds_E1.diff())


def sort_slots_by_expert(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> SortedSlots:
    """The slots of ``expert_TK`` ([T, K] expert ids) sorted by expert; see the module docstring."""
    if _sk is not None and expert_TK.numel() > 0 and kernel_inputs_ok(expert_TK):
        slot_order_S, token_idx_S, row_of_slot_S, *rest = _sk.sort_slots(expert_TK, keep_TK, num_experts)
        return SortedSlots(slot_order_S, token_idx_S, row_of_slot_S.view(expert_TK.shape), *rest)
    return sort_slots_torch(expert_TK, keep_TK, num_experts)
