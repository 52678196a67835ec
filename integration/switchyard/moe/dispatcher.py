"""Token dispatch: permute token copies by expert, move them to the EP rank owning the expert, and back.

    dispatch:  x_TH ──gather by slot──▶ x_NH (sorted by global expert)
               ──all-to-all (ep>1)──▶ rows from every source rank ──regroup──▶ x_MH (by local expert)
    combine:   y_MH ──regroup⁻¹──▶ ──all-to-all⁻¹──▶ y_NH ──gather by slot, Σ_k weight·row──▶ out_TH

The SwiGLU experts can take each row's weight themselves (``dispatch(..., weight_TK)`` hands them
``plan.row_weights``; the layer decides): the combine is then Σ_k row, whose backward is a gather and keeps
nothing. At ep > 1 the weights cross in an all-to-all of their own, right after the rows' (``all_to_all``'s
``after``).

The local permutation has no host sync: the slots are sorted by expert and counted in one call
(``sort_slots_by_expert``: a two-launch Triton counting sort on CUDA, ``torch.sort`` and a binary search
elsewhere; ``torch.bincount`` would read its max back to the host on CUDA). With the fused kernels on (default;
``SWITCHYARD_FUSED_KERNELS=0`` or ``switchyard.moe.kernels.set_fused_kernels(False)`` for the unfused
path) both directions go through ``row_of_slot_TK``, the inverse of the sort: the gather's backward and
the combine are per-token gathers with fp32 sums over the K copies (Triton on CUDA), so no atomics, no
fp32 [N, H] temporaries, and deterministic results.

Serving replicates the tokens on every EP rank (each rank runs the same dense layers on the same
batch). ``dispatch_replicated`` then keeps only the copies bound for this rank's experts, and
``combine`` ends in one all-reduce over the EP group instead of two all-to-alls: no split sizes cross
to the host, so the whole step can be captured in a CUDA graph. Inference only (no backward).

Experts are laid out in contiguous blocks per EP rank (expert e lives on rank e // E_local), so
after sorting by global expert id the rows bound for each rank are contiguous and the all-to-all
needs no extra permutation on the send side. Dropped (over-capacity) slots are simply never
gathered. Every step is differentiable; both all-to-alls have the swapped all-to-all as backward.

Tensor suffixes:
    T tokens on this rank    K top-k    E global experts    L local experts (E // ep)
    N token copies this rank sends    M token copies this rank's experts receive    H hidden
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from switchyard.moe.kernels import fused_kernels_enabled, gather_rows, sum_copies, unpermute_combine
from switchyard.moe.kernels.ep_regroup import CountPlan, plan_counts, regroup_index
from switchyard.moe.kernels.expert_sort import sort_slots_by_expert
from switchyard.moe.swiglu_ffn import RowWeights
from switchyard.parallel.all_to_all import all_to_all, all_to_all_start, exchange_counts


@dataclass
class DispatchPlan:
    """Everything ``combine`` needs to undo ``dispatch``."""

    num_tokens: int
    slot_order_N: torch.Tensor  # flat slot (t * K + k) of each sent row, sorted by expert
    token_idx_N: torch.Tensor  # source token of each sent row
    tokens_per_expert_E: torch.Tensor  # rows this rank routes to each global expert (kept only)
    tokens_per_local_expert_L: torch.Tensor  # rows this rank's experts receive, per local expert
    local_cu_offsets_L1: torch.Tensor | None = None  # 0, then their int32 cumulative sum (the grouped GEMMs' offsets)
    input_splits: list[int] | None = None  # rows sent to each EP rank
    output_splits: list[int] | None = None  # rows received from each EP rank
    regroup_M: torch.Tensor | None = None  # received (source-major) row for each local-expert-major row
    dest_M: torch.Tensor | None = None  # its inverse: local-expert-major row of each received row
    row_of_slot_TK: torch.Tensor | None = None  # sent row of each slot (t, k), -1 if dropped (fused path)
    replicated: bool = False  # every EP rank holds the same tokens: combine all-reduces partial sums
    overlap_out: torch.Tensor | None = None  # what dispatch's ``overlap`` returned
    row_weights: RowWeights | None = None  # each received row's routing weight, where dispatch carried them


# codes for the row format each rank announces in the count exchange (same torch on every rank: same order)
_FLOAT_DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point},
                             key=str))


class _CountExchange(NamedTuple):
    plan: CountPlan  # split sizes, per-local-expert counts and offsets, chunk shifts (device)
    # [rows sent to, rows received from, row dtype code, row width] per EP rank (host, once ``ready``)
    splits_4R: torch.Tensor
    ready: "torch.cuda.Event | None"  # recorded after the copy to the host (None on CPU)


def permute_rows(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in the order ``src``, a permutation whose inverse is ``dst``: the dispatch gather with one
    copy per row, so the backward is the gather ``grad[dst]`` too (``index_select``'s own backward zero-fills
    and scatter-adds with atomics)."""
    return gather_rows(x, src, dst.view(-1, 1))


