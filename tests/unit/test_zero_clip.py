"""switchyard's sync-free ZeRO-1/2 clip against DeepSpeed's own ``unscale_and_clip_grads`` (the oracle): the same
gradients after it, bit for bit, whether the norm clips, does not, is DeepSpeed's -1 sentinel or infinite, and with a
loss scale and no clipping."""

from __future__ import annotations

import types

import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from switchyard.deepspeed.grad_norm import clip_grads_without_sync

CASES = {  # id: (clip_grad, loss_scale, total norm)
    "clips": (1.0, 1.0, torch.tensor(7.5)),
    "below-the-clip": (10.0, 1.0, torch.tensor(7.5)),
    "sentinel-zeroes": (1.0, 1.0, torch.tensor(-1.0)),
    "inf-zeroes": (1.0, 1.0, torch.tensor(float("inf"))),
    "fp64-norm-and-loss-scale": (1.0, 4.0, torch.tensor(30.0, dtype=torch.float64)),
    "loss-scale-only": (0.0, 8.0, None),
}


@pytest.mark.parametrize("clip_grad, loss_scale, norm", CASES.values(), ids=CASES.keys())
def test_clip_equals_deepspeeds(clip_grad, loss_scale, norm):
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(1000, generator=gen), [torch.randn(10, generator=gen), torch.randn(3, generator=gen)]]
    theirs = [grads[0].clone(), [g.clone() for g in grads[1]]]
    optimizer = types.SimpleNamespace(clip_grad=clip_grad, loss_scale=loss_scale, device="cpu")
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(optimizer, theirs, norm)
    clip_grads_without_sync(optimizer, grads, norm)
    for got, want in zip([grads[0], *grads[1]], [theirs[0], *theirs[1]]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(grads[0], torch.randn(1000, generator=torch.Generator().manual_seed(3))) or (
        clip_grad > 0 and float(norm) < clip_grad), "the case left the gradients as they were: it tests nothing"
