"""One MoE layer, forward + backward, side by side: switchyard vs transformers vs DeepSpeed vs a dense ceiling.

    python benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json

CPU smoke run of the same logic (tiny shapes, fp32, few iterations; writes to a temp file):

    python benchmarks/moe_layer.py --tiny

Every implementation runs in the same process on the same input ``x`` [1, tokens, H], the same fixed
``grad_output`` (``out.backward(grad)``) and, where it has them, the same router and expert weights
(copied from one reference set), so they send each token to the same experts (up to near-ties: the
routers compute logits at different precisions; ``rel_err_vs_hf`` shows how close each output is to
that of transformers' block, built as for ``hf_grouped_mm`` and run once before any implementation is built):

    switchyard        switchyard.moe.layer.MoELayer (dropless), experts impl "auto"
    switchyard_autograd    the same layer, experts as autograd's grouped_mm → SwiGLU → grouped_mm
    switchyard_per_expert  the same layer, the SwiGLU Function over one cuBLAS GEMM per expert
    switchyard_cuda_graph  the same layer with ``cuda_graph = True``: its routed path, forward and backward,
                      replayed as two CUDA graphs (moe/cuda_graph.py; the first step captures)
    switchyard_torch_router  (opt-in) the same layer with the one-launch router switched off
                      (``Router.fused = False``): the A/B of moe/kernels/router_fused.py
    switchyard_torch_gemm  (opt-in) the same layer with its grouped GEMMs from torch's grouped_mm even
                      where QuACK's would run (``grouped_gemm.use_backend("torch")``): the A/B of
                      moe/grouped_gemm.py (the same rows as ``switchyard`` where QuACK is not installed)
    switchyard_weighted_combine  (opt-in) the same layer with ``fold_routing_weights = False``: the routing
                      weights applied in the combine (which keeps the experts' output for its backward), not in
                      the SwiGLU before GEMM 2: the A/B of that fold
    switchyard_triton_launch  (opt-in) the same layer with its Triton kernels launched through Triton's own
                      ``kernel[grid](...)`` every time, not switchyard's cached launcher: the A/B of
                      moe/kernels/launch.py (forward and backward run under the switch; no ``rel_err_vs_hf``)
    hf_grouped_mm     transformers' MixtralSparseMoeBlock with config._experts_implementation="grouped_mm"
                      (falls back to "eager" where grouped_mm cannot run; "variant" says what ran)
    deepspeed_moe     deepspeed.moe.layer.MoE (GShard-style, capacity_factor=1.0, drop_tokens=True,
                      top2_2nd_expert_sampling=False; experts = an nn.ModuleList of SwiGLU MLPs run one
                      after another; it drops overflowing tokens: ``dropped_fraction``)
    deepspeed_autoep  the AutoEPMoELayer that deepspeed.initialize(expert_parallel={autoep_size: 1,
                      preset_model: "mixtral"}) puts into a one-layer MixtralForCausalLM; the layer alone
                      is timed, not the model
    dense_ceiling     the six dense GEMMs (2 forward, 4 backward) of one SwiGLU expert applied to all
                      tokens*K routed rows at once: what a perfect grouped GEMM with no routing,
                      permutation or activation cost would take

FLOPs (the same formula for every implementation, so TFLOP/s ratios are time ratios): expert GEMMs only,
router excluded, gated (SwiGLU) experts,

    forward = 2 * tokens * K * (H * 2F + F * H);   forward + backward = 3 * forward

TFLOP/s = FLOPs / median time. Timing: ``warmup`` untimed steps, then ``iters`` steps, each started
after a device synchronize and bracketed by CUDA events (time.perf_counter on CPU); the median is
reported. Gradients are set to None before every step, so each step allocates its gradients like a
training step after ``zero_grad()``. ``ms_back_to_back``: the same number of steps issued without a
synchronize between them, CUDA events around all of them, divided by the count: the device's throughput
when each step's host work (routing ops, launches) overlaps the previous step's kernels, as inside a
model; the ``*_back_to_back`` ratios compare those times. ``peak_mem_gb`` is the peak memory allocated
during the timed steps minus what was allocated before the implementation was built (the shared input,
grad_output and reference weights): the implementation's own weights, gradients and activations.
``build_peak_mem_gb`` is the same for its construction. Memory is null on CPU. For
``switchyard_cuda_graph`` ``peak_mem_gb`` undercounts: the replays use the graph pool's blocks while no
tensor owns them, and the allocator counts only owned blocks.

Output: ``{shape: {impl: {"ms", "tflops", "peak_mem_gb", "build_peak_mem_gb", "ms_min", "ms_max", "iters",
"ms_back_to_back", "vs_autoep", "vs_dense_ceiling" (TFLOP/s ratios), "vs_autoep_back_to_back",
"vs_dense_ceiling_back_to_back", and where they apply "rel_err_vs_hf", "variant", "note",
"dropped_fraction"} or {"error"}}, "meta": {"command", "torch", "transformers", "deepspeed", "device",
"tokens", "dtype", "flops_formula", "date", ...}}``. One implementation failing records its error and the
run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "integration") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common sits here, also when loaded by path

from bench_common import (  # noqa: E402  (moe_decode, moe_layer_host, moe_layer_profile use them as ml.<name>)
    _device_name, _git_commit, _versions, autoep_kernel, ensure_world, fill_counts, free_memory, gb, int_at_least,
    mem_allocated, peak_gb, reset_peak, resolve_out, synchronize, time_back_to_back_ms, time_step_ms)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "moe_layer.json"
FLOPS_FORMULA = ("expert GEMMs only (router excluded): fwd = 2*tokens*K*(H*2F + F*H); "
                 "fwd+bwd = 3*fwd; TFLOP/s = fwd+bwd FLOPs / median ms")


@dataclass(frozen=True)
class Shape:
    hidden: int  # H
    ffn: int  # F, per expert
    experts: int  # E
    top_k: int  # K


SHAPES: dict[str, Shape] = {
    "mixtral_8x7b": Shape(hidden=4096, ffn=14336, experts=8, top_k=2),
    "olmoe": Shape(hidden=2048, ffn=1024, experts=64, top_k=8),
    "qwen3_30b_a3b": Shape(hidden=2048, ffn=768, experts=128, top_k=8),
}
# Opt-in with --shapes: one MoE layer of benchmarks/finetune.py's upcycled model (hidden 1536, FFN 4096).
EXTRA_SHAPES: dict[str, Shape] = {
    "finetune_llama_8x": Shape(hidden=1536, ffn=4096, experts=8, top_k=2),
}
# Same experts and top-k (they decide the code paths: top-2 vs top-k gating, 128-expert loops), tiny widths.
TINY_SHAPES: dict[str, Shape] = {
    "mixtral_8x7b": Shape(hidden=64, ffn=128, experts=8, top_k=2),
    "olmoe": Shape(hidden=32, ffn=64, experts=64, top_k=8),
    "qwen3_30b_a3b": Shape(hidden=32, ffn=48, experts=128, top_k=8),
    "finetune_llama_8x": Shape(hidden=48, ffn=64, experts=8, top_k=2),
}
IMPLS = ("switchyard", "switchyard_cuda_graph", "switchyard_autograd", "switchyard_per_expert", "hf_grouped_mm",
         "deepspeed_moe", "deepspeed_autoep", "dense_ceiling")
# Opt-in with --impls: A/B variants of switchyard's layer.
EXTRA_IMPLS = ("switchyard_torch_router", "switchyard_torch_gemm", "switchyard_triton_launch",
               "switchyard_weighted_combine")
ALL_IMPLS = (*IMPLS, *EXTRA_IMPLS)
RUN_ORDER = ("hf_grouped_mm", "switchyard_torch_router", "switchyard_torch_gemm", "switchyard_triton_launch",
             "switchyard_weighted_combine", "switchyard",
             "switchyard_cuda_graph", "switchyard_autograd", "switchyard_per_expert", "deepspeed_moe", "deepspeed_autoep",
             "dense_ceiling")


def expert_flops(shape: Shape, tokens: int) -> int:
    """Forward + backward FLOPs of the routed expert GEMMs (see the module docstring)."""
    h, f, k = shape.hidden, shape.ffn, shape.top_k
    return 3 * 2 * tokens * k * (h * 2 * f + f * h)


# ----------------------------------------------------------------------------------------------------------
# Shared inputs and the result of building one implementation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every implementation of one shape shares: input, grad_output, reference weights."""

    name: str
    shape: Shape
    tokens: int
    device: torch.device
    dtype: torch.dtype
    x_BTH: torch.Tensor
    grad_BTH: torch.Tensor
    router_EH: torch.Tensor
    gate_up_EOH: torch.Tensor  # [E, 2F, H], gate rows first (transformers 5 MixtralExperts layout)
    down_EHF: torch.Tensor  # [E, H, F]
    ref_out_BTH: torch.Tensor | None = None  # transformers' block on x (reference_outputs), set before any impl


