"""Adopted MoE blocks keep what was frozen: each parameter takes ``requires_grad`` from the HF ones it comes from.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_adopt_requires_grad.py

Oracle: the transformers model itself; every parameter of the patched model must have the flag of the
parameter it came from (names map one to one, as in test_adopt_training_parity.py).
"""

from __future__ import annotations

import copy

import pytest
import torch.nn as nn
from transformers import AutoConfig

import switchyard as sy
from switchyard.hf import layer_from_hf_block

from test_patch import MOE_MODELS, build


def _ours(name: str) -> str:
    return name.replace(".shared_expert.", ".shared_experts.").replace(".gate.weight", ".router.weight")


def test_frozen_router_experts_and_shared_experts_stay_frozen() -> None:
    """Adoption built fresh parameters: a router frozen before patching came back trainable."""
    hf = build("qwen2_moe", **MOE_MODELS["qwen2_moe"])  # layer 1 is dense (mlp_only_layers)
    layers = hf.model.layers
    layers[0].mlp.gate.requires_grad_(False)
    layers[2].mlp.experts.requires_grad_(False)
    layers[2].mlp.shared_expert_gate.requires_grad_(False)
    layers[3].mlp.shared_expert.up_proj.requires_grad_(False)
    layers[3].mlp.experts.down_proj.requires_grad_(False)
    model = sy.patch_model(copy.deepcopy(hf))
    want = {_ours(name): p.requires_grad for name, p in hf.named_parameters()}
    got = {name: p.requires_grad for name, p in model.named_parameters()}
    assert got == want
    assert sum(not trainable for trainable in got.values()) == 6


def _per_expert_block(frozen: list[tuple[int, str]]) -> tuple[nn.Module, object]:
    """A transformers 4.x-style Mixtral block (``experts``: a ModuleList of w1/w3/w2 MLPs), ``frozen`` weights off."""
    config = AutoConfig.for_model("mixtral", hidden_size=16, intermediate_size=8, num_local_experts=4,
                                  num_experts_per_tok=2, hidden_act="silu")
    block = type("MixtralSparseMoeBlock", (nn.Module,), {})()  # adapters key on the class name
    block.gate = nn.Linear(16, 4, bias=False)
    block.experts = nn.ModuleList()
    for _ in range(4):
        mlp = nn.Module()
        for name, (fan_in, fan_out) in {"w1": (16, 8), "w3": (16, 8), "w2": (8, 16)}.items():
            setattr(mlp, name, nn.Linear(fan_in, fan_out, bias=False))
        block.experts.append(mlp)
    for expert, name in frozen:
        getattr(block.experts[expert], name).weight.requires_grad_(False)
    return block, config


def test_per_expert_flags_carry_over_when_alike_and_are_refused_when_mixed() -> None:
    block, config = _per_expert_block([(e, name) for e in range(4) for name in ("w1", "w3")])
    layer = layer_from_hf_block(block, config)
    assert not layer.experts.gate_up_proj.requires_grad
    assert layer.experts.down_proj.requires_grad and layer.router.weight.requires_grad
    block, config = _per_expert_block([(1, "w2")])
    with pytest.raises(ValueError, match=r"1 of the 4 HF expert weights read into 'experts.down_proj' have "
                                         r"requires_grad=False .* block.experts.requires_grad_\(False\)"):
        layer_from_hf_block(block, config)
