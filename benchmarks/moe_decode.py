"""Decode-regime latency of one MoE layer: forward only, 1 / 8 / 64 tokens, switchyard vs transformers vs AutoEP.

    python benchmarks/moe_decode.py --out benchmarks/results/moe_decode.json

CPU smoke run of the same logic (tiny shapes; writes to a temp file):

    python benchmarks/moe_decode.py --tiny

Same shapes, weights and builders as benchmarks/moe_layer.py; every implementation is put in eval mode
and called under ``torch.no_grad()`` on the first ``tokens`` rows of the same input ``x`` [1, tokens, H]:

    switchyard        MoELayer (dropless, fused kernels; path_<tokens> names the path it took)
    switchyard_sorted the same layer with the small-batch and all-experts paths off (sort + grouped_mm)
    hf_grouped_mm     transformers' MixtralSparseMoeBlock, _experts_implementation="grouped_mm"
    hf_batched_mm     the same block with "batched_mm" (gathers each copy's expert weights; what
                      transformers offers for small batches)
    deepspeed_autoep  AutoEP's layer (built as in moe_layer.py)

``variant``: what is fixed about the build. For switchyard the decode paths it may take (which one it took
at each size is ``path_<tokens>``: ``small_batch``, ``all_experts``, or ``sort + <experts impl>``), not the
experts impl a training step would use; for transformers' block the experts function and kernel; for AutoEP
how it was built and its expert kernel.

Timing. The cells are host-bound (hundreds of µs, mostly Python and kernel launches) and the host's speed
drifts during a run, so the implementations of a shape are timed interleaved, not one after another: all
are built first (and kept: the largest shape's weights are ~3 GB per implementation), then per token count
each is checked against the reference and warmed up (``warmup`` forwards), then each of ``iters``
iterations calls every implementation once, in an order shuffled afresh per iteration (``random.Random(seed)``),
each call timed alone: host wall-clock of one forward followed by a device synchronize (what one decode step
waits for). A drift thus falls on every implementation alike, and the paired statistic removes what is left:

``latency_us`` / ``latency_min_us``: median / min of an implementation's ``iters`` timed calls.
``paired_ratio_vs`` (switchyard's cells only): ``{other impl: median over iterations of switchyard's latency
/ that impl's latency in the same iteration}``; below 1 switchyard was faster. Close cells (e.g. 347 vs
337 µs medians) are decided by it, not by the medians taken apart.
``pipelined_us``: ``iters`` forwards issued back to back between two CUDA events (perf_counter on CPU, where
it is a logic check only), divided by ``iters`` (launch-bound throughput); measured in ``rounds`` rounds,
each calling every implementation once, in the listed order in even rounds and reversed in odd ones;
``pipelined_us`` is the median of the rounds, ``pipelined_rounds_us`` lists them.
``rel_err_vs_hf``: per token count, the relative error of the output against transformers' block (built as
``hf_grouped_mm``, run in eval mode before any implementation is built): a fast but wrong path shows here.
``floor_us``: bytes of the expert weights the step must read (distinct experts the tokens route to, by the
shared fp32 router, x 3·H·F·2 bytes) over 4.3 TB/s, the H200's measured device copy rate: no implementation
reading weights from HBM can beat it.

Output: ``{shape: {"floor_us": {tokens: µs}, impl: {"variant", "<tokens>": {"latency_us", "latency_min_us",
"pipelined_us", "pipelined_rounds_us", "rel_err_vs_hf", "paired_ratio_vs" (switchyard)}, "path_<tokens>"
(switchyard)} or {"error"[, "variant"]}, ["reference_error"]}, "meta": {..., "iters", "warmup", "rounds",
"seed", "timing"}}``. An implementation failing records its error; the others go on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as ml  # noqa: E402

DEFAULT_OUT = ml.REPO_ROOT / "benchmarks" / "results" / "moe_decode.json"
HBM_BYTES_PER_S = 4.3e12
IMPLS = ("switchyard", "switchyard_sorted", "hf_grouped_mm", "hf_batched_mm", "deepspeed_autoep")
PAIRED_REF = "switchyard"  # the implementation whose paired ratios against every other one are reported
TIMING = ("per token count: every impl checked and warmed up, then per iteration every impl called once in a "
          "fresh random.Random(seed) order, each call timed as one forward + synchronize (host perf_counter); "
          "latency_us = median, paired_ratio_vs = median of switchyard / other per iteration; pipelined_us = "
          "median over rounds (alternating order) of iters back-to-back forwards between CUDA events (perf_counter "
          "on CPU) / iters")


@torch.no_grad()
def sort_path_impl(layer: nn.Module, b: ml.Bench) -> str:
    """The experts impl switchyard's sort path runs at inference (no autograd graph), on this device."""
    return layer.experts.resolve_impl(b.x_BTH.reshape(-1, b.shape.hidden)[:1])


