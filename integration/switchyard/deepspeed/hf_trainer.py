"""HF ``transformers.Trainer`` with ``TrainingArguments(deepspeed=...)`` on a switchyard-patched model.

    deepspeed --num_gpus 2 my_trainer_script.py

    groups = switchyard.ProcessGroupManager(ep=2)              # before or after TrainingArguments
    switchyard.patch_model(model, moe_config, groups=groups)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=moe_optimizer_cls_and_kwargs(args, model))

Trainer builds DeepSpeed's engine through accelerate, which passes no ``mpu``: DeepSpeed's data-parallel group is the
world, the manager's at tp = pp = 1 (``set_deepspeed_parallelism`` checks it). The expert groups are the manager's
(registered in ``deepspeed.utils.groups``), so the engine reduces expert gradients over the expert-data-parallel group
and dense ones over data-parallel — provided the optimizer keeps expert parameters in their own ``moe`` param groups:
ZeRO-1/2 assert that, and Trainer's own optimizer has only its decay / no-decay groups. Trainer's ``optimizers=``
argument does not help: its ``deepspeed_init`` drops that optimizer and calls ``create_optimizer``, which honours
``optimizer_cls_and_kwargs``. Settings that cannot give one process's result are refused here, before training.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.optim import Optimizer

from switchyard.deepspeed.config import optimizer_param_groups

STAGE0_CLIP_MESSAGE = (
    "{path} is ZeRO stage 0 with gradient_clipping={clip} (TrainingArguments.max_grad_norm): DeepSpeed's stage-0 clip "
    "uses the mean of each rank's local gradient norm, which with experts sharded over ep={ep} ranks is not the "
    "model's norm (the step would differ from one process's). Use ZeRO stage 1 or 2 (configs/deepspeed/zero1.json, "
    "zero2.json), which compute the right norm, or set max_grad_norm=0.0"
)
STAGE3_MESSAGE = (
    "{path} is ZeRO stage 3: Trainer partitions the model without switchyard's preparation (experts partitioned over "
    "their expert-data-parallel group, switchyard/deepspeed/zero3.py), which only switchyard.deepspeed.initialize and "
    "launch/finetune.py apply. Use ZeRO stage 1 or 2 with Trainer"
)
SAVE_MESSAGE = (
    "TrainingArguments(save_strategy={strategy!r}): Trainer's checkpoints call DeepSpeed's engine.save_checkpoint, "
    "whose MoE path names experts as DeepSpeed's own MoE layer does ('.deepspeed_moe.experts.deepspeed_experts.N') "
    "and fails on switchyard's layers (a TypeError in _save_moe_checkpoint), and its model.safetensors would hold "
    "only rank 0's experts. Set save_strategy=\"no\" and, after trainer.train(), call "
    "switchyard.save_pretrained(trainer.model, path) on every rank (reload with switchyard.from_pretrained); "
    "launch/finetune.py's checkpoints resume"
)
NO_DEEPSPEED_MESSAGE = (
    "the model's experts are split over ep={ep} ranks, and TrainingArguments has no deepspeed config: Trainer would "
    "wrap the model in DDP, which copies rank 0's experts to every rank and averages expert gradients over the whole "
    "world. Pass TrainingArguments(deepspeed=\"configs/deepspeed/zero2.json\")"
)
OPTIMIZER_SECTION_MESSAGE = (
    "{path} has an \"optimizer\" section: Trainer then hands DeepSpeed its own optimizer of every parameter in one "
    "group and never asks for switchyard's, whose expert groups ZeRO-1/2 require (\"None of the param groups are "
    "marked as MoE\"). Remove the section; TrainingArguments' optim, learning_rate, adam_beta1/2 and weight_decay "
    "choose the optimizer"
)
MPU_MESSAGE = (
    "the model's MoE layers were built with tp={tp}, pp={pp}: Trainer gives deepspeed.initialize no mpu, so DeepSpeed "
    "would reduce dense gradients over the whole world, not switchyard's data-parallel groups. Use Trainer with expert "
    "(and data) parallelism only, or launch/finetune.py for tp / pp"
)


def _check(args: Any, model: nn.Module) -> None:
    from switchyard.deepspeed.config import stage_of
    from switchyard.hf.patch import moe_layers

    layers = moe_layers(model)
    groups = next((layer.groups for layer in layers if layer.groups is not None), None)
    if groups is not None and (groups.size("tp") > 1 or groups.size("pp") > 1):
        raise ValueError(MPU_MESSAGE.format(tp=groups.size("tp"), pp=groups.size("pp")))
    if args.save_strategy != "no":
        raise ValueError(SAVE_MESSAGE.format(strategy=getattr(args.save_strategy, "value", args.save_strategy)))
    hf_config = getattr(args, "hf_deepspeed_config", None)
    ep = max((layer.ep_size for layer in layers), default=1)
    if hf_config is None:
        if ep > 1:
            raise ValueError(NO_DEEPSPEED_MESSAGE.format(ep=ep))
        return
    path = args.deepspeed if isinstance(args.deepspeed, str) else "the deepspeed config"
    settings = hf_config.config
    if "optimizer" in settings:
        raise ValueError(OPTIMIZER_SECTION_MESSAGE.format(path=path))
    stage = stage_of(settings, path)
    if stage == 3:
        raise ValueError(STAGE3_MESSAGE.format(path=path))
    clip = settings.get("gradient_clipping", 0.0)
    if stage == 0 and ep > 1 and isinstance(clip, (int, float)) and clip > 0:
        raise ValueError(STAGE0_CLIP_MESSAGE.format(path=path, clip=clip, ep=ep))


def moe_optimizer_cls_and_kwargs(args: Any, model: nn.Module) -> tuple[type[Optimizer], dict[str, Any]]:
    """Trainer's ``optimizer_cls_and_kwargs``: the optimizer ``args`` choose (``args.optim``, lr, betas, …) over
    switchyard's MoE-aware parameter groups (decay / no-decay by ``args.weight_decay``, expert parameters in groups of
    their own, as DeepSpeed requires). A subclass of that optimizer that takes those groups in place of the ones
    Trainer passes, so every transformers version instantiates it as it would the class (newer ones call a
    non-class as a factory). ``ValueError`` for settings with which Trainer cannot train ``model`` right."""
    from transformers import Trainer

    _check(args, model)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = optimizer_param_groups(model, args.weight_decay)

    def __init__(self: Optimizer, params: Any, **settings: Any) -> None:  # Trainer's own groups: not the MoE ones
        optimizer_cls.__init__(self, groups, **settings)

    return type(f"MoE{optimizer_cls.__name__}", (optimizer_cls,), {"__init__": __init__}), kwargs
