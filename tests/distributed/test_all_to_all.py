"""The differentiable all-to-all on gloo ranks: the in-flight form (``all_to_all_start``) against the blocking one,
and where its backward lets other work run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

HIDDEN = 5


def _splits(rank: int, world: int) -> tuple[list[int], list[int]]:
    """Uneven rows: rank r sends r + d + 1 rows to rank d (some peer pairs send more than others)."""
    send = [rank + dst + 1 for dst in range(world)]
    recv = [src + rank + 1 for src in range(world)]
    return send, recv


def _start_matches_blocking_and_overlaps_backward():
    from switchyard.parallel.all_to_all import all_to_all, all_to_all_start

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    send, recv = _splits(rank, world)
    torch.manual_seed(rank)
    x = torch.randn(sum(send), HIDDEN).to(device)
    weight_HH = torch.randn(HIDDEN, HIDDEN).to(device)
    side_in = torch.randn(3, HIDDEN).to(device)
    grad_out = torch.randn(sum(recv), HIDDEN).to(device)

    x_block = x.clone().requires_grad_(True)
    all_to_all(x_block, recv, send).backward(grad_out)

    events: list[str] = []
    x_flight = x.clone().requires_grad_(True)
    side_w = weight_HH.clone().requires_grad_(True)
    x_flight.register_hook(lambda g: events.append("start backward done"))
    side_w.register_hook(lambda g: events.append("side backward"))
    pending = all_to_all_start(x_flight, recv, send)
    side = side_in @ side_w  # created while the exchange is in flight, as the layer's shared expert is
    out = pending.wait()
    out.register_hook(lambda g: events.append("wait backward starts"))
    with pytest.raises(RuntimeError, match="once"):
        pending.wait()
    (out * grad_out).sum().add(side.sum()).backward()

    assert torch.equal(out.detach(), all_to_all(x, recv, send)), "in-flight all-to-all moved other rows"
    assert torch.equal(x_flight.grad, x_block.grad), "in-flight all-to-all's gradient differs from the blocking one's"
    assert events == ["wait backward starts", "side backward", "start backward done"], events
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_start_matches_blocking_and_its_backward_overlaps(world):
    assert run_on_ranks(_start_matches_blocking_and_overlaps_backward, world, timeout_s=90) == [True] * world


@pytest.mark.gpu
def test_all_to_all_start_on_two_gpus_with_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_on_ranks(_start_matches_blocking_and_overlaps_backward, 2, timeout_s=120, backend="nccl")
    assert results == [True, True]


def _double_backward_and_retain_graph():
    """Second-order gradients through both all-to-alls (``create_graph=True``), and a second backward through
    one graph (``retain_graph=True``): the gradient of ``sum(a2a(x) * c)`` with respect to ``x`` is ``a2a⁻¹(c)``,
    so differentiating ``sum(that * d)`` with respect to ``c`` must give ``a2a(d)``."""
    from switchyard.parallel.all_to_all import all_to_all, all_to_all_start

    rank, world = dist.get_rank(), dist.get_world_size()
    send, recv = _splits(rank, world)
    torch.manual_seed(rank)
    x = torch.randn(sum(send), HIDDEN, dtype=torch.float64, requires_grad=True)
    d = torch.randn(sum(send), HIDDEN, dtype=torch.float64)
    want = all_to_all(d, recv, send)
    for name, exchange in (("blocking", lambda t: all_to_all(t, recv, send)),
                           ("in flight", lambda t: all_to_all_start(t, recv, send).wait())):
        c = torch.randn(sum(recv), HIDDEN, dtype=torch.float64, requires_grad=True)
        (grad_x,) = torch.autograd.grad((exchange(x) * c).sum(), x, create_graph=True)
        (grad_c,) = torch.autograd.grad((grad_x * d).sum(), c)
        assert torch.equal(grad_c, want), f"{name}: second-order gradient"
        out = exchange(x * 3)
        out.sum().backward(retain_graph=True)
        out.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 6.0)), f"{name}: two backwards through one graph"
        x.grad = None
    return True


def test_all_to_all_double_backward_and_second_backward():
    assert run_on_ranks(_double_backward_and_retain_graph, 3, timeout_s=90) == [True] * 3