def build_switchyard(b: ml.Bench) -> ml.Built:
    """moe_layer.py's layer; its variant there names the training experts impl, which decode never runs."""
    built = ml.build_switchyard(b)
    built.variant = (f"decode paths at the layer's default limits: small_batch, all_experts, else sort + "
                     f"{sort_path_impl(built.keep[0], b)}")
    return built


def build_switchyard_sorted(b: ml.Bench) -> ml.Built:
    """The same layer with both unsorted inference paths off: the sort + grouped_mm path at every size."""
    built = ml.build_switchyard(b)
    layer = built.keep[0]
    layer.small_batch_rows = layer.all_experts_tokens = 0
    built.variant = f"small_batch_rows=0, all_experts_tokens=0: sort + {sort_path_impl(layer, b)} at every size"
    return built


def build_hf_batched_mm(b: ml.Bench) -> ml.Built:
    built = ml.build_hf_grouped_mm(b)
    block = built.keep[0]
    block.experts.config._experts_implementation = "batched_mm"  # type: ignore[union-attr]
    built.variant = ml._hf_experts_variant(block, b.x_BTH)
    return built


BUILDERS = {"switchyard": build_switchyard, "switchyard_sorted": build_switchyard_sorted,
            "hf_grouped_mm": ml.build_hf_grouped_mm, "hf_batched_mm": build_hf_batched_mm,
            "deepspeed_autoep": ml.build_deepspeed_autoep}


@torch.no_grad()
def floor_us(b: ml.Bench, tokens: int) -> float:
    x_TH = b.x_BTH[0, :tokens].float()
    idx_TK = torch.topk(torch.softmax(x_TH @ b.router_EH.float().t(), -1), b.shape.top_k, dim=-1).indices
    experts = int(torch.unique(idx_TK).numel())
    nbytes = experts * 3 * b.shape.hidden * b.shape.ffn * b.gate_up_EOH.element_size()
    return nbytes / HBM_BYTES_PER_S * 1e6


def _error(exc: Exception) -> str:
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}"


@torch.no_grad()
def interleaved_latencies(calls: dict[str, Callable[[], object]], device: torch.device, iters: int,
                          rng: random.Random, errors: dict[str, str]) -> dict[str, list[float]]:
    """µs of each call per iteration: every iteration calls each implementation once, in a fresh random
    order, each timed alone (forward + synchronize on an idle device). One that raises goes into ``errors``
    and out of the result (its iterations would not pair with the others')."""
    lat_us: dict[str, list[float]] = {name: [] for name in calls}
    ml.synchronize(device)
    for _ in range(iters):
        order = list(lat_us)
        rng.shuffle(order)
        for name in order:
            try:
                t0 = time.perf_counter()
                calls[name]()
                ml.synchronize(device)
                lat_us[name].append((time.perf_counter() - t0) * 1e6)
            except Exception as exc:  # noqa: BLE001 - one implementation failing must not end the run
                errors[name] = _error(exc)
                del lat_us[name]
    return lat_us


