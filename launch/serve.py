"""Serve an expert-parallel MoE model over an OpenAI-compatible HTTP API.

    deepspeed --num_gpus 2 launch/serve.py --model <switchyard or HF MoE dir> --ep 2 [--port 8000]
    python launch/serve.py --model tiny                    # one process, the embedded tiny MoE

Rank 0 serves http://HOST:PORT/v1 (127.0.0.1 unless --host says otherwise) and broadcasts each
scheduler step to the other ranks. SIGTERM to rank 0 drains: no new requests (503), in-flight ones
finish, then every rank exits 0. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import sys


def _one_line(err: Exception, config: str | None) -> str:
    """PyYAML's message spans lines (the text quoted, a caret): as one line naming the file and the place."""
    import yaml

    if not isinstance(err, yaml.YAMLError):
        return str(err)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"--config {config} is not valid YAML: {getattr(err, 'problem', None) or err}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="switchyard checkpoint, HF MoE dir (e.g. from `switchyard export`), or 'tiny'")
    parser.add_argument("--ep", type=int, help="expert-parallel size, dividing the world size (default 1: every rank "
                                               "holds every expert)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--api-key", dest="api_key", help="require 'Authorization: Bearer KEY' (all but /health); "
                        "SWITCHYARD_API_KEY=KEY does the same without putting the key in the launcher's log")
    parser.add_argument("--served-model-name", dest="served_model_name", help="model id in the API (default: dir name)")
    parser.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--max-batch", dest="max_batch", type=int, help="sequences decoding at once (default 16)")
    parser.add_argument("--decode", help="auto (default: static where the model allows, else batched) | static | batched | sequential")
    parser.add_argument("--max-model-len", dest="max_model_len", type=int, help="context limit (default: the model's)")
    parser.add_argument("--config", help="YAML of the same settings (configs/serve/*.yaml); flags win")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args(argv)

    import yaml

    from switchyard.serve.config import ServeConfig

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "local_rank")}
    try:
        config = ServeConfig.load(args.config, overrides)
        if not config.model:
            raise ValueError("--model is required (or `model:` in the --config file)")
    except (ValueError, yaml.YAMLError) as err:
        print(f"serve: config error: {_one_line(err, args.config)}", file=sys.stderr, flush=True)
        return 2
    from switchyard.serve.main import run

    return run(config)


if __name__ == "__main__":
    from switchyard.parallel.process_exit import exit_without_teardown

    exit_without_teardown(main())
