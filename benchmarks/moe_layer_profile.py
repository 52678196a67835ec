"""Where the time goes in switchyard's MoE layer: per-stage forward + backward times, fused vs unfused.

    python benchmarks/moe_layer_profile.py --out benchmarks/results/moe_layer_profile.json

CPU smoke run of the same logic (tiny shapes; writes to a temp file):

    python benchmarks/moe_layer_profile.py --tiny

Same shapes, inputs and weights as benchmarks/moe_layer.py. For each shape and each mode (``fused``: the
default path with switchyard.moe.kernels; ``unfused``: ``set_fused_kernels(False)``, the layer as it was
before them) it reports

    step_ms      one forward + backward through ``layer(x)`` (median, CUDA events), and peak memory
    stages_ms    the same step cut at stage boundaries by CUDA events: forward marks between router /
                 permute / grouped GEMM 1 / activation / grouped GEMM 2 / combine; backward marks from
                 gradient hooks on the stage outputs (combine bwd, GEMM 2 bwd, activation bwd, GEMM 1
                 bwd, then permute + router bwd and the accumulation into x.grad). Events do not
                 synchronize, so the stages sum to about the step time.
    kernels      torch.profiler's CUDA kernels over ``--profile-steps`` steps, ms per step, top 15
    check        fused vs unfused on the same input: relative error of the output, x.grad and each
                 parameter's grad (bf16 rounding only: the router is the same)

plus ``deepspeed_autoep`` (step time and top kernels, same input) when DeepSpeed imports, and
``kernel_checks``: each Triton kernel against its PyTorch fallback on random inputs with dropped slots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as ml  # noqa: E402  (benchmarks/moe_layer.py: shapes, inputs, builders, timing)

from switchyard.moe import experts as experts_mod  # noqa: E402
from switchyard.moe import kernels  # noqa: E402
from switchyard.moe.kernels import ops  # noqa: E402

DEFAULT_OUT = ml.REPO_ROOT / "benchmarks" / "results" / "moe_layer_profile.json"
FWD_STAGES = ("router", "permute", "gemm1", "act", "gemm2", "combine")
BWD_STAGES = ("combine_bwd", "gemm2_bwd", "act_bwd", "gemm1_bwd", "permute_router_bwd")


class Marks:
    """Named points on the device timeline (CUDA events; host clock on CPU, where work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.points: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        ml.synchronize(self.device)
        out = {}
        for (_, a), (name, b) in zip(self.points, self.points[1:]):
            out[name] = a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3  # type: ignore[union-attr]
        return out


def staged_step(layer, x_BTH: torch.Tensor, grad_BTH: torch.Tensor, marks: Marks) -> None:
    """``layer(x).backward(grad)`` for a routed-only layer, stage by stage, with marks between stages."""
    original_act = experts_mod._apply_act

    def marked_act(module, h_NO):
        marks.mark("gemm1")
        a_NF = original_act(module, h_NO)
        marks.mark("act")
        if a_NF.requires_grad:
            a_NF.register_hook(lambda g: marks.mark("gemm2_bwd"))
            h_NO.register_hook(lambda g: marks.mark("act_bwd"))
        return a_NF

    experts_mod._apply_act = marked_act
    try:
        marks.mark("start")
        x_TH = x_BTH.reshape(-1, layer.hidden_size)
        routed = layer.router(x_TH)
        marks.mark("router")
        keep_TK = layer._capacity_mask(routed)
        x_MH, plan = layer.dispatcher.dispatch(x_TH, routed.topk_idx_TK, keep_TK)
        marks.mark("permute")
        y_MH = layer.experts(x_MH, plan.tokens_per_local_expert_L, plan.local_cu_offsets_L1)
        marks.mark("gemm2")
        out_TH = layer.dispatcher.combine(y_MH, plan, routed.topk_weight_TK)
        marks.mark("combine")
    finally:
        experts_mod._apply_act = original_act
    y_MH.register_hook(lambda g: marks.mark("combine_bwd"))
    x_MH.register_hook(lambda g: marks.mark("gemm1_bwd"))
    out_TH.backward(grad_BTH.reshape_as(out_TH))
    marks.mark("permute_router_bwd")


def stage_times(layer, b: ml.Bench, reps: int) -> dict[str, float]:
    x = b.x_BTH.detach().clone().requires_grad_(True)
    per_stage: dict[str, list[float]] = {}
    for i in range(reps + 2):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        ml.synchronize(b.device)
        marks = Marks(b.device)
        staged_step(layer, x, b.grad_BTH, marks)
        if i >= 2:  # two warm-ups
            for name, ms in marks.durations().items():
                per_stage.setdefault(name, []).append(ms)
    order = [s for s in (*FWD_STAGES, *BWD_STAGES) if s in per_stage]
    return {s: round(statistics.median(per_stage[s]), 4) for s in order}


def kernel_table(step: Callable[[], object], zero: Callable[[], None], device: torch.device,
                 steps: int) -> list[dict]:
    """Top CUDA kernels by self time over ``steps`` steps (ms per step)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        zero()
        step()
    ml.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            zero()
            step()
        ml.synchronize(device)
    rows = []
    for evt in prof.key_averages():
        if str(getattr(evt, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        rows.append({"kernel": evt.key[:160], "ms_per_step": round(us / 1e3 / steps, 4),
                     "calls_per_step": round(evt.count / steps, 2)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    return [{"kernel": "(all kernels)", "ms_per_step": round(total, 4), "calls_per_step": None}] + rows[:15]


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def fused_vs_unfused(layer, b: ml.Bench) -> dict[str, float | None]:
    results = []
    for fused in (True, False):
        kernels.set_fused_kernels(fused)
        x = b.x_BTH.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.backward(b.grad_BTH.view_as(out))
        results.append({"out": out.detach(), "x.grad": x.grad,
                        **{name: p.grad for name, p in layer.named_parameters()}})
    kernels.set_fused_kernels(True)
    return {k: rel(results[0][k], results[1][k]) for k in results[0]}


def kernel_checks(device: torch.device) -> dict:
    """Each Triton kernel vs its PyTorch fallback (fresh random inputs, dropped slots, odd sizes)."""
    if device.type != "cuda" or not kernels.triton_available():
        return {"skipped": "needs CUDA and Triton"}
    from switchyard.moe.kernels import triton_kernels as tk

    out: dict[str, float | None] = {}
    gen = torch.Generator(device=device).manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        for drops in (False, True):
            tokens, top_k, hidden = 1003, 8, 2000
            slots = tokens * top_k
            keep = (torch.rand(slots, device=device, generator=gen) > 0.25) if drops else torch.ones(
                slots, dtype=torch.bool, device=device)
            kept = torch.randperm(slots, device=device, generator=gen)
            kept = kept[keep[kept]]
            idx = torch.full((slots,), -1, dtype=torch.int64, device=device)
            idx[kept] = torch.arange(kept.numel(), device=device)
            idx_TK = idx.view(tokens, top_k)
            y = torch.randn(kept.numel(), hidden, device=device, generator=gen).to(dtype)
            w = torch.rand(tokens, top_k, device=device, generator=gen)
            g = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
            tag = f"{str(dtype).split('.')[-1]}{'_drops' if drops else ''}"
            out[f"combine_fwd_{tag}"] = rel(tk.gather_sum(y, idx_TK, w, dtype), ops._gather_sum_torch(y, idx_TK, w, dtype))
            out[f"gather_sum_{tag}"] = rel(tk.gather_sum(y, idx_TK, None, dtype), ops._gather_sum_torch(y, idx_TK, None, dtype))
            gy, gw = tk.combine_backward(g, y, idx_TK, w, True)
            gy2, gw2 = ops._combine_backward_torch(g, y, idx_TK, w, True)
            out[f"combine_bwd_y_{tag}"], out[f"combine_bwd_w_{tag}"] = rel(gy, gy2), rel(gw, gw2)
        h = torch.randn(777, 2 * 1500, device=device, generator=gen).to(dtype)
        da = torch.randn(777, 1500, device=device, generator=gen).to(dtype)
        h32 = h.float().requires_grad_(True)
        gate, up = h32.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
        ref.backward(da.float())
        tag = str(dtype).split(".")[-1]
        out[f"silu_mul_fwd_{tag}"] = rel(tk.silu_mul_fwd(h), ref.detach())
        out[f"silu_mul_bwd_{tag}"] = rel(tk.silu_mul_bwd(h, da)[0], h32.grad)
    return out


def profile_switchyard(b: ml.Bench, args: argparse.Namespace) -> dict:
    # the stage cut hooks autograd's intermediate tensors (SwiGLU in and out), which the SwiGLU Function
    # (the training default on CUDA) does not expose: profile autograd's composition of the same kernels
    built = ml.build_switchyard(b, "grouped_mm" if b.device.type == "cuda" else None)
    layer = built.keep[0]
    x = b.x_BTH.detach().clone().requires_grad_(True)

    def step() -> None:
        layer(x).backward(b.grad_BTH)

    def zero() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)

    result: dict = {"variant": built.variant}
    for mode in args.modes:
        kernels.set_fused_kernels(mode == "fused")
        ml.free_memory(b.device)
        base = ml.mem_allocated(b.device)
        ml.reset_peak(b.device)
        times = ml.time_steps(step, zero, b.device, args.warmup, args.iters)
        entry = {"step_ms": round(statistics.median(times), 4),
                 "peak_mem_gb_above_layer": ml.peak_gb(b.device, base),
                 "stages_ms": stage_times(layer, b, args.stage_reps)}
        entry["stages_sum_ms"] = round(sum(entry["stages_ms"].values()), 4)
        try:
            entry["kernels"] = kernel_table(step, zero, b.device, args.profile_steps)
        except Exception as exc:  # noqa: BLE001 - the profiler is a bonus
            entry["kernels_error"] = f"{type(exc).__name__}: {exc}"
        result[mode] = entry
    kernels.set_fused_kernels(True)
    if len(args.modes) == 2:
        result["check_fused_vs_unfused_rel_err"] = fused_vs_unfused(layer, b)
    return result


def profile_autoep(b: ml.Bench, args: argparse.Namespace) -> dict:
    built = ml.build_deepspeed_autoep(b)
    assert built.forward is not None
    forward, params = built.forward, built.params
    x = b.x_BTH.detach().clone().requires_grad_(True)

    def step() -> None:
        forward(x).backward(b.grad_BTH)

    def zero() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    times = ml.time_steps(step, zero, b.device, args.warmup, args.iters)
    out = {"variant": built.variant, "step_ms": round(statistics.median(times), 4)}
    out["kernels"] = kernel_table(step, zero, b.device, args.profile_steps)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(ml.SHAPES), default=list(ml.SHAPES))
    p.add_argument("--modes", nargs="+", choices=("fused", "unfused"), default=["fused", "unfused"])
    p.add_argument("--no-autoep", action="store_true")
    p.add_argument("--tokens", type=ml.int_at_least(1), default=None)
    p.add_argument("--iters", type=ml.int_at_least(1), default=None)
    p.add_argument("--warmup", type=ml.int_at_least(0), default=None)
    p.add_argument("--stage-reps", type=ml.int_at_least(1), default=None)
    p.add_argument("--profile-steps", type=ml.int_at_least(1), default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ml.fill_counts(args, tokens=(128, 8192), iters=(2, 20), warmup=(1, 5), stage_reps=(1, 5))
    args.out = args.out or (Path(tempfile.gettempdir()) / "moe_layer_profile_tiny.json" if args.tiny else DEFAULT_OUT)
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    shapes = ml.TINY_SHAPES if args.tiny else ml.SHAPES
    results: dict = {"meta": {
        "command": " ".join(["python", "benchmarks/moe_layer_profile.py", *(sys.argv[1:] if argv is None else argv)]),
        **ml._versions(), "device": ml._device_name(device), "tokens": args.tokens, "dtype": str(dtype),
        "git_commit": ml._git_commit(), "triton": kernels.triton_available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    try:
        results["kernel_checks"] = kernel_checks(device)
    except Exception as exc:  # noqa: BLE001
        results["kernel_checks"] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    for name in args.shapes:
        b = ml.make_bench(name, shapes[name], args.tokens, device, dtype, seed=0)
        entry: dict = {}
        for impl, fn in (("switchyard", profile_switchyard), ("deepspeed_autoep", profile_autoep)):
            if impl == "deepspeed_autoep" and args.no_autoep:
                continue
            print(f"[{name}] {impl} ...", file=sys.stderr, flush=True)
            try:
                entry[impl] = fn(b, args)
            except Exception as exc:  # noqa: BLE001 - one failure must not end the run
                entry[impl] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            ml.free_memory(device)
        results[name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a timeout
    print_summary(results, args.shapes)
    print(f"wrote {args.out}")
    return results


def print_summary(results: dict, shapes: list[str]) -> None:
    print("kernel checks:", json.dumps(results.get("kernel_checks")))
    for name in shapes:
        sy = results.get(name, {}).get("switchyard", {})
        ae = results.get(name, {}).get("deepspeed_autoep", {})
        print(f"== {name}: autoep {ae.get('step_ms', ae.get('error'))} ms")
        for mode in ("unfused", "fused"):
            e = sy.get(mode)
            if not e:
                continue
            stages = " ".join(f"{k}={v:.3f}" for k, v in e["stages_ms"].items())
            print(f"  {mode}: step {e['step_ms']:.3f} ms (stages sum {e['stages_sum_ms']:.3f}), peak "
                  f"{e['peak_mem_gb_above_layer']} GB | {stages}")
            for k in e.get("kernels", [])[:8]:
                print(f"      {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']}  {k['kernel'][:110]}")
        if "check_fused_vs_unfused_rel_err" in sy:
            print("  fused vs unfused rel err:", {k: (f"{v:.1e}" if v is not None else None)
                                               for k, v in sy["check_fused_vs_unfused_rel_err"].items()})
        if "error" in sy:
            print("  switchyard error:", sy["error"])
        for k in ae.get("kernels", [])[:6]:
            print(f"   autoep {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']}  {k['kernel'][:100]}")


if __name__ == "__main__":
    main()
