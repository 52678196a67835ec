"""The integers of the EP exchange: split sizes from the exchanged counts, and the regroup permutation.

    plan_counts(send_E, recv_E, ep) -> CountPlan
        splits_2R        [rows sent to, rows received from] each EP rank (device; the host reads it once)
        per_local_L      rows this rank's experts receive, per local expert
        local_cu_offsets_L1  0, then their int32 cumulative sum: the grouped GEMMs' offsets
        src_start_C      first received row of each (source rank, local expert) chunk, as the all-to-all
                         delivers them (source-major)
        shift_C          each chunk's start in (local expert, source) order minus ``src_start_C``
    regroup_index(plan, rows) -> (dest_M, regroup_M)
        dest_M           the expert-major row of each received row (row + its chunk's shift)
        regroup_M        its inverse: the received row of each expert-major row

On CUDA each is one Triton launch (ep_regroup_kernels.py); elsewhere, or with the fused kernels off, the
same integers from ~15 PyTorch ops. The kernels exist for the host, as the slot sort's do: at ep > 1 the
device waits for the host between the count exchange and the all-to-all, and each small op costs the host
tens of microseconds (docs/performance.md, "Expert-parallel scaling").

Suffixes: E global experts (= R * L), R EP ranks, L local experts, C = R * L chunks, M received rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from switchyard.moe.kernels.ops import kernel_inputs_ok

try:  # Triton ships with CUDA torch; CPU-only installs (CI) go without it
    from switchyard.moe.kernels import ep_regroup_kernels as _rk
except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot initialise here
    _rk = None


class CountPlan(NamedTuple):
    splits_2R: torch.Tensor
    per_local_L: torch.Tensor
    local_cu_offsets_L1: torch.Tensor
    src_start_C: torch.Tensor
    shift_C: torch.Tensor
    recv_C: torch.Tensor  # the exchanged counts, (source, local expert) order


def plan_counts_torch(send_E: torch.Tensor, recv_E: torch.Tensor, ep: int) -> CountPlan:
    """The reference route (CPU, and the GPU test's oracle)."""
    send_RL, recv_RL = send_E.view(ep, -1), recv_E.view(ep, -1)
    splits_2R = torch.stack([send_RL.sum(1), recv_RL.sum(1)])
    per_local_L = recv_RL.sum(0)
    src_start_C = torch.cumsum(recv_E, 0) - recv_E
    recv_LR = recv_RL.t().reshape(-1)
    expert_major_start_LR = (torch.cumsum(recv_LR, 0) - recv_LR).view(recv_RL.shape[1], ep)
    shift_C = expert_major_start_LR.t().reshape(-1) - src_start_C
    cu_offsets_L1 = torch.cat([per_local_L.new_zeros(1), torch.cumsum(per_local_L, 0)]).to(torch.int32)
    return CountPlan(splits_2R, per_local_L, cu_offsets_L1, src_start_C, shift_C, recv_E)


def regroup_index_torch(plan: CountPlan, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    row_M = torch.arange(rows, device=plan.shift_C.device)
    dest_M = row_M + torch.repeat_interleave(plan.shift_C, plan.recv_C, output_size=rows)
    return dest_M, torch.empty_like(dest_M).scatter_(0, dest_M, row_M)


def plan_counts(send_E: torch.Tensor, recv_E: torch.Tensor, ep: int) -> CountPlan:
    """Split sizes, per-local-expert counts and offsets, and the chunk shifts; see the module docstring."""
    if _rk is not None and kernel_inputs_ok(recv_E):
        return CountPlan(*_rk.plan_counts(send_E, recv_E, ep), recv_E)
    return plan_counts_torch(send_E, recv_E, ep)


def regroup_index(plan: CountPlan, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dest_M, regroup_M)`` for ``rows`` received rows (the sum of ``plan.recv_C``)."""
    if _rk is not None and rows > 0 and kernel_inputs_ok(plan.shift_C):
        return _rk.regroup_index(plan.src_start_C, plan.shift_C, rows)
    return regroup_index_torch(plan, rows)