@dataclass
class Built:
    """A runnable implementation: ``forward(x_BTH) -> out_BTH`` and the parameters whose grads to clear."""

    forward: Callable[[torch.Tensor], torch.Tensor] | None
    params: list[torch.Tensor]
    variant: str | None = None
    note: str | None = None
    keep: list[object] = field(default_factory=list)  # objects that must outlive the timing (engines, modules)
    step: Callable[[], torch.Tensor | None] | None = None  # replaces forward+backward (dense_ceiling)
    zero: Callable[[], None] | None = None
    extra: dict = field(default_factory=dict)  # more result fields


def make_bench(name: str, shape: Shape, tokens: int, device: torch.device, dtype: torch.dtype,
               seed: int) -> Bench:
    gen = torch.Generator(device=device).manual_seed(seed)
    h, f, e = shape.hidden, shape.ffn, shape.experts

    def uniform(size: tuple[int, ...], bound: float) -> torch.Tensor:
        t = torch.empty(size, device=device, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        return t.to(dtype)

    x = torch.randn(1, tokens, h, device=device, generator=gen).to(dtype)
    grad = (torch.randn(1, tokens, h, device=device, generator=gen) / math.sqrt(tokens * h)).to(dtype)
    router = (torch.randn(e, h, device=device, generator=gen) * 0.02).to(dtype)  # HF initializer_range
    gate_up = uniform((e, 2 * f, h), 1.0 / math.sqrt(h))  # nn.Linear's default bound
    down = uniform((e, h, f), 1.0 / math.sqrt(f))
    return Bench(name, shape, tokens, device, dtype, x, grad, router, gate_up, down)


@torch.no_grad()
def copy_by_suffix(module: nn.Module, sources: dict[str, torch.Tensor]) -> list[str]:
    """Copy each source into every parameter whose name ends with its key and whose shape matches."""
    copied = []
    for name, param in module.named_parameters():
        for suffix, src in sources.items():
            if (name == suffix or name.endswith("." + suffix)) and tuple(param.shape) == tuple(src.shape):
                param.copy_(src)
                copied.append(name)
    return copied


def _first(out: torch.Tensor | tuple | list) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------


def _routed_rows(b: Bench) -> torch.Tensor:
    """What the experts see: tokens * K rows (one row of ``x`` repeated: only its shape and dtype are read)."""
    return b.x_BTH.reshape(-1, b.shape.hidden)[:1].expand(b.tokens * b.shape.top_k, b.shape.hidden)


def _gemm_library(rows_NH: torch.Tensor, experts: nn.Module) -> str:
    """Which library runs the SwiGLU experts' grouped GEMMs on these rows (switchyard.moe.grouped_gemm)."""
    from switchyard.moe import grouped_gemm

    return grouped_gemm.backend_for(rows_NH.to(experts.down_proj.dtype), experts.gate_up_proj, experts.down_proj)


def build_switchyard(b: Bench, experts_impl: str | None = None) -> Built:
    from switchyard.config import MoEConfig
    from switchyard.moe.layer import MoELayer  # written concurrently; an ImportError is recorded as the result

    s = b.shape
    layer = MoELayer(MoEConfig(num_experts=s.experts, top_k=s.top_k, aux_loss_coef=0.0),
                     hidden_size=s.hidden, intermediate_size=s.ffn).to(device=b.device, dtype=b.dtype)
    layer.train()
    copied = copy_by_suffix(layer, {"router.weight": b.router_EH, "gate.weight": b.router_EH,
                                    "gate_up_proj": b.gate_up_EOH, "down_proj": b.down_EHF})
    variant = None
    experts = getattr(layer, "experts", None)
    if experts_impl is not None:
        experts.impl = experts_impl
    if experts is not None and hasattr(experts, "resolve_impl"):
        rows_NH = _routed_rows(b)
        variant = f"experts impl {experts.resolve_impl(rows_NH)!r}"
        if "grouped" in variant:
            variant += f", grouped GEMMs from {_gemm_library(rows_NH, experts)}"
    note = None if len(copied) >= 3 else f"only these weights were shared: {copied}"
    return Built(forward=lambda x: _first(layer(x)), params=list(layer.parameters()), variant=variant,
                 note=note, keep=[layer])


def _hf_experts_variant(block: nn.Module, x_BTH: torch.Tensor) -> str:
    """Which experts function the block dispatches to, and whether a forward reaches torch's grouped_mm.

    The function comes from transformers' ExpertsInterface (the table ``@use_experts_implementation``
    reads ``config._experts_implementation`` from on every call); the kernel from spying on
    ``F.grouped_mm`` / ``torch._grouped_mm`` during one forward, which holds whatever the
    transformers version does internally.
    """
    impl = getattr(block.experts.config, "_experts_implementation", None)
    try:
        from transformers.integrations import moe as hf_moe

        fn = hf_moe.ALL_EXPERTS_FUNCTIONS.get_interface(impl, None) if impl not in (None, "eager") else None
        fn_name = f"{fn.__module__}.{fn.__name__}" if fn is not None else "the experts class's own forward"
    except Exception as exc:  # noqa: BLE001 - older/newer transformers: the kernel spy still answers
        fn_name = f"unknown ({type(exc).__name__})"
    calls = {"n": 0}
    patched = []
    for owner, attr in ((F, "grouped_mm"), (torch, "_grouped_mm")):
        original = getattr(owner, attr, None)
        if original is None:
            continue

        def spy(*args, _orig=original, **kwargs):
            calls["n"] += 1
            return _orig(*args, **kwargs)

        setattr(owner, attr, spy)
        patched.append((owner, attr, original))
    try:
        with torch.no_grad():
            block(x_BTH)
    finally:
        for owner, attr, original in patched:
            setattr(owner, attr, original)
    kernel = "torch grouped_mm kernel" if calls["n"] else "no grouped_mm kernel call"
    return f"{impl} ({fn_name} -> {kernel})"


def build_hf_grouped_mm(b: Bench) -> Built:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    s = b.shape
    config = MixtralConfig(hidden_size=s.hidden, intermediate_size=s.ffn, num_local_experts=s.experts,
                           num_experts_per_tok=s.top_k, router_jitter_noise=0.0)
    # A standalone block never passes through PreTrainedModel's dispatch check (which would default it
    # to grouped_mm), so set the attribute @use_experts_implementation's forward reads on every call.
    config._experts_implementation = "grouped_mm"
    with torch.device(b.device), _default_dtype(b.dtype):
        block = MixtralSparseMoeBlock(config)
    block.to(dtype=b.dtype).train()
    copied = copy_by_suffix(block, {"gate.weight": b.router_EH, "experts.gate_up_proj": b.gate_up_EOH,
                                    "experts.down_proj": b.down_EHF})
    notes = [] if len(copied) == 3 else [f"only these reference weights fit the block: {copied}"]
    try:  # grouped_mm has no working backward on some CPU builds: probe forward + backward first
        x = b.x_BTH.detach().clone().requires_grad_(True)
        _first(block(x)).backward(b.grad_BTH)
        block.zero_grad(set_to_none=True)
        del x
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot use grouped_mm here"
        config._experts_implementation = "eager"
        notes.append(f"grouped_mm failed here, ran eager: {type(exc).__name__}: {str(exc)[:200]}")
    variant = _hf_experts_variant(block, b.x_BTH)
    return Built(forward=lambda x: _first(block(x)), params=list(block.parameters()), variant=variant,
                 note="; ".join(notes) or None, keep=[block])


class SwiGLUExpert(nn.Module):
    """One Mixtral expert for DeepSpeed's MoE: ``down(silu(gate(x)) * up(x))`` with gate+up fused (2F rows)."""

    def __init__(self, hidden: int, ffn: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False, device=device, dtype=dtype)
        self.down = nn.Linear(ffn, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def build_deepspeed_moe(b: Bench) -> Built:
    ensure_world(b.device)  # a one-rank world for DeepSpeed's process groups
    from deepspeed.moe.layer import MoE

    s = b.shape
    moe = MoE(hidden_size=s.hidden, expert=SwiGLUExpert(s.hidden, s.ffn, b.device, b.dtype),
              num_experts=s.experts, ep_size=1, k=s.top_k, capacity_factor=1.0, drop_tokens=True,
              # plain top-k of the shared router (default samples the 2nd expert with Gumbel noise)
              top2_2nd_expert_sampling=False)
    moe.to(device=b.device, dtype=b.dtype).train()
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(b.router_EH)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_up.weight.copy_(b.gate_up_EOH[e])
            expert.down.weight.copy_(b.down_EHF[e])
    gating = "top1gating" if s.top_k == 1 else "top2gating" if s.top_k == 2 else "topkgating"
    capacity = max(math.ceil(b.tokens / s.experts * s.top_k * 1.0), 4)  # min_capacity=4
    dropped = dropped_fraction(b, capacity)
    note = (f"{gating}, capacity {capacity} rows/expert (capacity_factor=1.0, drop_tokens=True): "
            f"E*capacity = {s.experts * capacity} expert rows for tokens*K = {b.tokens * s.top_k}; "
            f"{100 * dropped:.1f}% of token-expert assignments overflow and are dropped, short experts are "
            "zero-padded; experts run one after another (nn.ModuleList); deepspeed's docstring says k is 1 "
            "or 2, this version routes k>2 through topkgating")
    return Built(forward=lambda x: moe(x)[0], params=list(moe.parameters()), variant=gating, note=note,
                 keep=[moe], extra={"dropped_fraction": round(dropped, 4)})


@torch.no_grad()
def dropped_fraction(b: Bench, capacity: int) -> float:
    """Share of the shared router's token-expert assignments beyond ``capacity`` rows of their expert."""
    scores_TE = F.linear(b.x_BTH.reshape(-1, b.shape.hidden).float(), b.router_EH.float()).softmax(-1)
    idx_TK = scores_TE.topk(b.shape.top_k, dim=-1).indices
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=b.shape.experts)
    return float((counts_E - capacity).clamp_min(0).sum()) / idx_TK.numel()


def _mixtral_model_config(s: Shape):
    from transformers import MixtralConfig

    heads = max(1, s.hidden // 128)
    return MixtralConfig(vocab_size=128, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=min(heads, 8),
                         num_local_experts=s.experts, num_experts_per_tok=s.top_k, router_jitter_noise=0.0,
                         max_position_embeddings=4096, tie_word_embeddings=False)


def _autoep_model(b: Bench) -> nn.Module:
    """A one-layer MixtralForCausalLM of the shape, cast to the bench dtype, with the shared weights."""
    from transformers import MixtralForCausalLM

    with torch.device(b.device), _default_dtype(b.dtype):
        model = MixtralForCausalLM(_mixtral_model_config(b.shape))
    model.to(dtype=b.dtype).train()
    copied = copy_by_suffix(model.model.layers[0].mlp, {"gate.weight": b.router_EH,
                                                        "experts.gate_up_proj": b.gate_up_EOH,
                                                        "experts.down_proj": b.down_EHF})
    assert len(copied) == 3, f"the Mixtral block's weights changed names or shapes: copied only {copied}"
    return model


def _autoep_layer_directly(model: nn.Module, ep_config: dict, ep_size: int = 1, ep_rank: int = 0) -> nn.Module:
    """What the engine does for autoep_size=ep_size, through AutoEP's public pieces, minus the output-recorder
    retargeting (it only matters for output_router_logits capture, which the timed layer call never uses).
    At ep_size > 1 the layer keeps rank ``ep_rank``'s experts and builds its EP groups through deepspeed.comm."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config, validate_autoep_post_detection
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    config = parse_autoep_config(ep_config)
    specs = AutoEP(model, config).ep_parser()
    assert len(specs) == 1, f"expected one MoE block, AutoEP found {len(specs)}"
    validate_autoep_post_detection(config, specs)
    layer = AutoEPMoELayer(specs[0], model.get_submodule(specs[0].moe_module_name), ep_size=ep_size, ep_rank=ep_rank,
                           config=config)
    layer.set_deepspeed_parallelism()
    return layer


def build_deepspeed_autoep(b: Bench) -> Built:
    ensure_world(b.device)  # a one-rank world for DeepSpeed's process groups
    import deepspeed
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    ep_config = {"enabled": True, "autoep_size": 1, "preset_model": "mixtral"}
    if b.device.type != "cuda":
        ep_config["use_grouped_mm"] = False  # CPU torch._grouped_mm: no dependable backward
    # No optimizer and no "bf16" section: the model is already cast, and a bf16 section without an
    # optimizer whose param groups mark the MoE params makes the engine assert.
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}, "expert_parallel": ep_config}
    model = _autoep_model(b)
    note = ("AutoEPMoELayer that deepspeed.initialize put into a 1-layer MixtralForCausalLM, called directly; "
            "rows are padded per expert to deepspeed's alignment (padding not counted as FLOPs)")
    keep: list[object] = []
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
        layers = [m for m in engine.module.modules() if isinstance(m, AutoEPMoELayer)]
        assert len(layers) == 1, f"expected one AutoEPMoELayer in engine.module, found {len(layers)}"
        layer, built_by = layers[0], "deepspeed.initialize"
        keep = [engine, layer]
    except Exception as exc:  # noqa: BLE001 - e.g. deepspeed 0.19.8 vs transformers >= 5.2x output recorders
        print(f"[{b.name}/deepspeed_autoep] deepspeed.initialize failed ({type(exc).__name__}: {exc}); "
              "building AutoEPMoELayer directly", file=sys.stderr)
        note = (f"deepspeed.initialize failed ({type(exc).__name__}: {str(exc)[:160]}); the same AutoEPMoELayer "
                "was built directly with AutoEP's parser and the same expert_parallel config, called directly")
        del model
        free_memory(b.device)
        model = _autoep_model(b)  # the failed initialize may have swapped the block already
        layer, built_by = _autoep_layer_directly(model, ep_config), "direct"
        del model  # the layer holds copies of the router and expert weights
        keep = [layer]
    layer.train()
    kernel = autoep_kernel(layer.experts)
    if not ep_config.get("use_grouped_mm", True):
        note += "; use_grouped_mm=false off CUDA"
    return Built(forward=lambda x: _first(layer(x)), params=list(layer.parameters()),
                 variant=f"{built_by}; GroupedExperts: {kernel}", note=note, keep=keep)


def build_dense_ceiling(b: Bench) -> Built:
    """Six GEMMs into preallocated outputs; the first-GEMM output's F gate columns stand in for the activation."""
    s = b.shape
    n, h, f = b.tokens * s.top_k, s.hidden, s.ffn
    kw = {"device": b.device, "dtype": b.dtype}
    x_NH = b.x_BTH.reshape(-1, h).repeat(s.top_k, 1)
    w1_OH = b.gate_up_EOH[0].clone()
    w2_HF = b.down_EHF[0].clone()
    a_NF = torch.randn(n, f, **kw)
    dy_NH = b.grad_BTH.reshape(-1, h).repeat(s.top_k, 1)
    dh1_NO = torch.randn(n, 2 * f, **kw)
    h1_NO, y_NH, da_NF = torch.empty(n, 2 * f, **kw), torch.empty(n, h, **kw), torch.empty(n, f, **kw)
    dw2_HF, dx_NH, dw1_OH = torch.empty(h, f, **kw), torch.empty(n, h, **kw), torch.empty(2 * f, h, **kw)

    def step() -> torch.Tensor:
        torch.mm(x_NH, w1_OH.t(), out=h1_NO)  # fwd gate+up   2*N*H*2F
        torch.mm(a_NF, w2_HF.t(), out=y_NH)  # fwd down      2*N*F*H
        torch.mm(dy_NH, w2_HF, out=da_NF)  # bwd down dX   2*N*H*F
        torch.mm(dy_NH.t(), a_NF, out=dw2_HF)  # bwd down dW   2*H*N*F
        torch.mm(dh1_NO, w1_OH, out=dx_NH)  # bwd up dX     2*N*2F*H
        torch.mm(dh1_NO.t(), x_NH, out=dw1_OH)  # bwd up dW     2*2F*N*H
        return y_NH

    keep = [x_NH, w1_OH, w2_HF, a_NF, dy_NH, dh1_NO, h1_NO, y_NH, da_NF, dw2_HF, dx_NH, dw1_OH]
    variant = "torch.mm x6" + (" (cuBLAS)" if b.device.type == "cuda" else "")
    return Built(forward=None, params=[], variant=variant,
                 note=f"one [{n}, ...] GEMM chain: gate+up H->2F, down F->H, their dX and dW", keep=keep,
                 step=step, zero=lambda: None)


def build_switchyard_autograd(b: Bench) -> Built:
    """The layer with the experts as autograd's composition of grouped_mm, SwiGLU, grouped_mm (the default
    before the SwiGLU Function; it keeps a = silu(gate) * up for the backward). CPU: the loop (torch's
    CPU grouped_mm has no working backward)."""
    return build_switchyard(b, "grouped_mm" if b.device.type == "cuda" else "loop")


def build_switchyard_per_expert(b: Bench) -> Built:
    """The SwiGLU Function with one cuBLAS GEMM per expert instead of grouped GEMMs (one host sync)."""
    return build_switchyard(b, "swiglu_per_expert")


def build_switchyard_cuda_graph(b: Bench) -> Built:
    """The default layer with ``cuda_graph = True`` (a CPU run takes the eager path: same numbers)."""
    built = build_switchyard(b)
    built.keep[0].cuda_graph = True
    # per-expert GEMMs read the counts on the host, which a capture cannot: the graph holds grouped GEMMs
    variant = built.variant
    if "swiglu_per_expert" in variant:
        variant = (f"{variant.replace('swiglu_per_expert', 'swiglu_grouped')}, grouped GEMMs from "
                   f"{_gemm_library(_routed_rows(b), built.keep[0].experts)}")
    built.variant = f"{variant}; cuda_graph"
    return built


def build_switchyard_torch_router(b: Bench) -> Built:
    """The default layer with the router's one-launch Triton path switched off (the unfused router ops)."""
    built = build_switchyard(b)
    built.keep[0].router.fused = False
    built.variant = f"{built.variant}; router unfused"
    return built


def build_switchyard_torch_gemm(b: Bench) -> Built:
    """The default layer with its grouped GEMMs from torch's grouped_mm (the backward follows the forward's)."""
    from switchyard.moe import grouped_gemm

    with grouped_gemm.use_backend("torch"):
        built = build_switchyard(b)
    layer = built.keep[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        with grouped_gemm.use_backend("torch"):
            return _first(layer(x))

    built.forward = forward
    return built


def build_switchyard_weighted_combine(b: Bench) -> Built:
    """The default layer with the routing weights applied in the combine, not folded into the experts' SwiGLU."""
    built = build_switchyard(b)
    built.keep[0].fold_routing_weights = False
    built.variant = f"{built.variant}; weights in the combine"
    return built


def build_switchyard_triton_launch(b: Bench) -> Built:
    """The default layer, its Triton kernels launched by Triton's ``kernel[grid](...)`` (forward and backward)."""
    built = build_switchyard(b)
    forward = built.forward
    assert forward is not None
    x = b.x_BTH.detach().clone().requires_grad_(True)

    def step() -> torch.Tensor:
        with _plain_triton_launches():
            out = forward(x)
            out.backward(b.grad_BTH.view_as(out))
        return out

    def zero() -> None:
        x.grad = None
        for p in built.params:
            p.grad = None

    built.forward, built.step, built.zero = None, step, zero
    built.variant = f"{built.variant}; Triton's own launches"
    return built


@contextlib.contextmanager
def _plain_triton_launches() -> Iterator[None]:
    """switchyard.moe.kernels.launch's cache off (where Triton is installed)."""
    try:
        from switchyard.moe.kernels import launch
    except ImportError:  # no Triton: nothing is launched through it
        yield
        return
    previous, launch.ENABLED = launch.ENABLED, False
    try:
        yield
    finally:
        launch.ENABLED = previous


BUILDERS: dict[str, Callable[[Bench], Built]] = {
    "switchyard": build_switchyard,
    "switchyard_autograd": build_switchyard_autograd,
    "switchyard_per_expert": build_switchyard_per_expert,
    "switchyard_cuda_graph": build_switchyard_cuda_graph,
    "switchyard_torch_router": build_switchyard_torch_router,
    "switchyard_torch_gemm": build_switchyard_torch_gemm,
    "switchyard_triton_launch": build_switchyard_triton_launch,
    "switchyard_weighted_combine": build_switchyard_weighted_combine,
    "hf_grouped_mm": build_hf_grouped_mm,
    "deepspeed_moe": build_deepspeed_moe,
    "deepspeed_autoep": build_deepspeed_autoep,
    "dense_ceiling": build_dense_ceiling,
}


# ----------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------


def time_steps(step: Callable[[], object], zero: Callable[[], None], device: torch.device, warmup: int,
               iters: int) -> list[float]:
    """Milliseconds of each timed step; every step starts on an idle device."""
    for _ in range(warmup):
        zero()
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        zero()
        synchronize(device)
        times.append(time_step_ms(step, device))
    return times


def reference_outputs(b: Bench, xs: list[torch.Tensor], eval_mode: bool = False) -> list[torch.Tensor]:
    """transformers' block, built as ``hf_grouped_mm`` builds it, on each input under no_grad: the outputs every
    implementation is compared with. Computed and freed before any implementation is built, so every one has it
    in its memory baseline alike (kept by one of them, it would count in that one's peak only)."""
    built = build_hf_grouped_mm(b)
    assert built.forward is not None
    if eval_mode:
        built.keep[0].eval()
    with torch.no_grad():
        outs = [built.forward(x).detach() for x in xs]
    del built
    free_memory(b.device)
    return outs


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``|out - ref| / |ref|`` (Frobenius norms, fp32)."""
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _sig(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}")


def run_impl(name: str, b: Bench, warmup: int, iters: int) -> dict:
    """Build, check against the reference output, time; any failure becomes ``{"error": ...}``."""
    device = b.device
    free_memory(device)
    baseline = mem_allocated(device)
    reset_peak(device)
    built: Built | None = None
    result: dict = {}
    try:
        built = BUILDERS[name](b)
        result["build_peak_mem_gb"] = peak_gb(device, baseline)
        if built.step is None:
            x = b.x_BTH.detach().clone().requires_grad_(True)
            forward, params = built.forward, built.params
            assert forward is not None

            def step() -> torch.Tensor:
                out = forward(x)
                out.backward(b.grad_BTH.view_as(out))
                return out

            def zero() -> None:
                x.grad = None
                for p in params:
                    p.grad = None

            out = step().detach()
            if b.ref_out_BTH is not None:
                result["rel_err_vs_hf"] = rel_err(out, b.ref_out_BTH)
            del out
        else:
            step, zero = built.step, built.zero or (lambda: None)
        synchronize(device)
        reset_peak(device)
        times = time_steps(step, zero, device, warmup, iters)
        peak = peak_gb(device, baseline)
        ms = statistics.median(times)
        result = {"ms": _sig(ms), "tflops": _sig(expert_flops(b.shape, b.tokens) / (ms * 1e-3) / 1e12),
                  "peak_mem_gb": peak, **result,
                  "ms_min": _sig(min(times)), "ms_max": _sig(max(times)), "iters": len(times),
                  "ms_back_to_back": _sig(time_back_to_back_ms(step, zero, device, iters))}
        result.update(built.extra)
        for key in ("variant", "note"):
            if getattr(built, key):
                result[key] = getattr(built, key)
    except Exception as exc:  # noqa: BLE001 - one implementation failing must not end the run
        result = {"error": f"{type(exc).__name__}: {exc}"}
        if built is not None and built.variant:
            result["variant"] = built.variant
        print(f"[{b.name}/{name}] failed:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        built = None
        free_memory(device)
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def add_ratios(shape_results: dict) -> None:
    """``vs_autoep`` and ``vs_dense_ceiling``: TFLOP/s ratios (= inverse time ratios, the FLOPs being equal);
    ``*_back_to_back``: the same ratios of the back-to-back times."""
    for ref_impl, key in (("deepspeed_autoep", "vs_autoep"), ("dense_ceiling", "vs_dense_ceiling")):
        ref = shape_results.get(ref_impl, {}).get("tflops")
        ref_b2b = shape_results.get(ref_impl, {}).get("ms_back_to_back")
        for entry in shape_results.values():
            if ref and entry.get("tflops"):
                entry[key] = _sig(entry["tflops"] / ref, 4)
            if ref_b2b and entry.get("ms_back_to_back"):
                entry[f"{key}_back_to_back"] = _sig(ref_b2b / entry["ms_back_to_back"], 4)


def combine_rounds(entries: list[dict], flops: float) -> dict:
    """One impl's rounds as one entry: ``ms`` and ``ms_back_to_back`` are the rounds' means (each round ran the
    impls in the other order), TFLOP/s from that mean, peak the largest; each round kept under ``rounds``."""
    if len(entries) == 1:
        return entries[0]
    combined = {**entries[-1], "rounds": entries}
    for key in ("ms", "ms_back_to_back"):
        values = [e[key] for e in entries if key in e]
        if len(values) == len(entries):
            combined[key] = _sig(sum(values) / len(values))
    if "ms" in combined and len([e for e in entries if "ms" in e]) == len(entries):
        combined["tflops"] = _sig(flops / (combined["ms"] * 1e-3) / 1e12)
    peaks = [e["peak_mem_gb"] for e in entries if e.get("peak_mem_gb") is not None]
    if peaks:
        combined["peak_mem_gb"] = max(peaks)
    return combined


def print_table(results: dict, shapes: list[str], impls: list[str]) -> None:
    headers = ["shape", "impl", "ms", "TFLOP/s", "vs autoep", "vs dense", "b2b ms", "b2b vs dense", "peak GB",
               "variant / error"]
    rows = []
    for shape in shapes:
        autoep = results[shape].get("deepspeed_autoep", {}).get("tflops")
        dense = results[shape].get("dense_ceiling", {}).get("tflops")
        for impl in impls:
            r = results[shape].get(impl, {})
            tf = r.get("tflops")
            rows.append([
                shape, impl,
                f"{r['ms']:.3f}" if "ms" in r else "-",
                f"{tf:.4g}" if tf is not None else "-",
                f"{tf / autoep:.2f}x" if tf and autoep else "-",
                f"{100 * tf / dense:.0f}%" if tf and dense else "-",
                f"{r['ms_back_to_back']:.3f}" if "ms_back_to_back" in r else "-",
                f"{100 * r['vs_dense_ceiling_back_to_back']:.0f}%" if "vs_dense_ceiling_back_to_back" in r else "-",
                f"{r['peak_mem_gb']:.2f}" if r.get("peak_mem_gb") is not None else "-",
                (r.get("error") or r.get("variant") or "")[:70],
            ])
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="MoE layer forward+backward (vs = TFLOP/s ratio, i.e. inverse time ratio)")
        for h in headers:
            table.add_column(h, justify="left" if h in ("shape", "impl", "variant / error") else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        for row in [headers, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=[*SHAPES, *EXTRA_SHAPES], default=list(SHAPES))
    p.add_argument("--impls", nargs="+", choices=list(ALL_IMPLS), default=list(IMPLS))
    p.add_argument("--tokens", type=int_at_least(1), default=None,
                   help="tokens per step (default 8192; 128 with --tiny)")
    p.add_argument("--iters", type=int_at_least(1), default=None, help="timed steps (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed steps (default 5; 1 with --tiny)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="default bf16 on CUDA; fp32 on CPU with --tiny")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few iterations: a CPU test of the logic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int_at_least(1), default=1,
                   help="run every impl this many times per shape, odd rounds in reverse order; ms is the mean")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; a temp file with --tiny)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    fill_counts(args, tokens=(128, 8192), iters=(2, 20), warmup=(1, 5))
    args.dtype = args.dtype or ("fp32" if args.tiny and args.device.type == "cpu" else "bf16")
    resolve_out(p, args, DEFAULT_OUT, "moe_layer_tiny.json", "full shapes on CPU take very long")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes = TINY_SHAPES if args.tiny else {**SHAPES, **EXTRA_SHAPES}
    argv_used = sys.argv[1:] if argv is None else argv
    meta = {
        "command": shlex.join(["python", "benchmarks/moe_layer.py", *argv_used]),
        **_versions(("deepspeed", "quack")),
        "device": _device_name(args.device),
        "tokens": args.tokens,
        "dtype": args.dtype,
        "flops_formula": FLOPS_FORMULA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "timing": "median of iters; each step synchronized, CUDA events (perf_counter on CPU)",
        "grad": "out.backward(fixed random grad_output); x.requires_grad; grads set to None before each step",
        "peak_mem": "GiB allocated at peak during the timed steps minus GiB allocated before the impl was built",
        "reference": "rel_err_vs_hf = |out - ref| / |ref| of the first step's output; ref = transformers' "
                     "MixtralSparseMoeBlock built as for hf_grouped_mm, run on x under no_grad before any impl",
        "ratios": "vs_autoep / vs_dense_ceiling = tflops / that impl's tflops (same FLOPs => inverse time ratio)",
        "shapes": {},
    }
    results: dict = {}
    impls = [i for i in RUN_ORDER if i in args.impls]
    for shape_name in args.shapes:
        shape = shapes[shape_name]
        bench = make_bench(shape_name, shape, args.tokens, args.device, dtype, args.seed)
        try:
            bench.ref_out_BTH = reference_outputs(bench, [bench.x_BTH])[0]
        except Exception as exc:  # noqa: BLE001 - no reference: the runs go on without rel_err_vs_hf
            meta.setdefault("reference_errors", {})[shape_name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        meta["shapes"][shape_name] = {**asdict(shape), "fwd_bwd_flops": expert_flops(shape, args.tokens),
                                      "shared_mem_gb": gb(mem_allocated(args.device))}
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for round_index in range(args.rounds):  # odd rounds in reverse: drift within the run falls on every impl
            for impl in impls if round_index % 2 == 0 else impls[::-1]:
                print(f"[{shape_name}] round {round_index + 1} {impl} ...", file=sys.stderr, flush=True)
                runs[impl].append(run_impl(impl, bench, args.warmup, args.iters))
        results[shape_name] = {impl: combine_rounds(entries, expert_flops(shape, bench.tokens))
                               for impl, entries in runs.items()}
        results[shape_name] = {impl: results[shape_name][impl] for impl in ALL_IMPLS if impl in args.impls}
        add_ratios(results[shape_name])
        del bench
        free_memory(args.device)
    results["meta"] = meta
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args.shapes, [i for i in ALL_IMPLS if i in args.impls])
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
