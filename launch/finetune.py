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
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Every other setting is a key.sub=value override (the value read as YAML), e.g. train.lr=1e-3 "
               "train.max_steps=100 moe.layers=[0,2] train.cuda_graph=true checkpoint.resume=null; quote a value "
               "with spaces: 'moe.layers=[0, 2]'. Keys: docs/finetune.md.")
    parser.add_argument("--config", default=None,
                        help="run config YAML (configs/finetune/*.yaml; default: none, every setting at its default)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint dir (same as checkpoint.resume)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied over the YAML, in order")
    return parser


def setting_keys() -> list[str]:
    """Every ``key.sub`` an override can set (``moe.*`` is flat: MoEConfig's fields beside the selection's)."""
    import dataclasses
    from typing import get_type_hints

    from switchyard.config import MoEConfig
    from switchyard.train.run_config import RunConfig

    keys, hints = [], get_type_hints(RunConfig)
    for name, hint in ((f.name, hints[f.name]) for f in dataclasses.fields(RunConfig)):
        if not dataclasses.is_dataclass(hint):
            keys.append(name)
            continue
        names = [g.name for g in dataclasses.fields(hint) if g.name != "config"]
        names += [g.name for g in dataclasses.fields(MoEConfig)] if name == "moe" else []
        keys += [f"{name}.{sub}" for sub in names]
    return keys


