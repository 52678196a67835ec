"""``patch_model``: swap a transformers model's FFNs for expert-parallel MoE layers, in place.

Two modes, chosen by what the model holds:

* **upcycle** — a dense model: each selected FFN becomes a ``MoELayer`` whose experts are initialized
  from the FFN's weights (``MoEConfig.init``: copy, granular, drop_upcycle, random).
* **adopt** — a model with transformers' own MoE blocks (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3):
  each block becomes a ``MoELayer`` with the same weights and routing, so it runs expert-parallel.

Everything is planned and built first — adapters resolved, targets matched, weights read and checked,
new layers materialized — and only then installed, so an error leaves the model exactly as it was.
The model stays a ``PreTrainedModel``: a forward hook adds the router losses to ``output.loss`` (like
transformers' ``router_aux_loss_coef``) and serves ``output_router_logits``; the MoE settings go to
``model.config.switchyard`` (on a copy of the config the model then holds alone: models built from one config
object stay apart) so a saved model rebuilds itself.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn as nn

from switchyard.config import MoEConfig
from switchyard.hf.adopt import SUPPORTED_BLOCKS, layer_from_hf_block, moe_config_from_hf, refuse_unadoptable
from switchyard.hf.architectures import (ADAPTERS, DenseFFN, FFNAdapter, FFNSite, adapter_for, read_generic,
                                         refuse_offloaded, refuse_peft_model)
from switchyard.hf.matching import Selection, layer_index_of, select, sites_from_names
from switchyard.hf.upcycle import (
    check_extra, expert_fields, expert_intermediate_size, output_preserving_issues, upcycle_layer,
)
from switchyard.log import get_logger
from switchyard.moe.layer import LOSS_COEFFICIENTS, MoELayer
from switchyard.parallel.deepspeed_groups import tag_expert_parameters

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

log = get_logger(__name__)

CONFIG_KEY = "switchyard"
_LAYER_SEED_STRIDE = 7919  # experts of different layers must not share random draws


@dataclass
class PatchPlan:
    mode: str  # "upcycle" | "adopt"
    moe_config: MoEConfig
    sites: list[FFNSite]
    layers: list[MoELayer]
    adapter: str | None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def patch_model(
    model: nn.Module,
    moe_config: MoEConfig | None = None,
    groups: "ProcessGroupManager | None" = None,
    *,
    layers: Sequence[int] | None = None,
    every_n: int | None = None,
    targets: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    adapter: str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Swap FFNs (dense model) or MoE blocks (HF MoE model) for switchyard MoE layers; returns ``model``.

    ``layers`` / ``every_n`` (layers 0, n, 2n, … as Megatron's ``moe_layer_freq``) / ``targets`` and
    ``exclude`` (exact, suffix or ``"re:<regex>"`` module names) select what to swap. For architectures
    outside the registry, name the modules with ``targets`` and say how to read them with ``adapter``.
    ``overrides`` adjusts an adopted model's derived ``MoEConfig`` (e.g. ``{"capacity_factor": 1.25}``).
    A ``torch.compile``-d model is patched inside: the transformers model it wraps gets the layers and hooks.
    """
    given, model = model, _uncompiled(model)
    refuse_peft_model(model)  # its save would drop the MoE layers; its names carry peft's prefix
    refuse_offloaded(model, type(model).__name__)  # meta weights behind accelerate's hooks: nothing to read
    if getattr(getattr(model, "config", None), CONFIG_KEY, None):
        raise ValueError("this model is already patched by switchyard (model.config.switchyard is set): patch the "
                         "original transformers model once, with every layer wanted (layers= / every_n=)")
    selection = Selection.of(layers=layers, every_n=every_n, targets=targets, exclude=exclude)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    moe_blocks = _hf_moe_sites(model)
    if moe_blocks:
        if moe_config is not None:
            raise ValueError(
                f"{type(model).__name__} already has MoE blocks ({type(moe_blocks[0].parent.get_submodule(moe_blocks[0].attribute)).__name__}); "
                "its routing comes from its config: pass moe_config=None and overrides={...} to change settings"
            )
        if adapter is not None:
            raise ValueError(f"adapter={adapter!r} says how to read dense FFNs; {type(model).__name__}'s MoE blocks "
                             "are adopted as they are: drop adapter")
        plan = _plan_adoption(model, moe_blocks, selection, groups, overrides or {})
    else:
        refuse_unadoptable(model)  # an MoE model we cannot adopt: name what differs, with or without a MoEConfig
        if moe_config is None:
            _refuse_unsupported_moe(model)
            raise ValueError("a dense model needs a MoEConfig: patch_model(model, MoEConfig(num_experts=8, top_k=2))")
        if not isinstance(moe_config, MoEConfig):
            raise ValueError(f"moe_config must be a MoEConfig, got {type(moe_config).__name__}; "
                             "build one with MoEConfig(...) or MoEConfig.from_dict({...})")
        if overrides:
            raise ValueError("overrides apply to adopted MoE models; put the settings in moe_config instead")
        plan = _plan_upcycle(model, moe_config, selection, groups, adapter, targets, seed)
    own_configs = _copied_configs(model)
    # nothing above touched the model; from here on nothing can fail halfway
    for site, layer in zip(plan.sites, plan.layers):
        _install(plan, site, layer)
    _use_own_config(model, own_configs)
    _record(model, plan, seed)
    _save_keys_as_they_are(model)
    attach_router_loss_hooks(model)
    log.info(
        "patched %d modules (%s, %d experts, top-%d)", len(plan.layers), plan.mode,
        plan.moe_config.num_experts, plan.moe_config.top_k, ranks=[0],
    )
    return given


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped: it calls that module, so hooks there run, and it is what gets
    saved, unwrapped (accelerate) and named (``model.layers.0.mlp``, not ``_orig_mod.model.layers.0.mlp``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return model._orig_mod if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule) else model


