"""train.freeze: glob patterns over parameter names, checked on the whole model before any weight is read."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import switchyard as sy
from switchyard.deepspeed import optimizer_param_groups
from switchyard.train.freezing import check_freeze, freeze_parameters


def _dense_config(tied: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=tied)


def _model(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return sy.patch_model(LlamaForCausalLM(_dense_config(tied)), sy.MoEConfig(num_experts=4, top_k=2))


def test_patterns_freeze_what_they_match_and_the_optimizer_leaves_it_out():
    model = _model()
    patterns = ["*.self_attn.*", "model.layers.1.mlp.experts.*"]
    plan = check_freeze(model, patterns)
    assert freeze_parameters(model, patterns) == plan.frozen_tensors == 2 * 4 + 2
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"} | {
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
    assert plan.frozen_params == sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    assert plan.total_params == sum(p.numel() for p in model.parameters())
    in_groups = {id(p) for group in optimizer_param_groups(model, 0.0) for p in group["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_tied_head_is_frozen_by_either_name():
    model = _model(tied=True)
    assert check_freeze(model, ["lm_head.weight"]).frozen_tensors == 1  # named_parameters lists only the embedding
    freeze_parameters(model, ["lm_head.weight"])
    assert not model.model.embed_tokens.weight.requires_grad and model.lm_head.weight is model.model.embed_tokens.weight


def test_a_pattern_that_matches_nothing_is_refused_with_names_to_choose_from():
    model = _model()
    with pytest.raises(ValueError, match=r"pattern 'self_attn' matches no parameter of LlamaForCausalLM \(names look "
                                         r"like model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight"):
        check_freeze(model, ["*.router.*", "self_attn"])
    assert all(p.requires_grad for p in model.parameters())  # the check changes nothing


def test_freezing_everything_is_refused():
    with pytest.raises(ValueError, match=r"freezes every parameter of LlamaForCausalLM: nothing would train"):
        check_freeze(_model(), ["model.*", "lm_head.*"])


def test_the_check_runs_on_the_meta_device():
    with torch.device("meta"):
        model = _model()
    assert check_freeze(model, ["*.router.*"]).frozen_tensors == 2


def test_the_launchers_meta_model_is_patched_by_module_names_too(tmp_path):
    """A run config that names the FFNs (moe.targets, moe.exclude, moe.adapter for architectures outside the
    registry) gets its freeze patterns checked on the model the load builds (the plan used to ignore the names:
    it patched every layer, or failed to build outside the registry)."""
    from switchyard.moe.layer import MoELayer
    from switchyard.train.model_source import planned_run_model
    from switchyard.train.run_config import load_run_config

    _dense_config().save_pretrained(tmp_path)
    config = load_run_config("configs/finetune/tiny.yaml", [
        f"model.source={tmp_path}", "output_dir=/unused", 'moe.targets=["re:.*\\\\.mlp"]', "moe.adapter=llama",
        'moe.exclude=["model.layers.0.mlp"]'])
    planned = planned_run_model(config, str(tmp_path))
    assert [n for n, m in planned.named_modules() if isinstance(m, MoELayer)] == ["model.layers.1.mlp"]
    assert check_freeze(planned, ["*.experts.*"]).frozen_tensors == 2
