"""The dispatcher's row permutation (the regroup between source-major and expert-major rows at ep > 1)."""

from __future__ import annotations

import torch

from switchyard.moe.dispatcher import permute_rows


def test_permute_rows_is_a_gather_both_ways():
    gen = torch.Generator().manual_seed(0)
    src = torch.randperm(11, generator=gen)
    dst = torch.empty_like(src).scatter_(0, src, torch.arange(11))  # the inverse permutation
    x = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    out = permute_rows(x, src, dst)
    assert torch.equal(out, x[src])
    # the backward undoes the permutation: the same gradient as index_select's own backward
    grad = torch.randn(11, 5, dtype=torch.float64, generator=gen)
    out.backward(grad)
    want = torch.zeros_like(x).index_add_(0, src, grad)
    assert torch.equal(x.grad, want)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, src, dst), (x.detach().requires_grad_(),))


def test_permute_rows_of_nothing():
    empty = torch.empty(0, dtype=torch.long)
    x = torch.randn(0, 3, requires_grad=True)
    permute_rows(x, empty, empty).sum().backward()
    assert x.grad.shape == (0, 3)