# -- planning ----------------------------------------------------------------------------------------
def _hf_moe_sites(model: nn.Module) -> list[FFNSite]:
    sites = []
    for name, module in model.named_modules():
        if type(module).__name__ in SUPPORTED_BLOCKS:
            parent_name, _, attribute = name.rpartition(".")
            index = layer_index_of(name)
            sites.append(FFNSite(index if index is not None else len(sites), name,
                                 model.get_submodule(parent_name), attribute))
    return sites


# Config fields holding the expert count of transformers' MoE families (Mixtral, Qwen-MoE, DeepSeek, …).
_EXPERT_COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _refuse_unsupported_moe(model: nn.Module) -> None:
    """An MoE model whose blocks we cannot adopt is not "dense": say so rather than ask for a MoEConfig."""
    config = _text_config(model)
    for attr in _EXPERT_COUNT_ATTRS:
        count = getattr(config, attr, None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 1:
            raise ValueError(
                f"{type(model).__name__} is an MoE model ({attr}={count}) whose MoE blocks switchyard cannot adopt; "
                f"adoption supports the blocks {list(SUPPORTED_BLOCKS)}"
            )


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "get_text_config", lambda: config)()


def _plan_adoption(model, sites, selection, groups, overrides) -> PatchPlan:
    hf_config = _text_config(model)
    num_layers = getattr(hf_config, "num_hidden_layers", len(sites))
    chosen = select(sites, selection, num_layers)
    built = [layer_from_hf_block(site.parent.get_submodule(site.attribute), hf_config, groups, **overrides)
             for site in chosen]
    block_name = type(chosen[0].parent.get_submodule(chosen[0].attribute)).__name__
    return PatchPlan("adopt", moe_config_from_hf(hf_config, block_name, **overrides), chosen, built, None,
                     dict(overrides))


