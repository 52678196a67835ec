"""Fine-tuning throughput, MFU and peak memory: switchyard vs DeepSpeed AutoEP vs transformers' grouped_mm.

    python benchmarks/finetune.py --out benchmarks/results/finetune.json --variant-moe-max-group-size 178956971

(on one H200 through the device tool, with the deepspeed + pydantic wheels of .whl carried and installed; the
committed JSON came from exactly this command). CPU smoke run of the same logic (tiny shape, fp32,
2 timed steps; writes to a temp file):

    python benchmarks/finetune.py --tiny

One process, one rank (a world of one is initialized here, as in benchmarks/moe_layer.py), DeepSpeed
ZeRO-2 (``configs/deepspeed/zero2.json`` filled by ``switchyard.deepspeed.fill_deepspeed_config``; its
``bf16.check_grad_overflow`` is false), bf16 on CUDA, torch AdamW (``fused=True`` on CUDA) over
``switchyard.deepspeed.optimizer_param_groups`` (MoE groups capped at ``MOE_MAX_GROUP_SIZE`` elements),
gradient clipping 1.0, the same random token ids (fixed generator) for every implementation, and
``loss = model(input_ids, labels=input_ids).loss``:

    switchyard        a Llama-shaped dense model with random weights (``AutoConfig.for_model("llama")``,
                      ``AutoModelForCausalLM.from_config``) upcycled by ``switchyard.patch_model`` into
                      E experts, top-k (``init="copy"``, aux_loss_coef 0.01, its router loss is inside
                      ``.loss``); ``switchyard.deepspeed.initialize(..., mpu=ProcessGroupManager(ep=1).mpu)``:
                      DeepSpeed's engine, whose ZeRO gradient norm is switchyard's fused fp32 one, whose
                      ZeRO-1/2 clip has no host syncs (``switchyard/deepspeed/grad_norm.py``; DeepSpeed's own norm
                      takes an fp64 copy of each gradient, its clip reads the norm back once per param group) and
                      whose ZeRO-1/2 step casts, clips, updates and copies back in one pass per param group
                      (``switchyard/deepspeed/zero_step.py``; DeepSpeed's makes four)
    switchyard_deepspeed_step  (opt-in through ``--impls``) the same with DeepSpeed's own ZeRO step (switchyard's
                      norm and clip kept): the A/B of the fused step, run in the same rounds
    switchyard_deepspeed_norm  (opt-in) the same with DeepSpeed's own gradient norm, clip and step: the A/B of
                      all three
    switchyard_torch_gemm  (opt-in) switchyard with its experts' grouped GEMMs from torch's grouped_mm even where
                      QuACK's would run (switchyard/moe/grouped_gemm.py): the A/B of QuACK's GEMMs
    switchyard_weighted_combine  (opt-in) switchyard with ``MoELayer.fold_routing_weights = False``: the routing
                      weights applied in the combine (which keeps each layer's expert outputs for the backward),
                      not inside the SwiGLU experts: the A/B of that fold
    deepspeed_autoep  the same MoE as a standard transformers ``MixtralForCausalLM`` (same hidden size,
                      layers, heads, experts, top-k, expert FFN; ``output_router_logits=True`` with
                      ``router_aux_loss_coef`` 0.01 so its loss has the same router term) under DeepSpeed
                      AutoEP (``expert_parallel: {enabled, autoep_size: 1, preset_model: mixtral}``); the
                      optimizer is a callable so DeepSpeed builds it after AutoEP swapped the blocks, from
                      param groups that mark AutoEP's expert parameters as MoE (else ZeRO asserts)
    hf_grouped_mm     the same ``MixtralForCausalLM`` with ``experts_implementation="grouped_mm"`` under plain
                      DeepSpeed ZeRO-2 (falls back to "eager" where grouped_mm's backward cannot run: CPU)

The weights are random (not shared across implementations); the shapes are identical, so the losses of
the first step should be close (about ln(vocab)), not equal.

Per implementation: ``tokens_per_s`` (batch * seq_len * steps / wall time of the timed steps, each step
ended by a device synchronize), ``ms_per_step`` (median), ``fwd/bwd/opt_ms`` (median, CUDA events),
``mfu`` = 6 * matmul_params * tokens_per_s / 989e12 (H200 dense bf16 datasheet peak; matmul params = the
weights of the matmuls a token goes through: LM head, attention, routers, top_k of E experts, i.e. the active
params less the input embedding, a lookup with no FLOPs; from the shape, the same number for all three;
attention score FLOPs are not counted), ``peak_mem_gb`` (torch.cuda.max_memory_allocated during the timed
steps, stats reset after warm-up, minus what was allocated before the implementation was built),
``loss_first`` (the first step's loss, router term included), ``lm_loss_first`` (cross-entropy of
that step's logits, computed here the same way for every implementation) and ``grad_norm_first`` (the global
gradient norm that step was clipped by). On CUDA a short
torch.profiler pass after the timed steps (first round only) records the top kernels, kernel time by
category and each phase's host time (``profile``). On CUDA the implementations run in two rounds, in
``RUN_ORDER`` and then reversed (build order changes allocator and clock state); the round with the higher
tokens/s is reported and every round is listed under ``rounds``; ``tokens_per_s_round_mean`` /
``vs_autoep_round_mean`` average the rounds (each implementation once early and once late: an effect of the
position in the process cancels, which the best round does not). ``--variant-moe-max-group-size N`` then
reruns switchyard and AutoEP with the MoE param-group size cap set to N instead of
``switchyard.deepspeed.config.MOE_MAX_GROUP_SIZE`` (each group is one more ZeRO partition and optimizer
call; DeepSpeed's own default, 178956971, makes 14 expert groups here) and stores them under ``variants``.
``--variant-experts-impl IMPL`` likewise reruns switchyard with its experts' compute path forced to IMPL,
``--variant-cuda-graph`` with ``MoELayer.cuda_graph`` on. ``--gradient-checkpointing`` runs the rounds themselves
with activation checkpointing of every decoder layer (every implementation; the variant of that name runs it once
after the rounds, in one fixed order).
One implementation failing records ``{"error": ...}`` and the run goes on (at ``--ep`` > 1 it ends the run
instead: the launcher then stops every rank, where a rank going on alone would hang in its next collective).

Expert parallelism, ``--ep N`` on N ranks (one GPU each), the same script under a launcher:

    torchrun --nproc_per_node 2 benchmarks/finetune.py --ep 2 --out benchmarks/results/finetune_ep2.json

switchyard with ``ProcessGroupManager(ep=N)`` (each rank holds E/N experts; tokens travel by all-to-all)
against AutoEP at ``autoep_size=N``; both data-parallel over the N ranks (ZeRO-2 partitions over them, every
rank its own batch of random ids). ``hf_grouped_mm`` has no expert parallelism and is left out.
``tokens_per_s`` counts every rank's tokens over the slowest rank's wall time; MFU divides by N GPUs' peak;
``peak_mem_gb`` is the largest rank's; with ``--profile-steps`` every rank's phases and kernel time by category
go under ``profile_per_rank`` (which rank waits in its collectives); every rank's median step and phase times
under ``per_rank_timing``; for switchyard, the rows each EP rank's experts received in the last timed step, per
MoE layer, under ``ep_rank_load`` (max over mean: the load imbalance the other ranks wait for). Rank 0 writes
the JSON.

Output: ``{"meta": {command, versions, device, shape (+ parameter counts), batch, seq_len, steps, rounds,
training, flops_formula, date, git_commit (SWITCHYARD_GIT_COMMIT wins), target, ...}, "results": {impl:
{tokens_per_s, ms_per_step, mfu, peak_mem_gb, loss_first, lm_loss_first, fwd_ms, bwd_ms, opt_ms, vs_autoep,
vs_hf, rounds, tokens_per_s_round_mean, vs_autoep_round_mean, profile, ...} or {"error"}}, "variants": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "integration") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common sits here, also when loaded by path

from bench_common import (  # noqa: E402
    _device_name, _git_commit, _versions, autoep_kernel, ensure_world, fill_counts, free_memory, gb, int_at_least,
    launcher_prefix, mem_allocated, peak_gb, reset_peak, resolve_out, synchronize)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "finetune.json"
ZERO2_CONFIG = REPO_ROOT / "configs" / "deepspeed" / "zero2.json"
ZERO_CONFIGS = {2: ZERO2_CONFIG, 3: REPO_ROOT / "configs" / "deepspeed" / "zero3.json"}
PEAK_FLOPS = 989e12  # H200 dense bf16 datasheet value (the same constant as switchyard.train.loop)
IMPLS = ("switchyard", "deepspeed_autoep", "hf_grouped_mm")
# switchyard with DeepSpeed's own ZeRO step, or its norm, clip and step (A/Bs of switchyard's, in the same rounds)
OPTIONAL_IMPLS = ("switchyard_deepspeed_step", "switchyard_deepspeed_norm", "switchyard_torch_gemm",
                  "switchyard_weighted_combine")
# Competitors first: switchyard's ProcessGroupManager registers its groups with DeepSpeed last, so it
# cannot change what the others ran with.
RUN_ORDER = ("hf_grouped_mm", "deepspeed_autoep", "switchyard_deepspeed_norm", "switchyard_deepspeed_step",
             "switchyard_torch_gemm", "switchyard_weighted_combine", "switchyard")
AUX_LOSS_COEF = 0.01
LR, WEIGHT_DECAY, CLIP = 1e-5, 0.01, 1.0


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int  # dense FFN = per-expert FFN (copy upcycling)
    experts: int
    top_k: int
    max_positions: int = 4096

    def params(self) -> dict[str, int]:
        """Total, expert and active parameter counts of the MoE model (untied embeddings, no biases)."""
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        expert = 3 * self.hidden * self.ffn
        per_layer_dense = attn + 2 * self.hidden + self.experts * self.hidden  # + 2 norms + router
        dense = 2 * self.vocab * self.hidden + self.hidden + self.layers * per_layer_dense
        experts = self.layers * self.experts * expert
        active = dense + self.layers * self.top_k * expert
        return {"total": dense + experts, "experts": experts, "dense": dense, "active": active,
                # what the matmuls of one token read: LM head, attention, router, top_k experts (not the
                # input embedding, a lookup, nor the norms' scales)
                "active_matmul": self.vocab * self.hidden + self.layers * (attn + self.experts * self.hidden
                                                                           + self.top_k * expert),
                "dense_model": dense - self.layers * self.experts * self.hidden + self.layers * expert}


# ~0.5B dense Llama/Qwen2-shaped model (GQA 12/4 heads of 128) -> 2.6B-parameter 8-expert top-2 MoE.
SHAPE = Shape(vocab=32000, hidden=1536, layers=16, heads=12, kv_heads=4, ffn=4096, experts=8, top_k=2)
TINY_SHAPE = Shape(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, experts=8, top_k=2,
                   max_positions=128)


def flops_formula(shape: Shape) -> str:
    return (f"MFU = 6 * matmul_params * tokens_per_s / {PEAK_FLOPS:.4g}; matmul_params = LM head + attention + "
            f"router + top_k experts per layer = {shape.params()['active_matmul']} (the input embedding, a lookup, "
            "and norm scales left out; attention score FLOPs not counted)")


def mfu(shape: Shape, tokens_per_s: float, gpus: int) -> float:
    """Model FLOPs utilisation: 6 FLOPs per matmul parameter a token passes through (forward + backward), over
    ``gpus`` GPUs' bf16 peak. Not the active parameter count: the input embedding is a row lookup."""
    return 6 * shape.params()["active_matmul"] * tokens_per_s / (PEAK_FLOPS * gpus)


