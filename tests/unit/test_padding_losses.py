"""Padding (a layer's ``token_mask``) stays out of the sequence-wise balance loss, the router z-loss and the
expert-bias counts.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_padding_losses.py

The oracle is the unpadded batch: the same real tokens without padding. Both are per-token routing, so the
real tokens route alike either way; the loss is per sequence, so its oracle is each sequence run alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

from switchyard import MoEConfig
from switchyard.moe.layer import MoELayer
from switchyard.moe.losses import sequence_balance_loss, z_loss

H = 8
# per row: (left padding, real tokens, right padding), all rows 7 wide; the last row is all padding
ROWS = [(2, 5, 0), (0, 3, 4), (1, 4, 2), (0, 7, 0), (0, 0, 7)]
WIDTH = 7


def _padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(x [B, WIDTH, H], mask [B, WIDTH], each row's real tokens [1, L, H]); padding is random, not zeros."""
    gen = torch.Generator().manual_seed(seed)
    x_BSH = torch.randn(len(ROWS), WIDTH, H, generator=gen)
    mask_BS = torch.zeros(len(ROWS), WIDTH, dtype=torch.long)
    for row, (left, real, _) in enumerate(ROWS):
        mask_BS[row, left:left + real] = 1
    real = [x_BSH[row, left:left + n].unsqueeze(0) for row, (left, n, _) in enumerate(ROWS) if n > 0]
    return x_BSH, mask_BS, real


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_balance_loss_of_a_padded_batch_is_that_of_its_sequences_unpadded(score_func: str) -> None:
    """The sequence loss counted padding as tokens of its row: f_i and P_i were diluted and skewed by it."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, score_func=score_func, aux_loss_coef=0.0,
                               seq_aux_loss_coef=1.0), H, 16).train()
    x_BSH, mask_BS, real = _padded_batch(seed=1)

    want = torch.stack([_sequence_loss(layer, x_1LH) for x_1LH in real]).mean()
    want.backward()
    want_grad = layer.router.weight.grad.clone()

    layer.router.weight.grad = None
    layer.token_mask = mask_BS
    layer(x_BSH)
    got = layer.last_stats.losses["sequence_balance"]
    layer.aux_loss.backward()
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(layer.router.weight.grad, want_grad)


def test_z_loss_of_a_padded_batch_is_that_of_its_real_tokens_unpadded() -> None:
    """The z-loss averaged over every row, padding included: how much padding a batch had changed it."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=1.0), H, 16).train()
    x_BSH, mask_BS, _ = _padded_batch(seed=3)
    x_BSH[~mask_BS.bool()] *= 4.0  # padding with large logits: it would dominate a mean over all rows

    layer(x_BSH[mask_BS.bool()])
    want = layer.last_stats.losses["z_loss"]
    layer.aux_loss.backward()
    want_grad = layer.router.weight.grad.clone()

    layer.router.weight.grad = None
    layer.token_mask = mask_BS
    layer(x_BSH)
    got = layer.last_stats.losses["z_loss"]
    layer.aux_loss.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(layer.router.weight.grad, want_grad)

    layer.router.weight.grad = None
    layer.token_mask = torch.zeros_like(mask_BS)  # all padding: 0 and a zero gradient, not NaN
    layer(x_BSH)
    assert layer.last_stats.losses["z_loss"].item() == 0.0
    layer.aux_loss.backward()
    assert torch.count_nonzero(layer.router.weight.grad) == 0


def test_z_loss_mask_forms() -> None:
    """No mask is the plain mean (unchanged), all ones agrees with it, [T] means what [B, L] means, padding rows'
    logits (even inf / NaN) reach neither value nor gradient, and all padding gives a graph-attached 0."""
    logits_TE = torch.randn(12, 4) * 3
    plain = z_loss(logits_TE)
    assert torch.equal(plain, torch.logsumexp(logits_TE, -1).square().mean())
    torch.testing.assert_close(z_loss(logits_TE, torch.ones(3, 4)), plain)
    mask_BL = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    real_T = mask_BL.reshape(-1).bool()
    torch.testing.assert_close(z_loss(logits_TE, real_T), z_loss(logits_TE[real_T]))
    torch.testing.assert_close(z_loss(logits_TE, mask_BL), z_loss(logits_TE, real_T))

    poisoned_TE = logits_TE.clone()
    poisoned_TE[~real_T] = torch.tensor([float("inf"), float("nan"), 0.0, -float("inf")])
    poisoned_TE.requires_grad_(True)
    loss = z_loss(poisoned_TE, real_T)
    loss.backward()
    torch.testing.assert_close(loss.detach(), z_loss(logits_TE[real_T]))
    assert torch.isfinite(poisoned_TE.grad).all() and not poisoned_TE.grad[~real_T].any()

    leaf_TE = logits_TE.clone().requires_grad_(True)
    nothing = z_loss(leaf_TE, torch.zeros(12, dtype=torch.bool))
    assert nothing.item() == 0.0 and nothing.requires_grad
    nothing.backward()
    assert not leaf_TE.grad.any()
    with pytest.raises(ValueError, match="attention_mask has 11 elements, logits have T=12"):
        z_loss(logits_TE, torch.ones(11))


