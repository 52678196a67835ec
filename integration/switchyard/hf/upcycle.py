"""Expert and router initializers that upcycle one dense FFN into E experts (``MoEConfig.init``).

Every rank builds only its own experts, and all ranks must agree: the randomness of expert ``e``
comes from a CPU generator seeded with ``(seed, e)`` alone, so ranks building experts 0..3 and 4..7
together equal one process building 0..7, on any device. The router is small and dense: every rank
builds all of it from ``seed``.

Methods (``INITIALIZERS``, one function per expert):

* ``copy`` — every expert is the dense FFN, router ~ N(0, 0.02). Output-preserving: the routed
  output is ``(sum of the k weights) * dense(x)``, i.e. exactly ``dense(x)`` when the weights sum to
  1 (softmax + ``norm_topk_prob``, top-k-then-softmax, sigmoid + ``norm_topk_prob``) and no copy is
  dropped. With softmax and ``norm_topk_prob=False`` it is scaled by the top-k probability mass (< 1).
* ``granular`` — arXiv:2410.07524 / Megatron-Core ``upcycling_utils``: see ``_granular``.
* ``drop_upcycle`` — arXiv:2502.19261: copy, then re-draw a fraction of each expert's intermediate
  units from the dense matrices' statistics (diversity from step 0, most knowledge kept).
* ``random`` — ``nn.Linear``'s default init per expert (the only method that may change F).

Shared experts are not part of any method: ``init_shared_experts`` starts them at zero output (dense
units in, zero down projection out), so they never break the output preservation of copy/granular.

Tensor suffixes: E global experts, L experts built here, H hidden, F dense FFN size, F' expert size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from switchyard.config import MoEConfig
from switchyard.hf.architectures import DenseFFN
from switchyard.log import get_logger

if TYPE_CHECKING:
    from switchyard.moe.layer import MoELayer

log = get_logger(__name__)

ROUTER_STD = 0.02  # HF's initializer_range: near-uniform routing at step 0
_SEED_STRIDE = 1_000_003  # (seed, expert) -> one generator seed; expert ids stay below the router's slot
_ROUTER_SLOT = _SEED_STRIDE - 1

ExpertInit = Callable[[DenseFFN, MoEConfig, int, int], DenseFFN]


def expert_generator(seed: int, expert_id: int) -> torch.Generator:
    """The only source of randomness for expert ``expert_id``: the same on every rank and device.

    Taken modulo 2**64, the range ``manual_seed`` accepts: a user seed of 2**32 - 1 times the per-layer and
    per-expert strides exceeds it (it raised "Overflow when unpacking long long"); smaller products are unchanged.
    """
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + expert_id) % (1 << 64))


# MoEConfig.extra keys each initializer reads; nothing else reads ``extra``
EXTRA_KEYS: dict[str, tuple[str, ...]] = {"granular": ("granularity",), "drop_upcycle": ("drop_ratio",)}


def check_extra(config: MoEConfig) -> None:
    """A misspelt ``extra`` key would silently leave its default in place: refuse it; warn about a key that
    another init reads (it does nothing for this one)."""
    known = sorted({k for keys in EXTRA_KEYS.values() for k in keys})
    unknown = sorted(set(config.extra) - set(known))
    if unknown:
        raise ValueError(f"MoEConfig.extra keys {unknown} are unknown; the upcycling initializers read {known} "
                         f"({', '.join(f'{k!r} for init={i!r}' for i, ks in EXTRA_KEYS.items() for k in ks)})")
    unused = sorted(set(config.extra) - set(EXTRA_KEYS.get(config.init, ())))
    if unused:
        log.warning(f"MoEConfig.extra {unused} is ignored with init={config.init!r}", ranks=[0])


def granularity(config: MoEConfig) -> int:
    """G for granular upcycling: ``extra["granularity"]``, default ``top_k``; 1 for other methods."""
    if config.init != "granular":
        return 1
    g = config.extra.get("granularity", config.top_k)
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ValueError(f"MoEConfig.extra['granularity'] must be a positive integer, got {g!r}")
    return g


def expert_intermediate_size(dense: DenseFFN, config: MoEConfig) -> int:
    """F': F // G for granular, F otherwise; ``config.intermediate_size`` may differ only for random."""
    f, g = dense.intermediate_size, granularity(config)
    if f % g:
        raise ValueError(f"granular upcycling splits the FFN size {f} into granularity={g} shards; {g} must divide {f}")
    default = f // g
    wanted = config.intermediate_size
    if wanted is not None and wanted != default and config.init != "random":
        raise ValueError(
            f"MoEConfig.intermediate_size={wanted} differs from the {config.init!r} expert size {default} "
            f"(dense FFN size {f}{f' / granularity {g}' if g > 1 else ''}); only init='random' can change it"
        )
    return wanted or default


