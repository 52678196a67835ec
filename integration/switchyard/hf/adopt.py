"""Adopt the MoE blocks of transformers' own MoE models as switchyard ``MoELayer``s.

One small adapter per HF block class says which config fields become which ``MoEConfig`` fields and
where the block keeps its shared experts; reading weights is shared, because every family stores the
router as ``gate.weight`` [E, H] (DeepSeek-V3 adds ``gate.e_score_correction_bias`` [E]) and its
experts in one of two layouts:

* transformers >= 5: fused 3-D ``experts.gate_up_proj`` [E, 2F, H] (gate rows first) and
  ``experts.down_proj`` [E, H, F] — exactly ``GroupedExperts``' layout, so this rank's slice copies over;
* transformers 4.x: ``experts`` is an ``nn.ModuleList`` of MLPs whose ``nn.Linear``s are
  ``gate_proj/up_proj/down_proj`` (Mixtral: ``w1/w3/w2``); they are stacked here.

Everything is read and shape-checked against the new layer before a single weight is copied, and the
HF block itself is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from switchyard.config import MoEConfig
from switchyard.hf.architectures import refuse_offloaded, refuse_unreadable
from switchyard.moe.layer import MoELayer

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

ConfigFields = Callable[[Any], dict[str, Any]]

# Per-expert nn.Linear names of transformers 4.x MLPs, as (gate, up, down); Mixtral's w1/w3/w2 first.
_PER_EXPERT_NAMES: tuple[tuple[str, str, str], ...] = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _attr(hf_config: Any, name: str) -> Any:
    if not hasattr(hf_config, name):
        raise ValueError(f"{type(hf_config).__name__} has no {name!r}, which this MoE block family needs")
    return getattr(hf_config, name)


@dataclass(frozen=True)
class BlockAdapter:
    """What differs between HF MoE families; the rest (top-k, activation, sizes, losses) is common."""

    num_experts_attr: str
    fields: ConfigFields  # family-specific MoEConfig fields from the HF config
    shared_attr: str | None = None  # block attribute holding the shared-expert MLP
    shared_gate_attr: str | None = None  # block attribute holding the [1, H] sigmoid gate of that MLP


def _mixtral(cfg: Any) -> dict[str, Any]:
    # Mixtral's router always renormalizes the top-k and has no norm_topk_prob flag.
    return {"norm_topk_prob": True, "jitter_experts_input": True}


def _softmax_flagged(cfg: Any) -> dict[str, Any]:
    # Qwen2/3-MoE and OLMoE default norm_topk_prob to False (weights are raw softmax probabilities).
    return {"norm_topk_prob": bool(_attr(cfg, "norm_topk_prob"))}


def _qwen2_moe(cfg: Any) -> dict[str, Any]:
    # One shared expert of its own size, scaled per token by sigmoid(shared_expert_gate(x)).
    return {**_softmax_flagged(cfg), "num_shared_experts": 1, "shared_expert_gate": True,
            "shared_expert_intermediate_size": _attr(cfg, "shared_expert_intermediate_size")}


def _deepseek_v3(cfg: Any) -> dict[str, Any]:
    n_shared = _attr(cfg, "n_shared_experts") or 0
    return {
        "score_func": "sigmoid", "norm_topk_prob": bool(_attr(cfg, "norm_topk_prob")),
        "n_group": _attr(cfg, "n_group"), "topk_group": _attr(cfg, "topk_group"),
        "routed_scaling_factor": float(_attr(cfg, "routed_scaling_factor")), "expert_bias": True,
        "num_shared_experts": n_shared,
        "shared_expert_intermediate_size": _attr(cfg, "moe_intermediate_size") * n_shared if n_shared else None,
        # Balanced by the expert bias (aux-loss-free); HF's model computes no aux loss either.
        "aux_loss_coef": float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0),
    }


ADAPTERS: dict[str, BlockAdapter] = {
    "MixtralSparseMoeBlock": BlockAdapter("num_local_experts", _mixtral),
    "Qwen2MoeSparseMoeBlock": BlockAdapter("num_experts", _qwen2_moe, "shared_expert", "shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": BlockAdapter("num_experts", _softmax_flagged),
    "OlmoeSparseMoeBlock": BlockAdapter("num_experts", _softmax_flagged),
    "DeepseekV3MoE": BlockAdapter("n_routed_experts", _deepseek_v3, "shared_experts"),
}
SUPPORTED_BLOCKS: tuple[str, ...] = tuple(ADAPTERS)


def _adapter(block_class_name: str) -> BlockAdapter:
    if block_class_name not in ADAPTERS:
        raise ValueError(f"no adapter for HF MoE block {block_class_name!r}; supported: {list(SUPPORTED_BLOCKS)}")
    return ADAPTERS[block_class_name]


def moe_config_from_hf(hf_config: Any, block_class_name: str, **overrides: Any) -> MoEConfig:
    """The ``MoEConfig`` reproducing ``block_class_name``'s routing and FFN; ``overrides`` win."""
    adapter = _adapter(block_class_name)
    fields: dict[str, Any] = {
        "num_experts": _attr(hf_config, adapter.num_experts_attr),
        "top_k": _attr(hf_config, "num_experts_per_tok"),
        "activation": _attr(hf_config, "hidden_act"),
        # MoE families with dense layers too (Qwen2-MoE, DeepSeek-V3) size experts separately.
        "intermediate_size": getattr(hf_config, "moe_intermediate_size", None) or _attr(hf_config, "intermediate_size"),
    }
    if getattr(hf_config, "router_aux_loss_coef", None) is not None:
        fields["aux_loss_coef"] = float(hf_config.router_aux_loss_coef)
    if getattr(hf_config, "router_jitter_noise", None) is not None:
        # HF Mixtral jitters the experts' input too: _mixtral sets jitter_experts_input (training only).
        fields["router_jitter"] = float(hf_config.router_jitter_noise)
    fields.update(adapter.fields(hf_config))
    fields.update(overrides)
    return MoEConfig.from_dict(fields)


