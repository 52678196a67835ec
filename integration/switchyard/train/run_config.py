"""The fine-tune run config: one YAML file plus ``key.sub=value`` overrides, validated before any step.

Sections: ``output_dir``, ``model``, ``moe``, ``parallel``, ``data``, ``train``, ``checkpoint``,
``deepspeed``. Unknown keys and inconsistent values are ``ValueError``s that name the key, the value
and the fix; checks that need the world size (global batch, ep dividing the world) run in
:meth:`RunConfig.check_world`, still before the model is built.
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import yaml

from switchyard.config import MoEConfig, ParallelConfig, check_field_type
from switchyard.train.data import DataConfig

PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")

@dataclass
class ModelSection:
    """``source``: "tiny" (the embedded default), a dense HF dir or hub id (upcycled on the fly), a
    switchyard dir (``save_pretrained``), or an HF MoE model (adopted)."""

    source: str = "tiny"
    tokenizer: str | None = None  # defaults to the model's own
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides for the embedded tiny model
    # HF sources: how many ranks of a node load the whole model at once (None: as many as host memory holds)
    load_ranks_at_once: int | None = None

    def __post_init__(self) -> None:
        self.tiny = _checked_tiny(self.tiny)
        if self.load_ranks_at_once is not None and self.load_ranks_at_once < 1:
            raise ValueError(f"model.load_ranks_at_once={self.load_ranks_at_once} must be >= 1 (ranks of a node that "
                             "load the model at the same time), or left out to size it from the host's free memory")


def _checked_tiny(values: dict[str, Any]) -> dict[str, Any]:
    """``model.tiny`` keys go into LlamaConfig, which keeps any unknown key silently: refuse typos here."""
    from switchyard.train.tiny import TINY_LLAMA_DEFAULTS, tiny_setting_defaults

    if not isinstance(values, dict):
        raise ValueError(f"model.tiny must be a mapping, got {values!r}")
    defaults = tiny_setting_defaults()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config keys {['model.tiny.' + k for k in unknown]}; model.tiny takes LlamaConfig "
                         f"fields (e.g. {sorted(TINY_LLAMA_DEFAULTS)}) and name, seed")
    return {k: coerce_field(f"model.tiny.{k}", v, float if isinstance(defaults[k], float) else Any)
            for k, v in values.items()}


@dataclass
class MoESection:
    """MoEConfig fields (flat in the YAML: ``moe.num_experts``) plus which layers to swap (see
    ``switchyard.patch_model``); the MoEConfig fields are gathered into ``config``."""

    config: dict[str, Any] = field(default_factory=lambda: {"num_experts": 4, "top_k": 2})
    layers: list[int] | None = None
    every_n: int | None = None
    targets: list[str] | None = None
    exclude: list[str] | None = None
    adapter: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # for adopted HF MoE models


@dataclass
class TrainSection:
    """``max_steps`` and ``epochs``: either or both (training ends at whichever comes first)."""

    max_steps: int | None = None
    epochs: int | None = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    global_batch_size: int | None = None  # if set, must equal micro_batch_size * grad_accum * dp
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 3e-4
    momentum: float = 0.0  # sgd only
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 25
    eval_batches: int = 8
    log_every: int = 1
    cuda_graph: bool = False  # MoE layers' routed path as CUDA graph replays where its rules hold (moe-layer.md)
    # each decoder layer's activations recomputed in the backward instead of kept (transformers' own switch)
    gradient_checkpointing: bool = False
    # glob patterns over parameter names left untrained (train/freezing.py), e.g. ["*.self_attn.*"]
    freeze: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("cuda_graph", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        if self.freeze is not None and (not self.freeze or not all(isinstance(p, str) and p for p in self.freeze)):
            raise ValueError(f"train.freeze must be a non-empty list of glob patterns over parameter names (e.g. "
                             f"['*.self_attn.*']) or null, got {self.freeze!r}")
        if self.cuda_graph and self.gradient_checkpointing:
            raise ValueError("train.cuda_graph and train.gradient_checkpointing are both true: a CUDA graph saves "
                             "its activations itself, so recomputation cannot replace them; turn one of them off")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("train needs max_steps or epochs (or both: whichever ends first); set train.max_steps "
                             "or train.epochs")
        for name in ("max_steps", "epochs", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"train.{name} must be a positive integer or null, got {value!r}")
        for name in ("micro_batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.clip < 0 or self.weight_decay < 0 or self.momentum < 0:
            raise ValueError(f"train.warmup_steps, train.clip, train.weight_decay and train.momentum must be >= 0, got "
                             f"{self.warmup_steps}, {self.clip}, {self.weight_decay}, {self.momentum}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer={self.optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is unknown; choose one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is unknown; choose one of {PRECISIONS}")


@dataclass
class CheckpointSection:
    every: int = 25  # steps; a checkpoint is also written at the end
    keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: str | None = None  # None | "auto" | a checkpoint dir

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint.every and checkpoint.keep must be >= 1, got {self.every}, {self.keep}")


@dataclass
class RunConfig:
    # MoEConfig keys the YAML or an override set (load_run_config fills it): a source that brings its own MoE
    # layers (a switchyard checkpoint, an HF MoE model) refuses them rather than ignore them (model_source.py)
    moe_keys_set: ClassVar[tuple[str, ...]] = ()

    output_dir: str = "runs/tiny"
    model: ModelSection = field(default_factory=ModelSection)
    moe: MoESection = field(default_factory=MoESection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    deepspeed: str = "configs/deepspeed/zero2.json"

    def __post_init__(self) -> None:
        out = Path(self.output_dir)
        if not self.output_dir.strip():  # Path("") is the working directory: what an unset variable would name
            raise ValueError("output_dir is empty (an unset variable?): name the run's directory, e.g. runs/my-run")
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir={self.output_dir!r} is a file; a run writes its checkpoints, metrics and "
                             "plots into a directory: choose another output_dir")

    def moe_config(self) -> MoEConfig:
        return MoEConfig.from_dict(self.moe.config)

    def check_world(self, world_size: int) -> dict[str, int]:
        """Checks that need the world size; returns the derived degrees (dp, edp, …)."""
        sizes = self.parallel.derived(world_size)
        if sizes["tp"] > 1 and sizes["etp"] == 1:  # tokens split over the tp ranks: what a slice cannot honour
            # the fix per key: etp = tp takes a sequence balance loss, no tensor parallelism takes router jitter
            for key, other in (("seq_aux_loss_coef", " or leave parallel.etp unset (etp = tp)"), ("router_jitter", "")):
                if self.moe.config.get(key):
                    raise ValueError(
                        f"moe.{key}={self.moe.config[key]} with parallel.tp={sizes['tp']} and parallel.etp=1: each tp "
                        f"rank routes a slice of the tokens (docs/moe-layer.md); set moe.{key}=0{other}"
                    )
        # only a count this config decides: a source with its own MoE layers (an HF MoE model, a switchyard
        # checkpoint) keeps its experts, which MoESection's default of 4 says nothing about (patch_model checks them)
        num_experts = self.moe.config.get("num_experts")
        decided = "num_experts" in self.moe_keys_set or self.model.source == "tiny"
        if decided and num_experts is not None and num_experts % self.parallel.ep != 0:
            raise ValueError(f"moe.num_experts={num_experts} is not divisible by parallel.ep={self.parallel.ep}")
        t = self.train
        implied = t.micro_batch_size * t.grad_accum * sizes["dp"]
        if t.global_batch_size is not None and t.global_batch_size != implied:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} but micro_batch_size × grad_accum × dp = "
                f"{t.micro_batch_size} × {t.grad_accum} × {sizes['dp']} = {implied}; make them agree"
            )
        return sizes

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The ``deepspeed`` JSON with its "auto" values filled for ``world_size`` (after :meth:`check_world`);
        refuses ZeRO-3 with tp, pp or CUDA graphs, values contradicting the run config and sections switchyard
        builds itself. At ZeRO stage 0 the training loop clips with the global norm itself
        (``STAGE0_CLIP_MESSAGE``)."""
        from switchyard.deepspeed.config import fill_deepspeed_config, zero_stage

        sizes = self.check_world(world_size)
        t = self.train
        stage = zero_stage(self.deepspeed)
        if stage == 3:
            self._check_zero3(sizes)
        return fill_deepspeed_config(self.deepspeed, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                                     dp_size=sizes["dp"], clip=t.clip, precision=t.precision, ep_size=sizes["ep"],
                                     caller_clips=stage == 0)

    def _check_zero3(self, sizes: dict[str, int]) -> None:
        from switchyard.deepspeed.config import ZERO3_MESSAGE

        for what, unsupported, fix in (
            (f"parallel.tp={sizes['tp']}", sizes["tp"] > 1, "use parallel.tp=1, or ZeRO stage 1 or 2 with tp"),
            (f"parallel.pp={sizes['pp']}", sizes["pp"] > 1, "use parallel.pp=1, or ZeRO stage 1 or 2 with pp"),
            ("train.cuda_graph=true", self.train.cuda_graph, "set train.cuda_graph=false (a graph would keep the "
                                                             "gathered weights its capture saw)"),
        ):
            if unsupported:
                raise ValueError(ZERO3_MESSAGE.format(path=self.deepspeed, what=what, fix=fix))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_mismatches(self, recorded: dict[str, Any]) -> list[str]:
        """``RESUME_FIXED`` settings that differ from a checkpoint's recorded run config, as ``key: old → new``."""
        old, new = _comparable(recorded), _comparable(self.to_dict())
        return [d for key in RESUME_FIXED for d in _differences(key, _at(old, key), _at(new, key))]


