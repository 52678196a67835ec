"""Megatron-style tensor parallelism of a transformers model, from the model's own ``base_model_tp_plan``.

``apply_tensor_parallel(model, groups)`` slices every module the plan names in place, after ``patch_model`` and
before the optimizer and DeepSpeed: a ``"colwise"`` ``nn.Linear`` keeps this tp rank's output rows, a
``"rowwise"`` one its input columns (Megatron-LM's column / row parallel linears, paired so that attention heads
and FFN channels stay local and one all-reduce per block restores the full output). Embeddings, norms and
``lm_head`` stay replicated. The modules keep their class's names and parameters (only the class changes to a
subclass whose forward adds the collectives), so ``state_dict`` keys are the same as before sharding.

MoE layers shard their own routed experts (``MoELayer.shard_experts_tensor_parallel``; at etp = 1 they keep them
whole and split the tokens over the tp ranks instead); plan entries inside them are skipped, and their shared
experts are sharded here like a dense MLP. ``tensor_parallel_shards(model, tp)`` runs the same checks and finds the
same parameters without changing anything (``switchyard plan`` sizes jobs with it).

``full_state_dict(model, groups)`` is the unsharded state dict, gathered on every rank (a collective); a sharded
linear loads either its own slice or the full tensor (keeping its slice), so that state dict loads back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from switchyard.log import get_logger
from switchyard.parallel.tensor_shards import (
    TensorShard,
    as_local_shard,
    copy_to_group,
    deepcopy_keeping_parameter_tags,
    gather_tensor,
    reduce_from_group,
    shard_of,
    shard_parameter_,
)

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

log = get_logger(__name__)


class _ShardedLinear(nn.Linear):
    weight_dim: int  # the weight dimension split over the group
    tp_group: dist.ProcessGroup | None
    tp_rank: int
    tp_size: int

    def __deepcopy__(self, memo: dict) -> nn.Module:  # the copy's shards keep their tp_shard tags
        return deepcopy_keeping_parameter_tags(self, memo)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """A full tensor (``full_state_dict``'s, or the model's before sharding) loads as this rank's slice; a
        slice-sized one as it is."""
        for name, param in self._parameters.items():
            shard, given = shard_of(param) if param is not None else None, state_dict.get(prefix + name)
            if shard is not None and given is not None:
                state_dict[prefix + name] = as_local_shard(given, param, shard, self.tp_rank, self.tp_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ColumnParallelLinear(_ShardedLinear):
    """This rank's output features (weight rows, bias) of an ``nn.Linear``; its input is the same on every rank,
    so the input's gradient is summed over the group (``copy_to_group``)."""

    weight_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """This rank's input features (weight columns) of an ``nn.Linear``: a partial product, summed over the group;
    the bias is whole and added once, after the sum."""

    weight_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_group(F.linear(x, self.weight), self.tp_group)
        return out if self.bias is None else out + self.bias


LINEAR_STYLES: dict[str, type[_ShardedLinear]] = {"colwise": ColumnParallelLinear, "rowwise": RowParallelLinear}
# transformers' styles for its own MoE blocks: switchyard's MoE layers replace those blocks (patch_model)
HF_EXPERT_STYLES = {"moe_tp_experts", "packed_colwise", "packed_rowwise", "moe_identity_expert"}
# what a shared-experts MLP of an MoE layer gets (no plan names it: an MoE model's plan names HF's blocks)
SHARED_EXPERT_STYLES = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}


def _shard_linear(cls: type[_ShardedLinear], linear: nn.Module, group: dist.ProcessGroup | None, rank: int,
                  size: int) -> None:
    """Slice ``linear``'s parameters in place (same Parameter objects: their attributes, hooks and names stay)."""
    for name, shard in _linear_shards(cls, linear).items():
        shard_parameter_(getattr(linear, name), shard, rank, size)
    linear.out_features, linear.in_features = linear.weight.shape
    linear.__class__ = cls
    linear.tp_group, linear.tp_rank, linear.tp_size = group, rank, size


def _linear_shards(cls: type[_ShardedLinear], linear: nn.Module) -> dict[str, TensorShard]:
    """The weight splits along ``cls.weight_dim``; a column-parallel bias with it, a row-parallel one stays whole
    (it is added once, after the sum)."""
    shard = TensorShard(cls.weight_dim, "tp")
    return {"weight": shard, **({"bias": shard} if linear.bias is not None and cls.weight_dim == 0 else {})}


