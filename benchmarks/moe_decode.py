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

``rel_err_vs_hf``: per token count, the relative error of the output against transformers' block (built as
``hf_grouped_mm``, run in eval mode before any implementation is built): a fast but wrong path shows here.
``latency_us``: median host wall-clock of one forward followed by a device synchronize (what one decode
step waits for), over ``iters`` calls after ``warmup``. ``pipelined_us``: ``iters`` forwards back to back
between two CUDA events, divided by ``iters`` (launch-bound throughput). ``floor_us``: bytes of the expert
weights the step must read (distinct experts the tokens route to, by the shared fp32 router, x 3·H·F·2
bytes) over 4.3 TB/s, the H200's measured device copy rate: no implementation reading weights from HBM
can beat it.
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

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as ml  # noqa: E402

DEFAULT_OUT = ml.REPO_ROOT / "benchmarks" / "results" / "moe_decode.json"
HBM_BYTES_PER_S = 4.3e12
IMPLS = ("switchyard", "switchyard_sorted", "hf_grouped_mm", "hf_batched_mm", "deepspeed_autoep")


def build_hf_batched_mm(b: ml.Bench) -> ml.Built:
    built = ml.build_hf_grouped_mm(b)
    block = built.keep[0]
    block.experts.config._experts_implementation = "batched_mm"  # type: ignore[union-attr]
    built.variant = ml._hf_experts_variant(block, b.x_BTH)
    return built


def build_switchyard_sorted(b: ml.Bench) -> ml.Built:
    """The same layer with both unsorted inference paths off: the sort + grouped_mm path at every size."""
    built = ml.build_switchyard(b)
    layer = built.keep[0]
    layer.small_batch_rows = layer.all_experts_tokens = 0
    built.variant = "small_batch_rows=0, all_experts_tokens=0"
    return built


BUILDERS = {"switchyard": ml.build_switchyard, "switchyard_sorted": build_switchyard_sorted, "hf_grouped_mm": ml.build_hf_grouped_mm,
            "hf_batched_mm": build_hf_batched_mm, "deepspeed_autoep": ml.build_deepspeed_autoep}


@torch.no_grad()
def floor_us(b: ml.Bench, tokens: int) -> float:
    x_TH = b.x_BTH[0, :tokens].float()
    idx_TK = torch.topk(torch.softmax(x_TH @ b.router_EH.float().t(), -1), b.shape.top_k, dim=-1).indices
    experts = int(torch.unique(idx_TK).numel())
    nbytes = experts * 3 * b.shape.hidden * b.shape.ffn * b.gate_up_EOH.element_size()
    return nbytes / HBM_BYTES_PER_S * 1e6


@torch.no_grad()
def time_decode(forward, x: torch.Tensor, device: torch.device, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        forward(x)
    ml.synchronize(device)
    lat = []
    for _ in range(iters):
        t0 = time.perf_counter()
        forward(x)
        ml.synchronize(device)
        lat.append((time.perf_counter() - t0) * 1e6)
    out = {"latency_us": round(statistics.median(lat), 2), "latency_min_us": round(min(lat), 2)}
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            forward(x)
        end.record()
        end.synchronize()
        out["pipelined_us"] = round(start.elapsed_time(end) * 1e3 / iters, 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(ml.SHAPES), default=list(ml.SHAPES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    args.iters = args.iters or (3 if args.tiny else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    args.out = args.out or (Path(tempfile.gettempdir()) / "moe_decode_tiny.json" if args.tiny else DEFAULT_OUT)
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    shapes = ml.TINY_SHAPES if args.tiny else ml.SHAPES
    results: dict = {"meta": {
        "command": " ".join(["python", "benchmarks/moe_decode.py", *(sys.argv[1:] if argv is None else argv)]),
        **ml._versions(), "device": ml._device_name(device), "dtype": str(dtype), "git_commit": ml._git_commit(),
        "tiny": args.tiny, "tokens": args.tokens,
        "iters": args.iters, "warmup": args.warmup, "floor": f"distinct experts' weight bytes / {HBM_BYTES_PER_S:.2g} B/s",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    for name in args.shapes:
        b = ml.make_bench(name, shapes[name], max(args.tokens), device, dtype, seed=0)
        entry: dict = {"floor_us": {str(t): round(floor_us(b, t), 2) for t in args.tokens}}
        xs = [b.x_BTH[:, :t].contiguous() for t in args.tokens]
        refs: dict[str, torch.Tensor] = {}
        try:
            refs = dict(zip(map(str, args.tokens), ml.reference_outputs(b, xs, eval_mode=True)))
        except Exception as exc:  # noqa: BLE001 - no reference: the timings go on without rel_err_vs_hf
            entry["reference_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        for impl in args.impls:
            print(f"[{name}] {impl} ...", file=sys.stderr, flush=True)
            built = None
            try:
                built = BUILDERS[impl](b)
                for obj in built.keep:
                    if isinstance(obj, nn.Module):
                        obj.eval()
                assert built.forward is not None
                row = {"variant": built.variant}
                for t, x in zip(args.tokens, xs):
                    row[str(t)] = time_decode(built.forward, x, device, args.warmup, args.iters)
                    if str(t) in refs:
                        with torch.no_grad():
                            row[str(t)]["rel_err_vs_hf"] = ml.rel_err(built.forward(x), refs[str(t)])
                    if impl == "switchyard":  # which path the layer took at this size
                        layer = built.keep[0]
                        with torch.no_grad():
                            path = layer.inference_path(x[0], torch.zeros(t, b.shape.top_k, device=device))
                        row[f"path_{t}"] = path or "sort + grouped_mm"
                entry[impl] = row
            except Exception as exc:  # noqa: BLE001
                entry[impl] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            finally:
                built = None
                ml.free_memory(device)
        results[name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name in args.shapes:
        e = results[name]
        print(f"== {name} (latency us; floor {e['floor_us']})")
        for impl in args.impls:
            r = e.get(impl, {})
            cells = [f"{t}: {r[str(t)]['latency_us']:.0f}" + (f" ({r[str(t)]['pipelined_us']:.0f})" if "pipelined_us" in r[str(t)] else "")
                     for t in args.tokens if str(t) in r]
            print(f"  {impl:18s} " + ("  ".join(cells) if cells else r.get("error", "")[:120]))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
