"""Differentiable all-to-all with variable split sizes (the transport of expert parallelism).

The backward of an all-to-all is the all-to-all with input and output splits swapped. Split sizes
are Python lists of row counts per peer rank (``len == group size``); a rank may send or receive
zero rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in = _all_to_all(grad_out, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Send ``input_splits[r]`` rows of ``x`` to rank r of ``group``; receive ``output_splits[r]`` from it."""
    assert sum(input_splits) == x.shape[0], (sum(input_splits), x.shape)
    if group is not None and dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all of per-destination counts (``[group_size * k]``): chunk r of the result is what
    rank r will send here."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