def check_arguments(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """An option the launcher does not take (``--lr 1e-3``, HF Trainer's habit) is named with the override that
    sets it; a word without ``=`` is named too, with the quoting hint when the shell split an override at a space
    (``moe.layers=[0, 2]`` unquoted). Both before any config is read."""
    options = {s: action for action in parser._actions for s in action.option_strings}
    taking_value = False
    for i, token in enumerate(argv):
        if taking_value:
            taking_value = False
            continue
        name, eq, value = token.partition("=")
        matched = [action for s, action in options.items()  # argparse also takes a unique prefix (--conf)
                   if s == name or (name.startswith("--") and len(name) > 2 and s.startswith(name))]
        if matched:
            taking_value = not eq and matched[0].nargs != 0
            continue
        if token.startswith("-"):
            if not eq and i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
            key = name.lstrip("-").replace("-", "_")
            matches = [k for k in setting_keys() if k.rsplit(".", 1)[-1] == key]
            fix = (" or ".join(f"{k}={value or 'VALUE'}" for k in matches) if matches
                   else "key.sub=value (the keys: docs/finetune.md)")
            parser.error(f"unknown option {token}: the launcher takes --config and --resume; settings are "
                         f"overrides: {fix}")
        if not eq:
            before = argv[i - 1] if i else ""
            split = "=" in before and sum(before.count(c) for c in "[{") > sum(before.count(c) for c in "]}")
            hint = (f"; the shell split {before} {token} at a space: quote the whole override, '{before} {token}'"
                    if split else "; settings look like key.sub=value, e.g. train.lr=1e-3 (quote a value with spaces)")
            parser.error(f"{token!r} is not a key.sub=value override{hint}")


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


def _model_sources(config) -> list[tuple[str, str]]:
    """(key, value) of ``model.source`` / ``model.tokenizer`` where each names a model dir or hub id (not ``tiny``)."""
    pairs = (("model.source", config.model.source), ("model.tokenizer", config.model.tokenizer))
    return [(key, value) for key, value in pairs if value is not None and value != "tiny"]


def _error_line(message: str) -> None:
    """One write per line: every rank prints its error to the launcher's shared stderr, and print's separate write of
    the newline let two ranks' lines run together."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def check_model_source(config) -> None:
    """A local path that is not there, or a model directory without config.json, named now (else every rank's
    traceback from the hub client, which reads a missing ``./dir`` as a malformed repo id, or transformers')."""
    from switchyard.cli import check_local_model, check_model_dir

    for key, value in _model_sources(config):
        (check_model_dir if key == "model.source" else check_local_model)(value, key)


def _in_hub_cache(key: str, repo_id: str) -> bool:
    """Whether the hub cache holds the file transformers reads first for ``key`` (then it loads without the hub)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json" if key == "model.source" else "tokenizer_config.json")
    except Exception:  # noqa: BLE001 - a malformed id: transformers' load below names it
        return False
    return isinstance(found, str)


def _hub_silent(repo_id: str) -> str | None:
    """Why the hub gave no answer about ``repo_id`` (no network, DNS, a timeout), or None when it answered: with
    the model's info or with an error (no such repo, gated, a malformed id) that transformers' load then words."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from switchyard.cli import _one_line

    try:
        HfApi().model_info(repo_id, timeout=10)
    except (HfHubHTTPError, HFValidationError):
        return None
    except Exception as err:  # noqa: BLE001 - httpx's connection errors and the like: nobody answered
        return f"{type(err).__name__}: {_one_line(err)}"
    return None


def check_hub_sources(config) -> None:
    """``model.source`` / ``model.tokenizer`` given as a hub id, fetched now (config.json / the tokenizer, small): a
    repo that does not exist, or a hub out of reach (no network; HF_HUB_OFFLINE=1 and not in the cache), is a
    ValueError naming the key and the fix, not an OSError traceback from every rank's model load."""
    from pathlib import Path

    from huggingface_hub import constants
    from transformers import AutoConfig, AutoTokenizer

    from switchyard.cli import _one_line

    loaders = {"model.source": AutoConfig, "model.tokenizer": AutoTokenizer}
    for key, value in _model_sources(config):
        if Path(value).expanduser().exists():
            continue
        no_answer = None if constants.HF_HUB_OFFLINE or _in_hub_cache(key, value) else _hub_silent(value)
        if no_answer is not None:  # at once: transformers' download would retry for ~25 s first
            raise ValueError(f"{key}={value!r} is not a local directory nor in the hub cache, and the hub does not "
                             f"answer ({no_answer}); point {key} at a local model directory, or download it once with "
                             "network access")
        try:
            loaders[key].from_pretrained(value)
        except OSError as err:
            if constants.HF_HUB_OFFLINE:
                raise ValueError(f"{key}={value!r} is not a local directory nor in the hub cache (HF_HUB_OFFLINE=1 is "
                                 f"set: nothing is downloaded); point {key} at a local model directory, or download "
                                 "it once with network access (HF_HUB_OFFLINE unset)") from None
            raise ValueError(f"{key}={value!r} is not a local directory, and fetching it from the hub failed: "
                             f"{_one_line(err)}; point {key} at a local model directory, or check the repo id and the "
                             "network (without one, HF_HUB_OFFLINE=1 loads from the hub cache alone)") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    check_arguments(argv, parser)
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order

    from switchyard.train.loop import train
    from switchyard.train.run_config import load_run_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        # `accelerate launch` with the DeepSpeed plugin: its JSON is the run's (CLI overrides win)
        overrides = accelerate_overrides(os.environ) + overrides
        config = load_run_config(args.config, overrides)
        check_model_source(config)
        check_world(config)
    except ValueError as err:
        bare = not args.config and not args.overrides
        hint = " (no --config was given: start from --config configs/finetune/tiny.yaml)" if bare else ""
        _error_line(f"finetune: config error: {err}{hint}")
        return 2
    from switchyard.parallel.manager import release_shm_allreduce_buffer

    try:
        check_hub_sources(config)
        summary = train(config)
    # a user mistake found while building (the checkpoint to resume, the model, the data), or a file in the way (a
    # build lock a killed run left: switchyard/deepspeed/build_lock.py)
    except (ValueError, FileExistsError) as err:
        _error_line(f"finetune: error: {err}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: one line each, not a traceback each
        _error_line("finetune: interrupted; the newest complete checkpoint in output_dir is intact: continue with "
                    "--resume auto")
        return 130
    finally:
        release_shm_allreduce_buffer()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "losses"}
                                      | {"first_loss": summary["losses"][0] if summary["losses"] else None,
                                         "last_loss": summary["losses"][-1] if summary["losses"] else None}),
              flush=True)
    # every rank leaves together and shuts its process groups down: left to interpreter exit, a gloo group's
    # threads were seen to abort a rank ("terminate called without an active exception") after a finished run
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from switchyard.parallel.process_exit import exit_without_teardown

    exit_without_teardown(main())
