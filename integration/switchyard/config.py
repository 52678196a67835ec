"""Validated settings objects.

Every user-facing knob lives in a dataclass whose ``__post_init__`` raises ``ValueError`` naming the
offending value and the fix, so a bad setting fails before any process group or model is touched.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from switchyard.activations import get_activation

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
INIT_METHODS = ("copy", "granular", "drop_upcycle", "random")


# Type names in errors, spelled for the reader: Python callers see True/None, YAML users true/null.
_TYPE_NAMES: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                               list: "a list", dict: "a mapping", type(None): "null"}
_PYTHON_TYPE_NAMES = {**_TYPE_NAMES, bool: "True or False", dict: "a dict", type(None): "None"}


def check_field_type(where: str, value: Any, hint: Any, python_spelling: bool = False) -> None:
    """``value`` against a field's type hint, or a ValueError naming the field, the value and the type.

    A bool is not a number here and an int is a float, so ``aux_loss_coef=1`` passes but
    ``num_experts=8.0`` and ``norm_topk_prob="false"`` do not. One checker for MoEConfig (Python API)
    and the fine-tune run config (YAML), which first coerces YAML's numeric strings.
    """
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds = [get_origin(a) or a for a in args if a is not type(None)]
    if (value is None and optional) or Any in kinds:
        return
    for kind in kinds:
        if isinstance(value, bool) and kind in (int, float):
            continue
        if kind is float and isinstance(value, float) and not math.isfinite(value):
            # NaN passes every range check after this one (all its comparisons are False)
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        if isinstance(value, kind) or (kind is float and isinstance(value, int)):
            return
    spelled = _PYTHON_TYPE_NAMES if python_spelling else _TYPE_NAMES
    names = [spelled.get(k, k.__name__) for k in kinds + ([type(None)] if optional else [])]
    raise ValueError(f"{where} must be {' or '.join(names)}, got {value!r} ({type(value).__name__})")


def _check_kinds(config: Any) -> None:
    """Type errors as ValueErrors naming the field, before any comparison could fail on a wrong type."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        check_field_type(f"{type(config).__name__}.{f.name}", getattr(config, f.name), hints[f.name],
                         python_spelling=True)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ParallelConfig:
    """Degrees of parallelism. ``etp=None`` means expert tensor parallel = ``tp``. ``pp_layers``: decoder layers per
    pipeline stage, first to last (None: as even as the count allows, the first stages taking one more)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    pp_layers: list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            _positive_int(name, getattr(self, name))
        if self.pp_layers is not None:
            if self.pp == 1:
                raise ValueError(f"pp_layers={self.pp_layers!r} divides the layers among pipeline stages, but pp=1; "
                                 "leave pp_layers out or set pp")
            if not isinstance(self.pp_layers, (list, tuple)) or len(self.pp_layers) != self.pp:
                raise ValueError(f"pp_layers={self.pp_layers!r} must list one layer count per pipeline stage, "
                                 f"{self.pp} of them (pp={self.pp})")
            for count in self.pp_layers:
                _positive_int("every pp_layers entry (a stage's decoder layers)", count)
            self.pp_layers = list(self.pp_layers)
        if self.etp is None:
            self.etp = self.tp
        _positive_int("etp", self.etp)
        if self.etp not in (1, self.tp):
            raise ValueError(
                f"etp={self.etp} is not supported with tp={self.tp}: expert tensor parallelism must be 1 "
                f"(experts not sharded) or equal to tp ({self.tp})"
            )

    def derived(self, world_size: int) -> dict[str, int]:
        """dp and edp for ``world_size``, or ``ValueError`` naming the numbers that do not divide."""
        _positive_int("world_size", world_size)
        tp, pp, ep, etp = self.tp, self.pp, self.ep, self.etp
        assert etp is not None
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
                f"choose tp and pp whose product divides {world_size}"
            )
        dp = world_size // (tp * pp)
        ranks_per_stage = tp * dp
        if ranks_per_stage % (ep * etp) != 0:
            raise ValueError(
                f"ep*etp = {ep}*{etp} = {ep * etp} does not divide tp*dp = {tp}*{dp} = {ranks_per_stage} "
                f"(world {world_size}, pp {pp}); choose ep so that ep*etp divides {ranks_per_stage}"
            )
        return {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "etp": etp, "edp": ranks_per_stage // (ep * etp)}


@dataclass
class MoEConfig:
    """How an MoE layer routes, balances, drops and computes.

    Defaults reproduce Mixtral: softmax over all experts, top-2, renormalized, dropless, SwiGLU experts.
    ``intermediate_size=None`` means "take it from the FFN being replaced".
    """

    num_experts: int = 8
    top_k: int = 2
    init: str = "copy"
    intermediate_size: int | None = None
    # router
    score_func: str = "softmax"
    softmax_before_topk: bool = True
    norm_topk_prob: bool = True
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    router_jitter: float = 0.0
    jitter_experts_input: bool = False  # the experts see the jittered input too (transformers' Mixtral)
    # losses
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # capacity: None = dropless
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: str = "probs"
    # shared experts
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    # expert FFN
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kinds(self)
        _positive_int("num_experts", self.num_experts)
        _positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use top_k <= {self.num_experts}"
            )
        if self.init not in INIT_METHODS:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {INIT_METHODS}")
        if self.intermediate_size is not None:
            _positive_int("intermediate_size", self.intermediate_size)
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={self.score_func!r} is unknown; choose one of {SCORE_FUNCS}")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                f"group-limited routing needs both n_group and topk_group, got n_group={self.n_group}, "
                f"topk_group={self.topk_group}"
            )
        if self.n_group is not None:
            _positive_int("n_group", self.n_group)
            _positive_int("topk_group", self.topk_group)
            if self.num_experts % self.n_group != 0:
                raise ValueError(
                    f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}"
                )
            if self.topk_group > self.n_group:  # type: ignore[operator]
                raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
            experts_reachable = self.topk_group * (self.num_experts // self.n_group)  # type: ignore[operator]
            if experts_reachable < self.top_k:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts hold "
                    f"{experts_reachable} experts, fewer than top_k={self.top_k}"
                )
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.router_jitter < 0:
            raise ValueError(f"router_jitter must be >= 0, got {self.router_jitter}")
        if self.expert_bias_update_rate < 0:
            raise ValueError(f"expert_bias_update_rate must be >= 0, got {self.expert_bias_update_rate}")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for dropless), got {value}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={self.drop_policy!r} is unknown; choose one of {DROP_POLICIES}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_intermediate_size is not None:
            _positive_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size)
        get_activation(self.activation)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
