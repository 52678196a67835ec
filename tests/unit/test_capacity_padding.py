"""Capacity with padding: padding copies take no expert capacity and C counts real tokens only.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_capacity_padding.py

Capacity is per batch, so the oracle for a padded batch is the same real tokens as one unpadded batch
(same sequences, same order) under the same capacity factor: the real tokens must get the same outputs
and the same drops however much padding, left or right, surrounds them.
"""

from __future__ import annotations

import pytest
import torch

import switchyard as sy
from switchyard.hf.patch import moe_layers
from switchyard.moe.capacity import capacity_keep_mask, expert_capacity
from switchyard.moe.layer import MoELayer

from tiny_models import TINY, build

# per row: (left padding, right padding) around the same 6 real tokens
PADDING = [(3, 0), (0, 3), (1, 2), (0, 0)]
REAL = 6


def _padded(ids_BS: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of ``ids_BS`` with each row padded as PADDING says."""
    width = REAL + max(left + right for left, right in PADDING)
    ids = torch.full((len(PADDING), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (left, right) in enumerate(PADDING):
        start = left + (width - REAL - left - right)  # rows shorter than the widest get extra left padding
        ids[row, start:start + REAL] = ids_BS[row]
        mask[row, start:start + REAL] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("mode, policy", [("train", "probs"), ("eval", "position")])
def test_padded_batch_keeps_what_the_unpadded_batch_keeps(mode: str, policy: str) -> None:
    """Padding copies used to take capacity, and C counted them: a padded batch dropped other real copies
    than the unpadded batch of the same tokens (and eval, under no_grad, never saw the mask at all)."""
    factor = dict(capacity_factor=0.6) if mode == "train" else dict(eval_capacity_factor=0.6)
    config = sy.MoEConfig(num_experts=4, top_k=2, init="random", drop_policy=policy, **factor)
    model = sy.patch_model(build("llama", intermediate_size=48, attn_implementation="eager"), config)
    model.train(mode == "train")
    ids_BS = torch.randint(1, TINY["vocab_size"], (len(PADDING), REAL), generator=torch.Generator().manual_seed(5))
    ids, mask, positions = _padded(ids_BS, pad_id=0)

    with torch.set_grad_enabled(mode == "train"):
        want = model(ids_BS).logits
        want_dropped = [int(layer.last_stats.dropped_copies) for layer in moe_layers(model)]
        want_kept = [layer.last_stats.tokens_per_expert_E.clone() for layer in moe_layers(model)]
        got = model(ids, attention_mask=mask, position_ids=positions).logits

    assert sum(want_dropped) > 0, "the oracle drops nothing: the test would not see padding take capacity"
    torch.testing.assert_close(got[mask.bool()].view_as(want), want, atol=1e-5, rtol=1e-5)
    for layer, dropped, kept in zip(moe_layers(model), want_dropped, want_kept):
        stats = layer.last_stats
        assert int(stats.dropped_copies) == dropped  # real copies only, as in the unpadded batch
        assert int(stats.routed_copies) == REAL * len(PADDING) * config.top_k
        assert torch.equal(stats.tokens_per_expert_E, kept)  # padding copies were never sent to an expert
        assert layer.token_mask is None  # this forward's mask is not left behind


def test_layer_alone_padding_that_would_crowd_out_real_tokens_takes_nothing() -> None:
    """Padding rows that all prefer expert 0 with the highest weights: before, they filled its capacity."""
    torch.manual_seed(0)
    layer = MoELayer(sy.MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0), 8, 16)
    real_TH = torch.randn(8, 8)
    want = layer(real_TH)
    want_dropped = int(layer.last_stats.dropped_copies)
    crowd_TH = layer.router.weight[0].detach().expand(8, 8) * 50  # routed to expert 0 with weight ~1
    layer.token_mask = torch.tensor([[0] * 8 + [1] * 8])
    got = layer(torch.cat([crowd_TH, real_TH])[None])
    assert torch.equal(got[0, 8:], want)
    assert int(layer.last_stats.dropped_copies) == want_dropped
    assert int(layer.last_stats.tokens_per_expert_E.sum()) == 8 - want_dropped


def test_keep_mask_capacity_counts_real_tokens() -> None:
    idx_TK = torch.tensor([[0], [0], [0], [0], [1], [1]])
    weight_TK = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    real_T = torch.tensor([False, True, True, True, False, True])
    # 4 real tokens, 2 experts, factor 1 → C = 2: expert 0 keeps tokens 1, 2 (not padding 0); expert 1 keeps 5
    keep = capacity_keep_mask(idx_TK, weight_TK, num_experts=2, capacity_factor=1.0, policy="probs", real_T=real_T)
    assert keep.squeeze(1).tolist() == [False, True, True, False, False, True]
    keep = capacity_keep_mask(idx_TK, weight_TK, num_experts=2, capacity_factor=1.0, policy="position",
                              real_T=torch.zeros(6, dtype=torch.bool))
    assert not keep.any()  # all padding: nothing kept
    # the tensor form (no host sync, for captured graphs) rounds as the integer form does
    for tokens in range(0, 40):
        for factor in (0.3, 0.6, 1.0, 1.25, 2.0):
            want = expert_capacity(tokens, 2, 8, factor)
            assert int(expert_capacity(torch.tensor(tokens), 2, 8, factor)) == want, (tokens, factor)


def test_mask_of_another_size_is_ignored_for_capacity() -> None:
    """A decode step with a cache: the 2-D mask covers past positions too, so it is not this call's mask."""
    torch.manual_seed(0)
    layer = MoELayer(sy.MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5), 8, 16)
    x = torch.randn(2, 3, 8)
    want = layer(x)
    layer.token_mask = torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(layer(x), want)
