"""MoELayer pieces that need no ranks: capacity, stats, losses, state dict, expert-bias updates."""

import pytest
import torch

from switchyard import MoEConfig
from switchyard.moe.capacity import capacity_keep_mask, expert_capacity
from switchyard.moe.layer import MoELayer
from tiny_models import saved_tensor_shapes


def test_capacity_keeps_highest_weights_per_expert():
    idx = torch.tensor([[0], [0], [0], [1]])
    weight = torch.tensor([[0.2], [0.9], [0.5], [0.3]])
    # 4 copies, 2 experts, factor 1 → capacity 2: expert 0 keeps tokens 1 and 2 (0.9, 0.5)
    keep = capacity_keep_mask(idx, weight, num_experts=2, capacity_factor=1.0, policy="probs")
    assert keep.squeeze(1).tolist() == [False, True, True, True]
    keep = capacity_keep_mask(idx, weight, num_experts=2, capacity_factor=1.0, policy="position")
    assert keep.squeeze(1).tolist() == [True, True, False, True]
    assert expert_capacity(10, 2, 8, 1.0) == 3


def test_dropped_fraction_and_eval_capacity():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5, eval_capacity_factor=None), 8, 16)
    layer.router.weight.data.zero_()
    layer.router.weight.data[0] = 5.0  # every token prefers expert 0
    x = torch.ones(16, 8)
    layer.train()
    layer(x)
    stats = layer.last_stats
    # capacity ceil(0.5*16*2/4) = 4 per expert; 32 copies, only experts 0 and 1..3 (ties) take 4 each
    assert stats.tokens_per_expert_E.max().item() <= 4
    assert stats.dropped_fraction > 0.5
    layer.eval()
    layer(x)
    assert layer.last_stats.dropped_fraction == 0.0  # dropless at eval
    assert layer.last_stats.imbalance >= 1.0


def test_aux_losses_are_weighted_sum_and_absent_without_grad():
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01, seq_aux_loss_coef=0.5), 8, 16)
    x = torch.randn(2, 5, 8)
    layer(x)
    losses = layer.last_stats.losses
    assert set(losses) == {"load_balancing", "sequence_balance", "z_loss"}
    want = 0.1 * losses["load_balancing"] + 0.5 * losses["sequence_balance"] + 0.01 * losses["z_loss"]
    torch.testing.assert_close(layer.aux_loss.detach(), want)
    with torch.no_grad():
        layer(x)
    assert layer.aux_loss is None


def test_state_dict_uses_global_expert_ids_and_rejects_foreign_experts():
    layer = MoELayer(MoEConfig(num_experts=4, top_k=1, bias=True, gated=False, activation="gelu"), 8, 16)
    state = layer.state_dict()
    assert "experts.3.up_proj" in state and "experts.3.down_proj_bias" in state
    assert "experts.up_proj" not in state
    assert state["experts.2.up_proj"].shape == (16, 8)
    fresh = MoELayer(MoEConfig(num_experts=4, top_k=1, bias=True, gated=False, activation="gelu"), 8, 16)
    fresh.load_state_dict(state)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), layer(x))
    state["experts.9.up_proj"] = state["experts.0.up_proj"]
    with pytest.raises(ValueError, match="state dict has expert 9 but this layer has 4 experts"):
        fresh.load_state_dict(state)
    missing = {k: v for k, v in layer.state_dict().items() if k != "experts.1.down_proj"}
    with pytest.raises(RuntimeError, match="experts.down_proj"):
        fresh.load_state_dict(missing)


def test_expert_bias_moves_against_load():
    layer = MoELayer(MoEConfig(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.01), 8, 16)
    layer.router.weight.data.zero_()
    layer.router.weight.data[2] = 1.0
    layer.train()
    layer(torch.ones(12, 8))
    layer.update_expert_bias()
    bias = layer.router.expert_bias
    assert bias[2] < 0 and (bias[[0, 1, 3]] > 0).all()
    before = bias.clone()
    layer.update_expert_bias()  # nothing counted since: no change
    torch.testing.assert_close(layer.router.expert_bias, before)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="needs intermediate_size"):
        MoELayer(MoEConfig(), 8)
    # the config's size won without a word over the argument
    with pytest.raises(ValueError, match="MoEConfig.intermediate_size=32 but intermediate_size=16 was passed"):
        MoELayer(MoEConfig(num_experts=4, intermediate_size=32), 8, intermediate_size=16)
    assert MoELayer(MoEConfig(num_experts=4, intermediate_size=32), 8, 32).experts.down_proj.shape == (4, 8, 32)


