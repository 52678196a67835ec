"""Router losses against transformers' load_balancing_loss_func and hand-computed numbers.

Run: /work/main/.venv/bin/python -m pytest -q tests/unit/test_losses.py
"""

from __future__ import annotations

import math

import pytest
import torch

from switchyard.config import MoEConfig
from switchyard.moe.losses import load_balancing_loss, sequence_balance_loss, z_loss
from switchyard.moe.router import Router

H = 16


def _hf_lbl():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (8, 1), (4, 4)])
def test_load_balancing_matches_hf(num_experts: int, top_k: int) -> None:
    torch.manual_seed(0)
    router = Router(H, MoEConfig(num_experts=num_experts, top_k=top_k))
    with torch.no_grad():
        router.weight.normal_()
        out = router(torch.randn(3 * 7, H))
    ours = load_balancing_loss(out.scores_TE, out.topk_idx_TK, num_experts)
    # HF softmaxes the logits itself and recomputes top-k: feed it the raw logits.
    hf = _hf_lbl()((out.logits_TE,), num_experts, top_k)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)
    assert ours.dtype == torch.float32 and ours.dim() == 0


def test_load_balancing_with_attention_mask_matches_hf() -> None:
    torch.manual_seed(1)
    batch, seq, num_experts, top_k = 3, 5, 8, 2
    router = Router(H, MoEConfig(num_experts=num_experts, top_k=top_k))
    with torch.no_grad():
        router.weight.normal_()
        out = router(torch.randn(batch, seq, H))
    mask_BS = torch.ones(batch, seq, dtype=torch.long)
    mask_BS[0, :2] = 0  # left padding
    mask_BS[2, 3:] = 0  # right padding
    ours = load_balancing_loss(out.scores_TE, out.topk_idx_TK, num_experts, attention_mask=mask_BS)
    hf = _hf_lbl()((out.logits_TE,), num_experts, top_k, mask_BS)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)
    unmasked = load_balancing_loss(out.scores_TE, out.topk_idx_TK, num_experts)
    assert not torch.allclose(ours, unmasked)
    # the same mask flattened to [T] means the same thing
    torch.testing.assert_close(
        load_balancing_loss(out.scores_TE, out.topk_idx_TK, num_experts, attention_mask=mask_BS.reshape(-1)), ours
    )


def test_load_balancing_all_padding_is_zero_not_nan() -> None:
    scores_TE = torch.softmax(torch.randn(4, 8), -1)
    idx_TK = torch.topk(scores_TE, 2, -1)[1]
    loss = load_balancing_loss(scores_TE, idx_TK, 8, attention_mask=torch.zeros(2, 2))
    assert loss.item() == 0.0


def test_load_balancing_balanced_router_scores_top_k() -> None:
    # uniform probabilities and perfectly even assignment: E * sum_i (K/E) * (1/E) = K
    scores_TE = torch.full((8, 4), 0.25)
    idx_TK = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(load_balancing_loss(scores_TE, idx_TK, 4), torch.tensor(2.0))


def test_z_loss_known_numbers() -> None:
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    torch.testing.assert_close(z_loss(logits_TE), torch.tensor(2.5 * math.log(2.0) ** 2))
    big = torch.tensor([[1000.0, 1000.0]])  # stable: no overflow
    torch.testing.assert_close(z_loss(big), torch.tensor((1000.0 + math.log(2.0)) ** 2))
    assert z_loss(logits_TE.bfloat16()).dtype == torch.float32


def test_sequence_balance_hand_example() -> None:
    # B=2 sequences, L=2 tokens, E=2, K=1; f_i = E/(K*L) * count_i, P_i = mean normalized score.
    # seq 0: counts [2, 0] -> f [2, 0]; P [0.7, 0.3] -> 1.4.  seq 1: f [1, 1]; P [0.4, 0.6] -> 1.0.
    idx_TK = torch.tensor([[0], [0], [1], [0]])
    softmax_TE = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    torch.testing.assert_close(sequence_balance_loss(softmax_TE, idx_TK, 2, batch_size=2), torch.tensor(1.2))
    # sigmoid-like scores are normalized per token first (DeepSeek-V3): these normalize to the above
    sigmoid_TE = torch.tensor([[0.4, 0.1], [0.3, 0.2], [0.3, 0.7], [0.25, 0.25]])
    torch.testing.assert_close(sequence_balance_loss(sigmoid_TE, idx_TK, 2, batch_size=2), torch.tensor(1.2))
    # one sequence of all four tokens: counts [3, 1] -> f [1.5, 0.5]; P [0.55, 0.45] -> 1.05
    torch.testing.assert_close(sequence_balance_loss(softmax_TE, idx_TK, 2, batch_size=1), torch.tensor(1.05))


def test_sequence_balance_every_expert_chosen_is_one() -> None:
    scores_TE = torch.softmax(torch.randn(6, 4), -1)
    idx_TK = torch.arange(4).repeat(6, 1)  # K = E: f_i = 1 for all i, sum_i P_i = 1
    torch.testing.assert_close(sequence_balance_loss(scores_TE, idx_TK, 4, batch_size=3), torch.tensor(1.0))
    with pytest.raises(ValueError):
        sequence_balance_loss(scores_TE, idx_TK, 4, batch_size=4)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gradients_reach_router_weight(score_func: str) -> None:
    torch.manual_seed(2)
    router = Router(H, MoEConfig(num_experts=8, top_k=2, score_func=score_func))
    out = router(torch.randn(2 * 6, H))
    for loss in (
        load_balancing_loss(out.scores_TE, out.topk_idx_TK, 8),
        sequence_balance_loss(out.scores_TE, out.topk_idx_TK, 8, batch_size=2),
        z_loss(out.logits_TE),
    ):
        router.weight.grad = None
        loss.backward(retain_graph=True)
        assert router.weight.grad is not None and torch.count_nonzero(router.weight.grad) > 0


def test_empty_input_gives_zero_with_graph() -> None:
    router = Router(H, MoEConfig(num_experts=8, top_k=2))
    out = router(torch.randn(0, H))
    losses = [
        load_balancing_loss(out.scores_TE, out.topk_idx_TK, 8),
        load_balancing_loss(out.scores_TE, out.topk_idx_TK, 8, attention_mask=torch.ones(0)),
        sequence_balance_loss(out.scores_TE, out.topk_idx_TK, 8, batch_size=2),
        z_loss(out.logits_TE),
    ]
    for loss in losses:
        assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.requires_grad
    sum(losses).backward()
    assert router.weight.grad is not None and torch.count_nonzero(router.weight.grad) == 0