def _plan_upcycle(model, moe_config, selection, groups, adapter_name, targets, seed) -> PatchPlan:
    if adapter_name is not None and adapter_name not in ADAPTERS:
        raise ValueError(f"adapter {adapter_name!r} is unknown; choose one of {sorted(ADAPTERS)}")
    if adapter_name is not None and targets is None and adapter_name != _registry_adapter_name(model):
        raise ValueError(
            f"adapter={adapter_name!r} reads the modules named by targets, and none are named: pass "
            f"targets=[...] (e.g. targets=['re:.*\\.mlp']) with it, or drop adapter to use the model type's own"
        )
    if adapter_name is not None and targets is not None:
        ffn_adapter: FFNAdapter = ADAPTERS[adapter_name]
        sites = sites_from_names(model, selection.targets or ())
        num_layers = max((s.layer_index for s in sites), default=-1) + 1
        activation = _named_activation(model, moe_config)

        def read(site: FFNSite) -> DenseFFN:
            try:
                return read_generic(site.parent.get_submodule(site.attribute), adapter_name, activation)
            except ValueError as e:  # a name pattern can match more than the FFNs (e.g. their projections)
                raise ValueError(f"targets matched {site.qualified_name!r}, which the {adapter_name!r} adapter "
                                 f"cannot read as an FFN: {e}; name only the FFN modules") from None
    else:
        ffn_adapter = adapter_for(model)
        sites = ffn_adapter.sites(model)
        num_layers = len(ffn_adapter.layers(model))
        read = lambda site: ffn_adapter.read(site, _text_config(model))  # noqa: E731
    chosen = select(sites, selection, num_layers)
    denses = [read(site) for site in chosen]
    config = _config_for(moe_config, denses[0])
    ep = groups.size("ep") if groups is not None else 1
    if config.num_experts % ep != 0:
        raise ValueError(f"num_experts={config.num_experts} is not divisible by ep={ep}: each EP rank holds "
                         f"num_experts / ep experts; choose ep dividing {config.num_experts}, or another num_experts")
    _check_one_form(chosen, denses)
    if config.init == "drop_upcycle" and any(dense.up.is_meta for dense in denses):
        raise ValueError(
            "init='drop_upcycle' re-draws units from the dense weights' mean and std, which a model on the meta "
            "device does not have: load the weights first, or use init='copy', 'granular' or 'random' (shapes suffice)"
        )
    built = [_upcycled_layer(dense, config, groups, seed * _LAYER_SEED_STRIDE + site.layer_index)
             for site, dense in zip(chosen, denses)]
    issues = output_preserving_issues(config) if config.init in ("copy", "granular") else []
    if issues:  # once per patch, once every layer was built (a refusal is not preceded by a warning)
        log.warning("init=%r: the upcycled layers will not reproduce the dense output at step 0: %s", config.init,
                    "; ".join(issues), ranks=[0])
    return PatchPlan("upcycle", config, chosen, built, ffn_adapter.name)


def _registry_adapter_name(model: nn.Module) -> str | None:
    try:
        return adapter_for(model).name
    except ValueError:
        return None


def _check_one_form(chosen: list[FFNSite], denses: list[DenseFFN]) -> None:
    """One MoEConfig holds the experts' form, so every FFN must share it; FFN sizes may differ (each
    layer's experts take their own FFN's size, as ``intermediate_size=None`` says)."""
    form = lambda d: (d.hidden_size, d.gated, d.has_bias)  # noqa: E731
    others = [site.qualified_name for site, dense in zip(chosen, denses) if form(dense) != form(denses[0])]
    if others:
        raise ValueError(
            f"{others} differ from {chosen[0].qualified_name} in hidden size, gating or biases, and one MoEConfig "
            f"describes every MoE layer of a model: patch only the FFNs of one form (exclude={others}, or layers=[...])"
        )


# Config fields naming the FFN activation, as transformers' families spell it (Falcon: ``activation``).
_ACTIVATION_ATTRS = ("hidden_act", "activation_function", "activation", "hidden_activation")
_MOE_DEFAULTS = MoEConfig()


def _named_activation(model: nn.Module, moe_config: MoEConfig) -> str:
    """The activation the model's config names; else one set in ``moe_config`` (not its default); never a guess."""
    config = _text_config(model)
    for attr in _ACTIVATION_ATTRS:
        if isinstance(getattr(config, attr, None), str):
            return getattr(config, attr)
    if moe_config.activation != _MOE_DEFAULTS.activation:
        return moe_config.activation
    raise ValueError(
        f"{type(config).__name__} names no activation ({'/'.join(_ACTIVATION_ATTRS)}), so the FFNs' activation is "
        f"unknown: say which it is with MoEConfig(activation=...), or for {_MOE_DEFAULTS.activation!r} (MoEConfig's "
        f"default, which does not count as a choice) with model.config.hidden_act = {_MOE_DEFAULTS.activation!r}"
    )