# ----------------------------------------------------------------------------------------------------------
# World, configs, models
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every implementation shares."""

    shape: Shape
    device: torch.device
    dtype: torch.dtype
    batch: int
    seq_len: int
    input_ids: torch.Tensor  # [B, S] on device
    seed: int = 0
    moe_max_group_size: int | None = None
    experts_impl: str | None = None  # switchyard's GroupedExperts.impl ("auto" when None)
    cuda_graph: bool = False  # switchyard's MoELayer.cuda_graph (the --variant-cuda-graph experiment)
    # transformers' activation checkpointing of every decoder layer, for every implementation alike
    # (the --variant-gradient-checkpointing experiment; train.gradient_checkpointing in launch/finetune.py)
    gradient_checkpointing: bool = False
    ep: int = 1  # expert-parallel size = world size (--ep)
    zero_stage: int = 2  # configs/deepspeed/zero{2,3}.json (--zero-stage), the same for every implementation
    fused_grad_norm: bool = True  # switchyard's ZeRO-1/2 gradient norm (False: DeepSpeed's fp64 one)
    fused_step: bool = True  # switchyard's one-pass ZeRO-1/2 step (False: DeepSpeed's)
    grouped_gemm: str | None = None  # switchyard's experts' grouped-GEMM library (None: as the environment says;
    # "torch": torch's even where QuACK would run)
    fold_routing_weights: bool = True  # switchyard's MoELayer.fold_routing_weights

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


@dataclass
class Built:
    engine: Any
    variant: str
    notes: list[str] = field(default_factory=list)
    keep: list[Any] = field(default_factory=list)
    params_total: int | None = None
    params_experts: int | None = None
    grouped_gemm: str | None = None  # the grouped-GEMM library its steps run under (None: SWITCHYARD_GROUPED_GEMM's)


def ds_config(run: Run, **extra: Any) -> dict:
    from switchyard.deepspeed import fill_deepspeed_config

    config = fill_deepspeed_config(ZERO_CONFIGS[run.zero_stage], micro_batch_size=run.batch, grad_accum=1, dp_size=run.ep,
                                   clip=CLIP, precision=run.precision, ep_size=run.ep)
    config.update(extra)
    return config


def make_optimizer(model: nn.Module, run: "Run") -> torch.optim.Optimizer:
    """torch AdamW over ``optimizer_param_groups`` (its default MoE group size cap, ``MOE_MAX_GROUP_SIZE``;
    ``run.moe_max_group_size`` overrides it for the ``--variant-moe-max-group-size`` experiment)."""
    from switchyard.deepspeed import optimizer_param_groups

    cap = {"max_group_size": run.moe_max_group_size} if run.moe_max_group_size else {}
    groups = optimizer_param_groups(model, WEIGHT_DECAY, **cap)
    kwargs = {"fused": True} if run.device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=LR, **kwargs)


def llama_config(shape: Shape):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu")


def mixtral_config(shape: Shape):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        num_local_experts=shape.experts, num_experts_per_tok=shape.top_k, router_jitter_noise=0.0,
        output_router_logits=True, router_aux_loss_coef=AUX_LOSS_COEF, sliding_window=None, hidden_act="silu")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, expert) parameters; expert = tagged for DeepSpeed's expert groups or inside ``.experts``."""
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if getattr(p, "allreduce", True) is False or ".experts." in f".{name}.":
            experts += p.numel()
    return total, experts