def test_hidden_states_of_another_width_or_an_integer_dtype_are_refused():
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2), 16, 32)
    # a [4, 32] input would reshape into eight 16-wide "tokens" and run without complaint
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 16\] floating-point hidden states, got \(4, 32\)"):
        layer(torch.randn(4, 32))
    with pytest.raises(ValueError, match="got \\(4, 16\\) torch.int64"):
        layer(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="got \\(\\)"):
        layer(torch.tensor(1.0))
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 16)


def test_sigmoid_router_balance_loss_uses_scores_normalised_per_token():
    """Megatron-Core's oracle (``compute_routing_scores_for_aux_loss``): a sigmoid router's Switch loss takes
    each token's scores divided by their sum. Raw sigmoids made it degenerate: shifting every logit down
    drives it to 0 with the routing unchanged, and a balanced router did not score K."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", aux_loss_coef=0.1)
    layer = MoELayer(config, 8, 16).train()
    x = torch.randn(24, 8)
    layer(x)
    routed = layer.last_router_output
    probs_TE = routed.scores_TE / routed.scores_TE.sum(-1, keepdim=True)
    counts_E = torch.zeros(8).index_add_(0, routed.topk_idx_TK.reshape(-1), torch.ones(48))
    want = 8 * (counts_E / 24 * probs_TE.mean(0)).sum()
    torch.testing.assert_close(layer.last_stats.losses["load_balancing"], want)
    # a uniform router (every score equal) scores exactly K = 2, as a softmax router does
    layer.router.weight.data.zero_()
    layer(x)
    torch.testing.assert_close(layer.last_stats.losses["load_balancing"], torch.tensor(2.0))


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (0, 8)])
def test_empty_batch_with_every_loss_on(shape):
    """A rank's empty batch ``[0, S, H]`` has zero sequences: the sequence loss is 0, not a ValueError."""
    config = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.1, seq_aux_loss_coef=0.1, z_loss_coef=0.1)
    layer = MoELayer(config, 8, 16).train()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    assert y.shape == x.shape and layer.aux_loss.item() == 0.0
    assert layer.router.weight.grad is not None


@pytest.mark.parametrize("impl", ["swiglu_per_expert", "swiglu_grouped"])
def test_empty_batch_gives_the_router_a_zero_gradient_without_aux_losses(impl):
    """No rows reach the experts, so nothing there can take the folded routing weights: the router's gradient is
    still zeros from the output alone (an optimizer that skips ``None`` grads would otherwise desync its state)."""
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.0), 8, 16).train()
    layer.experts.impl = impl
    x = torch.randn(0, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.router.weight.grad is not None
    assert torch.count_nonzero(layer.router.weight.grad) == 0


@pytest.mark.parametrize("impl", ["swiglu_per_expert", "swiglu_grouped"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_folded_routing_weights_keep_no_expert_outputs_and_change_nothing(impl, capacity_factor):
    """The routing weights folded into the SwiGLU (default) vs applied in the combine: the same outputs and
    gradients (fp32, every parameter and the input; with dropped copies too), and the backward keeps one
    [T*K, H] tensor fewer (the combine's saved expert outputs)."""
    torch.manual_seed(0)
    tokens, hidden, top_k = 24, 16, 2
    layer = MoELayer(MoEConfig(num_experts=4, top_k=top_k, capacity_factor=capacity_factor), hidden, 32)
    layer.experts.impl = impl
    x = torch.randn(tokens, hidden)
    cotangent = torch.randn(tokens, hidden)
    results = {}
    for fold in (True, False):
        layer.fold_routing_weights = fold
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        with saved_tensor_shapes() as kept_rows:
            out = layer(x_in)
        (out * cotangent).sum().backward()
        results[fold] = (out.detach(), x_in.grad, *[p.grad for p in layer.parameters()],
                         sum(1 for shape in kept_rows if len(shape) == 2 and shape[1] == hidden and shape[0] > tokens))
    *folded, folded_rows = results[True]
    *weighted, weighted_rows = results[False]
    for got, want in zip(folded, weighted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert folded_rows == weighted_rows - 1