def _sum_grads_over_group(module: nn.Module, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
    """Replicated parameters applied to this rank's heads only (Qwen3's per-head ``q_norm``/``k_norm``): each rank's
    gradient covers its heads, so the gradient is summed over the group before it accumulates (a tensor hook, not
    a post-accumulate one: gradient accumulation would sum earlier micro-batches again)."""
    for param in module.parameters(recurse=False):
        if param.requires_grad:
            param.register_hook(partial(_all_reduced, group=group))


def _all_reduced(grad: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


# plan style → what it does to the module, in place: (module, tp group, tp rank, tp size)
STYLES: dict[str, Callable[[nn.Module, dist.ProcessGroup | None, int, int], None]] = {
    **{style: partial(_shard_linear, cls) for style, cls in LINEAR_STYLES.items()},
    "replicated_with_grad_allreduce": _sum_grads_over_group,
}


@dataclass(frozen=True)
class _Site:
    name: str  # qualified name in the model, for messages
    module: nn.Module
    style: str


def apply_tensor_parallel(model: nn.Module, groups: "ProcessGroupManager") -> None:
    """Shard ``model`` in place over the tp group, per ``model.config.base_model_tp_plan``; a no-op at tp=1.

    Every check runs before anything changes: a model that cannot be sharded is left as it was.
    """
    tp = groups.size("tp")
    if tp == 1:
        return
    sites, moe_layers = _checked_sites(model, tp, groups.size("etp"))
    for layer in moe_layers.values():
        layer.shard_experts_tensor_parallel()
    group, rank = groups.group("tp"), groups.rank("tp")
    for site in sites:
        STYLES[site.style](site.module, group, rank, tp)
    experts = "shard their experts" if groups.size("etp") == tp else "split their tokens over the tp ranks (etp=1)"
    log.info("tensor parallel: %d modules sharded over tp=%d (%d MoE layers %s)",
             sum(site.style in LINEAR_STYLES for site in sites), tp, len(moe_layers), experts, ranks=[0])


def tensor_parallel_shards(model: nn.Module, tp: int, etp: int | None = None) -> dict[str, TensorShard]:
    """What ``apply_tensor_parallel`` at this tp and etp (default tp; at 1 the experts stay whole) would split,
    changing nothing: parameter name (as in ``model.named_parameters()``) → its shard; parameters left out stay
    whole on every rank. For sizing a job on the meta device (``switchyard plan``); raises the same errors, and
    ``{}`` at tp=1."""
    if tp == 1:
        return {}
    etp = tp if etp is None else etp
    sites, moe_layers = _checked_sites(model, tp, etp)
    shards: dict[str, TensorShard] = {}
    for site in sites:
        if site.style in LINEAR_STYLES:
            linear = _linear_shards(LINEAR_STYLES[site.style], site.module)
            shards.update({f"{site.name}.{param}": shard for param, shard in linear.items()})
    prefix = _base_prefix(model)
    for name, layer in moe_layers.items() if etp > 1 else ():
        experts = f"{prefix}.{name}.experts".lstrip(".")
        shards.update({f"{experts}.{param}": shard for param, shard in layer.experts.ffn_shards().items()})
    return shards


def _base_prefix(model: nn.Module) -> str:
    base = model.base_model
    return next(name for name, module in model.named_modules() if module is base)


def _checked_sites(model: nn.Module, tp: int, etp: int) -> tuple[list[_Site], dict[str, nn.Module]]:
    """The modules the plan shards and the MoE layers (by name in the base model), after every check."""
    from switchyard.moe.layer import MoELayer  # moe imports parallel (and DeepSpeed): imported on use

    plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no config.base_model_tp_plan: tensor parallelism (tp={tp}) needs a "
            "transformers model class with a tensor-parallel plan (Llama, Qwen2/3, Mistral, ...); use tp=1"
        )
    if any(shard_of(p) is not None for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} is already tensor-parallel: call apply_tensor_parallel once")
    base, prefix = model.base_model, _base_prefix(model)
    moe_layers = {name: m for name, m in base.named_modules() if isinstance(m, MoELayer)}
    sites = _plan_sites(base, plan, moe_layers, prefix) + _shared_expert_sites(moe_layers, prefix)
    if not sites and not moe_layers:
        raise ValueError(f"{type(model).__name__}'s base_model_tp_plan {plan} matched no module of the model; "
                         "use tp=1")
    _check_divisible(model, sites, moe_layers, tp, etp)
    return sites, moe_layers


def _plan_sites(base: nn.Module, plan: dict[str, str], moe_layers: dict[str, nn.Module], prefix: str) -> list[_Site]:
    """The modules the plan names, outside MoE layers; a plan entry this module cannot honour raises."""
    patterns = [(re.compile(_pattern(key)), style) for key, style in plan.items()]
    named = [*base.named_modules(), *base.named_parameters()]
    sites = []
    for name, target in named:
        style = next((style for pattern, style in patterns if pattern.fullmatch(name)), None)
        if style is None or any(name == m or name.startswith(m + ".") for m in moe_layers):
            continue
        qualified = f"{prefix}.{name}" if prefix else name
        if style not in STYLES:
            hint = "patch_model(model) first (MoE layers shard their experts), or " if style in HF_EXPERT_STYLES else ""
            raise ValueError(
                f"{qualified} has tensor-parallel style {style!r} in {type(base).__name__}'s base_model_tp_plan; "
                f"switchyard implements {sorted(STYLES)}: {hint}use tp=1 for this model"
            )
        if style in LINEAR_STYLES and type(target) is not nn.Linear:
            raise ValueError(f"{qualified} is a {type(target).__name__}, not an nn.Linear, so its {style!r} plan "
                             "entry cannot be applied; use tp=1 for this model")
        sites.append(_Site(qualified, target, style))
    return sites


def _pattern(key: str) -> str:
    """A plan key as a regex: ``*`` stands for one module-name component (a layer index)."""
    return r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in key.split("."))


