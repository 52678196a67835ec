"""Host time of one switchyard MoE layer step: how long Python takes to *issue* forward and backward.

    python benchmarks/moe_layer_host.py --out benchmarks/results/moe_layer_host.json [--trace-dir DIR]

A step that starts on an idle device waits for the host until the first grouped GEMM is issued, so the
layer's synchronized step time includes the host's time to run the router, the sort and the gather
(docs/performance.md, "Where the time goes"). This measures that host time directly: ``perf_counter``
around ``layer(x)`` and around ``out.backward`` (no synchronize inside either; the device is idle at
the start), the device time of the same step (CUDA events), the host time per step when the steps are issued
back to back (the device still busy with earlier ones, as inside a model), and, with ``--trace-dir``, a torch.profiler
trace of one step with Python stacks, to read which calls the host time goes to. ``--import-deps``
imports deepspeed and transformers first (as the other benchmarks do) to see whether that changes it.
Same shapes, inputs and weights as benchmarks/moe_layer.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as ml  # noqa: E402

DEFAULT_OUT = ml.REPO_ROOT / "benchmarks" / "results" / "moe_layer_host.json"


def _clear_grads(x: torch.Tensor, params: list[torch.Tensor]) -> None:
    """As moe_layer.py's timed steps do before each step."""
    x.grad = None
    for p in params:
        p.grad = None


def _issue_step(forward, x: torch.Tensor, grad: torch.Tensor, params: list[torch.Tensor]) -> tuple[float, float]:
    """Host ms to issue one forward and its backward (no synchronize inside)."""
    _clear_grads(x, params)
    t0 = time.perf_counter()
    out = forward(x)
    t1 = time.perf_counter()
    out.backward(grad.view_as(out))
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def host_times(forward, x: torch.Tensor, grad: torch.Tensor, params: list[torch.Tensor], device: torch.device,
               iters: int) -> dict:
    """Median host ms to issue forward, backward, and the device ms of the whole step; then the host ms with the
    steps issued back to back (no synchronize between them: the host issues while the device still runs
    earlier steps, as inside a model)."""
    fwd, bwd, step = [], [], []
    for i in range(iters + 3):
        ml.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host = _issue_step(forward, x, grad, params)
        end.record()
        end.synchronize()
        if i >= 3:
            fwd.append(host[0])
            bwd.append(host[1])
            step.append(start.elapsed_time(end))
    back_to_back = [_issue_step(forward, x, grad, params) for _ in range(iters)]
    ml.synchronize(device)
    return {"host_fwd_ms": statistics.median(fwd), "host_bwd_ms": statistics.median(bwd),
            "device_step_ms": statistics.median(step),
            "host_fwd_ms_back_to_back": statistics.median(h[0] for h in back_to_back),
            "host_bwd_ms_back_to_back": statistics.median(h[1] for h in back_to_back)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=[*ml.SHAPES, *ml.EXTRA_SHAPES], default=["olmoe", "qwen3_30b_a3b"])
    # dense_ceiling has no layer forward to issue (its step is six GEMMs)
    p.add_argument("--impls", nargs="+", choices=[i for i in ml.ALL_IMPLS if i != "dense_ceiling"],
                   default=["switchyard"])
    p.add_argument("--iters", type=ml.int_at_least(1), default=20)
    p.add_argument("--import-deps", action="store_true")
    p.add_argument("--trace-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_layer_host.py times host work against CUDA events: it needs a CUDA GPU")
    if args.import_deps:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401
    device = torch.device("cuda", torch.cuda.current_device())
    results: dict = {"meta": {"command": shlex.join(["python", "benchmarks/moe_layer_host.py", *(argv or sys.argv[1:])]),
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              **ml._versions(), "device": ml._device_name(device), "git_commit": ml._git_commit(),
                              "import_deps": args.import_deps}}
    for shape_name in args.shapes:
        b = ml.make_bench(shape_name, {**ml.SHAPES, **ml.EXTRA_SHAPES}[shape_name], 8192, device, torch.bfloat16, 0)
        for impl in args.impls:
            built = ml.BUILDERS[impl](b)
            x = b.x_BTH.detach().clone().requires_grad_(True)
            row = host_times(built.forward, x, b.grad_BTH, built.params, device, args.iters)
            results[f"{shape_name}/{impl}"] = row
            print(shape_name, impl, {k: round(v, 3) for k, v in row.items()}, flush=True)
            if args.trace_dir is not None:
                args.trace_dir.mkdir(parents=True, exist_ok=True)
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=acts, with_stack=True) as prof:
                    for _ in range(2):
                        _clear_grads(x, built.params)  # else the trace shows gradient-accumulation adds
                        ml.synchronize(device)
                        out = built.forward(x)
                        out.backward(b.grad_BTH.view_as(out))
                        ml.synchronize(device)
                tag = "deps" if args.import_deps else "plain"
                prof.export_chrome_trace(str(args.trace_dir / f"{shape_name}_{impl}_{tag}.json"))
            del built
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
