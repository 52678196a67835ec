"""ZeRO stage 3 with switchyard's MoE layers: each expert partitioned over its expert-data-parallel group.

DeepSpeed's ZeRO-3 partitions a parameter over the group named by its ``ds_zero_partition_process_group`` and
averages an expert's gradient over the whole data-parallel group when its ``ds_zero_placement_family`` is
``"autoep_expert"`` (the per-parameter placement DeepSpeed 0.19 added for its AutoEP layer). Switchyard's expert
parameters get that placement, so ZeRO-3 splits each rank's experts over the ranks that hold the same experts (the
expert-data-parallel group) and everything else over the data-parallel group, as stages 1-2 partition their
optimizer state. The MoE layers are ZeRO-3 leaf modules (``set_z3_leaf_modules``): all of a layer's parameters are
gathered when it runs, since which experts run changes from batch to batch.

The engine refuses any ``deepspeed.moe.layer.MoE`` at stage 3 (it cannot partition DeepSpeed's own MoE layer), and
switchyard's layer subclasses that class only so that stages 0-2 find it (``parallel/deepspeed_groups.py``). At
stage 3 the placement above does that job, so ``switchyard.deepspeed.initialize`` (``engine.py``) hides the layers
from the engine's MoE scan (:func:`engine_without_native_moe`) while it builds the engine; its MoE checkpoint code,
which only stages 0-2 would reach, then never runs (switchyard saves its own checkpoints, ``train/checkpointing.py``).

:func:`partition_into_the_device` moves the model there already partitioned; :func:`gathered_parameters` holds the
unpartitioned tensors while a save reads the state dict.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

ZERO3_NEEDS = ("ZeRO stage 3 with switchyard MoE layers needs a DeepSpeed whose ZeRO-3 partitions each parameter over "
               "its own group (ds_zero_partition_process_group; DeepSpeed 0.19.8 has it), not deepspeed {version}; "
               "upgrade DeepSpeed or use ZeRO stage 1 or 2 (configs/deepspeed/zero2.json)")


def check_deepspeed_supports_zero3() -> None:
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    import deepspeed.runtime.engine as engine_module

    if not (hasattr(DeepSpeedZeroOptimizer_Stage3, "_autoep_expert_parallel_group") and hasattr(engine_module, "MoE")):
        raise ValueError(ZERO3_NEEDS.format(version=deepspeed.__version__))


def prepare_for_zero3(model: nn.Module) -> int:
    """MoE layers as leaf modules; each expert parameter placed in its expert-data-parallel group. Returns how many
    expert parameters were placed. Call it after the ``ProcessGroupManager`` registered the expert groups."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups as ds_groups
    from deepspeed.utils import set_z3_leaf_modules

    from switchyard.moe.layer import MoELayer

    check_deepspeed_supports_zero3()
    if any(isinstance(m, MoELayer) for m in model.modules()):
        set_z3_leaf_modules(model, [MoELayer])
    placed = 0
    for param in model.parameters():
        if is_moe_param(param):
            param.ds_zero_placement_family = "autoep_expert"
            param.ds_zero_partition_group_name = param.group_name
            param.ds_zero_partition_process_group = ds_groups._get_expert_data_parallel_group(param.group_name)
            placed += 1
    return placed


class _NoModule:
    """A class no module is an instance of: the engine's MoE scan finds nothing while it is in place."""


@contextlib.contextmanager
def engine_without_native_moe() -> Iterator[None]:
    import deepspeed.runtime.engine as engine_module

    native = engine_module.MoE
    engine_module.MoE = _NoModule
    try:
        yield
    finally:
        engine_module.MoE = native


def partition_into_the_device(model: nn.Module, config: dict[str, Any], mpu: Any) -> None:
    """Partition the model parameter by parameter on its way to the device (``deepspeed.zero.Init(module=...)``):
    the engine would move the whole model to the device first, so a model larger than one device could not start.
    Each parameter goes to the device in the training dtype and is cut to this rank's partition before the next
    one moves; buffers (rotary frequencies, expert biases) move whole, as the engine would have moved them."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") is True else None
    device = torch.device(get_accelerator().current_device_name())
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    for param in model.parameters():
        if dtype is not None and param.is_floating_point():
            param.data = param.data.to(dtype)  # the engine checks a partitioned model is in its training dtype
    # the ZeRO and precision settings only: Init checks batch sizes against a world size of its own
    settings = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": config.get("zero_optimization", {}),
                "bf16": config.get("bf16", {})}
    deepspeed.zero.Init(module=model, config_dict_or_path=settings, mpu=mpu)


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 holds ``model``'s parameters partitioned (their ``.data`` is then a placeholder)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, wanted: Callable[[nn.Parameter], bool] | None = None) -> Iterator[None]:
    """Inside: every ZeRO-3 parameter of ``model`` holds its whole tensor on the CPU (``wanted(param)`` False: a
    zero-stride placeholder of its shape, values meaningless), so ``model.state_dict()`` and its hooks see the
    unpartitioned model. A collective over each parameter's partition group: every rank enters it. Gathered one at a
    time on the device, so the device never holds more than one whole tensor beside the partitions."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]  # tied parameters once
    full: list[torch.Tensor] = []
    for param in params:
        with GatheredParameters([param], modifier_rank=None):
            keep = wanted is None or wanted(param)
            full.append(param.data.detach().to("cpu", copy=True) if keep else
                        param.data.new_zeros((), device="cpu").expand(param.ds_shape))
    placeholders = [p.data for p in params]
    try:
        for param, tensor in zip(params, full):
            param.data = tensor
        yield
    finally:
        for param, placeholder in zip(params, placeholders):
            param.data = placeholder
