"""optimizer_param_groups: every trainable parameter in exactly one group, decay classes as transformers'
Trainer draws them (biases and norms don't decay), MoE parameters split out as DeepSpeed requires."""

from __future__ import annotations

import torch
import torch.nn as nn

from switchyard import MoEConfig
from switchyard.deepspeed import optimizer_param_groups
from switchyard.moe.layer import MoELayer

HIDDEN, FFN = 8, 12


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, HIDDEN)
        self.input_layernorm = nn.LayerNorm(HIDDEN)
        self.moe = MoELayer(MoEConfig(num_experts=4, top_k=2, bias=True, num_shared_experts=1), HIDDEN, FFN)
        self.head = nn.Linear(HIDDEN, 10, bias=True)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(HIDDEN, HIDDEN)
        self.frozen.requires_grad_(False)


def test_every_trainable_parameter_once_and_biases_never_decay():
    model = _Block()
    groups = optimizer_param_groups(model, weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == trainable, "a trainable parameter is missing (or a frozen one included)"
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    moe_of = {id(p): g.get("moe", False) for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # transformers' Trainer.get_decay_parameter_names: names with "bias" or a norm never decay
        want = 0.0 if "bias" in name or "norm" in name else 0.1
        assert decay_of[id(param)] == want, (name, tuple(param.shape), decay_of[id(param)])
        assert moe_of[id(param)] == name.startswith("moe.experts."), name
