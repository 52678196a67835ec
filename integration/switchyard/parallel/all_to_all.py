"""Differentiable all-to-all with variable split sizes (the transport of expert parallelism).

The backward of an all-to-all is the all-to-all with input and output splits swapped. Split sizes
are Python lists of row counts per peer rank (``len == group size``); a rank may send or receive
zero rows.

``all_to_all_start`` returns the exchange in flight, so work that does not need its output (a shared
expert) runs while the bytes move; ``wait()`` gives the output. Its backward overlaps the same way: the
gradient's all-to-all starts where ``wait`` was and is waited for where ``start`` was, so whatever autograd
runs between the two (that work's backward) runs while it is in flight.

Both backwards are differentiable (``create_graph=True``, double backward): under ``create_graph`` the gradient
moves by a blocking ``all_to_all``, whose own backward is the swapped one again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``after`` (optional): the output of an earlier exchange, taken as an input this one does not read. Autograd
    runs a consumer's backward before its producer's, so on every rank this exchange's gradient moves before the
    gradient of the exchange that made ``after``, as in the forward it moved after it. Two exchanges otherwise
    independent in the graph could have their gradients exchanged in different orders on different ranks (a
    mismatched collective)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, after=None):  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in = None
        if ctx.needs_input_grad[0]:  # the same on every rank (with ``after``, x alone may not need it)
            # through apply, not _all_to_all: under create_graph the gradient must stay differentiable
            grad_in = _AllToAll.apply(grad_out, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_in, None, None, None, None


@dataclass
class _InFlight:
    """The handles of one split exchange: its forward all-to-all and its gradient's, while they run."""

    output_splits: list[int]
    input_splits: list[int]
    group: dist.ProcessGroup | None
    forward: dist.Work | None = None
    backward: dist.Work | None = None
    grad_in: torch.Tensor | None = None  # where the gradient's exchange lands


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flight):  # type: ignore[override]
        ctx.flight = flight
        out = x.new_empty((sum(flight.output_splits), *x.shape[1:]))
        flight.forward = dist.all_to_all_single(out, x.contiguous(), flight.output_splits, flight.input_splits,
                                                group=flight.group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # the incoming gradient is the one _AllToAllWait.backward passed through and started exchanging
        flight = ctx.flight
        if flight.backward is None:  # create_graph: nothing in flight, a differentiable blocking exchange
            return _AllToAll.apply(grad_out, flight.input_splits, flight.output_splits, flight.group), None
        flight.backward.wait()
        grad_in, flight.backward, flight.grad_in = flight.grad_in, None, None
        return grad_in, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, flight):  # type: ignore[override]
        ctx.flight = flight
        flight.forward.wait()
        flight.forward = None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        flight = ctx.flight
        if torch.is_grad_enabled():  # create_graph: _AllToAllStart.backward exchanges, differentiably
            return grad_out, None
        flight.grad_in = grad_out.new_empty((sum(flight.input_splits), *grad_out.shape[1:]))
        flight.backward = dist.all_to_all_single(flight.grad_in, grad_out.contiguous(), flight.input_splits,
                                                 flight.output_splits, group=flight.group, async_op=True)
        return grad_out, None  # a stand-in of the right shape: _AllToAllStart.backward returns the exchanged one


class PendingAllToAll:
    """An all-to-all in flight (``all_to_all_start``); ``wait()`` returns its output, once."""

    def __init__(self, out: torch.Tensor, flight: _InFlight | None) -> None:
        self._out, self._flight, self._waited = out, flight, False

    def wait(self) -> torch.Tensor:
        if self._waited:
            raise RuntimeError("PendingAllToAll.wait() may be called once; keep the tensor it returned")
        self._waited = True
        if self._flight is None:  # a group of one: nothing was sent
            return self._out
        return _AllToAllWait.apply(self._out, self._flight)


def all_to_all_start(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> PendingAllToAll:
    """``all_to_all`` without waiting: the exchange runs while the caller queues other work."""
    assert sum(input_splits) == x.shape[0], (sum(input_splits), x.shape)
    if group is not None and dist.get_world_size(group) == 1:
        return PendingAllToAll(x, None)
    flight = _InFlight(list(output_splits), list(input_splits), group)
    return PendingAllToAll(_AllToAllStart.apply(x, flight), flight)


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
    after: torch.Tensor | None = None,
) -> torch.Tensor:
    """Send ``input_splits[r]`` rows of ``x`` to rank r of ``group``; receive ``output_splits[r]`` from it.

    ``after``: the output of the exchange this one follows (a second exchange riding along with a first, as the
    routing weights with the rows they weight); its backward then runs before that exchange's on every rank."""
    assert sum(input_splits) == x.shape[0], (sum(input_splits), x.shape)
    if group is not None and dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, after)


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all of per-destination counts (``[group_size * k]``): chunk r of the result is what
    rank r will send here."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
