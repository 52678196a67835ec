"""apply_tensor_parallel's checks and slicing in one process (no ranks: sharding itself runs no collective).

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_tensor_parallel_checks.py -p no:cacheprovider

A refused model must be left exactly as it was (peft's rule: check everything before changing anything).
The forward and gradients of a sharded model are checked on gloo ranks in tests/distributed/test_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from switchyard.parallel import apply_tensor_parallel
from switchyard.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from switchyard.parallel.tensor_shards import TensorShard, shard_of, shard_tensor

from harness import REPO_ROOT as REPO
from tiny_models import build

SMALL = dict(num_hidden_layers=2, intermediate_size=64, head_dim=8)


class FakeGroups:
    """What apply_tensor_parallel asks a ProcessGroupManager before any collective: sizes and this rank."""

    def __init__(self, tp: int, etp: int | None = None, rank: int = 0) -> None:
        self.sizes = {"tp": tp, "etp": tp if etp is None else etp}
        self.tp_rank = rank

    def size(self, kind: str) -> int:
        return self.sizes[kind]

    def rank(self, kind: str) -> int:
        return self.tp_rank

    def group(self, kind: str) -> None:
        return None


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[type]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, classes = snapshot
    assert [type(m) for m in model.modules()] == classes
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert not any(shard_of(p) for p in model.parameters())


def test_a_head_count_tp_does_not_divide_is_refused_and_the_model_left_alone():
    model = build("llama", **SMALL)  # 4 heads, 2 key/value heads
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"tp=4 must divide num_attention_heads=4 and num_key_value_heads=2 .*"
                                         r"choose tp in \[1, 2\]"):
        apply_tensor_parallel(model, FakeGroups(4))
    _assert_unchanged(model, snapshot)


def test_an_ffn_width_tp_does_not_divide_is_refused_by_module_name():
    model = build("llama", **{**SMALL, "intermediate_size": 63})
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"tp=2 does not divide model\.layers\.0\.mlp\.gate_proj dimension 0 of its "
                                         r"\(63, 32\) weight \(63\).*\(and 3 more\); choose a tp dividing it"):
        apply_tensor_parallel(model, FakeGroups(2))
    _assert_unchanged(model, snapshot)


def test_a_model_without_a_tp_plan_is_refused_by_class_name():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Sequential has no config.base_model_tp_plan: .*needs a transformers model "
                                         "class with a tensor-parallel plan"):
        apply_tensor_parallel(model, FakeGroups(2))


def test_a_plan_style_switchyard_cannot_honour_is_refused_by_module_and_style():
    model = build("llama", **SMALL)
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan,
                                       "layers.*.self_attn.q_proj": "colwise_gather_output"}
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has tensor-parallel style "
                                         r"'colwise_gather_output'.*use tp=1"):
        apply_tensor_parallel(model, FakeGroups(2))
    _assert_unchanged(model, snapshot)


def test_moe_layers_with_an_expert_tp_neither_1_nor_tp_are_refused():
    import switchyard as sy
    from tiny_models import build_moe

    model = sy.patch_model(build_moe("qwen2_moe", num_hidden_layers=2))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"etp=3 with tp=2: .*use etp=2 or etp=1"):
        apply_tensor_parallel(model, FakeGroups(2, etp=3))
    _assert_unchanged(model, snapshot)


def test_tp_1_changes_nothing():
    model = build("llama", **SMALL)
    snapshot = _snapshot(model)
    apply_tensor_parallel(model, FakeGroups(1))
    _assert_unchanged(model, snapshot)


def test_sharding_keeps_names_and_parameters_and_slices_this_ranks_part():
    full = build("llama", **SMALL, attention_bias=True, mlp_bias=True)
    model = build("llama", **SMALL, attention_bias=True, mlp_bias=True)
    params = dict(model.named_parameters())
    apply_tensor_parallel(model, FakeGroups(2, rank=1))
    assert dict(model.named_parameters()) == params  # the same Parameter objects, under the same names
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    reference = full.model.layers[0]
    assert type(attn.q_proj) is ColumnParallelLinear and type(mlp.down_proj) is RowParallelLinear
    assert torch.equal(attn.q_proj.weight, reference.self_attn.q_proj.weight[16:])  # heads 2, 3 of 4 (head_dim 8)
    assert torch.equal(attn.k_proj.bias, reference.self_attn.k_proj.bias[8:])
    assert torch.equal(mlp.down_proj.weight, reference.mlp.down_proj.weight[:, 32:])
    assert torch.equal(mlp.down_proj.bias, reference.mlp.down_proj.bias)  # replicated: added after the sum
    assert shard_of(attn.q_proj.weight) == TensorShard(0, "tp")
    assert shard_of(mlp.down_proj.weight) == TensorShard(1, "tp")
    assert shard_of(mlp.down_proj.bias) is None and shard_of(model.model.embed_tokens.weight) is None
    assert attn.q_proj.weight.tensor_model_parallel and attn.q_proj.weight.partition_dim == 0
    assert (attn.q_proj.out_features, mlp.down_proj.in_features) == (16, 32)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(model, FakeGroups(2, rank=1))


def test_packed_shards_take_their_slice_of_each_chunk():
    full = torch.arange(8)
    assert shard_tensor(full, TensorShard(0, "etp", packed=2), 0, 2).tolist() == [0, 1, 4, 5]
    assert shard_tensor(full, TensorShard(0, "etp", packed=2), 1, 2).tolist() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="does not split into 2 packed chunk"):
        shard_tensor(torch.arange(6), TensorShard(0, "etp", packed=2), 0, 2)


def test_the_launcher_refuses_a_tensor_parallel_layout_before_any_weight_is_read(tmp_path):
    """train(): check_model_split runs the model's checks on the meta device (upcycled as the run config says,
    or adopted) before load_model reads a weight; a layout that fits passes."""
    from switchyard.train import model_source
    from switchyard.train.run_config import load_run_config
    from tiny_models import build_moe

    dense, moe = tmp_path / "dense", tmp_path / "moe"  # config.json only: no weights to read
    build("llama", intermediate_size=48).config.save_pretrained(dense)  # 4 heads, 2 KV heads
    build_moe("qwen2_moe").config.save_pretrained(moe)
    config = load_run_config(REPO / "configs" / "finetune" / "tiny.yaml", [f"model.source={dense}"])
    with pytest.raises(ValueError, match=r"tp=4 must divide num_attention_heads=4 and num_key_value_heads=2"):
        model_source.check_model_split(config, str(dense), tp=4, etp=4)
    model_source.check_model_split(config, str(dense), tp=2, etp=2)
    model_source.check_model_split(config, str(moe), tp=2, etp=1)  # adopted: its own experts
    with pytest.raises(ValueError, match=r"tp=3 must divide num_attention_heads=4"):
        model_source.check_model_split(config, str(moe), tp=3, etp=3)
    # pipeline stages: one decoder layer each at least (the tiny models have 4)
    model_source.check_model_split(config, str(dense), tp=1, etp=1, pp=4)
    with pytest.raises(ValueError, match=r"parallel.pp=5 but the model has 4 decoder layers"):
        model_source.check_model_split(config, str(dense), tp=2, etp=2, pp=5)
