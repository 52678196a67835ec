"""DeepSpeed JSON configs: "auto" values filled from the run config, conflicts refused, MoE param groups.

The JSON in ``configs/deepspeed/`` says *how* DeepSpeed runs (ZeRO stage, communication); the run
config says *what* (batch sizes, clipping, precision). ``"auto"`` takes the run config's value; a
concrete value that disagrees with it is an error naming both, so the two files cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

ZERO3_MESSAGE = (
    "ZeRO stage 3 ({path}) with {what}: not supported. ZeRO-3 partitions switchyard's MoE layers with data and expert "
    "parallelism only (switchyard/deepspeed/zero3.py); {fix}"
)


STAGE0_CLIP_MESSAGE = (
    "{path} is ZeRO stage 0 with gradient_clipping={clip}, where DeepSpeed clips with the mean of each rank's local "
    "gradient norm, and with experts sharded over ep={ep} ranks that is not the model's norm (the step would differ "
    "from one process's). Set gradient_clipping to 0.0 (fill_deepspeed_config: clip=0.0) and, after "
    "engine.backward(loss), call switchyard.deepspeed.clipping.clip_global_grad_norm_(model, {clip}, groups) as "
    "launch/finetune.py does; or use ZeRO stage 1 or 2 (configs/deepspeed/zero1.json, zero2.json), which compute the "
    "right norm"
)


# DeepSpeed's own refusal comes after the model is built and tells the user to put an optimizer in the JSON,
# which switchyard refuses; a ZeRO-2 + offload run with the flag set was checked on CPU ranks (same losses)
OFFLOAD_MESSAGE = (
    "{path} offloads the optimizer to {device}; switchyard steps torch's optimizer (MoE-aware parameter groups), "
    "not DeepSpeedCPUAdam, which DeepSpeed refuses under ZeRO-Offload unless the JSON says "
    "\"zero_force_ds_cpu_optimizer\": false. Add that (torch's optimizer then steps the offloaded copy, slower than "
    "DeepSpeedCPUAdam) or remove zero_optimization.offload_optimizer"
)


# Settings with which DeepSpeed builds process groups of its own over the ProcessGroupManager's: the two would
# disagree and gradients be reduced over the wrong ranks (the layout flag would be silently ignored)
AUTOEP_MESSAGE = (
    "deepspeed config {path} enables AutoEP (expert_parallel.enabled), which swaps MoE blocks for its own layer "
    "and builds expert groups of its own beside switchyard's; switchyard's MoE layers do expert parallelism "
    "(parallel.ep in the run config). Remove the expert_parallel section"
)
AUTOTP_MESSAGE = (
    "deepspeed config {path} sets tensor_parallel.autotp_size={value}: DeepSpeed's AutoTP then replaces "
    "switchyard's mpu with groups of its own, whose data-parallel ranks are not those switchyard's expert groups "
    "assume. Remove it (tensor parallelism is parallel.tp, docs/parallelism.md)"
)
DATA_BEFORE_EXPERT_MESSAGE = (
    "deepspeed config {path} sets use_data_before_expert_parallelism={value}, a layout switchyard does not build: "
    "its ProcessGroupManager lays expert groups out in Megatron-Core's order (docs/parallelism.md), which "
    "DeepSpeed would use regardless. Remove the key"
)


def _refuse_own_groups(config: dict[str, Any], path: Path) -> None:
    autoep = config.get("expert_parallel")
    if isinstance(autoep, dict) and autoep.get("enabled"):
        raise ValueError(AUTOEP_MESSAGE.format(path=path))
    autotp = config.get("tensor_parallel")
    if isinstance(autotp, dict) and autotp.get("autotp_size") not in (None, 0, 1):
        raise ValueError(AUTOTP_MESSAGE.format(path=path, value=autotp["autotp_size"]))
    flag = config.get("use_data_before_expert_parallelism")
    if flag:
        raise ValueError(DATA_BEFORE_EXPERT_MESSAGE.format(path=path, value=flag))


def _read(path: Path) -> dict[str, Any]:
    """The JSON at ``path``; a missing file or a syntax error names the file (json's own message does not)."""
    if not path.is_file():
        raise ValueError(f"deepspeed config {path} does not exist (see configs/deepspeed/)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed config {path} must be a JSON object, got {type(config).__name__}")
    return config


def stage_of(config: dict[str, Any], path: Path) -> int:
    """``zero_optimization.stage``, 0 if absent. DeepSpeed drops "auto" values silently (stage 0), while the
    loop picks its clipping by the stage: switchyard wants the number written out."""
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f'deepspeed config {path}: zero_optimization={zero!r} must be a section, e.g. {{"stage": 2}}')
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed config {path}: zero_optimization.stage={stage!r}; the stage is one of the numbers "
                         "0, 1, 2 or 3 (written as a number: DeepSpeed would read \"auto\" as 0)")
    return stage


