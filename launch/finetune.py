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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="run config YAML (configs/finetune/*.yaml)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint dir (same as checkpoint.resume)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied over the YAML")
    args = parser.parse_args(argv)

    from switchyard.train.loop import train
    from switchyard.train.run_config import load_run_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    accelerate_ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if accelerate_ds:  # `accelerate launch` with the DeepSpeed plugin: its JSON is the run's (CLI overrides win)
        overrides.insert(0, f"deepspeed={accelerate_ds}")
    try:
        config = load_run_config(args.config, overrides)
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
