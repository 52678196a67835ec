"""Upcycling initializers: output preservation, rank-split determinism, drop-upcycle statistics, errors.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_upcycle.py

The oracle for ``copy`` and ``granular`` is the dense FFN itself: a freshly upcycled ``MoELayer`` must
compute ``DenseFFN.forward`` (fp32, 1e-5) whenever the routing weights sum to 1.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from switchyard.config import MoEConfig
from switchyard.hf.architectures import DenseFFN
from switchyard.hf.upcycle import (
    INITIALIZERS, expert_fields, expert_intermediate_size, init_experts, init_router, output_preserving_issues,
    upcycle_layer,
)
from switchyard.moe.layer import MoELayer

H, F, T = 16, 24, 64
TOL = {"atol": 1e-5, "rtol": 1e-5}
METHODS = sorted(INITIALIZERS)


def make_dense(gated: bool = True, bias: bool = False, h: int = H, f: int = F, mean: float = 0.0,
               std: float = 0.2, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g) * std + mean  # noqa: E731
    return DenseFFN(w(f, h), w(h, f), w(f, h) if gated else None, w(f) if bias else None,
                    w(f) if bias and gated else None, w(h) if bias else None,
                    "silu" if gated else "gelu_new")


DENSES = {"swiglu": dict(gated=True, bias=False), "gelu_bias": dict(gated=False, bias=True),
          "swiglu_bias": dict(gated=True, bias=True)}


def upcycled(dense: DenseFFN, seed: int = 0, **moe) -> MoELayer:
    config = dataclasses.replace(MoEConfig(**moe), **expert_fields(dense))
    layer = MoELayer(config, dense.hidden_size, expert_intermediate_size(dense, config))
    upcycle_layer(layer, dense, seed)
    return layer.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


# -- copy -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(DENSES))
@pytest.mark.parametrize("routing", [{}, {"softmax_before_topk": False, "norm_topk_prob": False},
                                     {"score_func": "sigmoid"}, {"num_shared_experts": 1, "shared_expert_gate": True}])
def test_copy_reproduces_the_dense_ffn(kind: str, routing: dict) -> None:
    dense = make_dense(**DENSES[kind])
    layer = upcycled(dense, num_experts=4, top_k=2, init="copy", **routing)
    assert output_preserving_issues(layer.config) == []
    with torch.no_grad():
        torch.testing.assert_close(layer(tokens()), dense.forward(tokens()), **TOL)


def test_copy_without_renormalization_scales_by_the_topk_mass() -> None:
    """Documented limit: softmax without norm_topk_prob gives (sum of the k probabilities) * dense(x)."""
    dense = make_dense()
    layer = upcycled(dense, num_experts=4, top_k=2, init="copy", norm_topk_prob=False)
    assert any("norm_topk_prob" in issue for issue in output_preserving_issues(layer.config))
    with torch.no_grad():
        out = layer(tokens())
        mass = layer.last_router_output.topk_weight_TK.sum(-1, keepdim=True)
        torch.testing.assert_close(out, mass * dense.forward(tokens()), **TOL)
        assert (mass < 0.99).all()


@pytest.mark.parametrize("name", ["capacity_factor", "eval_capacity_factor"])
def test_capacity_in_either_mode_is_reported_as_breaking_the_step0_output(name: str) -> None:
    """eval_capacity_factor alone used to pass as output-preserving, yet eval-mode outputs drop copies."""
    dense = make_dense()
    layer = upcycled(dense, num_experts=4, top_k=2, init="copy", **{name: 0.5})
    assert any(name in issue for issue in output_preserving_issues(layer.config))
    layer.train(name == "capacity_factor")
    with torch.no_grad():
        assert not torch.allclose(layer(tokens()), dense.forward(tokens()), **TOL)


def test_jittering_the_experts_input_is_reported_as_breaking_the_step0_output() -> None:
    """Training-mode jitter of the experts' input (transformers' Mixtral) changes a copy layer's output: reported."""
    dense = make_dense()
    moe = dict(num_experts=4, top_k=2, router_jitter=0.2, jitter_experts_input=True)
    layer = upcycled(dense, **moe).train()
    x = tokens()
    with torch.no_grad():
        assert not torch.allclose(layer(x), dense(x), **TOL)
    assert any("router_jitter=0.2" in i for i in output_preserving_issues(MoEConfig(**moe)))
    assert output_preserving_issues(MoEConfig(num_experts=4, top_k=2, router_jitter=0.2)) == []  # router's copy only