def _config_for(moe_config: MoEConfig, dense: DenseFFN) -> MoEConfig:
    """The expert FFN's form (activation, gating, bias) comes from the FFN being replaced: the experts copy
    its weights, so a form set explicitly in ``moe_config`` that contradicts it is an error, not a choice."""
    check_extra(moe_config)
    changes = expert_fields(dense)
    differing = {k: (getattr(moe_config, k), v) for k, v in changes.items() if getattr(moe_config, k) != v}
    conflicts = {k: pair for k, pair in differing.items() if pair[0] != getattr(_MOE_DEFAULTS, k)}
    if conflicts:
        raise ValueError(
            "MoEConfig sets the experts' form against the dense FFN they are built from: "
            + ", ".join(f"{k}={ours!r} but the FFN has {k}={theirs!r}" for k, (ours, theirs) in conflicts.items())
            + "; leave these fields at their defaults (the experts take the FFN's form)"
        )
    if differing:
        log.info("expert FFN form taken from the dense model: %s", differing, ranks=[0])
    return dataclasses.replace(moe_config, **changes)


@torch.no_grad()
def _upcycled_layer(dense: DenseFFN, config: MoEConfig, groups, seed: int) -> MoELayer:
    """Build on the meta device, then materialize only this rank's experts from the dense weights."""
    device, dtype = dense.down.device, dense.down.dtype
    ffn = expert_intermediate_size(dense, config)
    layer = MoELayer(config, dense.hidden_size, ffn, groups=groups, dtype=dtype, device="meta")
    layer.to_empty(device=device)
    tag_expert_parameters(layer.experts, layer.expert_group_name)  # to_empty made new Parameter objects
    upcycle_layer(layer, dense, seed=seed)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.zero_()
    return layer


# -- installing and recording ---------------------------------------------------------------------------
def _install(plan: PatchPlan, site: FFNSite, layer: MoELayer) -> None:
    layer.train(site.parent.training)
    layer.patched_as = (site.qualified_name, len(plan.layers))  # what its EP peers must have patched alike
    if plan.mode == "upcycle" and plan.adapter is not None:
        ADAPTERS[plan.adapter].install(site, layer)
    else:
        setattr(site.parent, site.attribute, layer)


def _copied_configs(model: nn.Module) -> dict[int, Any]:
    """A deep copy of ``model.config``, as ``id(original) -> copy`` for it and every config nested in it
    (``text_config``, …). Not yet used: ``_use_own_config`` puts it in once nothing can fail."""
    from transformers import PretrainedConfig

    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)
    return {key: new for key, new in memo.items() if isinstance(new, PretrainedConfig) or key == id(model.config)}


