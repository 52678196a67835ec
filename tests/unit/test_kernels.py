"""The MoE hot-path ops on CPU (their PyTorch fallbacks): graph-free calls equal the autograd ones.

Run: /work/main/.venv/bin/python -m pytest -q tests/unit/test_kernels.py
"""

from __future__ import annotations

import torch

from switchyard.moe.kernels import gather_rows, silu_mul, unpermute_combine

T, K, H = 6, 2, 8


def _plan(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """token_idx_N and idx_TK of a permutation of the T*K slots with two dropped."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(T * K, generator=g)[: T * K - 2]
    idx = torch.full((T * K,), -1, dtype=torch.int64)
    idx[order] = torch.arange(order.numel())
    return order // K, idx.view(T, K)


def test_graph_free_calls_equal_autograd_calls() -> None:
    token_idx_N, idx_TK = _plan()
    x = torch.randn(T, H, requires_grad=True)
    y = torch.randn(token_idx_N.numel(), H, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    h = torch.randn(5, 2 * H, requires_grad=True)
    with_graph = (gather_rows(x, token_idx_N, idx_TK), unpermute_combine(y, w, idx_TK), silu_mul(h))
    assert all(t.grad_fn is not None for t in with_graph)
    with torch.no_grad():
        free = (gather_rows(x, token_idx_N, idx_TK), unpermute_combine(y, w, idx_TK), silu_mul(h))
    for a, b in zip(with_graph, free):
        assert b.grad_fn is None and torch.equal(a.detach(), b)
