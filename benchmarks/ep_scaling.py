"""Expert-parallel scaling: dispatch + combine all-to-all vs raw NCCL, and the MoE layer's weak scaling.

    deepspeed --num_gpus 8 benchmarks/ep_scaling.py --out benchmarks/results/ep_scaling.json
    torchrun --nproc_per_node 8 benchmarks/ep_scaling.py --out benchmarks/results/ep_scaling.json

Cost model only (no process group, no GPU), and a CPU check of the logic on gloo ranks (temp JSON):

    python benchmarks/ep_scaling.py --cost-model-only
    torchrun --nproc_per_node 4 benchmarks/ep_scaling.py --tiny

For each EP in 1, 2, 4, … (powers of two dividing the world, or ``--ep-sizes``) every rank builds
``ProcessGroupManager(ep=EP)`` and a ``MoELayer``, ``--tokens`` tokens per rank, and measures (EP=1: every
rank holds all experts and no token leaves it, the weak-scaling baseline; it has no raw all-to-all):

    dispatcher   the layer's TokenDispatcher alone: dispatch → identity experts → combine (count exchange,
                 permutation, both all-to-alls, weighted combine) under no_grad, with the layer's router
    raw_a2a      two ``all_to_all_single`` calls with the same split sizes (there and back) on the same EP
                 group and buffers of the same bytes: what NCCL alone costs, so ``overhead`` = dispatcher /
                 raw shows what our dispatcher adds
    layer        forward + backward of the whole layer (weak scaling: tokens per rank fixed as EP grows;
                 ``weak_scaling_eff`` = layer ms at the smallest EP measured / layer ms at this EP)
    autoep       the same for DeepSpeed AutoEP's layer at autoep_size=EP (``AutoEPMoELayer``, built by AutoEP's
                 parser from a one-layer MixtralForCausalLM, as benchmarks/moe_layer.py builds it), with this
                 layer's router weights (the same routing, so the same bytes move) and the same inputs;
                 ``vs_autoep`` = its ms / ours (``--no-autoep`` leaves it out)
    shared       with ``--shared-ffn F`` the layer has a gated shared expert of width F (Qwen2-MoE style), and
                 ``layer`` is timed in four alternating rounds with ``MoELayer.overlap_shared_experts`` on, off,
                 on, off: ``layer_ms`` (on), ``layer_no_overlap_ms`` (off), ``overlap_speedup`` = off / on,
                 ``overlap_round_ms`` each round's median (slowest rank) in that order

Bytes are the off-rank bytes a rank sends in dispatch + combine (the self chunk is a local copy), counted
from the dispatch's split sizes; combine sends back what dispatch received, so sent == received. ``gbps``
= mean bytes per rank / ms, with ms the slowest rank's median (a collective ends when its last rank does).
``tokens_per_s`` = world × tokens / layer ms. Timing: every step starts after a world barrier and a device
synchronize, CUDA events (perf_counter on CPU). Before timing, a guard checks that dispatch → identity →
combine gives Σ_k w_k·x on every rank, so a broken path cannot be timed.

Cost model (uniform routing: a token copy leaves its rank with probability (EP−1)/EP), per rank per step:

    dispatch = tokens × top_k × hidden × bytes_per_elem × (EP−1)/EP   (each way: sent ≈ received)
    forward  = 2 × dispatch (dispatch + combine);   forward + backward = 4 × dispatch
    counts   = EP × local experts × 8 bytes (the int64 split-size exchange, once per forward)
    weights  = tokens × top_k × 4 bytes × (EP−1)/EP (the sent rows' fp32 routing weights, where the SwiGLU
               experts fold them in: the training default on GPUs; once in the forward, their gradient once
               in the backward; not part of the dispatcher step measured here, which weights in the combine)

Output (rank 0, ``--out``): ``{"results": {shape: {EP: {...}}}, "cost_model": [...], "meta": {...}}``.
CPU numbers never go to ``benchmarks/results/ep_scaling.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "integration") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, moe_layer sit here, also when loaded by path

from bench_common import (  # noqa: E402
    _git_commit, _versions, fill_counts, int_at_least, launcher_prefix, synchronize, time_step_ms)
from moe_layer import SHAPES, TINY_SHAPES, Shape  # noqa: E402  one source of truth for shapes

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "ep_scaling.json"
MODEL_EP_SIZES = (2, 4, 8, 16, 32, 64)
COST_FORMULA = ("per rank per step, uniform routing: dispatch = tokens*top_k*hidden*bytes_per_elem*(EP-1)/EP "
                "each way; forward = 2*dispatch (dispatch+combine); fwd+bwd = 4*dispatch; "
                "counts exchange = EP*local_experts*8 bytes per forward; folded routing weights = "
                "tokens*top_k*4*(EP-1)/EP each way, once forward and once backward")


def cost_model(shape: Shape, tokens: int, ep: int, bytes_per_elem: int = 2) -> dict[str, float]:
    """Expected off-rank bytes one rank sends (≈ receives) per step; see the module docstring."""
    leaving = tokens * shape.top_k * (ep - 1) / ep  # token copies that leave the rank
    dispatch = leaving * shape.hidden * bytes_per_elem
    return {"dispatch_bytes": dispatch, "forward_bytes": 2 * dispatch, "fwd_bwd_bytes": 4 * dispatch,
            "counts_bytes": ep * (shape.experts // ep) * 8, "weights_bytes": leaving * 4}


def cost_table(tokens: int, bytes_per_elem: int) -> list[dict]:
    """Rows for EP = 2…64 of every named shape (EP must divide the expert count)."""
    return [{"shape": name, "ep": ep, "local_experts": s.experts // ep, **cost_model(s, tokens, ep, bytes_per_elem)}
            for name, s in SHAPES.items() for ep in MODEL_EP_SIZES if s.experts % ep == 0]


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        print(title)
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        for row in [headers, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def print_cost_model(rows: list[dict], tokens: int, bytes_per_elem: int) -> None:
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    print_table(f"EP cost model: MB per rank per step, {tokens} tokens/rank, {bytes_per_elem} B/elem, uniform "
                "routing (EP must divide the experts: mixtral_8x7b stops at 8)",
                ["shape", "EP", "local experts", "dispatch", "fwd (disp+comb)", "fwd+bwd", "counts B",
                 "folded weights kB (each way)"],
                [[r["shape"], str(r["ep"]), str(r["local_experts"]), mb(r["dispatch_bytes"]),
                  mb(r["forward_bytes"]), mb(r["fwd_bwd_bytes"]), str(r["counts_bytes"]),
                  f"{r['weights_bytes'] / 1e3:,.0f}"]
                 for r in rows])


# --------------------------------------------------------------------------------------------------------
# Measurement (every rank)
# --------------------------------------------------------------------------------------------------------


def time_ms(step: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-step ms; a world barrier first, so a late peer's start is not counted as our collective time."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        dist.barrier()
        synchronize(device)
        times.append(time_step_ms(step, device))
    return times


def gather(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (world-ordered), on every rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def check_round_trip(dispatcher, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> None:
    """dispatch → identity → combine must give Σ_k w_k·x; every rank raises if any rank fails."""
    with torch.no_grad():
        x_MH, plan = dispatcher.dispatch(x_TH, idx_TK)
        out = dispatcher.combine(x_MH, plan, w_TK).float()
    expected = x_TH.float() * w_TK.float().sum(-1, keepdim=True)
    tol = 1e-5 if x_TH.dtype == torch.float32 else 2e-2
    err = float((out - expected).abs().max()) / (1.0 + float(expected.abs().max()))
    errs = [e[0] for e in gather([err], x_TH.device)]
    if max(errs) > tol:
        bad = [r for r, e in enumerate(errs) if e > tol]
        raise RuntimeError(f"dispatcher round trip is wrong on ranks {bad} (rel. errors {errs}); not timing it")


def measure_ep(shape: Shape, ep: int, args: argparse.Namespace) -> dict:
    """All three measurements for one EP size; fields named in the module docstring."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    device, dtype, tokens = args.device, args.dtype, args.tokens
    manager = ProcessGroupManager(ep=ep)
    group, me = manager.group("ep"), manager.rank("ep")
    torch.manual_seed(args.seed)  # same router on every rank
    shared = dict(num_shared_experts=1, shared_expert_intermediate_size=args.shared_ffn,
                  shared_expert_gate=True) if args.shared_ffn else {}
    layer = MoELayer(MoEConfig(num_experts=shape.experts, top_k=shape.top_k, aux_loss_coef=0.0, **shared),
                     hidden_size=shape.hidden, intermediate_size=shape.ffn, groups=manager, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1 + dist.get_rank())
    x_TH = torch.randn(tokens, shape.hidden, device=device, generator=gen).to(dtype)
    grad_TH = (torch.randn(tokens, shape.hidden, device=device, generator=gen) / tokens).to(dtype)
    with torch.no_grad():
        routed = layer.router(x_TH)
    idx_TK, w_TK, disp = routed.topk_idx_TK, routed.topk_weight_TK, layer.dispatcher
    check_round_trip(disp, x_TH, idx_TK, w_TK)

    def dispatcher_step() -> torch.Tensor:
        with torch.no_grad():
            x_MH, plan = disp.dispatch(x_TH, idx_TK)
            return disp.combine(x_MH, plan, w_TK)

    row_bytes = shape.hidden * x_TH.element_size()
    entry: dict = {"ep": ep, "local_experts": shape.experts // ep, "tokens_per_rank": tokens}
    own: list[float] = []
    if ep > 1:
        with torch.no_grad():
            _, plan = disp.dispatch(x_TH, idx_TK)
        send, recv = list(plan.input_splits), list(plan.output_splits)
        sent = (sum(send) - send[me]) * row_bytes  # dispatch off-rank bytes out
        received = (sum(recv) - recv[me]) * row_bytes  # dispatch off-rank bytes in = combine bytes out
        entry.update(rank_input_splits=send, rank_output_splits=recv, rank_bytes_sent=sent + received,
                     rank_bytes_recv=received + sent)
        buf_N = torch.randn(sum(send), shape.hidden, device=device, generator=gen).to(dtype)
        buf_M = buf_N.new_empty((sum(recv), shape.hidden))

        def raw_step() -> None:
            dist.all_to_all_single(buf_M, buf_N, recv, send, group=group)
            dist.all_to_all_single(buf_N, buf_M, send, recv, group=group)

        raw = statistics.median(time_ms(raw_step, device, args.warmup, args.iters))
        own = [raw, float(sent + received)]
    disp_ms = statistics.median(time_ms(dispatcher_step, device, args.warmup, args.iters))

    x = x_TH.detach().clone().requires_grad_(True)
    params = list(layer.parameters())

    def layer_step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(grad_TH)

    if args.shared_ffn:  # A/B of the shared expert's overlap with the all-to-all, alternating: on, off, on, off
        times: dict[bool, list[float]] = {True: [], False: []}
        round_ms = []  # each round's median, in run order: on, off, on, off
        for overlap in (True, False, True, False):
            layer.overlap_shared_experts = overlap
            this_round = time_ms(layer_step, device, args.warmup, args.iters)
            times[overlap] += this_round
            round_ms.append(statistics.median(this_round))
        layer.overlap_shared_experts = True
        layer_ms, no_overlap_ms = statistics.median(times[True]), statistics.median(times[False])
    else:
        layer_ms = statistics.median(time_ms(layer_step, device, args.warmup, args.iters))
        no_overlap_ms, round_ms = float("nan"), []
    router_EH = layer.router.weight.detach().clone()
    del layer, params
    autoep_ms = measure_autoep(shape, ep, me, router_EH, x, grad_TH, args) if args.autoep else float("nan")
    ranks = gather([disp_ms, layer_ms, autoep_ms, no_overlap_ms, *own], device)
    rounds = gather(round_ms, device) if round_ms else []
    world = dist.get_world_size()
    entry["dispatcher_ms"] = max(r[0] for r in ranks)
    entry["layer_ms"] = max(r[1] for r in ranks)
    entry["layer_ms_per_rank"] = [r[1] for r in ranks]
    entry["tokens_per_s"] = world * tokens / (entry["layer_ms"] * 1e-3)
    if args.shared_ffn:
        entry["layer_no_overlap_ms"] = max(r[3] for r in ranks)
        entry["overlap_speedup"] = entry["layer_no_overlap_ms"] / entry["layer_ms"]
        entry["overlap_round_ms"] = [max(r[i] for r in rounds) for i in range(len(round_ms))]  # on, off, on, off
    if args.autoep:
        entry["autoep_layer_ms"] = max(r[2] for r in ranks)
        entry["vs_autoep"] = entry["autoep_layer_ms"] / entry["layer_ms"]
    if ep > 1:
        mean_bytes = statistics.mean(r[5] for r in ranks)
        entry.update(raw_a2a_ms=max(r[4] for r in ranks), bytes_sent_per_rank=[int(r[5]) for r in ranks],
                     bytes_sent_mean=mean_bytes,
                     model_bytes=cost_model(shape, tokens, ep, x_TH.element_size())["forward_bytes"])
        entry["dispatcher_gbps"] = mean_bytes / (entry["dispatcher_ms"] * 1e-3) / 1e9
        entry["raw_a2a_gbps"] = mean_bytes / (entry["raw_a2a_ms"] * 1e-3) / 1e9
        entry["overhead"] = entry["dispatcher_ms"] / entry["raw_a2a_ms"]
    del x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def measure_autoep(shape: Shape, ep: int, ep_rank: int, router_EH: torch.Tensor, x_TH: torch.Tensor,
                   grad_TH: torch.Tensor, args: argparse.Namespace) -> float:
    """Median ms of forward + backward of DeepSpeed AutoEP's layer at autoep_size=``ep`` on this rank's tokens."""
    import deepspeed
    from transformers import MixtralForCausalLM

    from moe_layer import _autoep_layer_directly, _default_dtype, _first, _mixtral_model_config

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins the existing world; AutoEP's groups use it
    torch.manual_seed(args.seed)  # the same global experts on every rank; each keeps its own
    with torch.device(args.device), _default_dtype(args.dtype):
        model = MixtralForCausalLM(_mixtral_model_config(shape))
    model.to(dtype=args.dtype)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.copy_(router_EH)
    ep_config = {"enabled": True, "autoep_size": ep, "preset_model": "mixtral"}
    if args.device.type != "cuda":
        ep_config["use_grouped_mm"] = False  # CPU torch._grouped_mm: no dependable backward
    layer = _autoep_layer_directly(model, ep_config, ep_size=ep, ep_rank=ep_rank).train()
    del model
    x_1TH = x_TH.detach().view(1, *x_TH.shape).requires_grad_(True)
    grad_1TH = grad_TH.view(1, *grad_TH.shape)
    params = list(layer.parameters())

    def step() -> None:
        x_1TH.grad = None
        for p in params:
            p.grad = None
        _first(layer(x_1TH)).backward(grad_1TH)

    ms = statistics.median(time_ms(step, args.device, args.warmup, args.iters))
    del layer, params
    return ms


# --------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs="+", choices=list(SHAPES), default=None,
                   help="default: all three (olmoe with --tiny)")
    for name in ("hidden", "ffn", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int_at_least(1), default=None, help="override this field of one --shape")
    p.add_argument("--ep-sizes", type=int_at_least(1), nargs="+", default=None,
                   help="default: 1, 2, 4, … dividing the world")
    p.add_argument("--tokens", type=int_at_least(1), default=None,
                   help="tokens per rank (default 8192; 64 with --tiny)")
    p.add_argument("--iters", type=int_at_least(1), default=None, help="timed steps (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed steps (default 5; 1 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few steps: a CPU check of the logic")
    p.add_argument("--cost-model-only", action="store_true", help="print the cost model and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-ffn", type=int_at_least(0), default=0,
                   help="add a gated shared expert of this FFN width (Qwen2-MoE style) and time the layer with its "
                        "overlap of the dispatch all-to-all on and off (alternating rounds); needs --no-autoep")
    p.add_argument("--no-autoep", dest="autoep", action="store_false",
                   help="leave out DeepSpeed AutoEP's layer at autoep_size=EP")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: the committed results on GPU, "
                   "a temp file on CPU)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed's
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    fill_counts(args, tokens=(64, 8192), iters=(2, 20), warmup=(1, 5))
    args.shape = args.shape or (["olmoe"] if args.tiny else list(SHAPES))
    overrides = {k: getattr(args, k) for k in ("hidden", "ffn", "experts", "top_k") if getattr(args, k) is not None}
    if args.shared_ffn and args.autoep:
        p.error("--shared-ffn: the AutoEP layer here is Mixtral's, without a shared expert; add --no-autoep")
    if overrides and len(args.shape) != 1:
        p.error("--hidden/--ffn/--experts/--top-k override one --shape; name exactly one")
    base = TINY_SHAPES if args.tiny else SHAPES
    suffix = ("_custom" if overrides else "") + (f"_shared{args.shared_ffn}" if args.shared_ffn else "")
    args.shapes = {n + suffix: replace(base[n], **overrides) for n in args.shape}
    if args.out is None:
        args.out = DEFAULT_OUT if cuda else Path(tempfile.gettempdir()) / "ep_scaling_cpu.json"
    if not cuda and args.out.resolve() == DEFAULT_OUT.resolve():
        p.error(f"CPU/--tiny numbers must not overwrite {DEFAULT_OUT.relative_to(REPO_ROOT)}; pass another --out")
    return args


