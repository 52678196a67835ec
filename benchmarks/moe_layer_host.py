"""Host time of one switchyard MoE layer step: how long Python takes to *issue* forward and backward.

    python benchmarks/moe_layer_host.py --out benchmarks/results/moe_layer_host.json [--trace-dir DIR]

A step that starts on an idle device waits for the host until the first grouped GEMM is issued, so the
layer's synchronized step time includes the host's time to run the router, the sort and the gather
(docs/performance.md, "Where the time goes"). This measures that host time directly: ``perf_counter``
around ``layer(x)`` and around ``out.backward`` (no synchronize inside either; the device is idle at
the start), the device time of the same step (CUDA events), the host time per step when the steps are issued
back to back (the device still busy with earlier ones, as inside a model), and, with ``--trace-dir``, a torch.profiler
trace of one step with Python stacks, to read which calls the host time goes to, and with ``--gaps`` where the
device sits idle inside synchronized steps and which call issued the kernel it waited for (``idle_gaps``). ``--import-deps``
imports deepspeed and transformers first (as the other benchmarks do) to see whether that changes it.
Same shapes, inputs and weights as benchmarks/moe_layer.py.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shlex
import statistics
import sys
import tempfile
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


GAP_MIN_US = 2.0  # device idle shorter than this is launch latency, not waiting for the host
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _innermost_frame(frames: list[dict], ts: float, tid: object, prefer: str) -> str:
    """The innermost profiler frame (python function or op) on thread ``tid`` that contains time ``ts`` and whose
    name holds ``prefer`` (else the innermost of all; "?" if none)."""
    around = [f for f in frames if f["tid"] == tid and f["ts"] <= ts <= f["ts"] + f.get("dur", 0)]
    around.sort(key=lambda f: (f["ts"], -f.get("dur", 0)))
    preferred = [f for f in around if prefer in f["name"]]
    pick = (preferred or around or [{"name": "?"}])[-1]
    return pick["name"]


def idle_gaps(trace_events: list[dict], prefer: str = "switchyard") -> list[dict]:
    """Per step marked ``step<i>/forward`` + ``step<i>/backward`` (user annotations): the device's idle time from the
    forward's host start to its last kernel, split by the host frame that launched the kernel ending each gap (the
    device waited for that call to be issued). Frames: python functions with ``with_stack``, else ops."""
    device = sorted((e for e in trace_events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"),
                    key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in trace_events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    frames = [e for e in trace_events if e.get("cat") in ("python_function", "cpu_op") and e.get("ph") == "X"]
    marks = {e["name"]: e for e in trace_events if e.get("cat") == "user_annotation"}
    steps = sorted({name.split("/")[0] for name in marks if name.startswith("step")})
    out = []
    for step in steps:
        fwd, bwd = marks.get(f"{step}/forward"), marks.get(f"{step}/backward")
        if fwd is None or bwd is None:
            continue
        host_end = bwd["ts"] + bwd["dur"]
        issued = {c: e for c, e in launches.items() if fwd["ts"] <= e["ts"] <= host_end}
        mine = [k for k in device if k.get("args", {}).get("correlation") in issued]
        if not mine:
            continue
        by_frame: collections.Counter = collections.Counter()
        gaps = []
        prev_end = fwd["ts"]
        busy = 0.0
        for k in mine:
            gap = k["ts"] - prev_end
            launch = issued[k["args"]["correlation"]]
            if gap > GAP_MIN_US:
                frame = _innermost_frame(frames, launch["ts"], launch["tid"], prefer)
                phase = "forward" if launch["ts"] <= fwd["ts"] + fwd["dur"] else "backward"
                by_frame[f"{phase}: {frame}"] += gap
                gaps.append({"idle_us": round(gap, 1), "phase": phase, "before_kernel": k["name"][:80], "frame": frame})
            busy += k["dur"]
            prev_end = max(prev_end, k["ts"] + k["dur"])
        span = prev_end - fwd["ts"]
        out.append({"step": step, "host_forward_us": round(fwd["dur"], 1), "host_backward_us": round(bwd["dur"], 1),
                    "first_kernel_after_us": round(mine[0]["ts"] - fwd["ts"], 1), "span_us": round(span, 1),
                    "kernel_us": round(busy, 1), "idle_us": round(span - busy, 1), "kernels": len(mine),
                    "idle_by_frame_us": {f: round(v, 1) for f, v in by_frame.most_common()},
                    "largest_gaps": sorted(gaps, key=lambda g: -g["idle_us"])[:12]})
    return out


def gap_report(forward, x: torch.Tensor, grad: torch.Tensor, params: list[torch.Tensor], device: torch.device,
               with_stack: bool, steps: int = 3) -> list[dict]:
    """``idle_gaps`` of ``steps`` synchronized steps under torch.profiler (which slows the host: the gaps are
    larger than unprofiled; their places are what this is for)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=with_stack) as prof:
        for i in range(steps):
            _clear_grads(x, params)
            ml.synchronize(device)
            with torch.profiler.record_function(f"step{i}/forward"):
                out = forward(x)
            with torch.profiler.record_function(f"step{i}/backward"):
                out.backward(grad.view_as(out))
            ml.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return idle_gaps(events)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=[*ml.SHAPES, *ml.EXTRA_SHAPES], default=["olmoe", "qwen3_30b_a3b"])
    # dense_ceiling has no layer forward to issue (its step is six GEMMs)
    p.add_argument("--impls", nargs="+", choices=[i for i in ml.ALL_IMPLS if i != "dense_ceiling"],
                   default=["switchyard"])
    p.add_argument("--iters", type=ml.int_at_least(1), default=20)
    p.add_argument("--import-deps", action="store_true")
    p.add_argument("--trace-dir", type=Path, default=None)
    p.add_argument("--gaps", action="store_true", help="also profile 3 synchronized steps (without and with Python "
                   "stacks) and report where the device idles and which host call it waits for")
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
            if args.gaps:
                for with_stack in (False, True):
                    report = gap_report(built.forward, x, b.grad_BTH, built.params, device, with_stack)
                    row["gaps_python" if with_stack else "gaps_ops"] = report
                    print(json.dumps(report[-1], indent=1), flush=True)
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
