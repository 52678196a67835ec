"""``switchyard.deepspeed.hf_trainer``: the optimizer it hands HF Trainer, and the settings it refuses (one process;
the 2-rank runs against one process are ``tests/integration/test_hf_trainer_ep.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import switchyard as sy
from switchyard.deepspeed import hf_trainer
from switchyard.deepspeed.hf_trainer import moe_optimizer_cls_and_kwargs
from tiny_models import build


def patched() -> torch.nn.Module:
    model = build("llama", hidden_act="silu", intermediate_size=64)
    return sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))


def test_the_optimizer_is_the_one_the_arguments_choose_over_moe_groups(tmp_path):
    from transformers import TrainingArguments

    model = patched()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, optim="adamw_torch", learning_rate=3e-4,
                             weight_decay=0.1, save_strategy="no", report_to=[])
    optimizer_cls, kwargs = moe_optimizer_cls_and_kwargs(args, model)
    assert issubclass(optimizer_cls, torch.optim.AdamW)
    optimizer = optimizer_cls([{"params": list(model.parameters())}], **kwargs)  # as Trainer.create_optimizer does
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters())  # each once
    experts = {id(p) for name, p in model.named_parameters() if ".experts." in name}
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-4
        assert bool(group.get("moe")) == ({id(p) for p in group["params"]} <= experts)  # DeepSpeed's ZeRO-1/2 rule
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}


def arguments(stage: int | None = None, save_strategy: str = "no") -> SimpleNamespace:
    config = None if stage is None else SimpleNamespace(config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(save_strategy=save_strategy, hf_deepspeed_config=config, deepspeed="my_ds.json")


def test_trainer_checkpoints_are_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match=r"save_strategy='steps'.*switchyard.save_pretrained\(trainer.model"):
        moe_optimizer_cls_and_kwargs(arguments(save_strategy="steps"), patched())


def test_a_deepspeed_optimizer_section_is_refused():
    """Trainer builds DeepSpeed's optimizer from such a section and never calls create_optimizer."""
    args = arguments(stage=2)
    args.hf_deepspeed_config.config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    with pytest.raises(ValueError, match=r'my_ds.json has an "optimizer" section.*Remove the section'):
        moe_optimizer_cls_and_kwargs(args, patched())


def test_ep_without_deepspeed_is_refused():
    """Without deepspeed= Trainer wraps the model in DDP, which broadcasts rank 0's experts to every rank."""
    model = patched()
    for layer in sy.hf.patch.moe_layers(model):
        layer.ep_size = 2
    with pytest.raises(ValueError, match=r"ep=2 ranks, and TrainingArguments has no deepspeed config.*DDP"):
        moe_optimizer_cls_and_kwargs(arguments(), model)
    for layer in sy.hf.patch.moe_layers(model):
        layer.ep_size = 1
    hf_trainer._check(arguments(), model)  # one process or DDP at ep=1: Trainer's own path, nothing refused


def test_zero3_is_refused():
    with pytest.raises(ValueError, match=r"my_ds.json is ZeRO stage 3.*Use ZeRO stage 1 or 2"):
        moe_optimizer_cls_and_kwargs(arguments(stage=3), patched())


def test_tensor_parallel_groups_are_refused():
    """accelerate gives DeepSpeed no mpu: with tp > 1 it would reduce dense gradients over the whole world."""
    model = patched()
    for layer in sy.hf.patch.moe_layers(model):
        layer.groups = SimpleNamespace(size={"tp": 2, "pp": 1}.get)
    with pytest.raises(ValueError, match=r"tp=2, pp=1: Trainer gives deepspeed.initialize no mpu"):
        moe_optimizer_cls_and_kwargs(arguments(stage=2), model)