def expert_fields(dense: DenseFFN) -> dict[str, Any]:
    """MoEConfig fields the experts must share with the dense FFN they come from."""
    return {"activation": dense.activation, "gated": dense.gated, "bias": dense.has_bias}


def output_preserving_issues(config: MoEConfig) -> list[str]:
    """Why a ``copy``/``granular`` layer would *not* reproduce the dense output at step 0 (empty: it does)."""
    issues = []
    weights_sum_to_one = config.norm_topk_prob or (config.score_func == "softmax" and not config.softmax_before_topk)
    if not weights_sum_to_one:
        issues.append("norm_topk_prob=False: the k routing weights sum to less than 1, scaling the output")
    if config.routed_scaling_factor != 1.0:
        issues.append(f"routed_scaling_factor={config.routed_scaling_factor} scales the output")
    if config.router_jitter > 0 and config.jitter_experts_input:
        issues.append(f"router_jitter={config.router_jitter} with jitter_experts_input scales the experts' input "
                      "in training")
    for name in ("capacity_factor", "eval_capacity_factor"):  # training / eval mode
        if getattr(config, name) is not None:
            issues.append(f"{name}={getattr(config, name)} drops token copies over capacity")
    g = granularity(config)
    if g > 1 and config.top_k % g:
        issues.append(f"granular: top_k={config.top_k} is not a multiple of granularity={g}")
    if g > 1 and config.n_group is not None and (config.num_experts // config.n_group) % g:
        per_group = config.num_experts // config.n_group
        issues.append(f"granular: routing groups of {per_group} experts split copy groups of {g}")
    return issues


# -- one expert per call ------------------------------------------------------------------------
def _copy(dense: DenseFFN, config: MoEConfig, expert_id: int, seed: int) -> DenseFFN:
    return dense


def _granular(dense: DenseFFN, config: MoEConfig, expert_id: int, seed: int) -> DenseFFN:
    """Expert ``e`` = shard ``e % G`` of copy group ``e // G``; down_proj × G, down_bias as is.

    Why exact: shard s holds intermediate units ``[s F', (s+1) F')``, so ``dense(x) = Σ_s down_s h_s(x)
    + b``. The router gives all G experts of a copy group the same row (``init_router``), hence equal
    scores; when top_k = m·G, top-k picks whole groups (G equal maxima — only a tie between groups,
    probability 0 for random rows, could split one; should a GEMM round identical rows differently,
    scores move by an ulp, the set is unchanged and weights move by ~1e-7), and the renormalized
    weights are ``p_c / (G Σ p)`` per shard. Summing ``w · G · down_s h_s`` over the chosen shards
    gives ``Σ_c (p_c/Σp) dense(x) = dense(x)``; the biases ``b`` weighted by weights that sum to 1
    give ``b``. All of the ×G sits on the linear down projection, so this holds for any activation
    (Megatron instead spreads the factor as G^(1/3) over fc1 and fc2, exact only for positively
    homogeneous activations such as ReLU).
    """
    g = granularity(config)
    f_shard = dense.intermediate_size // g
    rows = slice((expert_id % g) * f_shard, (expert_id % g + 1) * f_shard)

    def part(t: Tensor | None) -> Tensor | None:
        return t[rows] if t is not None else None

    up = dense.up[rows]
    return DenseFFN(up, dense.down[:, rows] * g, part(dense.gate), part(dense.up_bias),
                    part(dense.gate_bias), dense.down_bias, dense.activation)


def _drop_ratio(config: MoEConfig) -> float:
    r = config.extra.get("drop_ratio", 0.5)
    if not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"MoEConfig.extra['drop_ratio'] must be in [0, 1], got {r!r}")
    return float(r)


def _redraw(t: Tensor | None, idx: Tensor, dim: int, gen: torch.Generator) -> Tensor | None:
    """``t`` with the slices ``idx`` along ``dim`` re-drawn from N(mean(t), std(t)) (whole-matrix stats)."""
    if t is None:
        return None
    t32 = t.float()
    std = t32.std().item() if t.numel() > 1 else 0.0
    shape = list(t.shape)
    shape[dim] = idx.numel()
    fresh = torch.normal(t32.mean().item(), std, shape, generator=gen)
    out = t.clone()
    out.index_copy_(dim, idx.to(t.device), fresh.to(t.device, t.dtype))
    return out