# What a checkpoint's weights, optimizer state and data position depend on: a resume must keep them.
# Layout (parallel.*, world size), step counts, lr schedule, clipping, eval and checkpoint settings may change.
RESUME_FIXED = (
    "model.source", "model.tokenizer", "model.tiny",
    "moe.config", "moe.layers", "moe.every_n", "moe.targets", "moe.exclude", "moe.adapter", "moe.overrides",
    "data.source", "data.format", "data.text_field", "data.messages_field", "data.prompt_field",
    "data.response_field", "data.seq_len", "data.packing", "data.eval_fraction", "data.seed", "data.max_samples",
    "data.sample_by", "train.optimizer", "train.freeze",
)


def _comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """A run config dict as meta.json stores it (JSON types), with ``moe.config`` completed by MoEConfig's
    defaults so that a default spelled out equals one left out."""
    tree = json.loads(json.dumps(tree, default=str))
    moe = tree.get("moe") or {}
    moe["config"] = json.loads(json.dumps(dataclasses.asdict(MoEConfig.from_dict(moe.get("config") or {})),
                                          default=str))
    return tree


def _differences(key: str, old: Any, new: Any) -> list[str]:
    """``key: old → new`` per differing leaf (mappings compared key by key; ``moe.config.x`` shown as ``moe.x``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for sub in sorted(set(old) | set(new))
                for d in _differences(f"{key}.{sub}", old.get(sub), new.get(sub))]
    return [] if old == new else [f"{key.replace('moe.config.', 'moe.')}: {old!r} → {new!r}"]


def _at(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _build(cls: type, values: Any, where: str) -> Any:
    """Build a (nested) dataclass from plain YAML values, rejecting unknown keys by their full path."""
    if not dataclasses.is_dataclass(cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; known keys here are {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint, path = hints[name], f"{where}.{name}" if where else name
        kwargs[name] = _build(hint, value, path) if dataclasses.is_dataclass(hint) else coerce_field(path, value, hint)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where or 'config'}: {err}") from None


def number_from_string(value: str) -> float | None:
    """``"1e-4"`` → 1e-4: YAML 1.1 (PyYAML) reads exponents without a dot as strings; ``None`` if not a number."""
    try:
        return float(value)
    except ValueError:
        return None


def coerce_field(where: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's type hint (numeric strings and ints become floats for float
    fields), or a ValueError naming the field, the value and the expected type."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if float in args and not isinstance(value, bool):
        if isinstance(value, str) and number_from_string(value) is not None:
            value = number_from_string(value)
        elif isinstance(value, int):
            value = float(value)
    check_field_type(where, value, hint)
    return value


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (problem, the line quoted with a caret, position) as one line."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """``train.lr=1e-4`` → tree["train"]["lr"] = 1e-4 (the value parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key.sub=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {key!r} is not a section")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"override {assignment!r}: the value is not valid YAML ({_one_line(err)}); if it is a "
                         f"string, quote it: {dotted.strip()}='\"{raw}\"' (a list: {dotted.strip()}='[\"{raw}\"]')"
                         ) from None
    if isinstance(value, str) and number_from_string(value) is not None:  # YAML 1.1 reads "5e-4" as a string
        value = number_from_string(value)
    node[keys[-1]] = value