class TokenDispatcher:
    """Moves token copies between the ranks of one expert-parallel group (or stays local)."""

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup | None = None) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep_size}: choose an "
                f"ep dividing {num_experts}"
            )
        self.num_local_experts = num_experts // self.ep_size
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0

    def __deepcopy__(self, memo: dict[int, Any]) -> "TokenDispatcher":
        """A copy (a model deep-copied for an EMA or a reference model) shares the process group: a communicator
        of this job, which cannot be copied (``ProcessGroup`` does not pickle)."""
        if self.ep_group is not None:
            memo[id(self.ep_group)] = self.ep_group
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def dispatch(
        self, x_TH: torch.Tensor, expert_TK: torch.Tensor, keep_TK: torch.Tensor | None = None,
        overlap: Callable[[], torch.Tensor] | None = None, weight_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DispatchPlan]:
        """Token copies for this rank's local experts, grouped by local expert, and the plan to undo it.

        ``overlap`` (work independent of the routed path, e.g. a shared expert) runs while the all-to-all
        is in flight (at ep = 1 right away); its result comes back as ``plan.overlap_out``. ``weight_TK``
        (optional): the routing weights, carried to the received rows as ``plan.row_weights`` on the fused path
        (else None there: the combine weights the rows)."""
        num_tokens, top_k = expert_TK.shape
        if not fused_kernels_enabled():
            return self._dispatch_unfused(x_TH, expert_TK, keep_TK, overlap)
        slot_order, token_idx, row_of_slot_TK, bounds, cu_offsets_E1, tokens_per_expert_E = sort_slots_by_expert(
            expert_TK, keep_TK, self.num_experts)
        counts = self._exchange_counts(tokens_per_expert_E, x_TH) if self.ep_size > 1 else None
        if keep_TK is not None:  # dropped slots sorted after every real expert: cut off (one host sync)
            kept = int(bounds[-1])
            slot_order, token_idx = slot_order[:kept], token_idx[:kept]
        x_NH = gather_rows(x_TH, token_idx, row_of_slot_TK)
        plan = DispatchPlan(num_tokens, slot_order, token_idx, tokens_per_expert_E, tokens_per_expert_E,
                            row_of_slot_TK=row_of_slot_TK)
        if counts is None:
            plan.local_cu_offsets_L1 = cu_offsets_E1
            plan.overlap_out = overlap() if overlap is not None else None
            if weight_TK is not None:  # gathered by the experts, after their GEMM 1 is issued (swiglu_ffn.py)
                plan.row_weights = RowWeights(weight_TK.reshape(-1), slot_order)
            return x_NH, plan
        return self._exchange(x_NH, plan, counts, overlap, weight_TK)

    def dispatch_replicated(
        self, x_TH: torch.Tensor, expert_TK: torch.Tensor, keep_TK: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DispatchPlan]:
        """Copies bound for this rank's experts when every EP rank holds the same ``x_TH`` (serving).

        Sorted by global expert, this rank's copies form one block; rotating the sorted order to start
        at that block puts them in rows ``[0, n_local)`` without reading ``n_local`` on the host. While a
        CUDA graph is captured all ``T*K`` rows are kept (the rest are never combined: their slots map to
        -1); otherwise the rows are cut to ``n_local`` (one sync, free on CPU).
        """
        num_tokens, top_k = expert_TK.shape
        slot_order, _, _, bounds, _, tokens_per_expert_E = sort_slots_by_expert(expert_TK, keep_TK, self.num_experts)
        first = self.ep_rank * self.num_local_experts
        start, n_local = bounds[first], bounds[first + self.num_local_experts] - bounds[first]
        rows = torch.arange(slot_order.numel(), device=slot_order.device)
        local_order = slot_order[(rows + start) % max(1, slot_order.numel())]
        row_of_slot = torch.empty_like(local_order).scatter_(0, local_order, rows)
        row_of_slot = torch.where(row_of_slot < n_local, row_of_slot, torch.full_like(row_of_slot, -1))
        if not (x_TH.is_cuda and torch.cuda.is_current_stream_capturing()):
            local_order = local_order[: int(n_local)]
        token_idx = torch.div(local_order, top_k, rounding_mode="floor")
        row_of_slot_TK = row_of_slot.view(num_tokens, top_k)
        x_MH = gather_rows(x_TH, token_idx, row_of_slot_TK)
        local_counts = tokens_per_expert_E[first: first + self.num_local_experts]
        return x_MH, DispatchPlan(num_tokens, local_order, token_idx, tokens_per_expert_E, local_counts,
                                  row_of_slot_TK=row_of_slot_TK, replicated=True)

    def _dispatch_unfused(
        self, x_TH: torch.Tensor, expert_TK: torch.Tensor, keep_TK: torch.Tensor | None,
        overlap: Callable[[], torch.Tensor] | None,
    ) -> tuple[torch.Tensor, DispatchPlan]:
        """The reference path: bincount (a host sync on CUDA), argsort, index_select (atomic backward)."""
        num_tokens, top_k = expert_TK.shape
        flat_expert = expert_TK.reshape(-1)
        if keep_TK is not None:
            flat_expert = torch.where(keep_TK.reshape(-1), flat_expert, torch.full_like(flat_expert, self.num_experts))
        tokens_per_expert_E = torch.bincount(flat_expert, minlength=self.num_experts + 1)[: self.num_experts]
        slot_order = torch.argsort(flat_expert, stable=True)
        if keep_TK is not None:
            slot_order = slot_order[: int(tokens_per_expert_E.sum())]
        token_idx = torch.div(slot_order, top_k, rounding_mode="floor")
        x_NH = x_TH.index_select(0, token_idx)
        plan = DispatchPlan(num_tokens, slot_order, token_idx, tokens_per_expert_E, tokens_per_expert_E)
        if self.ep_size == 1:
            plan.overlap_out = overlap() if overlap is not None else None
            return x_NH, plan
        return self._exchange(x_NH, plan, self._exchange_counts(tokens_per_expert_E, x_TH), overlap)

    def _exchange_counts(self, tokens_per_expert_E: torch.Tensor, x_TH: torch.Tensor) -> "_CountExchange":
        """Start the split-size exchange, before the gather of ``x_NH`` is queued: the host read of the split
        sizes then waits for the counts and their copy to pinned memory only, and the gather, queued behind
        them, runs while the host wakes and issues the all-to-all. Everything else the exchange needs from the
        counts (offsets, the regroup's chunk shifts) comes from the same launch (``plan_counts``).

        Each rank's row dtype and width ride along (two more columns of the count matrix), so ranks whose rows
        differ (a layer cast on one rank only) all raise in ``_exchange`` instead of entering a row all-to-all of
        mismatched sizes (gloo aborts a rank)."""
        ep, local = self.ep_size, self.num_local_experts
        # filled on the device: a tensor built from a host list would be a blocking copy (a host sync per layer)
        row_format_R2 = tokens_per_expert_E.new_full((ep, 2), _FLOAT_DTYPES.index(x_TH.dtype))
        row_format_R2[:, 1].fill_(x_TH.shape[1:].numel())
        send_RL2 = torch.cat([tokens_per_expert_E.view(ep, local), row_format_R2], dim=1)
        recv_RL2 = exchange_counts(send_RL2, self.ep_group)
        recv_E = recv_RL2[:, :local].reshape(-1)
        plan = plan_counts(tokens_per_expert_E, recv_E, ep)
        splits_4R, ready = torch.cat([plan.splits_2R, recv_RL2[:, local:].t().to(plan.splits_2R.dtype)]), None
        if splits_4R.is_cuda:
            splits_4R = splits_4R.to("cpu", non_blocking=True)  # into pinned memory, in stream order
            ready = torch.cuda.Event()
            ready.record()
        return _CountExchange(plan, splits_4R, ready)

    def _exchange(self, x_NH: torch.Tensor, plan: DispatchPlan, counts: "_CountExchange",
                  overlap: Callable[[], torch.Tensor] | None = None, weight_TK: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, DispatchPlan]:
        plan.tokens_per_local_expert_L = counts.plan.per_local_L
        plan.local_cu_offsets_L1 = counts.plan.local_cu_offsets_L1
        if counts.ready is not None:
            counts.ready.synchronize()  # the split sizes' host sync: waits for the counts, not for the gather
        plan.input_splits, plan.output_splits, dtype_codes, widths = counts.splits_4R.tolist()
        if len(set(dtype_codes)) > 1 or len(set(widths)) > 1:
            per_rank = ", ".join(f"EP rank {r}: {_FLOAT_DTYPES[d]} rows of {w}"
                                 for r, (d, w) in enumerate(zip(dtype_codes, widths)))
            raise ValueError(f"the EP ranks of this MoE layer dispatch rows of different dtype or width ({per_rank}); "
                             "every EP rank must run the layer in one dtype and hidden size (cast the model the same "
                             "way on every rank)")
        if overlap is None:
            x_recv = all_to_all(x_NH, plan.output_splits, plan.input_splits, self.ep_group)
        else:
            in_flight = all_to_all_start(x_NH, plan.output_splits, plan.input_splits, self.ep_group)
            plan.overlap_out = overlap()
            x_recv = in_flight.wait()
        # rows arrive grouped by (source rank, local expert); the experts want (local expert, source rank)
        plan.dest_M, plan.regroup_M = regroup_index(counts.plan, x_recv.shape[0])
        if weight_TK is not None:  # the fused path (the unfused one carries none)
            # [N] weights, 4 bytes a row against the rows' 2 * H; their gradient crosses back before the rows'
            weight_N = weight_TK.reshape(-1).index_select(0, plan.slot_order_N)
            weight_recv = all_to_all(weight_N, plan.output_splits, plan.input_splits, self.ep_group, after=x_recv)
            plan.row_weights = RowWeights(weight_recv, plan.regroup_M)
        return permute_rows(x_recv, plan.regroup_M, plan.dest_M), plan

    def reduce_replicated(self, out_TH: torch.Tensor) -> torch.Tensor:
        """Each token's partial output summed over the EP ranks (in place), when every rank holds every
        token and added only its own experts' copies."""
        if self.ep_group is not None:
            dist.all_reduce(out_TH, group=self.ep_group)
        return out_TH

    def combine(self, y_MH: torch.Tensor, plan: DispatchPlan, weight_TK: torch.Tensor | None) -> torch.Tensor:
        """Weighted sum of each token's expert outputs, back on the rank and in the order it came from.

        ``weight_TK`` None: the rows carry their weights already (the experts took ``plan.row_weights``): a
        plain sum."""
        if weight_TK is None and plan.row_weights is None:
            raise ValueError("combine got no weight_TK, but dispatch carried no weights to the experts "
                             "(plan.row_weights is None); pass the routing weights to combine")
        if plan.replicated:
            assert plan.row_of_slot_TK is not None
            return self.reduce_replicated(unpermute_combine(y_MH, weight_TK, plan.row_of_slot_TK))
        if self.ep_size > 1:
            assert plan.regroup_M is not None and plan.dest_M is not None
            assert plan.input_splits is not None and plan.output_splits is not None
            y_recv = permute_rows(y_MH, plan.dest_M, plan.regroup_M)
            y_NH = all_to_all(y_recv, plan.input_splits, plan.output_splits, self.ep_group)
        else:
            y_NH = y_MH
        if weight_TK is None:
            assert plan.row_of_slot_TK is not None
            return sum_copies(y_NH, plan.token_idx_N, plan.row_of_slot_TK)
        if plan.row_of_slot_TK is not None:
            return unpermute_combine(y_NH, weight_TK, plan.row_of_slot_TK)
        weight_N = weight_TK.reshape(-1).index_select(0, plan.slot_order_N)
        weighted_NH = (y_NH * weight_N.unsqueeze(-1)).to(y_NH.dtype)
        out_TH = y_NH.new_zeros((plan.num_tokens, y_NH.shape[-1]))
        return out_TH.index_add(0, plan.token_idx_N, weighted_NH)