def build_switchyard(run: Run, aux: bool) -> Built:
    ensure_world(run.device)
    from transformers import AutoModelForCausalLM

    import switchyard as sy
    from switchyard.deepspeed import initialize  # deepspeed.initialize; at ZeRO-3 with the experts placed

    groups = sy.ProcessGroupManager(ep=run.ep)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(llama_config(run.shape), dtype=torch.float32)
    sy.patch_model(model, sy.MoEConfig(num_experts=run.shape.experts, top_k=run.shape.top_k, init="copy",
                                       aux_loss_coef=AUX_LOSS_COEF), groups)
    model.to(dtype=run.dtype).train()
    if run.gradient_checkpointing:
        from switchyard.train.loop import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    impls = set()
    for module in model.modules():
        if isinstance(module, sy.moe.experts.GroupedExperts):
            module.impl = run.experts_impl or module.impl
            impls.add(module.impl)
        if isinstance(module, sy.MoELayer):
            module.cuda_graph = run.cuda_graph
            module.fold_routing_weights = run.fold_routing_weights
    total, experts = count_params(model)
    engine, _, _, _ = initialize(model=model, optimizer=make_optimizer(model, run), config=ds_config(run),
                                 mpu=groups.mpu, fused_grad_norm=run.fused_grad_norm, fused_step=run.fused_step)
    graph = ", cuda_graph" if run.cuda_graph else ""
    norm = "" if run.fused_grad_norm else ", DeepSpeed's grad norm and clip"
    step = "" if run.fused_step else ", DeepSpeed's ZeRO step"
    gemm = "" if run.grouped_gemm is None else f", grouped GEMMs: {run.grouped_gemm}"
    gemm += "" if run.fold_routing_weights else ", weights in the combine"
    return Built(engine, variant=f"switchyard.patch_model (upcycle, init=copy), experts impl {sorted(impls)}{graph}{norm}{step}{gemm}",
                 keep=[groups],
                 params_total=total, params_experts=experts, grouped_gemm=run.grouped_gemm)


def _mixtral(run: Run, aux: bool, experts_impl: str | None) -> nn.Module:
    from transformers import MixtralForCausalLM

    config = mixtral_config(run.shape)
    config.output_router_logits = aux
    if experts_impl is not None:
        config._experts_implementation = experts_impl
    with torch.device(run.device):
        model = MixtralForCausalLM(config)
    if experts_impl is not None and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts_impl)
    model.to(dtype=run.dtype).train()
    if run.gradient_checkpointing:
        from switchyard.train.loop import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model


def _probe_backward(model: nn.Module, run: Run) -> None:
    ids = run.input_ids[:1, : min(16, run.seq_len)]
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def build_hf_grouped_mm(run: Run, aux: bool) -> Built:
    ensure_world(run.device)
    import deepspeed

    notes = []
    model = _mixtral(run, aux, "grouped_mm")
    if run.device.type != "cuda":  # CPU grouped_mm has no dependable backward (ARCHITECTURE.md)
        try:
            _probe_backward(model, run)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use grouped_mm here"
            notes.append(f"grouped_mm failed here, ran eager: {type(exc).__name__}: {str(exc)[:160]}")
            del model
            model = _mixtral(run, aux, "eager")
    impl = getattr(model.config, "_experts_implementation", None)
    total, experts = count_params(model)
    if run.zero_stage == 3:  # transformers' MoE block as one ZeRO-3 unit, as DeepSpeed advises for MoE models
        from deepspeed.utils import set_z3_leaf_modules
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        set_z3_leaf_modules(model, [MixtralSparseMoeBlock])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, run),
                                           config=ds_config(run))
    return Built(engine, variant=f"MixtralForCausalLM, experts_implementation={impl}", notes=notes,
                 params_total=total, params_experts=experts)


