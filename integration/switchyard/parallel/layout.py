"""Rank layout: which global ranks form each parallel group. Pure arithmetic, no processes.

Megatron-Core's orthogonal generator, two decompositions of one world:

    dense   rank = tp_r  + tp  * (dp_r + dp  * (pp_r))
    expert  rank = etp_r + etp * (ep_r + ep  * (edp_r + edp * pp_r))

with tp*dp == etp*ep*edp inside each pipeline stage. A group of kind X is the set of ranks that
agree on every coordinate of X's decomposition except X. EP therefore folds into DP (and, with
etp=1, into TP): the ranks of one expert-parallel group are data-parallel (or tensor-parallel)
peers for the dense part of the model.
"""

from __future__ import annotations

import itertools

from switchyard.config import ParallelConfig

GROUP_KINDS = ("tp", "pp", "dp", "ep", "edp", "etp")

# Each decomposition lists its axes fastest-varying first.
_DENSE_AXES = ("tp", "dp", "pp")
_EXPERT_AXES = ("etp", "ep", "edp", "pp")


def _rank_of(coords: dict[str, int], axes: tuple[str, ...], sizes: dict[str, int]) -> int:
    rank, stride = 0, 1
    for axis in axes:
        rank += coords[axis] * stride
        stride *= sizes[axis]
    return rank


def _groups_along(kind: str, axes: tuple[str, ...], sizes: dict[str, int]) -> list[list[int]]:
    others = [a for a in axes if a != kind]
    groups = []
    for fixed in itertools.product(*(range(sizes[a]) for a in others)):
        coords = dict(zip(others, fixed))
        groups.append(sorted(_rank_of({**coords, kind: i}, axes, sizes) for i in range(sizes[kind])))
    return sorted(groups)


def rank_layout(
    world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None
) -> dict[str, list[list[int]]]:
    """Every group of every kind: ``{"tp": [[0, 1], [2, 3]], "dp": ..., ...}``, sorted.

    Raises ``ValueError`` (naming the numbers) when the degrees do not fit ``world_size``.
    """
    sizes = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp).derived(world_size)
    layout = {kind: _groups_along(kind, _DENSE_AXES, sizes) for kind in ("tp", "dp", "pp")}
    layout.update({kind: _groups_along(kind, _EXPERT_AXES, sizes) for kind in ("ep", "edp", "etp")})
    return {kind: layout[kind] for kind in GROUP_KINDS}


def rank_coordinates(
    world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None
) -> list[dict[str, int]]:
    """For each global rank, its index inside each of its groups (its coordinate on every axis)."""
    layout = rank_layout(world_size, tp=tp, pp=pp, ep=ep, etp=etp)
    coords: list[dict[str, int]] = [{} for _ in range(world_size)]
    for kind, groups in layout.items():
        for group in groups:
            for index, rank in enumerate(group):
                coords[rank][kind] = index
    return coords


def local_expert_ids(num_experts: int, ep_size: int, ep_rank: int) -> list[int]:
    """Global ids of the experts an EP rank holds: a contiguous block, as Megatron and DeepSpeed do."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if num_experts % ep_size != 0:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by ep={ep_size}; choose ep dividing {num_experts}"
        )
    per_rank = num_experts // ep_size
    return list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