def _use_own_config(model: nn.Module, copies: dict[int, Any]) -> None:
    """Give the model its own config before the record is written into it. ``from_config(cfg)`` does not copy
    ``cfg``, so models built from one config object share it: the record would mark the others as patched ("already
    patched", and their own ``save_pretrained`` would write it). Every module holding the config or a config nested
    in it (the inner ``*Model``, attention layers reading ``config._attn_implementation``, rotary embeddings) is
    pointed at the copy, so that a later change of ``model.config`` (``use_cache``, ``set_attn_implementation``)
    still reaches all of them, as transformers expects of one shared object."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if id(value) in copies and copies[id(value)] is not value:
                object.__setattr__(module, name, copies[id(value)])


def _record(model: nn.Module, plan: PatchPlan, seed: int) -> None:
    record = {
        "version": 1,
        "mode": plan.mode,
        "moe": plan.moe_config.to_dict(),
        "modules": [site.qualified_name for site in plan.sites],
        "layer_indices": [site.layer_index for site in plan.sites],
        "adapter": plan.adapter,
        "overrides": plan.overrides,
        "seed": seed,
    }
    setattr(model.config, CONFIG_KEY, record)


def _save_keys_as_they_are(model: nn.Module) -> None:
    """Opt out of transformers' weight-conversion mapping for ``model.save_pretrained`` (what Trainer saves).

    transformers renames keys on save through the family's mapping — Mixtral's turns ``.mlp.`` into
    ``.block_sparse_moe.`` — and our MoE layers' keys would come back under names that no patched model
    has, so Trainer's resume (``load_state_dict`` of that file) would silently restore no expert or router.
    The mapping describes the HF blocks patching replaced; an empty one writes ``state_dict()``'s own keys.
    """
    model._weight_conversions = []


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


# -- router losses and router logits on the model's output -----------------------------------------------
# The hooks are plain functions reading the model they run on, not closures over its layers: a deep copy
# (TRL's reference model, EMA, a teacher) keeps the hooks and so reports its own layers, not the original's.
def attach_router_loss_hooks(model: nn.Module) -> None:
    """Add the MoE layers' weighted router losses (mean over layers) to ``output.loss``; serve
    ``output_router_logits``."""
    if getattr(model, "_switchyard_hooks", None):
        return
    # fixed once patched; not re-walked on every forward (decode is a hot path); deepcopy maps it to the copy's
    object.__setattr__(model, "_switchyard_moe_layers", moe_layers(model))
    object.__setattr__(model, "_switchyard_hook_state", {"router_logits": False, "warned": False,
                                                          "mask_position": _mask_position(model)})
    handles = (model.register_forward_pre_hook(_take_router_logits_flag, with_kwargs=True),
               model.register_forward_hook(_add_router_outputs, with_kwargs=True))
    object.__setattr__(model, "_switchyard_hooks", handles)


def keep_moe_layers_of_stage(model: nn.Module, all_layers: int) -> None:
    """After a pipeline split (``train/pipeline.py``): the hooks read this stage's MoE layers, and the router loss
    is this stage's share of the mean over all ``all_layers`` of the model (the stages' shares sum to it)."""
    if not getattr(model, "_switchyard_hooks", None):
        return
    object.__setattr__(model, "_switchyard_moe_layers", moe_layers(model))
    model._switchyard_hook_state["layers_in_model"] = all_layers


def _router_loss_divisor(model: nn.Module, counted: int) -> int:
    """The layers the router loss is a mean over: those that gave one, or all the model's when pipeline stages
    each hold some."""
    return getattr(model, "_switchyard_hook_state", {}).get("layers_in_model") or counted


def takes_moe_token_mask(model: nn.Module) -> bool:
    """Whether ``model(...)`` accepts ``moe_token_mask`` (the real tokens, for a caller whose attention mask is
    4-D): its router-loss hooks take the keyword; an unpatched model's forward would not know it."""
    return bool(getattr(model, "_switchyard_hooks", None))