def _meta(args: argparse.Namespace, argv: list[str]) -> dict:
    world = dist.get_world_size()
    cuda = args.device.type == "cuda"
    return {
        "command": shlex.join([*launcher_prefix(world), "benchmarks/ep_scaling.py", *argv]),
        **_versions(("deepspeed",), required=(), error_detail=False),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "backend": dist.get_backend(), "world_size": world,
        "device": torch.cuda.get_device_name(args.device) if cuda else f"cpu ({platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "tokens_per_rank": args.tokens, "dtype": str(args.dtype).removeprefix("torch."),
        "iters": args.iters, "warmup": args.warmup, "tiny": args.tiny, "shared_ffn": args.shared_ffn,
        "shapes": {n: asdict(s) for n, s in args.shapes.items()}, "cost_formula": COST_FORMULA,
        "bytes": "off-rank bytes one rank sends in dispatch + combine (= received), from the dispatch split sizes",
        "timing": "median of iters per rank, then the slowest rank; world barrier + sync before each step",
    }


def print_results(results: dict[str, dict[int, dict]]) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    mb = lambda e: e["bytes_sent_mean"] / 1e6 if "bytes_sent_mean" in e else None  # noqa: E731
    rows = [[shape, str(ep), fmt(mb(e), ".4g"), fmt(e.get("dispatcher_ms"), ".3f"),
             fmt(e.get("dispatcher_gbps"), ".4g"), fmt(e.get("raw_a2a_ms"), ".3f"), fmt(e.get("raw_a2a_gbps"), ".4g"),
             fmt(e.get("overhead"), ".2f"), fmt(e.get("layer_ms"), ".3f"), fmt(e.get("tokens_per_s"), ",.0f"),
             fmt(e.get("weak_scaling_eff"), ".2f"), fmt(e.get("autoep_layer_ms"), ".3f"), fmt(e.get("vs_autoep"), ".2f"),
             fmt(e.get("autoep_weak_scaling_eff"), ".2f"), fmt(e.get("layer_no_overlap_ms"), ".3f"),
             fmt(e.get("overlap_speedup"), ".3f")]
            for shape, per_ep in results.items() for ep, e in per_ep.items()]
    print_table("EP scaling (ms = slowest rank's median; MB/GB/s = mean off-rank bytes sent per rank)",
                ["shape", "EP", "MB sent", "dispatcher ms", "GB/s", "raw a2a ms", "GB/s", "overhead",
                 "layer fwd+bwd ms", "tokens/s (all)", "weak eff", "AutoEP ms", "vs AutoEP", "AutoEP weak eff",
                 "no-overlap ms", "overlap gain"], rows)