def build_deepspeed_autoep(run: Run, aux: bool) -> Built:
    ensure_world(run.device)
    import deepspeed
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    ep = {"enabled": True, "autoep_size": run.ep, "preset_model": "mixtral"}
    notes = []
    if run.device.type != "cuda":
        ep["use_grouped_mm"] = False  # CPU torch._grouped_mm: no dependable backward
        notes.append("use_grouped_mm=false off CUDA")
    model = _mixtral(run, aux, None)
    # A callable: DeepSpeed calls it after AutoEP replaced the blocks, so the param groups see AutoEP's
    # expert parameters (tagged allreduce=False) and mark them moe=True, as ZeRO with MoE requires.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=lambda _params: make_optimizer(model, run),
                                           config=ds_config(run, expert_parallel=ep))
    layers = [m for m in engine.module.modules() if isinstance(m, AutoEPMoELayer)]
    if len(layers) != run.shape.layers:
        raise RuntimeError(f"AutoEP replaced {len(layers)} of {run.shape.layers} MoE blocks")
    kernel = autoep_kernel(layers[0].experts)
    total, n_experts = count_params(engine.module)
    return Built(engine, variant=f"AutoEPMoELayer x{len(layers)} ({kernel})", notes=notes,
                 params_total=total, params_experts=n_experts)


BUILDERS: dict[str, Callable[[Run, bool], Built]] = {
    "switchyard": build_switchyard,
    "switchyard_deepspeed_step": lambda run, aux: build_switchyard(dataclasses.replace(run, fused_step=False), aux),
    "switchyard_deepspeed_norm": lambda run, aux: build_switchyard(
        dataclasses.replace(run, fused_grad_norm=False, fused_step=False), aux),
    "switchyard_torch_gemm": lambda run, aux: build_switchyard(dataclasses.replace(run, grouped_gemm="torch"), aux),
    "switchyard_weighted_combine": lambda run, aux: build_switchyard(
        dataclasses.replace(run, fold_routing_weights=False), aux),
    "deepspeed_autoep": build_deepspeed_autoep,
    "hf_grouped_mm": build_hf_grouped_mm,
}


# ----------------------------------------------------------------------------------------------------------
# Timing, memory, profile
# ----------------------------------------------------------------------------------------------------------


class _GroupedMMSpy:
    """Counts calls of F.grouped_mm / torch._grouped_mm (which kernel a forward+backward reached)."""

    def __init__(self) -> None:
        self.calls = 0
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "_GroupedMMSpy":
        for owner, attr in ((F, "grouped_mm"), (torch, "_grouped_mm")):
            original = getattr(owner, attr, None)
            if original is None:
                continue

            def spy(*args, _orig=original, **kwargs):
                self.calls += 1
                return _orig(*args, **kwargs)

            setattr(owner, attr, spy)
            self._patched.append((owner, attr, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in self._patched:
            setattr(owner, attr, original)


def train_step(engine, input_ids: torch.Tensor, events: list | None = None, first: dict | None = None,
               annotate: bool = False) -> None:
    from torch.profiler import record_function

    phase = record_function if annotate else (lambda _name: contextlib.nullcontext())
    if events:
        events[0].record()
    with phase("phase:forward"):
        out = engine(input_ids=input_ids, labels=input_ids)
    loss = out.loss
    if first is not None:
        first["loss_first"] = float(loss.detach().float())
        with torch.no_grad():
            logits = out.logits[:, :-1].float()
            first["lm_loss_first"] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           input_ids[:, 1:].reshape(-1)))
            del logits
    del out
    if events:
        events[1].record()
    with phase("phase:backward"):
        engine.backward(loss)
    if events:
        events[2].record()
    with phase("phase:optimizer"):
        engine.step()
    if first is not None:  # the norm the step clipped with (switchyard's fused fp32 one vs DeepSpeed's fp64 one)
        norm = engine.get_global_grad_norm()
        first["grad_norm_first"] = None if norm is None else float(norm)
    if events:
        events[3].record()


def profile_steps(engine, input_ids: torch.Tensor, device: torch.device, steps: int, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(engine, input_ids, annotate=True)
        synchronize(device)
    rows, phases = [], {}
    for evt in prof.key_averages():
        if evt.key.startswith("phase:"):  # host time of the phase; its GPU span when the profiler gives one
            entry = phases.setdefault(evt.key[6:], {})
            entry["host_ms"] = round(max(evt.cpu_time_total / 1e3 / steps, entry.get("host_ms", 0.0)), 3)
            dev = getattr(evt, "device_time_total", None)
            if dev:
                entry["gpu_span_ms"] = round(dev / 1e3 / steps, 3)
            continue
        if evt.key.startswith(("Optimizer.", "ProfilerStep")):  # user annotations (Optimizer.step#AdamW.step)
            continue
        self_us = getattr(evt, "self_device_time_total", None)
        if self_us is None:
            self_us = getattr(evt, "self_cuda_time_total", 0)
        if self_us and self_us > 0 and getattr(evt, "device_type", None) != torch.autograd.DeviceType.CPU:
            rows.append((evt.key, self_us / 1e3 / steps, evt.count / steps))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    categories: dict[str, float] = {}
    for name, ms, _ in rows:
        categories[_kernel_category(name)] = categories.get(_kernel_category(name), 0.0) + ms
    return {"steps": steps, "kernel_ms_per_step": round(total, 3), "phases": phases,
            "by_category_ms_per_step": {k: round(v, 3) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:140], "ms_per_step": round(ms, 3), "calls_per_step": round(c, 1),
                             "share": round(ms / total, 4) if total else None} for n, ms, c in rows[:top]]}