# -- granular ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(DENSES))
@pytest.mark.parametrize("experts,top_k,g", [(8, 2, 2), (8, 4, 4), (8, 4, 2), (12, 3, 3), (6, 6, 3)])
def test_granular_reproduces_the_dense_ffn(kind: str, experts: int, top_k: int, g: int) -> None:
    dense = make_dense(**DENSES[kind])
    layer = upcycled(dense, num_experts=experts, top_k=top_k, init="granular", extra={"granularity": g})
    assert layer.experts.intermediate_size == F // g
    assert output_preserving_issues(layer.config) == []
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense.forward(x), **TOL)
    chosen = layer.last_router_output.topk_idx_TK.sort(-1).values  # [T, K]: whole copy groups
    groups = chosen.view(T, top_k // g, g)
    assert torch.equal(groups % g, torch.arange(g).expand_as(groups)), "each group holds every shard once"
    assert (groups // g == groups[..., :1] // g).all(), "the shards of a group come from one copy"
    if top_k < experts:
        best = layer.last_router_output.topk_idx_TK[:, 0] // g
        assert len(set(best.tolist())) > 1, "routing is not degenerate"


def test_granular_router_ties_within_copy_groups() -> None:
    config = MoEConfig(num_experts=8, top_k=2, init="granular")
    router = init_router(make_dense(), config)
    assert torch.equal(router[0], router[1]) and torch.equal(router[6], router[7])
    assert not torch.equal(router[1], router[2])
    assert router.std().item() == pytest.approx(0.02, rel=0.3)


def test_granular_shapes_and_errors() -> None:
    dense = make_dense()
    out = init_experts(dense, MoEConfig(num_experts=8, top_k=4, init="granular"), [0, 5])
    assert out["gate_up_proj"].shape == (2, 2 * F // 4, H) and out["down_proj"].shape == (2, H, F // 4)
    torch.testing.assert_close(out["down_proj"][1], dense.down[:, F // 4: F // 2] * 4)  # expert 5 = shard 1
    with pytest.raises(ValueError, match="granularity=5 shards; 5 must divide 24"):
        init_experts(dense, MoEConfig(num_experts=10, top_k=5, init="granular"), [0])
    with pytest.raises(ValueError, match="num_experts=6 divisible by granularity=4"):
        init_experts(dense, MoEConfig(num_experts=6, top_k=4, init="granular"), [0])
    with pytest.raises(ValueError, match="intermediate_size=24 differs.*12"):
        init_experts(dense, MoEConfig(num_experts=8, top_k=2, init="granular", intermediate_size=24), [0])
    issues = output_preserving_issues(MoEConfig(num_experts=8, top_k=3, init="granular", extra={"granularity": 2}))
    assert any("not a multiple of granularity" in i for i in issues)


# -- determinism and rank splits ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_rank_split_equals_one_process_and_is_seeded(method: str) -> None:
    dense = make_dense(gated=True, bias=True)
    config = MoEConfig(num_experts=4, top_k=2, init=method)
    whole = init_experts(dense, config, [0, 1, 2, 3], seed=7)
    rank0, rank1 = init_experts(dense, config, [0, 1], seed=7), init_experts(dense, config, [2, 3], seed=7)
    assert set(whole) == {"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"}
    for name, value in whole.items():
        assert torch.equal(torch.cat([rank0[name], rank1[name]]), value), name
        assert torch.equal(init_experts(dense, config, [3, 1], seed=7)[name], value[[3, 1]]), name
    again = init_experts(dense, config, [0, 1, 2, 3], seed=7)
    assert all(torch.equal(again[k], v) for k, v in whole.items())
    assert torch.equal(init_router(dense, config, seed=7), init_router(dense, config, seed=7))
    other = init_experts(dense, config, [0, 1, 2, 3], seed=8)
    randomized = method in ("drop_upcycle", "random")
    assert torch.equal(other["gate_up_proj"], whole["gate_up_proj"]) != randomized
    assert not torch.equal(init_router(dense, config, seed=8), init_router(dense, config, seed=7))


@pytest.mark.parametrize("method", ["drop_upcycle", "random"])
def test_large_seeds_work_and_stay_deterministic(method: str) -> None:
    """A seed of 2**32 - 1 (numpy's largest) times the layer and expert strides overflowed manual_seed."""
    dense = make_dense(gated=True, bias=True)
    config = MoEConfig(num_experts=4, top_k=2, init=method)
    seed = (2**32 - 1) * 7919 + 3  # patch_model's seed for layer 3
    whole = init_experts(dense, config, [0, 1, 2, 3], seed=seed)
    assert all(torch.equal(init_experts(dense, config, [2, 3], seed=seed)[k], v[2:]) for k, v in whole.items())
    assert not torch.equal(whole["gate_up_proj"][0], whole["gate_up_proj"][1])
    assert torch.equal(init_router(dense, config, seed=seed), init_router(dense, config, seed=seed))


def test_patch_model_takes_a_large_seed() -> None:
    pytest.importorskip("transformers")
    import switchyard as sy
    from tiny_models import build

    model = build("llama", intermediate_size=48)
    sy.patch_model(model, MoEConfig(num_experts=4, top_k=2, init="drop_upcycle"), seed=2**32 - 1)
    assert model.config.switchyard["seed"] == 2**32 - 1


# -- drop-upcycle -----------------------------------------------------------------------------------------------
def test_drop_upcycle_redraws_exactly_r_f_units_from_the_dense_statistics() -> None:
    h, f, ratio = 64, 256, 0.3
    dense = make_dense(gated=True, bias=True, h=h, f=f, mean=0.05, std=0.2)
    config = MoEConfig(num_experts=4, top_k=2, init="drop_upcycle", extra={"drop_ratio": ratio})
    out = init_experts(dense, config, [0, 1, 2, 3], seed=3)
    n = round(ratio * f)
    seen = []
    for e in range(4):
        gate, up = out["gate_up_proj"][e, :f], out["gate_up_proj"][e, f:]
        down, gate_b, up_b = out["down_proj"][e], out["gate_up_proj_bias"][e, :f], out["gate_up_proj_bias"][e, f:]
        dropped = (gate != dense.gate).any(dim=1)
        assert dropped.sum().item() == n
        for new, old, dim in ((up, dense.up, 1), (down, dense.down, 0)):
            assert torch.equal((new != old).any(dim=dim), dropped)
            keep = dropped.logical_not()
            assert torch.equal(new[keep] if dim == 1 else new[:, keep], old[keep] if dim == 1 else old[:, keep])
        for new, old in ((gate, dense.gate), (up, dense.up), (down.t(), dense.down.t())):
            fresh = new[dropped]
            assert fresh.mean().item() == pytest.approx(old.mean().item(), abs=0.02)
            assert fresh.std().item() == pytest.approx(old.std().item(), rel=0.1)
        for new, old in ((gate_b, dense.gate_bias), (up_b, dense.up_bias)):
            assert torch.equal(new[~dropped], old[~dropped]) and not torch.equal(new[dropped], old[dropped])
        assert torch.equal(out["down_proj_bias"][e], dense.down_bias)
        seen.append(dropped)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[2], seen[3])


def test_drop_ratio_edges_and_errors() -> None:
    dense = make_dense()
    cfg = lambda r: MoEConfig(num_experts=2, top_k=1, init="drop_upcycle", extra={"drop_ratio": r})  # noqa: E731
    copy = init_experts(dense, MoEConfig(num_experts=2, top_k=1, init="copy"), [0, 1])
    assert torch.equal(init_experts(dense, cfg(0.0), [0, 1])["gate_up_proj"], copy["gate_up_proj"])
    full = init_experts(dense, cfg(1.0), [0])["gate_up_proj"][0, :F]
    assert (full != dense.gate).any(dim=1).all()
    with pytest.raises(ValueError, match="drop_ratio"):
        init_experts(dense, cfg(1.5), [0])


# -- random -----------------------------------------------------------------------------------------------------
def test_random_has_linear_default_bounds_and_may_change_the_size() -> None:
    dense = make_dense(gated=False, bias=True, std=5.0)
    f_new = 40
    config = MoEConfig(num_experts=3, top_k=1, init="random", intermediate_size=f_new)
    out = init_experts(dense, config, [0, 1, 2])
    assert out["up_proj"].shape == (3, f_new, H) and out["down_proj"].shape == (3, H, f_new)
    for name, fan_in in (("up_proj", H), ("up_proj_bias", H), ("down_proj", f_new), ("down_proj_bias", f_new)):
        bound = 1 / math.sqrt(fan_in)
        assert out[name].abs().max().item() <= bound
        assert out[name].abs().max().item() > 0.9 * bound  # spread like U(-b, b), not a tiny normal
    assert not torch.equal(out["up_proj"][0], out["up_proj"][1])


# -- errors ---------------------------------------------------------------------------------------------------
def test_shape_and_id_errors() -> None:
    dense = make_dense()
    for method in ("copy", "drop_upcycle"):
        with pytest.raises(ValueError, match=f"intermediate_size=32 differs from the '{method}' expert size 24"):
            init_experts(dense, MoEConfig(num_experts=4, top_k=2, init=method, intermediate_size=32), [0])
    with pytest.raises(ValueError, match=r"expert_ids must be distinct ints in \[0, 4\)"):
        init_experts(dense, MoEConfig(num_experts=4, top_k=2), [4])
    with pytest.raises(ValueError, match="distinct"):
        init_experts(dense, MoEConfig(num_experts=4, top_k=2), [1, 1])
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, gated=False), H, F)
    with pytest.raises(ValueError, match="do not match the dense FFN"):
        upcycle_layer(layer, dense)


def test_a_misspelt_extra_key_is_refused_not_replaced_by_its_default() -> None:
    """``extra={"drop_rate": 0.1}`` used to upcycle silently with the default drop_ratio 0.5."""
    import switchyard as sy
    from tiny_models import build

    model = build("llama", intermediate_size=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"extra keys \['drop_rate'\] are unknown.*'drop_ratio' for init='drop_upcycle'"):
        sy.patch_model(model, MoEConfig(num_experts=4, top_k=2, init="drop_upcycle", extra={"drop_rate": 0.1}))
    assert model.state_dict().keys() == before.keys() and not getattr(model.config, "switchyard", None)
    sy.patch_model(model, MoEConfig(num_experts=4, top_k=2, init="drop_upcycle", extra={"drop_ratio": 0.25}))
    gate_up, gate = model.model.layers[0].mlp.experts.gate_up_proj[0, :48], before["model.layers.0.mlp.gate_proj.weight"]
    assert int((gate_up != gate).any(dim=1).sum()) == round(0.25 * 48)


def test_a_layer_that_cannot_reproduce_the_dense_output_is_warned_about_once_per_patch(caplog):
    import logging

    import switchyard as sy
    from tiny_models import build

    config = MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False, score_func="softmax", softmax_before_topk=True)
    with caplog.at_level(logging.WARNING, logger="switchyard"):
        sy.patch_model(build("llama", intermediate_size=48), config)
    warned = [r.getMessage() for r in caplog.records if "will not reproduce" in r.getMessage()]
    assert len(warned) == 1 and "norm_topk_prob=False" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="switchyard"):  # random experts are not meant to reproduce it
        sy.patch_model(build("llama", intermediate_size=48), dataclasses.replace(config, init="random"))
    assert not [r for r in caplog.records if "will not reproduce" in r.getMessage()]
