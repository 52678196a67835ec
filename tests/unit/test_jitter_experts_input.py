"""``MoEConfig.jitter_experts_input``: an adopted Mixtral jitters what its experts see as transformers' Mixtral
block does (``hidden_states *= uniform noise`` before both the gate and the experts), so it trains like it.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_jitter_experts_input.py

Oracle: transformers' ``MixtralSparseMoeBlock`` / ``MixtralForCausalLM`` in train mode with
``router_jitter_noise``, run under the same RNG seed as the adopted layer / patched model.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import switchyard as sy  # noqa: E402
from switchyard.config import MoEConfig  # noqa: E402
from switchyard.hf import layer_from_hf_block  # noqa: E402
from switchyard.moe.layer import MoELayer  # noqa: E402

from test_hf_parity import H, build_hf, make_input  # noqa: E402
from test_patch import MOE_MODELS, build, ids  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}
JITTER = 0.3  # large enough to change routing


def _jittered_mixtral_block():
    block, config = build_hf("mixtral")
    config.router_jitter_noise = JITTER
    block.jitter_noise = JITTER
    return block.train(), config


def test_adopted_mixtral_sets_it() -> None:
    block, config = _jittered_mixtral_block()
    cfg = layer_from_hf_block(block, config).config
    assert cfg.router_jitter == JITTER and cfg.jitter_experts_input


def test_adopted_mixtral_block_trains_like_transformers_with_jitter() -> None:
    block, config = _jittered_mixtral_block()
    layer = layer_from_hf_block(block, config, aux_loss_coef=0.0).train()
    upstream = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(7))
    x = make_input()
    results = []
    for module, router_weight, experts in ((block, block.gate.weight, block.experts), (layer, layer.router.weight,
                                                                                         layer.experts)):
        x_leaf = x.clone().requires_grad_(True)
        torch.manual_seed(11)
        out = module(x_leaf * 1.0)  # HF's block jitters its input in place: not a leaf
        (out * upstream).sum().backward()
        results.append((out.detach(), x_leaf.grad, router_weight.grad, experts.gate_up_proj.grad,
                        experts.down_proj.grad))
    clean = layer.eval()(x)
    assert not torch.allclose(results[1][0], clean, **TOL)  # the jitter did act
    for name, ours, want in zip(("output", "input grad", "router grad", "gate_up grad", "down grad"), *results[::-1]):
        torch.testing.assert_close(ours, want, **TOL, msg=lambda m: f"{name}: {m}")


def test_patched_mixtral_model_trains_like_transformers_with_jitter() -> None:
    hf = build("mixtral", **MOE_MODELS["mixtral"], router_jitter_noise=JITTER).train()
    model = sy.patch_model(copy.deepcopy(hf), overrides={"aux_loss_coef": 0.0}).train()
    x = ids(batch=3)
    torch.manual_seed(5)
    ref = hf(x, labels=x)
    torch.manual_seed(5)
    out = model(x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    ref.loss.backward()
    out.loss.backward()
    ours = dict(model.named_parameters())
    for name, param in hf.named_parameters():
        mine = ours[name.replace(".gate.weight", ".router.weight")]
        torch.testing.assert_close(mine.grad, param.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_default_jitters_only_the_routers_copy() -> None:
    """Switch semantics (the default): the experts get the clean input, combined with the jittered routing."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, router_jitter=JITTER, aux_loss_coef=0.0), 8, 12).train()
    x = torch.randn(6, 8)
    torch.manual_seed(3)
    out = layer(x)
    routed = layer.last_router_output
    with torch.no_grad():
        want = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(2):
                e = int(routed.topk_idx_TK[t, k])
                gate, up = (layer.experts.gate_up_proj[e] @ x[t]).chunk(2)
                want[t] += routed.topk_weight_TK[t, k] * (layer.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out.detach(), want, **TOL)
