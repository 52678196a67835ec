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
HF block itself is never modified. Every other family's block is refused (``UNADOPTABLE``, ``refuse_unadoptable``):
a block without an adapter must fail with the reason, never run with other routing.
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
    intermediate_attr: str  # the HF config field sizing each routed expert (Mixtral/OLMoE ignore moe_intermediate_size)
    fields: ConfigFields  # family-specific MoEConfig fields from the HF config
    shared_attr: str | None = None  # block attribute holding the shared-expert MLP
    shared_gate_attr: str | None = None  # block attribute holding the [1, H] sigmoid gate of that MLP


def _mixtral(cfg: Any) -> dict[str, Any]:
    # Mixtral's router always renormalizes the top-k and has no norm_topk_prob flag. Its block is the only adopted
    # one that reads router_jitter_noise (training only), on the input of router and experts alike; the others ignore
    # the field, so a config carrying it must not jitter their adopted layers.
    return {"norm_topk_prob": True, "jitter_experts_input": True,
            "router_jitter": float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0)}


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
    "MixtralSparseMoeBlock": BlockAdapter("num_local_experts", "intermediate_size", _mixtral),
    "Qwen2MoeSparseMoeBlock": BlockAdapter("num_experts", "moe_intermediate_size", _qwen2_moe, "shared_expert",
                                           "shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": BlockAdapter("num_experts", "moe_intermediate_size", _softmax_flagged),
    "OlmoeSparseMoeBlock": BlockAdapter("num_experts", "intermediate_size", _softmax_flagged),
    "DeepseekV3MoE": BlockAdapter("n_routed_experts", "moe_intermediate_size", _deepseek_v3, "shared_experts"),
}
SUPPORTED_BLOCKS: tuple[str, ...] = tuple(ADAPTERS)


# MoE blocks of other transformers (5.24) families, with what switchyard's MoELayer would compute differently. A block
# missing here is refused as well (``_UNCHECKED``): without an adapter and a parity test its routing is unknown, and an
# unknown block must fail loudly rather than run with other routing.
UNADOPTABLE: dict[str, str] = {
    "GptOssMLP": "its router has a bias and takes the top-k of the logits before a softmax over the k; its experts "
                 "have biases, interleaved gate/up rows and a clamped SwiGLU "
                 "((up + 1) * gate * sigmoid(swiglu_alpha * gate), clamped at swiglu_limit)",
    "PhimoeSparseMoeBlock": "its sparsemixer router picks each expert from a softmax over threshold-masked logits "
                            "(Gumbel-sampled in training) and jitters the input",
    "Llama4TextMoe": "the sigmoid of each chosen logit scales the expert's input, not its output",
    "DbrxFFN": "its top-k weights are divided by their moe_normalize_expert_weights-norm, and its experts are stored "
               "as w1/v1/w2 [E*F, H]",
    "DeepseekV2Moe": "with topk_method='group_limited_greedy' its softmax router ranks groups by their best expert, "
                     "where switchyard's group-limited routing is DeepSeek-V3's (the sum of each group's top two "
                     "scores); its greedy routing has no adapter either",
    "DeepseekV4SparseMoeBlock": "its hash layers route by token id (tid2eid), not by router score",
    "JetMoeMoE": "its experts are ungated with a bias, and its attention heads are experts too (JetMoeMoA)",
    "DogeCDMoE": "it retrieves experts by product keys, not token-choice top-k over FFN experts",
}
_UNCHECKED = ("switchyard has no adapter for it, so its routing and experts are not known to match switchyard's "
              "(a new family is one adapter plus a logit-parity test in switchyard.hf.adopt)")


def _why_not(block_class_name: str) -> str:
    return UNADOPTABLE.get(block_class_name, _UNCHECKED)


def _adapter(block_class_name: str) -> BlockAdapter:
    if block_class_name not in ADAPTERS:
        raise ValueError(f"HF MoE block {block_class_name!r} cannot be adopted exactly: {_why_not(block_class_name)}; "
                         f"supported blocks: {list(SUPPORTED_BLOCKS)}")
    return ADAPTERS[block_class_name]


def refuse_unadoptable(model: nn.Module) -> None:
    """``ValueError`` naming the model type, an MoE block switchyard cannot reproduce and what differs, if ``model``
    has one: an MoE block is a module holding ``experts`` (every transformers family) or one listed in
    ``UNADOPTABLE``. Structural, so it finds MoE models whose config nests the expert count (DBRX's ``ffn_config``)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, MoELayer) or cls in ADAPTERS:  # ours (a patched model), or adoptable
            continue
        if cls in UNADOPTABLE or isinstance(getattr(module, "experts", None), nn.Module):
            found.append((name, module))
    if not found:
        return
    # a listed block first: JetMoe's attention holds experts too, its MoE MLP is the block meant
    name, block = next(((n, b) for n, b in found if type(b).__name__ in UNADOPTABLE), found[0])
    cls = type(block).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"{type(model).__name__} (model_type {model_type!r}) is an MoE model whose blocks switchyard cannot adopt "
        f"exactly: {cls} ({name}): {_why_not(cls)}. Supported blocks: {list(SUPPORTED_BLOCKS)}"
    )


def moe_config_from_hf(hf_config: Any, block_class_name: str, **overrides: Any) -> MoEConfig:
    """The ``MoEConfig`` reproducing ``block_class_name``'s routing and FFN; ``overrides`` win."""
    adapter = _adapter(block_class_name)
    fields: dict[str, Any] = {
        "num_experts": _attr(hf_config, adapter.num_experts_attr),
        "top_k": _attr(hf_config, "num_experts_per_tok"),
        "activation": _attr(hf_config, "hidden_act"),
        "intermediate_size": _attr(hf_config, adapter.intermediate_attr),
    }
    if getattr(hf_config, "router_aux_loss_coef", None) is not None:
        fields["aux_loss_coef"] = float(hf_config.router_aux_loss_coef)
    fields.update(adapter.fields(hf_config))
    _check_shared_overrides(block_class_name, adapter, fields, overrides)
    fields.update(overrides)
    return MoEConfig.from_dict(fields)


def _check_shared_overrides(block_class_name: str, adapter: BlockAdapter, derived: dict[str, Any],
                            overrides: dict[str, Any]) -> None:
    """Shared experts and their gate are read from the block: an override can drop them (its weights are then
    discarded), never add one the block does not have."""
    if adapter.shared_attr is None and overrides.get("num_shared_experts", 0) != 0:
        raise ValueError(
            f"{block_class_name} has no shared expert, so num_shared_experts cannot be overridden "
            f"(got num_shared_experts={overrides['num_shared_experts']!r}): leave it out of overrides"
        )
    if adapter.shared_gate_attr is None and overrides.get("shared_expert_gate", False):
        raise ValueError(
            f"{block_class_name} has no shared-expert gate, so shared_expert_gate cannot be overridden "
            f"(got shared_expert_gate={overrides['shared_expert_gate']!r}): leave it out of overrides"
        )
    if ("num_shared_experts" in overrides and overrides["num_shared_experts"] == 0
            and derived.get("shared_expert_gate") and "shared_expert_gate" not in overrides):
        raise ValueError(
            f"overrides num_shared_experts=0 removes {block_class_name}'s shared expert but keeps its gate "
            f"(shared_expert_gate=True, read from the block), which gates that shared expert: to drop both, also "
            f"pass shared_expert_gate=False (their weights are discarded and the output changes); to keep the shared "
            f"expert, leave num_shared_experts out of overrides"
        )


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

