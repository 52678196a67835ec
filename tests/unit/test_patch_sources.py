"""Weights patch_model must not read as they are: peft adapters, ZeRO-3 shards, quantized storage.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_patch_sources.py

Each used to be read silently (a LoRA layer's ``weight`` is its base weight: the adapter was dropped, and a
``PeftModel`` saves only its adapters, so MoE layers patched into one were never saved) or to fail with an
error about the model's layout ("no 2-D gate_proj.weight", "holds 0 experts"). Oracle: the model left
exactly as it was, and an error naming the cause and the fix. The peft and ZeRO-3 cases also run against
the real libraries (peft where installed; ``deepspeed.zero.Init`` in a fresh process).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import switchyard as sy
from harness import run_on_ranks

from test_patch import MOE_MODELS, TINY, _snapshot, build
from test_patch_inputs import _untouched

MOE = sy.MoEConfig(num_experts=4, top_k=2)
PEFT_FIX = r"patch_model, then peft.get_peft_model"


class LoraLike(nn.Module):
    """What peft's tuner layers look like from outside: ``base_layer`` plus adapters, ``weight`` the base's."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_B = nn.Linear(4, base.weight.shape[0], bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight


def _dense() -> nn.Module:
    return build("llama", intermediate_size=48)


def test_an_adapter_layer_inside_an_ffn_is_refused_not_read_as_its_base_weight():
    model = _dense()
    model.model.layers[2].mlp.gate_proj = LoraLike(model.model.layers[2].mlp.gate_proj)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"LlamaMLP.gate_proj is a peft adapter layer \(LoraLike\).*{PEFT_FIX}"):
        sy.patch_model(model, MOE)
    _untouched(model, before)


@pytest.mark.parametrize("by_name", [False, True])
def test_a_model_carrying_adapters_is_refused(by_name):
    """transformers' ``load_adapter`` marks the model itself; its save would write only the adapters."""
    model = _dense()
    model.peft_config = {"default": object()}
    before = _snapshot(model)
    kwargs = {"targets": ["mlp"], "adapter": "llama"} if by_name else {}
    with pytest.raises(ValueError, match=f"LlamaForCausalLM carries peft adapters.*{PEFT_FIX}"):
        sy.patch_model(model, MOE, **kwargs)
    _untouched(model, before)


@pytest.mark.parametrize("model_type, path", [("mixtral", "gate"), ("qwen2_moe", "shared_expert.up_proj")])
def test_adopting_a_block_with_an_adapter_is_refused(model_type, path):
    """A LoRA on the router was dropped silently; one on Qwen2-MoE's shared expert failed on key names."""
    model = build(model_type, **MOE_MODELS[model_type])
    block = model.model.layers[0].mlp
    parent, _, name = path.rpartition(".")
    owner = block.get_submodule(parent) if parent else block
    setattr(owner, name, LoraLike(getattr(owner, name)))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"SparseMoeBlock.{path} is a peft adapter layer.*{PEFT_FIX}"):
        sy.patch_model(model)
    _untouched(model, before)


def _partition_like_zero3(param_owner: nn.Module, name: str) -> None:
    """What ``deepspeed.zero.Init`` leaves on a rank: an empty local shard, the full shape in ``ds_shape``."""
    full = getattr(param_owner, name)
    shard = nn.Parameter(torch.empty(0, dtype=full.dtype))
    shard.ds_shape = full.shape
    setattr(param_owner, name, shard)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_zero3_partitioned_weights_are_named_as_such(model_type):
    """They were reported as a layout problem ("no 2-D gate_proj.weight", "holds 0 experts")."""
    model = build(model_type, **MOE_MODELS.get(model_type, {"intermediate_size": 48}))
    mlp = model.model.layers[0].mlp
    owner, name = (mlp.gate_proj, "weight") if model_type == "llama" else (mlp.experts, "gate_up_proj")
    _partition_like_zero3(owner, name)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"partitioned by DeepSpeed ZeRO-3 .*\(0,\) of \(.*ZeRO stages 0-2"):
        sy.patch_model(model, MOE if model_type == "llama" else None)
    _untouched(model, before)