def run(argv: list[str] | None = None) -> dict[str, dict[int, dict]]:
    """Measure every shape × EP size on the ranks of the current world: ``{shape: {EP: entry}}``."""
    args = parse_args(argv)
    # the model describes the GPU run (bf16, full shapes), whatever this run's device
    model_tokens = 8192 if args.tiny else args.tokens
    if args.cost_model_only:
        print_cost_model(cost_table(model_tokens, 2), model_tokens, 2)
        return {}
    from switchyard.parallel.manager import init_distributed

    init_distributed("nccl" if args.device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    # ascending: weak_scaling_eff is against the first (smallest) EP measured
    ep_sizes = sorted(set(args.ep_sizes or [2**i for i in range(world.bit_length()) if world % 2**i == 0]))
    if not ep_sizes or any(ep < 1 or world % ep for ep in ep_sizes):
        raise ValueError(f"EP sizes {ep_sizes} must be >= 1 and divide the world size {world}")
    results: dict[str, dict[int, dict]] = {}
    for name, shape in args.shapes.items():
        results[name] = {}
        for ep in ep_sizes:
            if shape.experts % ep:
                results[name][ep] = {"ep": ep, "skipped": f"{shape.experts} experts not divisible by EP={ep}"}
                continue
            results[name][ep] = measure_ep(shape, ep, args)
        timed = [e for e in results[name].values() if "layer_ms" in e]
        for e in timed:  # weak scaling: same tokens per rank, efficiency vs the smallest EP measured
            e["weak_scaling_eff"] = timed[0]["layer_ms"] / e["layer_ms"]
            if "autoep_layer_ms" in e:
                e["autoep_weak_scaling_eff"] = timed[0]["autoep_layer_ms"] / e["autoep_layer_ms"]
    if rank == 0:
        print_cost_model(cost_table(model_tokens, 2), model_tokens, 2)
        print_results(results)
        used = [a for a in (sys.argv[1:] if argv is None else argv)
                if not a.startswith(("--local_rank", "--local-rank"))]  # deepspeed's launcher adds it
        doc = {"results": {n: {str(ep): e for ep, e in r.items()} for n, r in results.items()},
               "cost_model": cost_table(model_tokens, 2), "meta": _meta(args, used)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    from switchyard.parallel.process_exit import exit_without_teardown

    exit_without_teardown(0)
