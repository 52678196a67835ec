"""Tuning sweep of the small-batch inference path: block sizes of its two kernels, and where it stops paying.

    python benchmarks/small_batch_sweep.py --out benchmarks/results/small_batch_sweep.json   # one CUDA GPU

On the moe_layer.py shapes (bf16):

    gate_up / down   the routed kernels alone (routed_swiglu_combine at 1 and 8 tokens) for five block
                     configurations each (triton.testing.do_bench, µs), and the weight-read floor
    picked           per kernel, the configuration with the least time summed relative to each case's best
    device_ops_olmoe device operations of one olmoe layer forward (torch.profiler) per path
    threshold        the whole layer's forward at 2…256 tokens on each path it may take (small-batch up to
                     512 copies; all-experts where T·K >= E; sorted): eager latency (median of 30, host
                     wall clock with a synchronize) and CUDA-graph replay (µs)

What it found set ``routed_kernels.GATE_UP_BLOCKS`` / ``DOWN_BLOCKS``, ``layer.SMALL_BATCH_*`` and
``layer.ALL_EXPERTS_MAX_TOKENS`` (docs/moe-layer.md, "Small-batch path", "All-experts path"). A tuning aid, GPU only; the speed claims live in moe_decode.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as ml  # noqa: E402

GATE_UP_CANDIDATES = [(8, 256, 4), (16, 256, 4), (32, 128, 4), (16, 512, 8), (4, 512, 4)]
DOWN_CANDIDATES = [(4, 512, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8), (2, 1024, 4)]
TOKENS = (2, 4, 8, 16, 32, 64, 128, 256)


def make_layer(shape: ml.Shape, device: torch.device):
    from switchyard import MoEConfig
    from switchyard.moe.layer import MoELayer

    torch.manual_seed(0)
    return MoELayer(MoEConfig(num_experts=shape.experts, top_k=shape.top_k, aux_loss_coef=0.0), shape.hidden,
                    shape.ffn, dtype=torch.bfloat16, device=device).eval()


def eager_us(fn: Callable[[], object], iters: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    lat = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        lat.append((time.perf_counter() - t0) * 1e6)
    return round(statistics.median(lat), 1)


def graph_us(fn: Callable[[], object], iters: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) * 1e3 / iters, 1)


def sweep_blocks(device: torch.device) -> dict:
    import triton

    from switchyard.moe.kernels import routed_kernels as rk
    from switchyard.moe.kernels.routed import routed_swiglu_combine

    res: dict = {"gate_up": {}, "down": {}}
    defaults = {"GATE_UP_BLOCKS": rk.GATE_UP_BLOCKS, "DOWN_BLOCKS": rk.DOWN_BLOCKS}
    for name, shape in ml.SHAPES.items():
        layer = make_layer(shape, device)
        w1, _, w2, _ = layer.experts.weights()
        for tokens in (1, 8):
            x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
            routed = layer.router(x)
            distinct = int(torch.unique(routed.topk_idx_TK).numel())
            floor = distinct * 3 * shape.hidden * shape.ffn * 2 / 4.3e12 * 1e6

            def op() -> object:
                return routed_swiglu_combine(x, w1, w2, routed.topk_idx_TK, routed.topk_weight_TK, None, 0,
                                             shape.experts)

            for key, candidates, attr in (("gate_up", GATE_UP_CANDIDATES, "GATE_UP_BLOCKS"),
                                          ("down", DOWN_CANDIDATES, "DOWN_BLOCKS")):
                row = {}
                for cfg in candidates:
                    setattr(rk, attr, cfg)
                    try:
                        row[str(cfg)] = round(triton.testing.do_bench(op, warmup=5, rep=25) * 1e3, 1)
                    except Exception as exc:  # noqa: BLE001 - a configuration that does not compile
                        row[str(cfg)] = f"{type(exc).__name__}: {exc}"[:200]
                setattr(rk, attr, defaults[attr])
                res[key][f"{name}/{tokens}"] = {"floor_us": round(floor, 1), "op_us": row}
                print(name, tokens, key, "floor", round(floor, 1), row, flush=True)
    res["picked"] = {"GATE_UP_BLOCKS": _pick(res["gate_up"], GATE_UP_CANDIDATES),
                     "DOWN_BLOCKS": _pick(res["down"], DOWN_CANDIDATES)}
    return res


def _pick(cases: dict, candidates: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The configuration with the least time summed relative to the best of each case."""
    def score(cfg: tuple[int, int, int]) -> float:
        total = 0.0
        for case in cases.values():
            times = [v for v in case["op_us"].values() if isinstance(v, float)]
            v = case["op_us"][str(cfg)]
            total += v / min(times) if isinstance(v, float) else 1e9
        return total
    return min(candidates, key=score)


def device_ops(layer, x: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    layer(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


PATH_LIMITS = {"small": (10**9, 0), "all_experts": (0, 10**9), "sorted": (0, 0)}  # small_batch_rows, all_experts_tokens


def _set_path(layer, path: str) -> None:
    layer.small_batch_rows, layer.all_experts_tokens = PATH_LIMITS[path]


def sweep_threshold(device: torch.device) -> dict:
    res: dict = {"device_ops_olmoe": {}, "threshold": {}}
    layer = make_layer(ml.SHAPES["olmoe"], device)
    for tokens, paths in ((1, ("small", "sorted")), (8, ("small", "sorted")), (32, ("all_experts", "sorted"))):
        x = torch.randn(1, tokens, ml.SHAPES["olmoe"].hidden, device=device, dtype=torch.bfloat16)
        for path in paths:
            _set_path(layer, path)
            res["device_ops_olmoe"][f"{path}/{tokens}"] = device_ops(layer, x)
    for name, shape in ml.SHAPES.items():
        layer = make_layer(shape, device)
        for tokens in TOKENS:
            x = torch.randn(1, tokens, shape.hidden, device=device, dtype=torch.bfloat16)
            cell = {}
            for path in PATH_LIMITS:
                _set_path(layer, path)
                taken = layer.inference_path(x[0], torch.zeros(tokens, shape.top_k, device=device)) or "sorted"
                if taken != {"small": "small_batch"}.get(path, path) or (path == "small" and tokens * shape.top_k > 512):
                    continue  # not eligible here (all-experts needs T * K >= E), or far past where it could pay
                cell[path] = {"eager_us": eager_us(lambda: layer(x)), "graph_us": graph_us(lambda: layer(x))}
            res["threshold"][f"{name}/{tokens}"] = cell
            print(name, tokens, "tokens", cell, flush=True)
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threshold-only", action="store_true", help="skip the kernels' block-size sweep")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("small_batch_sweep.py times Triton kernels and CUDA graphs: it needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.set_grad_enabled(False)
    results = {**({} if args.threshold_only else sweep_blocks(device)), **sweep_threshold(device),
               "meta": {"command": " ".join(["python", "benchmarks/small_batch_sweep.py", *(argv or sys.argv[1:])]),
                        **ml._versions(), "device": ml._device_name(device), "git_commit": ml._git_commit()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"picked {results.get('picked')}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