def _drop_upcycle(dense: DenseFFN, config: MoEConfig, expert_id: int, seed: int) -> DenseFFN:
    """Re-draw ``round(r F)`` random intermediate units per expert: their gate/up rows, down columns and
    gate/up biases, each from the mean/std of its dense matrix (the paper's per-matrix statistics);
    down_bias (not indexed by units) stays the dense one."""
    f = dense.intermediate_size
    gen = expert_generator(seed, expert_id)
    idx = torch.randperm(f, generator=gen)[: round(_drop_ratio(config) * f)]
    # Fixed draw order keeps the result a function of (seed, expert_id) only.
    gate, up = _redraw(dense.gate, idx, 0, gen), _redraw(dense.up, idx, 0, gen)
    down = _redraw(dense.down, idx, 1, gen)
    gate_b, up_b = _redraw(dense.gate_bias, idx, 0, gen), _redraw(dense.up_bias, idx, 0, gen)
    return DenseFFN(up, down, gate, up_b, gate_b, dense.down_bias, dense.activation)  # type: ignore[arg-type]


def _random(dense: DenseFFN, config: MoEConfig, expert_id: int, seed: int) -> DenseFFN:
    """nn.Linear's default: U(±1/sqrt(fan_in)) for weights and biases (fan_in H for gate/up, F' for down)."""
    f, h = expert_intermediate_size(dense, config), dense.hidden_size
    gen = expert_generator(seed, expert_id)

    def uniform(*shape: int, fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen).to(dense.up.device, dense.up.dtype)

    gate = uniform(f, h, fan_in=h) if dense.gated else None
    up, down = uniform(f, h, fan_in=h), uniform(h, f, fan_in=f)
    biased = dense.has_bias
    return DenseFFN(up, down, gate, uniform(f, fan_in=h) if biased else None,
                    uniform(f, fan_in=h) if biased and dense.gated else None,
                    uniform(h, fan_in=f) if biased else None, dense.activation)


INITIALIZERS: dict[str, ExpertInit] = {
    "copy": _copy,
    "granular": _granular,
    "drop_upcycle": _drop_upcycle,
    "random": _random,
}


def _check_ids(config: MoEConfig, expert_ids: list[int]) -> None:
    bad = [e for e in expert_ids if not isinstance(e, int) or not 0 <= e < config.num_experts]
    if bad or len(set(expert_ids)) != len(expert_ids):
        raise ValueError(f"expert_ids must be distinct ints in [0, {config.num_experts}), got {expert_ids}")


def init_experts(dense: DenseFFN, config: MoEConfig, expert_ids: list[int], seed: int = 0) -> dict[str, Tensor]:
    """Tensors for ``expert_ids`` only, stacked in that order, under ``GroupedExperts`` parameter names.

    ``gate_up_proj`` [L, 2F', H] (gate rows first) or ``up_proj`` [L, F', H]; ``down_proj`` [L, H, F'];
    ``*_bias`` when the dense FFN has any bias (missing ones are zeros). Structure (gated, bias,
    activation) follows the dense FFN — build the layer with ``expert_fields(dense)``. Each expert is
    written into the output and dropped, so only one expert's temporaries exist at a time.
    """
    g = granularity(config)
    if config.num_experts % g:
        raise ValueError(f"granular upcycling needs num_experts={config.num_experts} divisible by granularity={g}")
    f, h = expert_intermediate_size(dense, config), dense.hidden_size
    _check_ids(config, expert_ids)
    n, kw = len(expert_ids), {"dtype": dense.up.dtype, "device": dense.up.device}
    up_name = "gate_up_proj" if dense.gated else "up_proj"
    o = 2 * f if dense.gated else f
    out = {up_name: torch.empty(n, o, h, **kw), "down_proj": torch.empty(n, h, f, **kw)}
    if dense.has_bias:
        out.update({f"{up_name}_bias": torch.zeros(n, o, **kw), "down_proj_bias": torch.zeros(n, h, **kw)})
    init = INITIALIZERS[config.init]
    for slot, expert_id in enumerate(expert_ids):
        expert = init(dense, config, expert_id, seed)
        up_rows = slice(f, 2 * f) if dense.gated else slice(0, f)
        out[up_name][slot, up_rows] = expert.up
        out["down_proj"][slot] = expert.down
        if expert.gate is not None:
            out[up_name][slot, :f] = expert.gate
        for bias, target, rows in ((expert.up_bias, f"{up_name}_bias", up_rows),
                                   (expert.gate_bias, f"{up_name}_bias", slice(0, f)),
                                   (expert.down_bias, "down_proj_bias", slice(None))):
            if bias is not None:
                out[target][slot, rows] = bias
    return out