def _gather_moe_fields(moe: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Flat ``moe:`` keys → selection keys stay, MoEConfig keys go under ``config``; and the MoEConfig keys the
    user set (the rest are ``MoESection``'s defaults)."""
    if not isinstance(moe, dict):
        raise ValueError(f"moe must be a mapping, got {moe!r}")
    selection = {f.name for f in dataclasses.fields(MoESection)} - {"config"}
    gathered: dict[str, Any] = {k: v for k, v in moe.items() if k in selection}
    given = {**(moe.get("config") or {}), **{k: v for k, v in moe.items() if k not in selection and k != "config"}}
    hints = get_type_hints(MoEConfig)
    config = {**MoESection().config, **given}
    gathered["config"] = {k: coerce_field(f"moe.{k}", v, hints[k]) if k in hints else v for k, v in config.items()}
    return gathered, tuple(sorted(given))


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"run config {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"run config {path} is not valid YAML: {_one_line(err)}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"run config {path} must be a YAML mapping")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    tree["moe"], moe_keys_set = _gather_moe_fields(tree.get("moe") or {})
    config = _build(RunConfig, tree, "")
    config.moe_keys_set = moe_keys_set
    config.moe_config()  # validates the MoE section now
    config.deepspeed = str(resolve_deepspeed_path(config.deepspeed, path))
    return config


def resolve_deepspeed_path(value: str, run_config: Path | None) -> Path:
    """A relative ``deepspeed`` path, found from the cwd, else from the run config's directory or one above
    it (``configs/deepspeed/zero2.json`` in configs/finetune/tiny.yaml works from any cwd), else from switchyard's
    own checkout (the default ``configs/deepspeed/zero2.json`` works for a run config kept anywhere)."""
    path = Path(value).expanduser()
    checkout = Path(__file__).resolve().parents[3]  # integration/switchyard/train/run_config.py → the checkout
    bases = [Path.cwd()]
    if not path.is_absolute():
        if run_config is not None:
            here = run_config.resolve().parent
            bases += [here, *here.parents]
        bases.append(checkout)
    for base in bases:
        if (base / path).is_file():
            return base / path if base != Path.cwd() else path
    raise ValueError(f"deepspeed={value!r}: no such file (looked from the cwd {Path.cwd()}"
                     f"{'' if len(bases) == 1 else ', the run config directory and the ones above it, and ' + str(checkout)}"
                     "); point deepspeed at a JSON in configs/deepspeed/")
