"""``switchyard.deepspeed.initialize``: ``deepspeed.initialize`` for a model with switchyard MoE layers, at any stage.

Stages 0-2 build DeepSpeed's engine as it is. Stage 3 prepares the model first (expert placement, leaf modules,
partitioning on the way to the device: ``zero3.py``) and checks afterwards that the engine took the expert groups.
A ZeRO optimizer then gets the fused fp32 gradient norm and, at stages 1-2, the sync-free clip (``grad_norm.py``) and,
with torch's Adam/AdamW inside, the step that casts, clips, updates and writes the 16-bit weights in one pass
(``zero_step.py``).
Every stage first checks for a build lock left by a rank killed while DeepSpeed compiled its CPU op
(``build_lock.py``): an error, not a hang. Stage 0 with DeepSpeed's clipping is refused when experts are sharded over
ep > 1 ranks: DeepSpeed's stage-0 norm is wrong there (``STAGE0_CLIP_MESSAGE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from switchyard.log import get_logger

log = get_logger(__name__)


def _settings_and_stage(config: Any) -> tuple[dict[str, Any], int]:
    """``deepspeed.initialize``'s ``config`` (a dict, or the path of a JSON file) as a dict, and its ZeRO stage
    (checked as the launcher checks it: a number written out)."""
    from switchyard.deepspeed.config import _read, stage_of

    path = Path("(the config dict)") if isinstance(config, dict) else Path(config)
    settings = config if isinstance(config, dict) else _read(path)
    return settings, stage_of(settings, path)


def _check_stage0_clip(model: nn.Module, settings: dict[str, Any], config: Any) -> None:
    """Refuse what ``fill_deepspeed_config`` refuses on the launcher's path: DeepSpeed clipping at stage 0 with
    experts sharded over EP ranks (every rank, before the engine is built: each holds the same settings and ep)."""
    from switchyard.deepspeed.config import STAGE0_CLIP_MESSAGE
    from switchyard.hf.patch import moe_layers

    clip = settings.get("gradient_clipping", 0.0)
    ep = max((layer.ep_size for layer in moe_layers(model)), default=1)
    if ep > 1 and isinstance(clip, (int, float)) and clip > 0:
        path = "the config dict" if isinstance(config, dict) else config
        raise ValueError(STAGE0_CLIP_MESSAGE.format(path=path, clip=clip, ep=ep))


def initialize(model: nn.Module, config: Any, *, fused_grad_norm: bool = True, fused_step: bool = True,
               **kwargs: Any) -> tuple:
    """``deepspeed.initialize(model=model, config=config, **kwargs)``'s four results. ``fused_grad_norm=False``
    keeps DeepSpeed's own gradient norm and clip, ``fused_step=False`` its ZeRO step (the benchmark's A/Bs)."""
    import deepspeed

    from switchyard.deepspeed import zero3
    from switchyard.deepspeed.build_lock import check_build_lock
    from switchyard.deepspeed.grad_norm import install_fused_grad_norm
    from switchyard.deepspeed.zero_step import install_fused_step

    check_build_lock()  # CPU ranks: DeepSpeed compiles its all-reduce op inside initialize, under a lock torch never times out
    settings, stage = _settings_and_stage(config)
    if stage == 0:
        _check_stage0_clip(model, settings, config)
    if stage != 3:
        result = deepspeed.initialize(model=model, config=config, **kwargs)
    else:
        zero3.prepare_for_zero3(model)
        zero3.partition_into_the_device(model, settings, kwargs.get("mpu"))
        with zero3.engine_without_native_moe():
            result = deepspeed.initialize(model=model, config=config, **kwargs)
        wrong = [name for name, p in model.named_parameters() if getattr(p, "ds_zero_placement_family", None) ==
                 "autoep_expert" and getattr(p, "ds_process_group", None) is not p.ds_zero_partition_process_group]
        if wrong:
            raise RuntimeError(f"ZeRO-3 partitioned expert parameters {wrong[:3]} over another group than their "
                               "expert-data-parallel one: this DeepSpeed does not honour ds_zero_partition_process_group")
    replaced = install_fused_grad_norm(result[0]) if fused_grad_norm else []
    if replaced:
        clip = ("; clipping without a host sync per parameter group" if "unscale_and_clip_grads" in replaced else "")
        log.info("gradient norm: one fused fp32 reduction per parameter group (switchyard.deepspeed.grad_norm), not "
                 "DeepSpeed's fp64 copy of each gradient%s", clip, ranks=[0])
    if fused_step and install_fused_step(result[0]):
        log.info("optimizer step: the gradient's cast, the clip, Adam and the 16-bit weights' copy in one pass per "
                 "parameter group (switchyard.deepspeed.zero_step)", ranks=[0])
    return result