def _sequence_loss(layer: MoELayer, x_1LH: torch.Tensor) -> torch.Tensor:
    layer.token_mask = None
    layer(x_1LH)
    return layer.aux_loss


def test_sequence_balance_loss_mask_forms() -> None:
    """An all-ones mask changes nothing, [T] means what [B, L] means, and all padding gives a graph-attached 0."""
    scores_TE = torch.softmax(torch.randn(12, 4, requires_grad=True), -1)
    idx_TK = torch.topk(scores_TE, 2, -1)[1]
    plain = sequence_balance_loss(scores_TE, idx_TK, 4, batch_size=3)
    torch.testing.assert_close(sequence_balance_loss(scores_TE, idx_TK, 4, 3, torch.ones(3, 4)), plain)
    mask_BL = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(sequence_balance_loss(scores_TE, idx_TK, 4, 3, mask_BL.reshape(-1)),
                               sequence_balance_loss(scores_TE, idx_TK, 4, 3, mask_BL))
    nothing = sequence_balance_loss(scores_TE, idx_TK, 4, 3, torch.zeros(12))
    assert nothing.item() == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="attention_mask has 11 elements, routing has T=12"):
        sequence_balance_loss(scores_TE, idx_TK, 4, 3, torch.ones(11))


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_expert_bias_counts_real_tokens_only(capacity_factor: float | None) -> None:
    """Dropless, the bias counts took padding copies too: padding that all picks one expert pushed its bias down."""
    config = MoEConfig(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.01,
                       capacity_factor=capacity_factor)
    padded = MoELayer(config, H, 16).train()
    with torch.no_grad():  # expert e scores x[e]: padding (a large x[0]) all goes to expert 0
        padded.router.weight.zero_()
        padded.router.weight[:, :4] = torch.eye(4)
    unpadded = copy.deepcopy(padded)
    x_BSH, mask_BS, _ = _padded_batch(seed=2)
    x_BSH[~mask_BS.bool()] = torch.eye(H)[0] * 5.0

    unpadded(x_BSH[mask_BS.bool()])
    padded.token_mask = mask_BS
    padded(x_BSH)
    assert padded._bias_counts_E.sum() == mask_BS.sum()
    torch.testing.assert_close(padded._bias_counts_E, unpadded._bias_counts_E)
    padded.update_expert_bias()
    unpadded.update_expert_bias()
    torch.testing.assert_close(padded.router.expert_bias, unpadded.router.expert_bias)


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_stats_count_real_tokens_only(capacity_factor: float | None, training: bool) -> None:
    """``last_stats`` (the expert load that training metrics and a user's own monitoring read): dropless routing
    sends the padding rows to experts too, but only the real tokens' copies are load; the unpadded batch's stats
    are the oracle."""
    config = MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor)
    padded = MoELayer(config, H, 16).train(training)
    unpadded = copy.deepcopy(padded)
    x_BSH, mask_BS, _ = _padded_batch(seed=4)
    unpadded(x_BSH[mask_BS.bool()])
    padded.token_mask = mask_BS
    padded(x_BSH)
    got, want = padded.last_stats, unpadded.last_stats
    assert int(got.tokens_per_expert_E.sum()) + int(got.dropped_copies) == int(mask_BS.sum()) * 2
    torch.testing.assert_close(got.tokens_per_expert_E, want.tokens_per_expert_E)
    assert int(got.routed_copies) == int(want.routed_copies) and int(got.dropped_copies) == int(want.dropped_copies)
