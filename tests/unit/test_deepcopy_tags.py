"""A deep copy of a patched or tensor-sharded model keeps its parameters' tags.

torch's ``Parameter.__deepcopy__`` drops a parameter's attributes: a copied expert lost ``allreduce=False`` and
``group_name`` and went into the dense parameter groups, where DeepSpeed all-reduces it over the data-parallel group
(at ep > 1 that averages different experts). The oracle is the original model's own tags and param groups.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import switchyard as sy
from switchyard.deepspeed import optimizer_param_groups
from switchyard.parallel.tensor_parallel import ColumnParallelLinear, _shard_linear
from switchyard.parallel.tensor_shards import shard_of
from tiny_models import build, ids


def _tags(model: nn.Module) -> dict[str, dict]:
    return {name: vars(p) for name, p in model.named_parameters()}


def test_a_deep_copy_of_a_patched_model_keeps_the_expert_tags_and_param_groups():
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    twin = copy.deepcopy(model)
    assert _tags(twin) == _tags(model)
    assert any(tags.get("allreduce") is False for tags in _tags(twin).values())
    groups = [(g.get("moe", False), g.get("name"), len(g["params"])) for g in optimizer_param_groups(model, 0.1)]
    assert [(g.get("moe", False), g.get("name"), len(g["params"])) for g in optimizer_param_groups(twin, 0.1)] == groups
    # a copy, not the same tensors, and the same function
    original = dict(model.named_parameters())
    assert all(p is not original[n] and p.data_ptr() != original[n].data_ptr() for n, p in twin.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(twin(ids()).logits, model(ids()).logits)


def test_a_deep_copy_of_a_sharded_linear_keeps_its_shard():
    linear = nn.Linear(8, 6)
    _shard_linear(ColumnParallelLinear, linear, None, 1, 2)
    twin = copy.deepcopy(linear)
    assert type(twin) is ColumnParallelLinear and twin.tp_rank == 1
    assert shard_of(twin.weight) == shard_of(linear.weight) is not None
    assert shard_of(twin.bias) == shard_of(linear.bias) is not None


def _deep_copy_at_ep2() -> float:
    from switchyard.parallel import ProcessGroupManager

    groups = ProcessGroupManager(ep=2)
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), groups)
    twin = copy.deepcopy(model)  # a reference or EMA model of a distributed run: the copy shares the groups
    layer, copied = model.model.layers[0].mlp, twin.model.layers[0].mlp
    assert copied.groups is groups and copied.dispatcher.ep_group is groups.group("ep")
    assert copied.experts.gate_up_proj is not layer.experts.gate_up_proj and _tags(twin) == _tags(model)
    with torch.no_grad():  # the copy's all-to-alls run over the same group and give the same outputs
        torch.testing.assert_close(twin(ids()).logits, model(ids()).logits)
    return float(twin(ids()).logits.sum())


def test_a_deep_copy_of_an_expert_parallel_model_shares_its_process_groups():
    from harness import run_on_ranks

    sums = run_on_ranks(_deep_copy_at_ep2, 2, timeout_s=120)
    assert sums[0] == sums[1]  # the ranks see the same tokens and exchange them
