"""Tensor-parallel shards of parameters, and the two collectives that make a sharded layer exact.

A sharded parameter carries a ``TensorShard`` (``param.tp_shard``): which dimension is split, over which group
kind of the ``ProcessGroupManager`` ("tp" for dense layers, "etp" for experts) and whether the full tensor packs
several equal chunks along that dimension (a fused ``gate_up_proj`` packs gate and up: each rank holds its slice of
each chunk, so gathering is not a plain concatenation). It also gets ``tensor_model_parallel = True``, the flag
DeepSpeed's gradient norm reads (``deepspeed.runtime.utils.is_model_parallel_parameter``): sharded parameters count
on every model-parallel rank, replicated ones on model-parallel rank 0 only.

``copy_to_group`` / ``reduce_from_group`` are Megatron-LM's f / g: the input of a column-parallel product is the same
on every rank, so its gradient is the sum of every rank's partial gradient (identity forward, all-reduce backward);
a row-parallel product's output is a partial sum (all-reduce forward, identity backward).

``scatter_to_group`` / ``gather_from_group`` are Megatron's pair for a region that splits the tokens (dim 0) over
the group: the input is the same on every rank and each rank keeps its 1/size of the rows (backward: the rows'
gradients all-gathered), and the rows' outputs are all-gathered back (backward: each rank keeps its rows of a
gradient that is the same on every rank). An MoE layer at tp > 1 with etp = 1 routes its slice of the tokens.

``deepcopy_keeping_parameter_tags`` is the deep copy for modules whose parameters carry such tags (and DeepSpeed's
expert tags): torch's ``Parameter.__deepcopy__`` drops every attribute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class TensorShard:
    dim: int  # the dimension split over the group
    group_kind: str  # "tp" or "etp": the ProcessGroupManager kind that holds the other shards
    packed: int = 1  # the full tensor is ``packed`` equal chunks along ``dim``, each split over the group


def shard_tensor(full: torch.Tensor, shard: TensorShard, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of ``full`` (a copy, contiguous): slice ``rank`` of each packed chunk, concatenated."""
    length = full.shape[shard.dim]
    if length % (shard.packed * size) != 0:
        raise ValueError(
            f"dimension {shard.dim} of a {tuple(full.shape)} tensor ({length}) does not split into {shard.packed} "
            f"packed chunk(s) × {size} {shard.group_kind} ranks; choose a {shard.group_kind} size dividing "
            f"{length // shard.packed}"
        )
    chunks = full.chunk(shard.packed, dim=shard.dim)
    return torch.cat([c.chunk(size, dim=shard.dim)[rank] for c in chunks], dim=shard.dim).contiguous()


def gather_tensor(local: torch.Tensor, shard: TensorShard, group: dist.ProcessGroup | None, size: int) -> torch.Tensor:
    """The full tensor from every rank's ``local`` slice (a collective over ``group``: call it on every rank)."""
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    per_rank = [p.chunk(shard.packed, dim=shard.dim) for p in parts]
    return torch.cat([torch.cat([r[c] for r in per_rank], dim=shard.dim) for c in range(shard.packed)], dim=shard.dim)


def mark_sharded(param: torch.Tensor, shard: TensorShard) -> None:
    """Tag ``param`` as a shard: ``tp_shard`` for gathering, ``tensor_model_parallel`` for DeepSpeed's norm."""
    param.tp_shard = shard  # type: ignore[attr-defined]
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = shard.dim  # type: ignore[attr-defined]


def shard_of(param: torch.Tensor) -> TensorShard | None:
    return getattr(param, "tp_shard", None)


def deepcopy_keeping_parameter_tags(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module)`` whose parameters keep their attributes. torch's ``Parameter.__deepcopy__`` drops
    them, and a copied expert without ``allreduce=False`` / ``group_name`` (or a shard without ``tp_shard``) would
    be reduced over the dense data-parallel group like a replicated weight: a deep copy handed to DeepSpeed (a
    model copied before training, an EMA or reference model trained later) must keep them."""
    clone = type(module).__new__(type(module))
    memo[id(module)] = clone
    clone.__setstate__(copy.deepcopy(module.__getstate__(), memo))  # what the class says a copy takes
    pairs = zip(module.named_parameters(remove_duplicate=False), clone.named_parameters(remove_duplicate=False))
    for (_, source), (_, target) in pairs:
        for attr, value in vars(source).items():
            target.__dict__.setdefault(attr, value)
    return clone


def shard_parameter_(param: torch.Tensor, shard: TensorShard, rank: int, size: int) -> None:
    """Keep slice ``rank`` of ``size`` of ``param`` in place (the same Parameter object, so its attributes, hooks and
    name stay) and tag it (``mark_sharded``)."""
    param.data = shard_tensor(param.data, shard, rank, size)
    mark_sharded(param, shard)


def as_local_shard(given: torch.Tensor, local: torch.Tensor, shard: TensorShard, rank: int, size: int) -> torch.Tensor:
    """``given`` for a shard shaped like ``local``: this rank's slice when ``given`` is the full tensor (a full state
    dict, or the model's before sharding), else ``given`` as it is."""
    if given.shape[shard.dim] == size * local.shape[shard.dim]:
        return shard_tensor(given, shard, rank, size)
    return given


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over ``group`` (the input of a column-parallel product)."""
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce over ``group`` forward; identity backward (the partial output of a row-parallel product)."""
    return _ReduceFromGroup.apply(x, group)


def _rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[0] % size != 0:
        raise ValueError(f"{x.shape[0]} rows do not split over {size} ranks; pad them to a multiple of {size}")
    rows = x.shape[0] // size
    return x.narrow(0, dist.get_rank(group) * rows, rows).contiguous()


def _all_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _rows(x, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_rows(grad, ctx.group), None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _all_rows(x, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _rows(grad, ctx.group), None


def scatter_to_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's 1/size of ``x``'s rows (dim 0, which the group size must divide); all-gather of the gradient."""
    return _ScatterToGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's rows (dim 0) concatenated in rank order; backward: this rank's rows of the gradient."""
    return _GatherFromGroup.apply(x, group)