def _shared_expert_sites(moe_layers: dict[str, nn.Module], prefix: str) -> list[_Site]:
    sites = []
    for name, layer in moe_layers.items():
        if layer.shared_experts is None:
            continue
        for child, style in SHARED_EXPERT_STYLES.items():
            linear = getattr(layer.shared_experts, child, None)
            if linear is not None:
                sites.append(_Site(f"{prefix}.{name}.shared_experts.{child}".lstrip("."), linear, style))
    return sites


def _check_divisible(model: nn.Module, sites: list[_Site], moe_layers: dict[str, nn.Module], tp: int,
                     etp: int) -> None:
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    if heads is not None:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % tp or kv_heads % tp:
            fits = [d for d in range(1, heads + 1) if heads % d == 0 and kv_heads % d == 0]
            raise ValueError(
                f"tp={tp} must divide num_attention_heads={heads} and num_key_value_heads={kv_heads} (each tp rank "
                f"holds whole heads); choose tp in {fits}"
            )
    problems = [
        f"{site.name} dimension {LINEAR_STYLES[site.style].weight_dim} of its {tuple(site.module.weight.shape)} "
        f"weight ({site.module.weight.shape[LINEAR_STYLES[site.style].weight_dim]})"
        for site in sites
        if site.style in LINEAR_STYLES and site.module.weight.shape[LINEAR_STYLES[site.style].weight_dim] % tp
    ]
    problems += [f"{name}.experts' intermediate size ({layer.intermediate_size})"
                 for name, layer in moe_layers.items() if etp == tp and layer.intermediate_size % tp]
    if problems:
        raise ValueError(f"tp={tp} does not divide {'; '.join(problems[:3])}"
                         f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; choose a tp dividing it")
    if moe_layers and etp not in (1, tp):
        raise ValueError(f"expert tensor parallelism etp={etp} with tp={tp}: the MoE layers shard their experts over "
                         f"the tp ranks (etp = tp) or split the tokens over them (etp = 1); use etp={tp} or etp=1")


def full_state_dict(model: nn.Module, groups: "ProcessGroupManager",
                    wanted: Callable[[nn.Parameter], bool] | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tensor-parallel shard gathered: the unsharded model's state dict. A
    collective: every rank calls it.

    Shards are gathered one at a time on their device and the full tensor moved to the CPU, so the device never
    holds more than one gathered tensor beside the model (a model split because it does not fit one GPU does not
    have to fit for a save). ``wanted(param)`` False (a parameter this rank will not write): its entries are
    zero-stride placeholders of the full shape, costing no memory, whose values mean nothing. The gathered tensors
    stand in for the shards while ``state_dict`` runs, so state-dict hooks (an MoE layer's per-expert keys) see
    full shapes and the keys are exactly the model's own.
    """
    sharded = [(p, s) for p in model.parameters() if (s := shard_of(p)) is not None]
    local = [p.data for p, _ in sharded]
    try:
        for param, shard in sharded:
            full = gather_tensor(param.data, shard, groups.group(shard.group_kind), groups.size(shard.group_kind))
            keep = wanted is None or wanted(param)
            param.data = full.cpu() if keep else param.data.new_zeros(()).expand(full.shape)
            del full
        return model.state_dict()
    finally:
        for (param, _), data in zip(sharded, local):
            param.data = data