def _patch_under_zero3() -> list[str]:
    """On one gloo rank: build tiny models under the real ``deepspeed.zero.Init`` and patch them."""
    import torch._dynamo  # noqa: F401  (imported before zero.Init patches tensor creation, as transformers does)
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    errors = []
    for model_type, extra, moe in (("llama", {"intermediate_size": 48}, MOE), ("mixtral", MOE_MODELS["mixtral"], None)):
        config = AutoConfig.for_model(model_type, **{**TINY, **extra})
        with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                      "zero_optimization": {"stage": 3}}):
            model = AutoModelForCausalLM.from_config(config)
        try:
            sy.patch_model(model, moe)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_zero3_under_the_real_deepspeed_init():
    errors = run_on_ranks(_patch_under_zero3, 1, timeout_s=240)[0]
    assert len(errors) == 2
    assert all("partitioned by DeepSpeed ZeRO-3" in e for e in errors), errors


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_storage_is_refused(dtype):
    """int8 / float8 values mean nothing without their scales; copying them into experts would be garbage."""
    model = _dense()
    proj = model.model.layers[1].mlp.down_proj
    proj.weight = nn.Parameter(proj.weight.detach().to(dtype), requires_grad=False)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"LlamaMLP.down_proj.weight is stored as {dtype} \(a quantized model\?\)"):
        sy.patch_model(model, MOE)
    _untouched(model, before)


def test_real_peft_models_and_layers_are_refused():
    peft = pytest.importorskip("peft")
    lora = lambda targets: peft.LoraConfig(target_modules=targets, r=4)  # noqa: E731
    for targets in (["q_proj"], ["gate_proj"]):  # a PeftModel saves only adapters, whatever they target
        with pytest.raises(ValueError, match=f"PeftModel.* carries peft adapters.*{PEFT_FIX}"):
            sy.patch_model(peft.get_peft_model(_dense(), lora(targets)), MOE)
    injected = peft.inject_adapter_in_model(lora(["gate_proj"]), _dense())
    with pytest.raises(ValueError, match="carries peft adapters"):
        sy.patch_model(injected, MOE)
    mixtral = peft.inject_adapter_in_model(lora(["gate"]), build("mixtral", **MOE_MODELS["mixtral"]))
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock.gate is a peft adapter layer"):
        sy.patch_model(mixtral)


@pytest.mark.parametrize("model_type, by_name", [("llama", False), ("llama", True), ("mixtral", False)])
def test_weights_offloaded_by_accelerate_are_refused(model_type, by_name):
    """Offloaded weights are meta until a forward loads them: the MoE layers were built from shapes and ran on
    uninitialized memory (different logits, NaN), silently."""
    accelerate = pytest.importorskip("accelerate")
    model = build(model_type, **MOE_MODELS.get(model_type, {"intermediate_size": 48}))
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    kwargs = {"targets": ["mlp"], "adapter": "llama"} if by_name else {}
    with pytest.raises(ValueError, match="weights are offloaded by accelerate.*patch it, then dispatch it"):
        sy.patch_model(model, MOE if model_type == "llama" else None, **kwargs)
    assert not getattr(model.config, "switchyard", None)
    assert not any(type(m).__name__ == "MoELayer" for m in model.modules())


def test_adopting_a_model_carrying_adapters_is_refused_even_with_none_in_its_moe_blocks():
    """Adoption reads only the MoE blocks: a model whose adapters sit on attention alone went through, and its
    save (adapters only) would have dropped the MoE layers; patch_model now refuses such a model up front."""
    model = build("mixtral", **MOE_MODELS["mixtral"])
    model.peft_config = {"default": object()}
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"MixtralForCausalLM carries peft adapters.*{PEFT_FIX}"):
        sy.patch_model(model)
    _untouched(model, before)
