"""A ``[B, S]`` token mask with a flattened ``[T, H]`` input means what it means with ``[B, S, H]``.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_layer_2d_token_mask.py

OPT's decoder layer hands its FFN (our MoE) ``[B*S, H]`` while the patched model's hook sets the ``[B, S]``
attention mask on the layer. The oracle is the same layer, same weights, fed the same batch as ``[B, S, H]``:
output, losses (the sequence balance loss per sequence, not over the batch as one), gradients and stats agree.
"""

from __future__ import annotations

import pytest
import torch

from switchyard import MoEConfig
from switchyard.moe.layer import MoELayer
from switchyard.moe.losses import sequence_balance_loss

H = 8
# per row (left padding, real tokens): every row 6 wide, the last one all padding
ROWS = [(0, 6), (2, 4), (1, 3), (0, 0)]
WIDTH = 6


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [B, WIDTH, H], mask [B, WIDTH]); each row has its own routing (a per-row offset), so B sequences
    and one sequence of B * WIDTH tokens score different sequence losses."""
    gen = torch.Generator().manual_seed(seed)
    x_BSH = torch.randn(len(ROWS), WIDTH, H, generator=gen) + 2.0 * torch.randn(len(ROWS), 1, H, generator=gen)
    mask_BS = torch.zeros(len(ROWS), WIDTH, dtype=torch.long)
    for row, (left, real) in enumerate(ROWS):
        mask_BS[row, left:left + real] = 1
    return x_BSH, mask_BS


def _run(layer: MoELayer, x: torch.Tensor, mask: torch.Tensor) -> dict[str, object]:
    """One forward + backward of ``layer`` on ``x`` (a leaf copy) with ``mask``: everything worth comparing."""
    layer.zero_grad(set_to_none=True)
    layer._bias_counts_E = None
    x = x.detach().clone().requires_grad_(True)
    layer.token_mask = mask
    out = layer(x)
    (out.square().sum() + layer.aux_loss).backward()
    stats = layer.last_stats
    return {
        "out": out.reshape(-1, H).detach(),
        "x_grad": x.grad.reshape(-1, H),
        "aux_loss": layer.aux_loss.detach(),
        **{f"loss.{k}": v for k, v in stats.losses.items()},
        **{f"grad.{n}": p.grad for n, p in layer.named_parameters()},
        "tokens_per_expert_E": stats.tokens_per_expert_E,
        "routed_copies": torch.as_tensor(stats.routed_copies),
        "dropped_copies": stats.dropped_copies,
        "bias_counts_E": layer._bias_counts_E,
    }


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_2d_input_with_2d_mask_equals_3d_input(capacity_factor: float | None) -> None:
    """The layer took batch_size=1 for any input that was not 3-D: a [T, H] input with a [B, S] mask was
    one sequence of T tokens in the sequence balance loss (and its router gradient), not B sequences."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.01, seq_aux_loss_coef=1.0, z_loss_coef=1e-3,
                       expert_bias=True, capacity_factor=capacity_factor, drop_policy="probs")
    layer = MoELayer(config, H, 16).train()
    x_BSH, mask_BS = _batch(seed=1)

    want = _run(layer, x_BSH, mask_BS)
    got = _run(layer, x_BSH.reshape(-1, H), mask_BS)

    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")
    if capacity_factor is not None:
        assert int(want["dropped_copies"]) > 0, "nothing dropped: the test would not see the capacity path"
    # guard: one sequence of all T tokens scores otherwise, so the comparison above can see the mix-up
    routed = layer.last_router_output
    one_sequence = sequence_balance_loss(routed.scores_TE, routed.topk_idx_TK, 4, 1, mask_BS.reshape(-1))
    assert not torch.allclose(one_sequence, want["loss.sequence_balance"], atol=1e-3)


def test_2d_input_with_1d_mask_is_one_sequence() -> None:
    """A [T] mask names no sequences and a [T, H] input none either: the T rows are one sequence."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.0, seq_aux_loss_coef=1.0), H, 16).train()
    x_BSH, mask_BS = _batch(seed=2)
    layer.token_mask = mask_BS.reshape(-1)
    layer(x_BSH.reshape(-1, H))
    routed = layer.last_router_output
    want = sequence_balance_loss(routed.scores_TE, routed.topk_idx_TK, 4, 1, mask_BS.reshape(-1))
    torch.testing.assert_close(layer.last_stats.losses["sequence_balance"], want.detach())


@pytest.mark.parametrize("x_shape, mask_shape", [
    ((24, H), (5, 5)),     # B*S = 25 != T = 24
    ((24, H), (4, 5)),     # B*S = 20 != T = 24: 6 tokens per sequence, more than S = 5 (not a cache step)
    ((24, H), (5, 4)),     # T = 24 does not split into B = 5 sequences
    ((24, H), (23,)),      # [T] of the wrong T
    ((4, 6, H), (6, 4)),   # B*S = T but not the input's [B, S]
    ((4, 6, H), (3, 8)),   # B*S = T, another B
    ((4, 6, H), (4, 5)),   # S shorter than the input's
    ((4, 6, H), (2, 2, 6)),
])
def test_mask_that_does_not_fit_the_input_is_an_error(x_shape: tuple, mask_shape: tuple) -> None:
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, seq_aux_loss_coef=1.0), H, 16).train()
    layer.token_mask = torch.ones(mask_shape, dtype=torch.long)
    shapes = rf"{tuple(mask_shape)}.*{tuple(x_shape)}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=shapes):
        layer(torch.randn(x_shape))


@pytest.mark.parametrize("x_shape", [(2, 3, H), (6, H)])
def test_mask_of_a_step_with_a_kv_cache_is_ignored(x_shape: tuple) -> None:
    """[B, S_cache + S] with S new tokens per sequence (3-D, or 2-D with T = B * S): not this call's mask."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5, seq_aux_loss_coef=1.0), H, 16).train()
    x = torch.randn(2, 3, H).reshape(x_shape)
    want = layer(x)
    layer.token_mask = torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(layer(x), want)


def test_sequence_balance_loss_refuses_a_mask_of_other_sequences() -> None:
    scores_TE = torch.softmax(torch.randn(12, 4), -1)
    idx_TK = torch.topk(scores_TE, 2, -1)[1]
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 6\).*batch_size=3"):
        sequence_balance_loss(scores_TE, idx_TK, 4, 3, torch.ones(2, 6))