_CATEGORIES = (
    ("grouped_gemm", ("grouped", "group_gemm", "groupedgemm", "grouped_mm", "groupproblem")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("comm", ("nccl",)),
    ("copy", ("memcpy", "memset", "copy_", "cat", "index", "gather", "scatter")),
)


def _kernel_category(name: str) -> str:
    low = name.lower()
    for category, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def _max_over_ranks(value: float, device: torch.device) -> float:
    """The largest rank's ``value`` (the value itself in a world of one)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _from_every_rank(mine: dict) -> list[dict]:
    """Every rank's ``mine``, in rank order, on every rank."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _per_rank(profile: dict) -> list[dict]:
    """Every rank's phase times and kernel time by category (rank order), from each rank's own profile."""
    keys = ("kernel_ms_per_step", "phases", "by_category_ms_per_step", "error")
    return _from_every_rank({k: profile[k] for k in keys if k in profile})


def _per_rank_timing(result: dict) -> list[dict]:
    """Every rank's own medians (rank order): a rank that is slower in every phase points to its host or its
    load, one that is slower only where the others wait points to the collectives."""
    return _from_every_rank({k: result.get(k) for k in ("ms_per_step", "fwd_ms", "bwd_ms", "opt_ms")})


def _ep_rank_load(model: nn.Module) -> dict | None:
    """Rows each EP rank's experts received in the last step, per MoE layer (switchyard's layers record what
    they routed to each global expert; summed over the EP group that is what each expert received). An EP
    rank whose experts get more rows computes longer, and the others wait for it in the combine all-to-all."""
    import torch.distributed as dist

    from switchyard.moe.layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.last_stats is not None]
    if not layers or layers[0].ep_size == 1:
        return None
    ep, num_experts = layers[0].ep_size, layers[0].num_experts
    counts_LE = torch.stack([layer.last_stats.tokens_per_expert_E.double() for layer in layers])
    dist.all_reduce(counts_LE, group=layers[0].dispatcher.ep_group)
    rows_LR = counts_LE.view(len(layers), ep, num_experts // ep).sum(-1)
    ratio_L = rows_LR.max(1).values / rows_LR.mean(1)
    heaviest_L = rows_LR.argmax(1)
    return {"rows_per_ep_rank_per_layer": rows_LR.long().tolist(),
            "max_over_mean_per_layer": [round(float(r), 4) for r in ratio_L],
            "max_over_mean_mean": round(float(ratio_L.mean()), 4),
            "heaviest_rank_count": [int((heaviest_L == r).sum()) for r in range(ep)]}


def _param_group_count(engine) -> int | None:
    """How many optimizer param groups (= ZeRO flat partitions = optimizer.step calls per step)."""
    basic = getattr(engine, "basic_optimizer", None)
    return len(basic.param_groups) if basic is not None else None


def run_impl(name: str, run: Run, warmup: int, steps: int, profile_n: int) -> dict:
    """Build, one sanity step, warm-up, timed steps, optional profile; failures become ``{"error"}``."""
    from switchyard.moe import grouped_gemm

    device = run.device
    result: dict = {}
    notes: list[str] = []
    attempts = (True,) if name.startswith("switchyard") else (True, False)  # aux (router logits) on, then off
    for aux in attempts:
        free_memory(device)
        baseline = mem_allocated(device)
        reset_peak(device)
        built: Built | None = None
        t_build = time.perf_counter()
        torch.manual_seed(run.seed)  # the same random weights on every run of one implementation
        steps_context = contextlib.ExitStack()
        try:
            built = BUILDERS[name](run, aux)
            if built.grouped_gemm is not None:
                steps_context.enter_context(grouped_gemm.use_backend(built.grouped_gemm))
            engine = built.engine
            engine.train()
            build_s = time.perf_counter() - t_build
            build_peak_mem_gb = peak_gb(device, baseline)
            first: dict = {}
            with _GroupedMMSpy() as spy:
                train_step(engine, run.input_ids, first=first)  # step 1 of the warm-up
            synchronize(device)
            for _ in range(max(warmup - 1, 0)):
                train_step(engine, run.input_ids)
            synchronize(device)
            reset_peak(device)
            times, fwd, bwd, opt = [], [], [], []
            t0 = time.perf_counter()
            for _ in range(steps):
                events = ([torch.cuda.Event(enable_timing=True) for _ in range(4)]
                          if device.type == "cuda" else None)
                ts = time.perf_counter()
                train_step(engine, run.input_ids, events)
                synchronize(device)
                times.append((time.perf_counter() - ts) * 1e3)
                if events:
                    fwd.append(events[0].elapsed_time(events[1]))
                    bwd.append(events[1].elapsed_time(events[2]))
                    opt.append(events[2].elapsed_time(events[3]))
            wall = _max_over_ranks(time.perf_counter() - t0, device)
            peak_mem_gb = peak_gb(device, baseline)
            if peak_mem_gb is not None:
                peak_mem_gb = _max_over_ranks(peak_mem_gb, device)
            tokens = run.batch * run.seq_len * steps * run.ep  # every rank's tokens
            tps = tokens / wall
            median_ms = _max_over_ranks(statistics.median(times), device)
            result = {
                "tokens_per_s": round(tps, 1),
                "ms_per_step": round(median_ms, 3),
                "tokens_per_s_median": round(run.batch * run.seq_len * run.ep / (median_ms / 1e3), 1),
                "mfu": round(mfu(run.shape, tps, run.ep), 4) if device.type == "cuda" else None,
                "peak_mem_gb": peak_mem_gb,
                "build_peak_mem_gb": build_peak_mem_gb,
                "mem_before_build_gb": gb(baseline),
                **first,
                "fwd_ms": round(statistics.median(fwd), 3) if fwd else None,
                "bwd_ms": round(statistics.median(bwd), 3) if bwd else None,
                "opt_ms": round(statistics.median(opt), 3) if opt else None,
                "ms_min": round(min(times), 3), "ms_max": round(max(times), 3), "steps": steps,
                "build_s": round(build_s, 1),
                "router_loss_in_loss": aux,
                "grouped_mm_calls_first_step": spy.calls,
                "params_total": built.params_total, "params_experts": built.params_experts,
                "variant": built.variant,
                # transformers' own flag: whether the model really checkpoints its decoder layers
                "gradient_checkpointing": bool(getattr(engine.module, "is_gradient_checkpointing", False)),
                "optimizer_param_groups": _param_group_count(engine),
            }
            notes += built.notes
            if run.ep > 1:
                result["per_rank_timing"] = _per_rank_timing(result)
                result["ep_rank_load"] = _ep_rank_load(engine.module)
            if profile_n > 0:
                try:
                    result["profile"] = profile_steps(engine, run.input_ids, device, profile_n)
                except Exception as exc:  # noqa: BLE001 - a profile failing keeps the timing
                    result["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
                if run.ep > 1:  # which rank waits for which: every rank's phases and kernel time by category
                    result["profile_per_rank"] = _per_rank(result["profile"])
            break
        except Exception as exc:  # noqa: BLE001 - one implementation failing must not end the run
            print(f"[{name}] failed (router logits {'on' if aux else 'off'}):\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            if run.ep > 1:  # a rank going on alone would wait forever in its next collective: end them all
                raise
            err = f"{type(exc).__name__}: {str(exc)[:600]}"
            result = {"error": err}
            if aux and len(attempts) > 1:
                notes.append(f"with output_router_logits=True it failed ({err[:200]}); retried without")
        finally:
            steps_context.close()
            if built is not None:
                destroy = getattr(built.engine, "destroy", None)
                if callable(destroy):
                    try:
                        destroy()
                    except Exception:  # noqa: BLE001
                        pass
            built = engine = None  # noqa: F841
            free_memory(device)
    if notes:
        result["notes"] = notes
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


ROUND_KEYS = ("tokens_per_s", "tokens_per_s_median", "ms_per_step", "fwd_ms", "bwd_ms", "opt_ms", "peak_mem_gb")


def merge_round(best: dict | None, new: dict, rnd: int, position: int) -> dict:
    """Keep the round with the higher tokens/s (its fields), list every round under ``rounds``; the profile
    (round 1 only) stays."""
    summary = {"round": rnd + 1, "position": position + 1,
               **({k: new.get(k) for k in ROUND_KEYS} if "error" not in new else {"error": new["error"]})}
    if best is None:
        return {**new, "rounds": [summary]}
    rounds = [*best.get("rounds", []), summary]
    profile = best.get("profile") or new.get("profile")
    if "error" in best or ("error" not in new and new["tokens_per_s"] > best["tokens_per_s"]):
        best = dict(new)
    best = {k: v for k, v in best.items() if k not in ("rounds", "profile")}
    best["rounds"] = rounds
    if profile is not None:
        best["profile"] = profile
    return best


def round_mean(entry: dict) -> float | None:
    """Mean tokens/s over the rounds, None unless every round ran. With the rounds in opposite orders every
    implementation runs once early and once late in the process, so an effect of the position (a drift over
    the process's life, clock or allocator state) cancels, where the best round favours the better position."""
    rounds = entry.get("rounds") or []
    if not rounds or any("error" in r or not r.get("tokens_per_s") for r in rounds):
        return None
    return sum(r["tokens_per_s"] for r in rounds) / len(rounds)


def add_ratios(results: dict) -> None:
    for entry in results.values():
        mean = round_mean(entry)
        if mean is not None:
            entry["tokens_per_s_round_mean"] = round(mean, 1)
    ref_mean = results.get("deepspeed_autoep", {}).get("tokens_per_s_round_mean")
    for entry in results.values():
        if ref_mean and entry.get("tokens_per_s_round_mean"):
            entry["vs_autoep_round_mean"] = round(entry["tokens_per_s_round_mean"] / ref_mean, 3)
    for ref, key in (("deepspeed_autoep", "vs_autoep"), ("hf_grouped_mm", "vs_hf")):
        ref_tps = results.get(ref, {}).get("tokens_per_s")
        ref_mem = results.get(ref, {}).get("peak_mem_gb")
        for entry in results.values():
            if ref_tps and entry.get("tokens_per_s"):
                entry[key] = round(entry["tokens_per_s"] / ref_tps, 3)
            if ref_mem and entry.get("peak_mem_gb") is not None:
                entry[f"mem_{key}"] = round(entry["peak_mem_gb"] / ref_mem, 3)


def target_check(results: dict, ep: int = 1) -> dict:
    sy_r, ep_r = results.get("switchyard", {}), results.get("deepspeed_autoep", {})
    if "tokens_per_s" not in sy_r or "tokens_per_s" not in ep_r:
        return {"met": None, "why": "switchyard or deepspeed_autoep has no result"}
    speed = sy_r["tokens_per_s"] / ep_r["tokens_per_s"]
    mem_ok = (sy_r.get("peak_mem_gb") is not None and ep_r.get("peak_mem_gb") is not None
              and sy_r["peak_mem_gb"] <= ep_r["peak_mem_gb"])
    mean = {"speedup_vs_autoep_round_mean": sy_r.get("vs_autoep_round_mean")}
    if ep > 1:  # the target is stated against autoep_size=1 on one GPU
        return {"met": None, "why": f"the target compares against AutoEP at autoep_size=1; this run is ep={ep}",
                "speedup_vs_autoep": round(speed, 3), **mean, "memory_le_autoep": mem_ok}
    return {"target": ">= 1.3x AutoEP tokens/s at equal or lower peak memory",
            "speedup_vs_autoep": round(speed, 3), **mean, "speed_met": speed >= 1.3, "memory_met": mem_ok,
            "met": speed >= 1.3 and mem_ok}


def print_table(results: dict) -> None:
    headers = ["impl", "tokens/s", "ms/step", "fwd", "bwd", "opt", "MFU", "peak GB", "vs autoep",
               "vs autoep (round mean)", "vs hf", "loss1", "lm1", "variant / error"]
    rows = []
    for impl in [i for i in IMPLS + OPTIONAL_IMPLS if i in results]:
        r = results[impl]

        def f(key: str, fmt: str) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"

        rows.append([impl, f("tokens_per_s", ".0f"), f("ms_per_step", ".1f"), f("fwd_ms", ".1f"), f("bwd_ms", ".1f"),
                     f("opt_ms", ".1f"), f("mfu", ".1%"), f("peak_mem_gb", ".2f"), f("vs_autoep", ".2f"),
                     f("vs_autoep_round_mean", ".2f"), f("vs_hf", ".2f"), f("loss_first", ".3f"), f("lm_loss_first", ".3f"),
                     (r.get("error") or r.get("variant") or "")[:90]])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", nargs="+", choices=list(IMPLS + OPTIONAL_IMPLS), default=list(IMPLS),
                   help="default: %(default)s; switchyard_deepspeed_step = switchyard with DeepSpeed's own ZeRO-1/2 "
                        "step instead of its one-pass one (switchyard/deepspeed/zero_step.py); "
                        "switchyard_deepspeed_norm = with DeepSpeed's gradient norm, clip and step "
                        "(switchyard/deepspeed/grad_norm.py too); both in the same rounds")
    p.add_argument("--batch", type=int_at_least(1), default=None, help="micro-batch (default 8; 2 with --tiny)")
    p.add_argument("--seq-len", type=int_at_least(2), default=None,
                   help="sequence length, 2 or more for a next-token loss (default 1024; 32 with --tiny)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="timed steps (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=int_at_least(1), default=None, help="untimed steps, the first is the sanity "
                   "step (default 3; 1 with --tiny)")
    p.add_argument("--profile-steps", type=int_at_least(0), default=None,
                   help="steps under torch.profiler after timing (default 2 on CUDA, 0 otherwise)")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shape, fp32, 2 steps: a CPU test of the logic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ep", type=int_at_least(1), default=1,
                   help="expert-parallel size = the launcher's world size (torchrun / deepspeed, one GPU per rank); "
                        "hf_grouped_mm is left out above 1")
    p.add_argument("--rounds", type=int_at_least(1), default=None,
                   help="rounds over the implementations, alternating forward and reverse order; the round with "
                        "the higher tokens/s is reported, all are listed (default 2 on CUDA, 1 otherwise)")
    p.add_argument("--variant-moe-max-group-size", type=int_at_least(1), default=None, metavar="N",
                   help="after the main runs, rerun switchyard and deepspeed_autoep with the MoE param-group "
                        "size cap set to N elements (an experiment; stored under 'variants')")
    p.add_argument("--zero-stage", type=int, choices=sorted(ZERO_CONFIGS), default=2,
                   help="ZeRO stage of every implementation (configs/deepspeed/zero<N>.json); at 3 the weights are "
                        "partitioned too (switchyard: switchyard.deepspeed.initialize; AutoEP: its own ZeRO-3 support; "
                        "transformers' block as a ZeRO-3 leaf module)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="run the rounds themselves with activation checkpointing of every decoder layer, for every "
                        "implementation (so its timing alternates the order like the default's; meta.gradient_checkpointing)")
    p.add_argument("--variant-gradient-checkpointing", action="store_true",
                   help="after the rounds, rerun every implementation with activation checkpointing of every decoder "
                        "layer (stored under 'variants')")
    p.add_argument("--variant-cuda-graph", action="store_true",
                   help="after the rounds, rerun switchyard with MoELayer.cuda_graph on (stored under 'variants')")
    p.add_argument("--variant-experts-impl", default=None, metavar="IMPL",
                   help="after the main runs, rerun switchyard with every MoE layer's GroupedExperts.impl = IMPL "
                        "(e.g. grouped_mm, swiglu_per_expert; stored under 'variants')")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; a temp file with --tiny)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed's
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ep != world:
        p.error(f"--ep {args.ep} needs a world of {args.ep} ranks, this one has {world}: "
                f"launch with torchrun --nproc_per_node {args.ep} (or deepspeed --num_gpus {args.ep})")
    if args.gradient_checkpointing and args.variant_gradient_checkpointing:
        p.error("--variant-gradient-checkpointing reruns with checkpointing, which --gradient-checkpointing already "
                "gives the rounds: pass one of them")
    if args.ep > 1:
        args.impls = [i for i in args.impls if i != "hf_grouped_mm"]
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    fill_counts(args, batch=(2, 8), seq_len=(32, 1024), steps=(2, 20), warmup=(1, 3))
    if args.rounds is None:
        args.rounds = 2 if args.device.type == "cuda" and not args.tiny else 1
    if args.profile_steps is None:
        args.profile_steps = 2 if args.device.type == "cuda" and not args.tiny else 0
    resolve_out(p, args, DEFAULT_OUT, "finetune_tiny.json", "the full shape on CPU takes very long")
    return args


def main(argv: list[str] | None = None) -> dict:
    from switchyard.deepspeed.config import MOE_MAX_GROUP_SIZE

    args = parse_args(argv)
    shape = TINY_SHAPE if args.tiny else SHAPE
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rank = 0
    if args.ep > 1:
        import torch.distributed as dist

        ensure_world(args.device)
        rank = dist.get_rank()
    gen = torch.Generator().manual_seed(args.seed + rank)  # every data-parallel rank its own batch
    input_ids = torch.randint(0, shape.vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
    run = Run(shape, args.device, dtype, args.batch, args.seq_len, input_ids, args.seed, ep=args.ep,
              gradient_checkpointing=args.gradient_checkpointing, zero_stage=args.zero_stage)
    argv_used = [a for a in (sys.argv[1:] if argv is None else argv)
                 if not a.startswith(("--local_rank", "--local-rank"))]  # the deepspeed launcher adds it
    meta = {
        "command": shlex.join([*launcher_prefix(args.ep), "benchmarks/finetune.py", *argv_used]),
        **_versions(("deepspeed", "triton", "quack"), python=True, error_detail=False),
        "device": _device_name(args.device),
        "shape": {**asdict(shape), "model": "llama (switchyard, upcycled) / mixtral (deepspeed_autoep, hf_grouped_mm)",
                  "params": shape.params()},
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch * args.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "profile_steps": args.profile_steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": run.precision,
        "training": {"zero_stage": args.zero_stage,
                     "config": f"configs/deepspeed/zero{args.zero_stage}.json via fill_deepspeed_config",
                      "optimizer": f"torch.optim.AdamW(lr={LR}, weight_decay={WEIGHT_DECAY}"
                                   f"{', fused=True' if args.device.type == 'cuda' else ''}) over "
                                   "switchyard.deepspeed.optimizer_param_groups", "gradient_clipping": CLIP,
                      "moe_max_group_size": MOE_MAX_GROUP_SIZE,
                      "bf16_check_grad_overflow": json.loads(ZERO_CONFIGS[args.zero_stage].read_text()).get("bf16", {}).get(
                          "check_grad_overflow", True),
                      "world_size": args.ep, "ep": args.ep,
                      "grad_norm": "switchyard and switchyard_deepspeed_step: fused fp32 norm, ZeRO-1/2 clip "
                                   "without host syncs (switchyard/deepspeed/grad_norm.py); deepspeed_autoep, "
                                   "hf_grouped_mm and switchyard_deepspeed_norm: DeepSpeed's",
                      "zero_step": "switchyard: cast, clip, AdamW and bf16 copy in one pass per param group "
                                   "(switchyard/deepspeed/zero_step.py); every other implementation: DeepSpeed's"},
        "aux_loss_coef": AUX_LOSS_COEF,
        "flops_formula": flops_formula(shape),
        "peak_flops": PEAK_FLOPS,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "tiny": args.tiny,
        "timing": "tokens_per_s = batch*seq_len*steps / wall time of the timed steps (each ended by a device "
                  "synchronize); ms_per_step and fwd/bwd/opt_ms are medians; with rounds > 1 the implementations "
                  "run in RUN_ORDER, then reversed, and the round with the higher tokens_per_s is reported "
                  "(all rounds under 'rounds')",
        "peak_mem": "GiB, torch.cuda.max_memory_allocated during the timed steps (stats reset after warm-up) minus "
                    "memory allocated before the implementation was built",
        "ratios": "vs_autoep / vs_hf = tokens_per_s ratios; mem_vs_* = peak_mem_gb ratios",
    }
    results: dict = {}
    variants: dict = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        if rank != 0:
            return
        ordered = {impl: results[impl] for impl in IMPLS + OPTIONAL_IMPLS if impl in results}
        data = {"meta": meta, "results": ordered}
        if variants:
            data["variants"] = variants
        args.out.write_text(json.dumps(data, indent=2) + "\n")

    if args.device.type == "cuda":  # wake the clocks before the first implementation
        a = torch.randn(4096, 4096, device=args.device, dtype=dtype)
        for _ in range(20):
            a @ a
        synchronize(args.device)
        del a
    order = [i for i in RUN_ORDER if i in args.impls]
    for rnd in range(args.rounds):
        for position, impl in enumerate(order if rnd % 2 == 0 else order[::-1]):
            print(f"[finetune] round {rnd + 1}/{args.rounds}: {impl} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            r = run_impl(impl, run, args.warmup, args.steps, args.profile_steps if rnd == 0 else 0)
            print(f"[finetune] {impl} done in {time.perf_counter() - t:.1f}s: "
                  f"{ {k: v for k, v in r.items() if k != 'profile'} }", file=sys.stderr, flush=True)
            results[impl] = merge_round(results.get(impl), r, rnd, position)
            add_ratios(results)
            meta["target"] = target_check(results, args.ep)
            write()
    add_ratios(results)
    meta["target"] = target_check(results, args.ep)
    write()
    if rank == 0:
        print_table(results)
    experiments = []
    if args.variant_moe_max_group_size:
        experiments.append((
            f"moe_max_group_size={args.variant_moe_max_group_size}",
            "switchyard and deepspeed_autoep rerun (same process, same inputs) with "
            "split_params_into_different_moe_groups_for_optimizer(max_group_size="
            f"{args.variant_moe_max_group_size}) instead of optimizer_param_groups' default {MOE_MAX_GROUP_SIZE}",
            dataclasses.replace(run, moe_max_group_size=args.variant_moe_max_group_size),
            [i for i in RUN_ORDER if i in args.impls and i != "hf_grouped_mm"]))
    if args.variant_experts_impl:
        experiments.append((
            f"experts_impl={args.variant_experts_impl}",
            f"switchyard rerun (same process, same inputs) with every GroupedExperts.impl = "
            f"{args.variant_experts_impl!r} instead of 'auto'",
            dataclasses.replace(run, experts_impl=args.variant_experts_impl), ["switchyard"]))
    if args.variant_gradient_checkpointing:
        experiments.append((
            "gradient_checkpointing",
            "every implementation rerun (same process, same inputs) with transformers' activation checkpointing of "
            "every decoder layer, non-reentrant (switchyard.train.loop.enable_gradient_checkpointing, what "
            "train.gradient_checkpointing does in launch/finetune.py)",
            dataclasses.replace(run, gradient_checkpointing=True), [i for i in RUN_ORDER if i in args.impls]))
    if args.variant_cuda_graph:
        experiments.append((
            "cuda_graph",
            "switchyard rerun (same process, same inputs) with MoELayer.cuda_graph = True on every MoE layer "
            "(docs/moe-layer.md); its peak_mem_gb undercounts: the graph pools' blocks that no tensor owns are "
            "not counted as allocated",
            dataclasses.replace(run, cuda_graph=True), ["switchyard"]))
    for key, what, vrun, vimpls in experiments:
        variants[key] = {"what": what, "results": {}}
        for impl in vimpls:
            print(f"[finetune] {impl} ({key}) ...", file=sys.stderr, flush=True)
            variants[key]["results"][impl] = r = run_impl(impl, vrun, args.warmup, args.steps, args.profile_steps)
            print(f"[finetune] {impl} ({key}): { {k: v for k, v in r.items() if k != 'profile'} }",
                  file=sys.stderr, flush=True)
            write()
        if rank == 0:
            print(f"variant {key}:")
            print_table(variants[key]["results"])
    if rank == 0:
        print(f"target: {meta['target']}")
        print(f"wrote {args.out}")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    from switchyard.parallel.process_exit import exit_without_teardown

    main()
    exit_without_teardown(0)