def init_router(dense: DenseFFN, config: MoEConfig, seed: int = 0) -> Tensor:
    """Router weight [E, H] ~ N(0, 0.02), from ``seed`` alone; granular: one row per copy group, repeated
    for its G consecutive experts (Megatron's ``_process_router_param`` layout) so they tie exactly."""
    g = granularity(config)
    if config.num_experts % g:
        raise ValueError(f"granular upcycling needs num_experts={config.num_experts} divisible by granularity={g}")
    gen = expert_generator(seed, _ROUTER_SLOT)
    rows = torch.randn(config.num_experts // g, dense.hidden_size, generator=gen) * ROUTER_STD
    return rows.repeat_interleave(g, dim=0).to(dense.up.device, dense.up.dtype)


def init_shared_experts(dense: DenseFFN, config: MoEConfig, seed: int = 0) -> dict[str, Tensor]:
    """Shared-expert tensors (keys relative to ``MoELayer``) that leave the upcycled output unchanged.

    Copy/granular experts already reproduce the dense FFN, so a shared expert must add 0 at step 0:
    its gate/up rows (and biases) cycle through the dense FFN's units, and its down projection (and
    bias) start at zero — like LoRA's B, it learns from the first step. A shared-expert gate starts at 0
    (sigmoid 0.5). Deterministic, so data-parallel replicas agree.
    """
    if not config.num_shared_experts:
        return {}
    f_s = config.shared_expert_intermediate_size or expert_intermediate_size(dense, config) * config.num_shared_experts
    units = torch.arange(f_s, device=dense.up.device) % dense.intermediate_size
    out: dict[str, Tensor] = {"shared_experts.up_proj.weight": dense.up[units].clone(),
                              "shared_experts.down_proj.weight": dense.down.new_zeros(dense.hidden_size, f_s)}
    if dense.gate is not None:
        out["shared_experts.gate_proj.weight"] = dense.gate[units].clone()
    if dense.has_bias:
        zeros = dense.up.new_zeros(dense.intermediate_size)
        out["shared_experts.up_proj.bias"] = (dense.up_bias if dense.up_bias is not None else zeros)[units].clone()
        if dense.gate is not None:
            gate_b = dense.gate_bias if dense.gate_bias is not None else zeros
            out["shared_experts.gate_proj.bias"] = gate_b[units].clone()
        out["shared_experts.down_proj.bias"] = dense.up.new_zeros(dense.hidden_size)
    if config.shared_expert_gate:
        out["shared_expert_gate.weight"] = dense.up.new_zeros(1, dense.hidden_size)
    return out


@torch.no_grad()
def upcycle_layer(layer: "MoELayer", dense: DenseFFN, seed: int = 0) -> None:
    """Fill ``layer`` (this rank's ``local_expert_ids``, router, shared experts) from ``dense``."""
    cfg = layer.config
    wanted = expert_fields(dense)
    have = {k: getattr(cfg, k) for k in wanted}
    if have != wanted:
        raise ValueError(f"layer experts {have} do not match the dense FFN {wanted}; "
                         "build MoEConfig with dataclasses.replace(config, **expert_fields(dense))")
    tensors = {f"experts.{k}": v for k, v in init_experts(dense, cfg, layer.local_expert_ids, seed).items()}
    tensors["router.weight"] = init_router(dense, cfg, seed)
    tensors.update(init_shared_experts(dense, cfg, seed))
    params = dict(layer.named_parameters())
    for key, value in tensors.items():
        if key not in params or params[key].shape != value.shape:
            got = tuple(params[key].shape) if key in params else "missing"
            raise ValueError(f"cannot upcycle into {key}: layer has {got}, initializer made {tuple(value.shape)}")
    for key, value in tensors.items():
        params[key].copy_(value)


__all__ = ["EXTRA_KEYS", "INITIALIZERS", "check_extra", "expert_fields", "expert_generator",
           "expert_intermediate_size", "granularity",
           "init_experts", "init_router", "init_shared_experts", "output_preserving_issues", "upcycle_layer"]