def _mask_position(model: nn.Module) -> int | None:
    """Where ``forward`` takes ``attention_mask`` positionally (Llama: 1; GPT-2: 2), or None."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("attention_mask") if "attention_mask" in names else None


def _take_router_logits_flag(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state, config = module._switchyard_hook_state, getattr(module, "config", None)
    token_mask = kwargs.pop("moe_token_mask", None)
    if token_mask is not None:
        _check_moe_token_mask(token_mask, args, kwargs)
    wanted = kwargs.pop("output_router_logits", None)
    state["router_logits"] = bool(wanted if wanted is not None else getattr(config, "output_router_logits", False))
    if hasattr(config, "output_router_logits"):
        # transformers' own router-logits and aux-loss path looks for its router modules, which are gone; ours
        # replaces it. Switched off per call, so the config keeps the user's setting (saved, exported, our default)
        kwargs["output_router_logits"] = False
    # a tuple (return_dict=False, by argument or config) has no room for the router loss: ask for the dict,
    # add to it, and make the tuple afterwards (``_as_tuple``) as transformers' ``can_return_tuple`` would
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    state["as_tuple"] = not return_dict
    if state["as_tuple"]:
        kwargs["return_dict"] = True
    # padding (attention_mask 0) stays out of the balance loss, as in transformers' load_balancing_loss_func,
    # and out of expert capacity (training and eval: eval_capacity_factor runs under no_grad); a layer ignores
    # a mask whose size is not its token count (a decode step with a cache); a 4-D mask is not read, so a
    # caller whose mask is 4-D (serving's static decoder: padding rows) names its real tokens in moe_token_mask
    if token_mask is None:
        mask, position = kwargs.get("attention_mask"), state["mask_position"]
        if mask is None and position is not None and position < len(args):  # model(input_ids, attention_mask)
            mask = args[position]
        token_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
    for layer in module._switchyard_moe_layers:
        layer.token_mask = token_mask
    return args, kwargs


def _check_moe_token_mask(token_mask: Any, args: tuple, kwargs: dict) -> None:
    """An explicit mask is the caller's word on every token, so one the layers would ignore (its size not the
    token count) is an error, not a silent no-op. Shapes only: no host sync inside a captured graph."""
    if not torch.is_tensor(token_mask) or token_mask.dim() not in (1, 2):
        shape = tuple(token_mask.shape) if torch.is_tensor(token_mask) else type(token_mask).__name__
        raise ValueError(f"moe_token_mask must be a tensor of shape [B, S] or [T] (1 = real token), got {shape}")
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    tokens = ids.numel() if torch.is_tensor(ids) else embeds.shape[:-1].numel() if torch.is_tensor(embeds) else None
    if tokens is not None and token_mask.numel() != tokens:
        raise ValueError(f"moe_token_mask has {token_mask.numel()} entries for {tokens} input tokens; "
                         "pass one entry per input token (1 = real, 0 = padding)")


def _add_router_outputs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    layers, state = module._switchyard_moe_layers, module._switchyard_hook_state
    for layer in layers:
        layer.token_mask = None  # this forward's: a later call of a layer alone must not reuse it
    if not hasattr(output, "keys"):
        return output  # a model that returns a tuple even when asked for a dict: nothing to add to
    losses = [layer.aux_loss for layer in layers if layer.aux_loss is not None]
    if module.training and torch.is_grad_enabled() and len(losses) < len(layers) and not state["warned"]:
        if any(l.config.aux_loss_coef or l.config.seq_aux_loss_coef or l.config.z_loss_coef for l in layers):
            log.warning("some MoE layers produced no router loss (reentrant gradient checkpointing runs "
                        "them without grad); use use_reentrant=False", ranks=[0])
            state["warned"] = True
    if losses:
        # mean over layers, so a coefficient means the same here as transformers' router_aux_loss_coef (a sum
        # would scale with depth); transformers pools all layers' tokens into one loss instead, which lets
        # one layer's imbalance offset another's: each layer's own, as Switch / Megatron apply it
        aux = torch.stack([loss.float() for loss in losses]).sum() / _router_loss_divisor(module, len(losses))
        output["aux_loss"] = aux
        if output.get("loss") is not None:
            output["loss"] = output["loss"] + aux.to(output["loss"].dtype)
    if state["router_logits"]:
        output["router_logits"] = tuple(
            logits for logits in (layer.router_logits() for layer in layers) if logits is not None
        )
    return _as_tuple(output) if state["as_tuple"] else output


def router_loss_kinds(layers: Iterable[MoELayer]) -> list[str]:
    """The router-loss kinds some layer's coefficient turns on, in ``LOSS_COEFFICIENTS`` order."""
    layers = list(layers)
    return [k for k, field in LOSS_COEFFICIENTS.items() if any(getattr(l.config, field) for l in layers)]


def router_loss_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each kind's share of the ``aux_loss`` the hook added to the last forward's loss: coefficient × loss,
    averaged over the layers the hook averaged, so the kinds sum to ``aux_loss`` within rounding. Every kind a
    layer's coefficient turns on is there (0 where none was computed: a forward without grad), so each call
    and each rank gives the same keys. Detached, on device: no host sync."""
    layers = getattr(model, "_switchyard_moe_layers", ())
    kinds = router_loss_kinds(layers)
    if not kinds:
        return {}
    counted = [l for l in layers if l.aux_loss is not None]
    zero = torch.zeros((), device=next(iter(layers[0].parameters())).device)
    parts: dict[str, torch.Tensor] = {}
    for kind in kinds:
        field = LOSS_COEFFICIENTS[kind]
        weighted = [getattr(l.config, field) * l.last_stats.losses[kind].float() for l in counted
                    if kind in l.last_stats.losses]
        parts[kind] = torch.stack(weighted).sum() / _router_loss_divisor(model, len(counted)) if weighted else zero
    return parts


def _as_tuple(output: Any) -> tuple:
    """``output.to_tuple()`` in the output class's field order (an HF MoE output's ``aux_loss`` second, as
    transformers puts it), then what the class has no field for (a dense model's ``aux_loss``) at the end."""
    names = [f.name for f in dataclasses.fields(output)] if dataclasses.is_dataclass(output) else []
    names += [k for k in output.keys() if k not in names]
    return tuple(output[k] for k in names if output.get(k) is not None)