def _read_fused(experts: nn.Module, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5 ``*Experts``: 3-D tensors, honouring the ``use_experts_implementation`` layout flags."""
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ValueError(f"{type(experts).__name__}: biased or ungated HF experts are not supported")
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(f"{type(experts).__name__} has neither fused gate_up_proj/down_proj nor per-expert MLPs")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # stored [E, H, 2F] / [E, F, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate_up = gate_up[ids]
    if not getattr(experts, "is_concatenated", True):  # interleaved rows g0, u0, g1, u1, …
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
    return gate_up, down[ids]


def _per_expert_names(experts: nn.ModuleList) -> tuple[str, str, str]:
    """The (gate, up, down) ``nn.Linear`` names of transformers 4.x expert MLPs."""
    names = next((n for n in _PER_EXPERT_NAMES if all(hasattr(experts[0], a) for a in n)), None)
    if names is None:
        raise ValueError(f"expert MLP {type(experts[0]).__name__} has none of the projections {_PER_EXPERT_NAMES}")
    return names


def _read_per_expert(experts: nn.ModuleList, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 4.x: one MLP module per expert, stacked into the fused layout."""
    gate, up, down = names = _per_expert_names(experts)
    linears = [getattr(experts[i], a) for i in ids for a in names]
    if any(getattr(lin, "bias", None) is not None for lin in linears):
        raise ValueError("HF per-expert MLPs with biases are not supported")
    gate_up = torch.stack([torch.cat([getattr(experts[i], gate).weight, getattr(experts[i], up).weight]) for i in ids])
    return gate_up, torch.stack([getattr(experts[i], down).weight for i in ids])


def _check_parts(block: nn.Module, cfg: MoEConfig) -> tuple[nn.Module, nn.Module]:
    """The block's ``gate`` and ``experts``, checked for what every family shares."""
    refuse_offloaded(block, type(block).__name__)
    refuse_unreadable(block, type(block).__name__)
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or getattr(gate, "weight", None) is None:
        raise ValueError(f"{type(block).__name__} lacks the expected gate.weight / experts submodules")
    if getattr(gate, "bias", None) is not None:
        raise ValueError(f"{type(block).__name__}.gate has a bias; switchyard's router has none")
    down = getattr(experts, "down_proj", None)
    found = len(experts) if isinstance(experts, nn.ModuleList) else down.shape[0] if down is not None else None
    if found != cfg.num_experts:
        raise ValueError(f"{type(block).__name__}.experts holds {found} experts but the config says {cfg.num_experts}")
    return gate, experts


def _collect(block: nn.Module, adapter: BlockAdapter, cfg: MoEConfig, ids: list[int]) -> dict[str, torch.Tensor]:
    """The block's tensors under our layer's parameter/buffer names (experts: ``ids`` only)."""
    gate, experts = _check_parts(block, cfg)
    read = _read_per_expert if isinstance(experts, nn.ModuleList) else _read_fused
    gate_up, down = read(experts, ids)  # type: ignore[arg-type]
    src = {"router.weight": gate.weight, "experts.gate_up_proj": gate_up, "experts.down_proj": down}
    if cfg.expert_bias:
        src["router.expert_bias"] = _attr(gate, "e_score_correction_bias")
    if cfg.num_shared_experts > 0:
        assert adapter.shared_attr is not None, "adapter enables shared experts without naming them"
        shared = _attr(block, adapter.shared_attr)
        src.update({f"shared_experts.{k}": v for k, v in shared.state_dict(keep_vars=True).items()})
    if cfg.shared_expert_gate:
        assert adapter.shared_gate_attr is not None, "adapter enables a shared-expert gate without naming it"
        src["shared_expert_gate.weight"] = _attr(block, adapter.shared_gate_attr).weight
    return src


def _requires_grad(block: nn.Module, adapter: BlockAdapter, cfg: MoEConfig) -> dict[str, bool]:
    """Each of our parameters' ``requires_grad``, taken from the HF parameters it is read from, so a router or
    experts frozen before patching stay frozen. Every expert is checked (not only this rank's), so all EP
    ranks agree and raise alike."""
    gate, experts = _check_parts(block, cfg)
    sources: dict[str, list[torch.Tensor]] = {"router.weight": [gate.weight]}
    if isinstance(experts, nn.ModuleList):
        gate_name, up_name, down_name = _per_expert_names(experts)
        sources["experts.gate_up_proj"] = [getattr(e, a).weight for e in experts for a in (gate_name, up_name)]
        sources["experts.down_proj"] = [getattr(e, down_name).weight for e in experts]
    else:
        sources["experts.gate_up_proj"], sources["experts.down_proj"] = [experts.gate_up_proj], [experts.down_proj]
    if cfg.num_shared_experts > 0:
        assert adapter.shared_attr is not None, "adapter enables shared experts without naming them"
        shared = _attr(block, adapter.shared_attr)
        sources.update({f"shared_experts.{k}": [p] for k, p in shared.named_parameters()})
    if cfg.shared_expert_gate:
        assert adapter.shared_gate_attr is not None, "adapter enables a shared-expert gate without naming it"
        sources["shared_expert_gate.weight"] = [_attr(block, adapter.shared_gate_attr).weight]
    flags: dict[str, bool] = {}
    for key, params in sources.items():
        trainable = {p.requires_grad for p in params}
        if len(trainable) > 1:
            frozen = sum(not p.requires_grad for p in params)
            raise ValueError(
                f"{type(block).__name__}: {frozen} of the {len(params)} HF expert weights read into {key!r} have "
                f"requires_grad=False and the rest True, but {key!r} is one tensor over all experts and cannot be "
                f"partly frozen; set requires_grad alike on them before patching (e.g. "
                f"block.experts.requires_grad_(False) freezes every expert)"
            )
        flags[key] = trainable.pop()
    return flags


@torch.no_grad()
def layer_from_hf_block(
    block: nn.Module, hf_config: Any, groups: "ProcessGroupManager | None" = None, **overrides: Any
) -> MoELayer:
    """A ``MoELayer`` computing what ``block`` computes, holding this rank's experts (``local_expert_ids``).

    Experts and shared experts take the dtype/device of the block's experts; the router keeps the
    dtype of HF's gate (transformers 5.24 keeps DeepSeek-V3's fp32 in bf16 models; it decides routing).
    Each parameter keeps the ``requires_grad`` of the HF parameters it comes from (a frozen router stays frozen).
    """
    name = type(block).__name__
    adapter = _adapter(name)
    cfg = moe_config_from_hf(hf_config, name, **overrides)
    gate, experts = _check_parts(block, cfg)
    probe = next(experts.parameters())
    layer = MoELayer(cfg, _attr(hf_config, "hidden_size"), groups=groups, dtype=probe.dtype, device=probe.device)
    layer.router.to(dtype=gate.weight.dtype)
    src = _collect(block, adapter, cfg, layer.local_expert_ids)
    dst = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    problems = [f"missing {k}" for k in sorted(dst.keys() - src.keys())]
    problems += [f"unexpected {k}" for k in sorted(src.keys() - dst.keys())]
    problems += [f"{k}: HF {tuple(src[k].shape)} vs ours {tuple(v.shape)}"
                 for k, v in dst.items() if k in src and src[k].shape != v.shape]
    if problems:
        raise ValueError(f"cannot adopt {name}: " + "; ".join(problems))
    trainable = _requires_grad(block, adapter, cfg)
    params = dict(layer.named_parameters())
    assert trainable.keys() == params.keys(), f"requires_grad sources {sorted(trainable)} vs {sorted(params)}"
    for key, target in dst.items():
        target.copy_(src[key])
    for key, param in params.items():
        param.requires_grad_(trainable[key])
    layer.train(block.training)
    return layer

