"""Routing semantics against oracles switchyard did not write: DeepSpeed's ``sharded_moe`` gating functions,
transformers' loss functions and routers, and the papers' formulas (docs/moe-layer.md, "Routing semantics").

Each test calls the oracle itself, so a change to our capacity, drop, loss or bias math fails here. Where we
differ from an oracle on purpose, the test pins the documented difference.

Run: /work/main/.venv/bin/python -m pytest -q tests/unit/test_moe_semantics_audit.py
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from switchyard.config import MoEConfig
from switchyard.moe.capacity import capacity_keep_mask, expert_capacity
from switchyard.moe.losses import load_balancing_loss, sequence_balance_loss, z_loss
from switchyard.moe.router import Router

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")


def _ds_keep_TK(logits_TE: torch.Tensor, top_k: int, factor: float, policy: str) -> tuple[torch.Tensor, int]:
    """DeepSpeed's ``topkgating`` keep mask in its route order ([T, K], the top-k order) and its capacity."""
    out = sharded_moe.topkgating(logits_TE.clone(), top_k, factor, 1, drop_tokens=True, drop_policy=policy,
                                 sparse_routes=True)
    return out[3].t() >= 0, int(out[1])


def _softmax_routes(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our router's unrenormalised softmax → top-k (``norm_topk_prob=False``) on given logits."""
    weight_TK, idx_TK = torch.softmax(logits_TE, dim=-1).topk(top_k, dim=-1)
    return idx_TK, weight_TK


# -- capacity -------------------------------------------------------------------------------------------------
def test_capacity_is_exact_and_matches_deepspeed_where_its_fp32_is_exact() -> None:
    """C = max(1, ceil(f·T·K/E)) with f the decimal written; DeepSpeed's ``_capacity`` is the oracle wherever
    its fp32 product is not itself off by one (documented in moe/capacity.py)."""
    compared = 0
    for factor in (0.1, 0.5, 0.75, 1.0, 1.1, 1.2, 1.25, 1.5, 2.0, 3.3):
        for num_experts in (1, 2, 3, 7, 8, 10, 64):
            for top_k in sorted({1, 2, min(7, num_experts), num_experts}):
                for tokens in (*range(0, 40), 57, 100, 114, 4096):
                    got = expert_capacity(tokens, top_k, num_experts, factor)
                    exact = max(1, math.ceil(Fraction(repr(factor)) * tokens * top_k / num_experts))
                    assert got == exact, (factor, num_experts, top_k, tokens)
                    assert int(expert_capacity(torch.tensor(tokens), top_k, num_experts, factor)) == exact
                    ds = int(sharded_moe._capacity(torch.empty(tokens, num_experts), torch.tensor(factor * top_k),
                                                   torch.tensor(1)))
                    if ds == exact or tokens == 0:  # T = 0: DeepSpeed gives 0 (no copies either way)
                        assert tokens == 0 or got == ds
                        compared += 1
    assert compared > 4000
    # a float ceil gave 12 here (110.00000000000001 / 10 → 11.000000000000002); DeepSpeed and the decimal say 11
    assert expert_capacity(100, 1, 10, 1.1) == 11 == int(sharded_moe._capacity(
        torch.empty(100, 10), torch.tensor(1.1), torch.tensor(1)))
    # capacity below one copy rounds up to 1, as DeepSpeed's min_capacity=1 does
    assert expert_capacity(3, 1, 16, 0.5) == 1 == _ds_keep_TK(torch.randn(3, 16), 1, 0.5, "probs")[1]


# -- drop policies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_drops_match_deepspeed_topkgating(policy: str, logits_dtype: torch.dtype) -> None:
    """Unrenormalised softmax weights: the copies we keep are DeepSpeed's, for K from 1 to E."""
    gen = torch.Generator().manual_seed(0)
    for tokens, num_experts, top_k in [(16, 4, 1), (33, 8, 2), (64, 8, 3), (20, 4, 4), (7, 8, 2)]:
        for factor in (0.5, 1.0, 1.25):
            for scale in (0.5, 3.0):
                logits_TE = (torch.randn(tokens, num_experts, generator=gen) * scale).to(logits_dtype).float()
                idx_TK, weight_TK = _softmax_routes(logits_TE, top_k)
                want, ds_capacity = _ds_keep_TK(logits_TE, top_k, factor, policy)
                assert ds_capacity == expert_capacity(tokens, top_k, num_experts, factor)
                got = capacity_keep_mask(idx_TK, weight_TK, num_experts, factor, policy)
                assert torch.equal(got, want), (tokens, num_experts, top_k, factor)


def test_all_tokens_to_one_expert_and_k_equals_e_match_deepspeed() -> None:
    logits_TE = torch.zeros(10, 4)
    logits_TE[:, 0] = 5 + 0.1 * torch.arange(10)  # every token's first choice is expert 0, later tokens surer
    for policy, kept in [("probs", [7, 8, 9]), ("position", [0, 1, 2])]:
        idx_TK, weight_TK = _softmax_routes(logits_TE, 1)
        got = capacity_keep_mask(idx_TK, weight_TK, 4, 1.0, policy)
        assert torch.equal(got, _ds_keep_TK(logits_TE, 1, 1.0, policy)[0])
        assert got.squeeze(1).nonzero().squeeze(1).tolist() == kept
    logits_TE = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    idx_TK, weight_TK = _softmax_routes(logits_TE, 4)
    for factor in (1.0, 0.5):
        for policy in ("probs", "position"):
            got = capacity_keep_mask(idx_TK, weight_TK, 4, factor, policy)
            assert torch.equal(got, _ds_keep_TK(logits_TE, 4, factor, policy)[0])
        if factor == 1.0:
            assert got.all()  # K = E, f = 1: C = T, nothing dropped
    assert capacity_keep_mask(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4, 1.0).shape == (0, 2)


def test_probs_ties_keep_the_earlier_token_where_deepspeed_keeps_any() -> None:
    """Tied weights: DeepSpeed's ``torch.topk`` over tokens picks among them in no fixed order; we keep the
    earlier token. Either way each expert keeps as many copies, of the same weights."""
    gen = torch.Generator().manual_seed(0)
    differed = 0
    for trial in range(30):
        top_k = 1 + trial % 2
        logits_TE = torch.randint(0, 3, (24, 4), generator=gen).float()  # many equal rows: tied weights
        idx_TK, weight_TK = _softmax_routes(logits_TE, top_k)
        got = capacity_keep_mask(idx_TK, weight_TK, 4, 0.5, "probs")
        want = _ds_keep_TK(logits_TE, top_k, 0.5, "probs")[0]
        differed += not torch.equal(got, want)
        capacity = expert_capacity(24, top_k, 4, 0.5)
        for expert in range(4):
            here = idx_TK == expert
            assert sorted(weight_TK[here & got].tolist()) == sorted(weight_TK[here & want].tolist())
            copies = sorted((-w, t) for t, w in zip(here.nonzero()[:, 0].tolist(), weight_TK[here].tolist()))
            assert sorted(here.nonzero()[got[here]][:, 0].tolist()) == sorted(t for _, t in copies[:capacity])
    assert differed > 0  # the tie rule is ours, not DeepSpeed's


def test_probs_ranks_final_weights_not_deepspeeds_softmax_probabilities() -> None:
    """``probs`` ranks by the final (renormalised, scaled) combine weight, as Megatron-Core does: DeepSpeed's rule
    applied to those weights (logits log w, whose softmax is w / Σw). DeepSpeed itself ranks by the softmax
    probability before renormalisation, which keeps other copies. Renormalised top-1 weights are all 1, so
    ``probs`` then keeps the earliest tokens, as ``position`` does (documented)."""
    torch.manual_seed(0)
    differed = 0
    for top_k, score_func in [(2, "softmax"), (3, "softmax"), (2, "sigmoid")]:
        router = Router(16, MoEConfig(num_experts=6, top_k=top_k, score_func=score_func,
                                      routed_scaling_factor=2.5)).eval()
        for _ in range(10):
            with torch.no_grad():
                out = router(torch.randn(40, 16) * 40)
            got = capacity_keep_mask(out.topk_idx_TK, out.topk_weight_TK, 6, 1.0, "probs")
            weights_TE = torch.zeros(40, 6).scatter(1, out.topk_idx_TK, out.topk_weight_TK)
            via_final, _ = _ds_keep_TK(weights_TE.log(), top_k, 1.0, "probs")  # DeepSpeed's route order: top-k of w
            order_TK = weights_TE.topk(top_k, dim=-1).indices
            assert torch.equal(got, _reorder(via_final, order_TK, out.topk_idx_TK))
            if score_func == "softmax":
                differed += not torch.equal(got, _ds_keep_TK(out.logits_TE, top_k, 1.0, "probs")[0])
    assert differed > 0
    top1 = Router(16, MoEConfig(num_experts=4, top_k=1)).eval()  # norm_topk_prob=True: every weight is 1
    with torch.no_grad():
        out = top1(torch.randn(32, 16) * 40)
    probs = capacity_keep_mask(out.topk_idx_TK, out.topk_weight_TK, 4, 1.0, "probs")
    assert torch.equal(probs, capacity_keep_mask(out.topk_idx_TK, out.topk_weight_TK, 4, 1.0, "position"))


def _reorder(keep_TK: torch.Tensor, from_idx_TK: torch.Tensor, to_idx_TK: torch.Tensor) -> torch.Tensor:
    """``keep_TK`` whose columns follow ``from_idx_TK``'s experts, rearranged into ``to_idx_TK``'s order."""
    keep_TE = torch.zeros(keep_TK.shape[0], int(max(from_idx_TK.max(), to_idx_TK.max())) + 1, dtype=torch.bool)
    keep_TE.scatter_(1, from_idx_TK, keep_TK)
    return keep_TE.gather(1, to_idx_TK)


def test_position_queues_tokens_not_first_choices_as_top2gating_does() -> None:
    """``position`` is ``topkgating``'s (token order); ``top2gating`` queues all first choices first."""
    gen = torch.Generator().manual_seed(2)
    differed = 0
    for _ in range(10):
        logits_TE = torch.randn(32, 4, generator=gen) * 2
        idx_TK, weight_TK = _softmax_routes(logits_TE, 2)
        got = capacity_keep_mask(idx_TK, weight_TK, 4, 0.5, "position")
        assert torch.equal(got, _ds_keep_TK(logits_TE, 2, 0.5, "position")[0])
        top2 = sharded_moe.top2gating(logits_TE.clone(), 0.5, 1, top2_2nd_expert_sampling=False, sparse_routes=True)
        differed += not torch.equal(got, top2[3].t() >= 0)
    assert differed > 0


# -- losses ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k", [(32, 8, 1), (32, 8, 2), (50, 6, 3), (16, 4, 4)])
def test_load_balancing_loss_is_hfs_and_k_times_deepspeeds(logits_dtype: torch.dtype, tokens: int,
                                                           num_experts: int, top_k: int) -> None:
    """Value and logits gradient: transformers' scale (a balanced router scores K); DeepSpeed's ``topkgating`` and
    Megatron-Core divide by K (balanced = 1); ``top1gating`` is ours at K = 1; ``top2gating`` counts first
    choices only."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    base_TE = (torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(tokens + top_k)) * 2)
    base_TE = base_TE.to(logits_dtype).float()

    def run(fn):
        logits_TE = base_TE.clone().requires_grad_()
        loss = fn(logits_TE)
        return loss.detach(), torch.autograd.grad(loss, logits_TE)[0]

    def ours(logits_TE, k=top_k):
        scores_TE = torch.softmax(logits_TE, dim=-1)
        return load_balancing_loss(scores_TE, scores_TE.topk(top_k, dim=-1).indices[:, :k], num_experts)

    loss, grad = run(ours)
    hf_loss, hf_grad = run(lambda lg: load_balancing_loss_func((lg,), num_experts, top_k))
    torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, hf_grad, rtol=1e-5, atol=1e-8)
    ds_loss, ds_grad = run(lambda lg: sharded_moe.topkgating(lg, top_k, 1.0, 1, drop_tokens=False)[0])
    torch.testing.assert_close(loss / top_k, ds_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad / top_k, ds_grad, rtol=1e-5, atol=1e-8)
    if top_k == 1:
        assert torch.equal(loss, run(lambda lg: sharded_moe.top1gating(lg, 1.0, 1, use_rts=False)[0])[0])
    if top_k == 2:
        top2_loss, _ = run(lambda lg: sharded_moe.top2gating(lg, 1.0, 1, top2_2nd_expert_sampling=False)[0])
        torch.testing.assert_close(run(lambda lg: ours(lg, k=1))[0], top2_loss, rtol=1e-6, atol=0)


def test_z_loss_is_st_moes_as_transformers_computes_it() -> None:
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    for dtype in (torch.float32, torch.bfloat16):
        base_TE = (torch.randn(24, 8, generator=torch.Generator().manual_seed(5)) * 4).to(dtype).float()
        ours_in, hf_in = base_TE.clone().requires_grad_(), base_TE.clone().requires_grad_()
        ours, hf = z_loss(ours_in), router_z_loss_func(hf_in.view(3, 8, 8))
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
        ours.backward()
        hf.backward()
        torch.testing.assert_close(ours_in.grad, hf_in.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_balance_loss_is_deepseek_v3_eqs_17_to_20(score_func: str) -> None:
    """Per sequence: f_i = E / (K L) · #tokens choosing i, P_i = mean of s_i / Σ_j s_j; mean over sequences."""
    batch, length, num_experts, top_k = 3, 10, 8, 2
    logits_TE = torch.randn(batch * length, num_experts, generator=torch.Generator().manual_seed(3),
                            requires_grad=True)
    scores_TE = torch.softmax(logits_TE, -1) if score_func == "softmax" else torch.sigmoid(logits_TE)
    idx_TK = scores_TE.topk(top_k, dim=-1).indices
    ours = sequence_balance_loss(scores_TE, idx_TK, num_experts, batch)
    paper = 0.0
    for b in range(batch):
        rows = slice(b * length, (b + 1) * length)
        chosen = idx_TK[rows].tolist()
        f_E = torch.tensor([num_experts / (top_k * length) * sum(i in row for row in chosen)
                            for i in range(num_experts)])
        p_E = (scores_TE[rows] / scores_TE[rows].sum(-1, keepdim=True)).mean(0)
        paper = paper + (f_E * p_E).sum() / batch
    torch.testing.assert_close(ours, paper, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(ours, logits_TE, retain_graph=True)[0], torch.autograd.grad(paper, logits_TE)[0]
    torch.testing.assert_close(*grads, rtol=1e-5, atol=1e-9)


# -- router: jitter, group-limited top-k, expert bias -----------------------------------------------------------
def test_router_jitter_is_deepspeeds_multiplicative_jitter() -> None:
    """``router_jitter`` = DeepSpeed's ``noisy_gate_policy='Jitter'`` (Switch): the same draws under one seed,
    training only. (DeepSpeed's ``RSample`` and top-2 Gumbel sampling are not offered.)"""
    x_TH = torch.randn(16, 8)
    router = Router(8, MoEConfig(router_jitter=0.01)).train()
    torch.manual_seed(3)
    ours = router.jitter(x_TH)
    torch.manual_seed(3)
    assert torch.equal(ours, sharded_moe.multiplicative_jitter(x_TH, x_TH.device, epsilon=0.01))
    assert router.eval().jitter(x_TH) is x_TH


def test_deepspeed_gate_aux_loss_on_bf16_input() -> None:
    """DeepSpeed's ``TopKGate`` on a bf16 input (fp32 logits, as ours) scores our loss / K."""
    torch.manual_seed(0)
    gate = sharded_moe.TopKGate(16, 8, k=3, min_capacity=1).eval()
    router = Router(16, MoEConfig(num_experts=8, top_k=3, norm_topk_prob=False)).eval()
    with torch.no_grad():
        router.weight.copy_(gate.wg.weight)
        x_TH = torch.randn(40, 16).bfloat16()
        out = router(x_TH)
        ds_loss = gate(x_TH)[0]
    torch.testing.assert_close(load_balancing_loss(out.scores_TE, out.topk_idx_TK, 8) / 3, ds_loss, rtol=1e-6, atol=0)


def test_group_limit_masks_other_groups_even_below_zero() -> None:
    """DeepSeek-V3 (transformers and the reference code) fill the dropped groups with -inf, so a negative biased
    score in a kept group still beats them (DeepSeek-V2's 0.0 fill would pick from dropped groups)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(4)
    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3TopkRouter(cfg).eval()
    ours = Router(16, MoEConfig(num_experts=16, top_k=4, score_func="sigmoid", expert_bias=True, n_group=4,
                                topk_group=2, routed_scaling_factor=2.5)).eval()
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.copy_(-2.0 - torch.rand(16))  # every biased score below 0
        ours.weight.copy_(hf.weight)
        ours.expert_bias.copy_(hf.e_score_correction_bias)
        x_TH = torch.randn(32, 16)
        _, hf_weight, hf_idx = hf(x_TH)
        out = ours(x_TH)
    assert torch.equal(out.topk_idx_TK, hf_idx)
    torch.testing.assert_close(out.topk_weight_TK, hf_weight, rtol=0, atol=1e-6)
    assert max(len(set((row // 4).tolist())) for row in out.topk_idx_TK) <= 2


def test_expert_bias_update_is_rate_times_sign_of_mean_minus_load() -> None:
    """DeepSeek-V3 §2.1.2 (Megatron-Core's ``get_updated_expert_bias``): b_i += u · sign(mean load − load_i)."""
    rate = 1e-3
    router = Router(8, MoEConfig(num_experts=6, top_k=2, score_func="sigmoid", expert_bias=True,
                                 expert_bias_update_rate=rate))
    bias = torch.zeros(6)
    gen = torch.Generator().manual_seed(0)
    for counts in (torch.randint(0, 20, (6,), generator=gen), torch.tensor([4, 4, 4, 4, 4, 4]),
                   torch.tensor([24, 0, 0, 0, 0, 0]), torch.tensor([3, 5, 4, 4, 2, 6])):
        router.update_expert_bias(counts)
        bias += rate * torch.sign(counts.float().mean() - counts.float())
        torch.testing.assert_close(router.expert_bias, bias, rtol=0, atol=0)


def test_tied_scores_pick_what_transformers_picks() -> None:
    """All scores tied (a zero router): the choice and order are ``torch.topk``'s, as in transformers' Mixtral."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    hf = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)).eval()
    ours = Router(16, MoEConfig(num_experts=8, top_k=2)).eval()
    with torch.no_grad():
        hf.weight.zero_()
        ours.weight.zero_()
        x_TH = torch.randn(5, 16)
        _, hf_weight, hf_idx = hf(x_TH)
        out = ours(x_TH)
    assert torch.equal(out.topk_idx_TK, hf_idx) and torch.equal(out.topk_weight_TK, hf_weight)


@pytest.mark.parametrize("routing", [dict(expert_bias=True), dict(n_group=4, topk_group=1)], ids=["bias", "groups"])
def test_balance_losses_count_the_unbiased_top_k_not_the_routed_choice(routing: dict) -> None:
    # DeepSeek-V3 eq. 18 / Megatron-Core's compute_routing_scores_for_aux_loss: the bias and the group limit choose
    # the experts; what the balance losses count is the plain top-k of the unbiased scores over all experts
    from switchyard.moe.layer import MoELayer

    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", aux_loss_coef=0.01, seq_aux_loss_coef=0.01,
                       **routing)
    layer = MoELayer(config, 16, 32).train()
    if layer.router.expert_bias is not None:
        layer.router.expert_bias[3] = 10.0  # every token routed to expert 3; the unbiased top-k rarely holds it
    x = torch.randn(2, 12, 16)
    layer(x)
    routed = layer.last_router_output
    plain_TK = routed.scores_TE.topk(2, dim=-1).indices
    assert not torch.equal(plain_TK.sort(-1).values, routed.topk_idx_TK.sort(-1).values)  # the case is real
    probs = routed.scores_TE / routed.scores_TE.sum(-1, keepdim=True)
    losses = layer.last_stats.losses
    torch.testing.assert_close(losses["load_balancing"], load_balancing_loss(probs, plain_TK, 8))
    torch.testing.assert_close(losses["sequence_balance"], sequence_balance_loss(routed.scores_TE, plain_TK, 8, 2))