@torch.no_grad()
def pipelined_rounds(calls: dict[str, Callable[[], object]], device: torch.device, iters: int, rounds: int,
                     errors: dict[str, str]) -> dict[str, list[float]]:
    """µs per forward of ``iters`` forwards back to back, per round; each round times every implementation
    once, in the listed order in even rounds and reversed in odd ones (a drift falls on all alike)."""
    per_round_us: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        order = list(per_round_us)
        for name in order if round_index % 2 == 0 else order[::-1]:
            try:
                ms = ml.time_back_to_back_ms(calls[name], lambda: None, device, iters)
                per_round_us[name].append(ms * 1e3)
            except Exception as exc:  # noqa: BLE001
                errors[name] = _error(exc)
                del per_round_us[name]
    return per_round_us


def paired_ratios(lat_us: dict[str, list[float]], ref: str) -> dict[str, float]:
    """``{other: median over iterations of lat_us[ref][i] / lat_us[other][i]}``: within an iteration both ran
    within a few hundred µs of each other, so the host's drift over the run cancels in each ratio."""
    return {other: round(statistics.median(r / o for r, o in zip(lat_us[ref], times)), 4)
            for other, times in lat_us.items() if other != ref}


def run_shape(b: ml.Bench, args: argparse.Namespace, rng: random.Random) -> dict:
    """Build every implementation of one shape, then time them interleaved per token count (module docstring)."""
    device = b.device
    entry: dict = {"floor_us": {str(t): round(floor_us(b, t), 2) for t in args.tokens}}
    xs = [b.x_BTH[:, :t].contiguous() for t in args.tokens]
    refs: dict[str, torch.Tensor] = {}
    try:
        refs = dict(zip(map(str, args.tokens), ml.reference_outputs(b, xs, eval_mode=True)))
    except Exception as exc:  # noqa: BLE001 - no reference: the timings go on without rel_err_vs_hf
        entry["reference_error"] = _error(exc)
    built: dict[str, ml.Built] = {}
    for impl in args.impls:
        print(f"[{b.name}] building {impl} ...", file=sys.stderr, flush=True)
        try:
            built[impl] = BUILDERS[impl](b)
            for obj in built[impl].keep:
                if isinstance(obj, nn.Module):
                    obj.eval()
            assert built[impl].forward is not None
            entry[impl] = {"variant": built[impl].variant}
        except Exception as exc:  # noqa: BLE001
            entry[impl] = {"error": _error(exc)}
            built.pop(impl, None)
            ml.free_memory(device)

    def drop(impl: str, error: str) -> None:
        entry[impl] = {"error": error, **({"variant": built[impl].variant} if built[impl].variant else {})}
        del built[impl]
        ml.free_memory(device)

    for t, x in zip(args.tokens, xs):
        print(f"[{b.name}] {t} tokens: {', '.join(built)} interleaved ...", file=sys.stderr, flush=True)
        for impl in list(built):  # check against the reference, record the path, warm up
            forward, row = built[impl].forward, entry[impl]
            try:
                with torch.no_grad():
                    out = forward(x)
                    row[str(t)] = {"rel_err_vs_hf": ml.rel_err(out, refs[str(t)])} if str(t) in refs else {}
                    del out
                    if impl == "switchyard":  # which path the layer took at this size
                        layer = built[impl].keep[0]
                        path = layer.inference_path(x[0], torch.zeros(t, b.shape.top_k, device=device))
                        row[f"path_{t}"] = path or f"sort + {sort_path_impl(layer, b)}"
                    for _ in range(args.warmup):
                        forward(x)
            except Exception as exc:  # noqa: BLE001
                drop(impl, _error(exc))
        calls = {impl: (lambda fwd=built[impl].forward, x=x: fwd(x)) for impl in built}
        errors: dict[str, str] = {}
        lat_us = interleaved_latencies(calls, device, args.iters, rng, errors)
        pipe_us = pipelined_rounds({i: c for i, c in calls.items() if i in lat_us}, device, args.iters, args.rounds,
                                   errors)
        for impl, error in errors.items():
            drop(impl, error)
        lat_us = {impl: v for impl, v in lat_us.items() if impl in built}
        for impl, times in lat_us.items():
            entry[impl][str(t)] = {"latency_us": round(statistics.median(times), 2),
                                   "latency_min_us": round(min(times), 2),
                                   "pipelined_us": round(statistics.median(pipe_us[impl]), 2),
                                   "pipelined_rounds_us": [round(v, 2) for v in pipe_us[impl]],
                                   **entry[impl][str(t)]}
        if PAIRED_REF in lat_us and len(lat_us) > 1:
            entry[PAIRED_REF][str(t)]["paired_ratio_vs"] = paired_ratios(lat_us, PAIRED_REF)
        calls.clear()
    built.clear()
    ml.free_memory(device)
    return entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(ml.SHAPES), default=list(ml.SHAPES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--tokens", type=ml.int_at_least(1), nargs="+", default=[1, 8, 64])
    p.add_argument("--iters", type=ml.int_at_least(1), default=None,
                   help="timed calls per implementation and token count (default 100; 3 with --tiny)")
    p.add_argument("--warmup", type=ml.int_at_least(0), default=None,
                   help="untimed forwards per implementation and token count (default 10; 1 with --tiny)")
    p.add_argument("--rounds", type=ml.int_at_least(1), default=2,
                   help="pipelined_us rounds, odd ones in reverse order; their median is reported (default 2)")
    p.add_argument("--seed", type=int, default=0, help="inputs and weights, and the per-iteration call order")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few iterations: a CPU test of the logic")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT.relative_to(ml.REPO_ROOT)}; a temp file with --tiny)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ml.fill_counts(args, iters=(3, 100), warmup=(1, 10))
    ml.resolve_out(p, args, DEFAULT_OUT, "moe_decode_tiny.json", "full shapes on CPU take very long")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    shapes = ml.TINY_SHAPES if args.tiny else ml.SHAPES
    results: dict = {"meta": {
        "command": " ".join(["python", "benchmarks/moe_decode.py", *(sys.argv[1:] if argv is None else argv)]),
        **ml._versions(), "device": ml._device_name(device), "dtype": str(dtype), "git_commit": ml._git_commit(),
        "tiny": args.tiny, "tokens": args.tokens, "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
        "seed": args.seed, "timing": TIMING, "floor": f"distinct experts' weight bytes / {HBM_BYTES_PER_S:.2g} B/s",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    rng = random.Random(args.seed)
    for name in args.shapes:
        b = ml.make_bench(name, shapes[name], max(args.tokens), device, dtype, seed=args.seed)
        results[name] = run_shape(b, args, rng)
        del b
        ml.free_memory(device)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a timeout
    print_summary(results, args)
    print(f"wrote {args.out}")
    return results


def print_summary(results: dict, args: argparse.Namespace) -> None:
    for name in args.shapes:
        e = results[name]
        print(f"== {name} (latency us, interleaved; (pipelined); floor {e['floor_us']})")
        for impl in args.impls:
            r = e.get(impl, {})
            cells = [f"{t}: {r[str(t)]['latency_us']:.0f} ({r[str(t)]['pipelined_us']:.0f})"
                     for t in args.tokens if "latency_us" in r.get(str(t), {})]
            print(f"  {impl:18s} " + ("  ".join(cells) if cells else r.get("error", "")[:120]))
        for t in args.tokens:
            ratios = e.get(PAIRED_REF, {}).get(str(t), {}).get("paired_ratio_vs")
            if ratios:
                print(f"  {PAIRED_REF} / other, paired median at {t}: "
                      + "  ".join(f"{other} {ratio:.3f}" for other, ratio in ratios.items()))


if __name__ == "__main__":
    main()