def zero_stage(path: str | Path) -> int:
    path = Path(path)
    return stage_of(_read(path), path)


def _fill(config: dict[str, Any], key: str, value: Any, source: str, path: Path) -> None:
    """Fill ``key`` (dotted for nested sections: ``bf16.enabled``) if "auto" or absent, else check it agrees."""
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ValueError(f"deepspeed config {path} has {section}={node!r}; it must be a section, e.g. "
                             f'"{section}": {{"{leaf}": "auto"}}')
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ValueError(f"deepspeed config {path} has {key}={current!r} but the run config implies {value!r} "
                         f"({source}); set it to \"auto\" or make them agree")


def fill_deepspeed_config(
    path: str | Path, *, micro_batch_size: int, grad_accum: int, dp_size: int, clip: float, precision: str,
    ep_size: int = 1, caller_clips: bool = False,
) -> dict[str, Any]:
    """The JSON at ``path`` with its "auto" values filled. ``ep_size``: the job's expert parallelism, which
    decides whether DeepSpeed may clip at ZeRO stage 0 (see ``STAGE0_CLIP_MESSAGE``). ``caller_clips``: the
    caller clips to ``clip`` itself (``clip_global_grad_norm_``), so a concrete ``gradient_clipping`` must still
    agree with ``clip`` but DeepSpeed gets 0.0 (it must not clip again with its own norm)."""
    path = Path(path)
    config = _read(path)
    stage = stage_of(config, path)
    if stage == 3:
        # the optimizer offloads as at stage 2 (tests/integration/test_finetune_offload_gpu.py); the weights do not
        if (config.get("zero_optimization", {}).get("offload_param") or {}).get("device", "none") != "none":
            raise ValueError(ZERO3_MESSAGE.format(path=path, what="zero_optimization.offload_param",
                                                  fix="offloading the weights is not tested there: remove it "
                                                      "(offload_optimizer is supported)"))
    if stage == 0 and ep_size > 1 and clip > 0 and not caller_clips:
        raise ValueError(STAGE0_CLIP_MESSAGE.format(ep=ep_size, clip=clip, path=path))
    _fill(config, "train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size", path)
    _fill(config, "gradient_accumulation_steps", grad_accum, "train.grad_accum", path)
    _fill(config, "train_batch_size", micro_batch_size * grad_accum * dp_size, "micro_batch × grad_accum × dp", path)
    _fill(config, "gradient_clipping", clip, "train.clip", path)
    if caller_clips:
        config["gradient_clipping"] = 0.0
    _fill(config, "bf16.enabled", precision == "bf16", "train.precision", path)
    _refuse_own_groups(config, path)
    if config.get("fp16", {}).get("enabled") is True:
        raise ValueError("fp16 is not supported (use train.precision: bf16); remove the fp16 section")
    if "optimizer" in config or "scheduler" in config:
        raise ValueError("remove the optimizer/scheduler sections: switchyard builds them from the run config "
                         "(train.lr, train.schedule, …) with MoE-aware parameter groups")
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none" and config.get("zero_force_ds_cpu_optimizer", True):
        raise ValueError(OFFLOAD_MESSAGE.format(path=path, device=offload["device"]))
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 10**9)
    return config


# Largest expert param group (elements). DeepSpeed's own default (178956971) cut the 2.4B expert parameters
# of benchmarks/finetune.py into 16 groups (18 param groups in all); every group is one more ZeRO flat partition, flatten + fp32 cast,
# clip and optimizer call, and ~3 host syncs inside ZeRO's step (the is-finite check of the norm per group).
# 5e8 makes 6 (8 in all) there (the optimizer-phase measurement is in docs/performance.md). The cost is memory
# inside the step: ZeRO casts one group's gradients to a fresh fp32 copy (after a bf16 flatten), ~6 bytes
# per element of the group's partition, 2.8 GiB at this cap, while the activations are already freed.
MOE_MAX_GROUP_SIZE = 500_000_000


def optimizer_param_groups(model: nn.Module, weight_decay: float,
                           max_group_size: int | None = MOE_MAX_GROUP_SIZE) -> list[dict[str, Any]]:
    """Decay / no-decay groups (biases and norms don't decay), then split for MoE as DeepSpeed requires:
    expert parameters in their own groups, marked ``moe=True`` with their expert group name, each group at
    most ``max_group_size`` elements (``None``: one group per expert group and decay class)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if max_group_size is not None and max_group_size < 1:
        raise ValueError(f"max_group_size={max_group_size} must be a positive number of elements or None")

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # by name too: stacked expert biases ([E, out]) are 2-D, and like transformers' Trainer no bias decays
        no = param.dim() < 2 or "norm" in name.lower() or "bias" in name.rsplit(".", 1)[-1].lower()
        (no_decay if no else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=max_group_size)
