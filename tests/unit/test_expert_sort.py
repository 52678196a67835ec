"""sort_slots_by_expert: the torch route against a plain-Python definition, the Triton route (CUDA) against
the torch route, bit for bit.

Run: /work/main/.venv/bin/python -m pytest -q tests/unit/test_expert_sort.py
"""

from __future__ import annotations

import pytest
import torch

from switchyard.moe.kernels.expert_sort import SortedSlots, sort_slots_by_expert, sort_slots_torch


def _routing(tokens: int, top_k: int, experts: int, drop: float, seed: int, device: str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Distinct experts per token (as top-k gives), skewed towards low ids; ``drop`` of the slots dropped."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen) + torch.linspace(1.0, 0.0, experts)
    idx = scores.topk(top_k, dim=-1).indices
    keep = (torch.rand(tokens, top_k, generator=gen) >= drop) if drop > 0 else None
    return idx.to(device), (keep.to(device) if keep is not None else None)


def _definition(idx: torch.Tensor, keep: torch.Tensor | None, experts: int) -> SortedSlots:
    """What the outputs mean, in Python: stable order by (expert, slot), dropped slots after the kept."""
    tokens, top_k = idx.shape
    flat = idx.reshape(-1).tolist()
    kept = keep.reshape(-1).tolist() if keep is not None else [True] * len(flat)
    bucket = [e if k else experts for e, k in zip(flat, kept)]
    order = sorted(range(len(flat)), key=lambda s: (bucket[s], s))
    row_of_slot = [-1] * len(flat)
    for row, s in enumerate(order):
        if kept[s]:
            row_of_slot[s] = row
    bounds = [sum(b < e for b in bucket) for e in range(experts + 1)]
    return SortedSlots(torch.tensor(order), torch.tensor([s // top_k for s in order]),
                       torch.tensor(row_of_slot).view(tokens, top_k), torch.tensor(bounds),
                       torch.tensor(bounds, dtype=torch.int32), torch.tensor(bounds).diff())


def _assert_same(got: SortedSlots, want: SortedSlots) -> None:
    for name, a, b in zip(SortedSlots._fields, got, want):
        assert a.dtype == (torch.int32 if name == "cu_offsets_E1" else torch.int64), name
        assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize("tokens, top_k, experts, drop", [
    (1, 1, 4, 0.0), (7, 2, 8, 0.0), (50, 8, 64, 0.0), (33, 4, 12, 0.4), (20, 2, 8, 1.0),
])
def test_torch_route_matches_the_definition(tokens: int, top_k: int, experts: int, drop: float) -> None:
    idx, keep = _routing(tokens, top_k, experts, drop, seed=tokens)
    _assert_same(sort_slots_torch(idx, keep, experts), _definition(idx, keep, experts))
    _assert_same(sort_slots_by_expert(idx, keep, experts), _definition(idx, keep, experts))  # CPU: the same route


def test_no_tokens() -> None:
    got = sort_slots_by_expert(torch.empty(0, 2, dtype=torch.int64), None, 8)
    assert [t.numel() for t in got] == [0, 0, 0, 9, 9, 8] and got.bounds_E1.eq(0).all() and got.cu_offsets_E1.eq(0).all()


# -- CUDA: the Triton counting sort ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k, experts, drop", [
    (1, 1, 4, 0.0),          # one slot, one block
    (3, 2, 8, 0.5),          # fewer slots than a block, drops
    (1000, 8, 64, 0.0),      # olmoe-shaped: 8 blocks, the last one partial
    (8192, 8, 128, 0.0),     # qwen3-shaped: 64 blocks, 256 buckets
    (5000, 2, 8, 0.3),       # capacity drops across blocks
    (700, 6, 250, 0.1),      # 512 buckets
    (40000, 8, 64, 0.0),     # > 2^18 slots: the 4096-slot blocks
])
def test_triton_route_equals_the_torch_route(tokens: int, top_k: int, experts: int, drop: float) -> None:
    idx, keep = _routing(tokens, top_k, experts, drop, seed=tokens, device="cuda")
    want = sort_slots_torch(idx, keep, experts)
    got = sort_slots_by_expert(idx, keep, experts)
    _assert_same(got, want)
    _assert_same(sort_slots_by_expert(idx, keep, experts), got)  # deterministic


@pytest.mark.gpu
def test_triton_route_replays_in_a_cuda_graph() -> None:
    """Serving captures the layer in CUDA graphs: the sort must capture and replay on new routings."""
    idx, _ = _routing(64, 8, 64, 0.0, seed=1, device="cuda")
    static_idx = idx.clone()
    sort_slots_by_expert(static_idx, None, 64)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sort_slots_by_expert(static_idx, None, 64)
    for seed in (2, 3):
        new_idx, _ = _routing(64, 8, 64, 0.0, seed=seed, device="cuda")
        static_idx.copy_(new_idx)
        graph.replay()
        _assert_same(captured, sort_slots_torch(new_idx, None, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_on_cuda_is_bitwise_the_same_with_either_route(capacity_factor: float | None, monkeypatch) -> None:
    """The whole MoE layer, forward and backward: the sort only decides the order of rows, identically."""
    from switchyard.config import MoEConfig
    from switchyard.moe.kernels import expert_sort
    from switchyard.moe.layer import MoELayer

    torch.manual_seed(0)
    config = MoEConfig(num_experts=16, top_k=4, capacity_factor=capacity_factor, aux_loss_coef=0.01)
    layer = MoELayer(config, hidden_size=64, intermediate_size=96).cuda().to(torch.bfloat16).train()
    x = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16)

    def run() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        (out.float().square().mean() + layer.aux_loss).backward()
        return [out, xg.grad] + [p.grad for p in layer.parameters()]

    triton_route = run()
    monkeypatch.setattr(expert_sort, "_sk", None)
    torch_route = run()
    for a, b in zip(triton_route, torch_route):
        assert torch.equal(a, b)
