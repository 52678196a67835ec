"""Fine-tune an upcycled (or adopted) MoE model expert-parallel under DeepSpeed.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune/tiny.yaml [key.sub=value …]
    python launch/finetune.py --config configs/finetune/tiny.yaml parallel.ep=1     # one process
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml launch/finetune.py --config …

CPU ranks use gloo, GPUs NCCL; multi-node runs take deepspeed's --hostfile. See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

# accelerate's inline DeepSpeed plugin settings (env var → accelerate YAML key, values that change nothing):
# switchyard builds DeepSpeed from the run config and the JSON, so any other value would be silently ignored
ACCELERATE_IGNORED = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("zero_stage", ()),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("gradient_accumulation_steps", ()),
    "ACCELERATE_GRADIENT_CLIPPING": ("gradient_clipping", ()),
    "ACCELERATE_MIXED_PRECISION": ("mixed_precision", ("no",)),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("offload_optimizer_device", ("none",)),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("offload_param_device", ("none",)),
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": ("zero3_init_flag", ("false",)),
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": ("zero3_save_16bit_model", ("false",)),
    "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES": ("deepspeed_moe_layer_cls_names", ()),
}


def accelerate_overrides(environ: Mapping[str, str]) -> list[str]:
    """Overrides from `accelerate launch`'s DeepSpeed plugin: its deepspeed_config_file becomes the run's JSON.
    Inline plugin settings are refused (they would be ignored): they belong in the run config or that JSON."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return []
    ignored = [f"{key}: {environ[var]}" for var, (key, harmless) in ACCELERATE_IGNORED.items()
               if var in environ and environ[var].lower() not in harmless]
    if ignored:
        raise ValueError(
            f"accelerate's DeepSpeed plugin sets {ignored}, which switchyard does not read; remove them from the "
            "accelerate config and set train.grad_accum / train.clip / train.precision in the run config, the "
            "ZeRO stage and offload in the DeepSpeed JSON named by deepspeed_config_file"
        )
    config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return [f"deepspeed={config_file}"] if config_file else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="run config YAML (configs/finetune/*.yaml)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint dir (same as checkpoint.resume)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied over the YAML")
    return parser


def check_world(config) -> None:
    """The run config's checks that need the world size, and its DeepSpeed JSON filled for that world, run
    here so that a mistake (ep not dividing the world, ZeRO-3, a JSON value contradicting the run config) is
    one line on every rank (inside ``train`` it was a traceback per rank). A plain ``python`` run of a config
    made for several ranks (``tiny.yaml``'s ep=2) is told how to start it."""
    import torch.distributed as dist

    from switchyard.parallel import init_distributed

    init_distributed()
    world = dist.get_world_size()
    try:
        config.check_world(world)
    except ValueError as err:
        if world == 1 and config.parallel.ep > 1:
            raise ValueError(f"{err}. This is a world of one process: start it with `deepspeed --num_gpus "
                             f"{config.parallel.ep} launch/finetune.py …`, or set parallel.ep=1") from None
        raise
    config.deepspeed_config(world)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # options and overrides in any order

    from switchyard.train.loop import train
    from switchyard.train.run_config import load_run_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        # `accelerate launch` with the DeepSpeed plugin: its JSON is the run's (CLI overrides win)
        overrides = accelerate_overrides(os.environ) + overrides
        config = load_run_config(args.config, overrides)
        check_world(config)
    except ValueError as err:
        print(f"finetune: config error: {err}", file=sys.stderr, flush=True)
        return 2
    summary = train(config)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "losses"}
                                      | {"first_loss": summary["losses"][0] if summary["losses"] else None,
                                         "last_loss": summary["losses"][-1] if summary["losses"] else None}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
