"""Export a switchyard model as a standard transformers MoE checkpoint (no switchyard needed to load it).

    sy.export_hf(model, "hf-out/")   # then AutoModelForCausalLM.from_pretrained("hf-out/") or vLLM

``EXPORTS`` maps the source ``model_type`` to a transformers MoE family: upcycled Llama/Mistral →
Mixtral, Qwen2 → Qwen2-MoE, Qwen3 → Qwen3-MoE; adopted MoE models go back to their own class.
Correctness rests on one rule: the target config is built first and its routing is read back with
``switchyard.hf.adopt.moe_config_from_hf`` (the same code that adopts those blocks, parity-tested
against transformers), then compared field by field with ours — whatever the target cannot compute
is a ``ValueError`` naming the setting, before anything is written (``check_export`` runs every check on the
meta device from a checkpoint's config.json, before its weights are read). The target model is built with
meta parameters, filled with our tensors (shared storage, no copy) by a strict ``load_state_dict``,
and saved by its own ``save_pretrained``, so the on-disk layout is whatever that transformers
version (and vLLM) expects. It is saved into a hidden directory inside ``path`` and moved up when complete;
that directory's name records the process and host writing it, so a later export can tell a killed export's
leftover (removed) from a running one's (kept). The written config.json carries ``EXPORT_KEY``: only a directory
holding that mark is taken for an earlier export and replaced; any other non-empty directory is refused, as it may
be a model the user downloaded or adopted from (same ``model_type`` or not).
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from switchyard.config import MoEConfig
from switchyard.hf.adopt import ADAPTERS as BLOCK_ADAPTERS
from switchyard.hf.adopt import _PER_EXPERT_NAMES, moe_config_from_hf
from switchyard.hf.checkpoint import (_parse_size, _read_json, empty_model, moe_prefixes, nonempty_path,
                                      switchyard_record)
from switchyard.hf.patch import CONFIG_KEY, _uncompiled
from switchyard.log import get_logger
from switchyard.moe.layer import MoELayer

log = get_logger(__name__)

# Routing / FFN settings that change what the model computes at inference; the rest (loss
# coefficients, jitter, init, bias update rate) only shape training.
SEMANTIC_FIELDS = ("num_experts", "top_k", "intermediate_size", "score_func", "softmax_before_topk",
                   "norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor", "expert_bias",
                   "activation", "gated", "bias", "eval_capacity_factor", "shared")
KEEP_SWITCHYARD = "or keep the switchyard checkpoint (switchyard.save_pretrained)"
# Weight files transformers' from_pretrained reads (safetensors first, then .bin), sharded or not
_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
# The staging directory inside the export path: .export-<pid>@<host>.<random>, so that a later export can tell
# a killed export's leftover (pid gone on this host) from a concurrent one's; a bare .export-<random> is an older one's
_STAGING_PREFIX = ".export-"
_STAGING_OWNER = re.compile(r"^\.export-(?P<pid>\d+)@(?P<host>[^@/]+)\.[^.]+$")
# The mark an export writes into its config.json ({"version": 1, "from": <source model_type>}): what tells an earlier
# export, which a new one may replace, from a model of the same model_type that must never be overwritten
EXPORT_KEY = "switchyard_export"
_EXPORT_MARK_VERSION = 1


@dataclass(frozen=True)
class Shape:
    """What the upcycled model looks like, for building the target config."""

    moe: MoEConfig
    expert_size: int
    shared_size: int | None
    dense_layers: list[int]


@dataclass(frozen=True)
class MoEFamily:
    """A transformers MoE family we can write: its block and how to describe an upcycled model to it."""

    model_type: str
    block: str  # key of switchyard.hf.adopt.ADAPTERS
    upcycled_fields: Callable[[Shape], dict[str, Any]] | None = None  # None: adopt-only family
    dense_layers_ok: bool = False  # upcycled_fields lists dense layers (mlp_only_layers); else all must be MoE
    always_shared_expert: bool = False  # the block has a shared expert; ours may lack one → zero expert
    hints: dict[str, str] = field(default_factory=dict)


def _mixtral_fields(s: Shape) -> dict[str, Any]:
    return {"num_local_experts": s.moe.num_experts, "num_experts_per_tok": s.moe.top_k,
            "intermediate_size": s.expert_size, "router_aux_loss_coef": s.moe.aux_loss_coef,
            "router_jitter_noise": s.moe.router_jitter}


def _qwen_fields(s: Shape) -> dict[str, Any]:
    return {"num_experts": s.moe.num_experts, "num_experts_per_tok": s.moe.top_k,
            "moe_intermediate_size": s.expert_size, "norm_topk_prob": s.moe.norm_topk_prob,
            "router_aux_loss_coef": s.moe.aux_loss_coef, "decoder_sparse_step": 1,
            "mlp_only_layers": s.dense_layers}


def _qwen2_moe_fields(s: Shape) -> dict[str, Any]:
    # No shared expert of ours → a zero one (its down_proj is 0); expert-sized keeps it TP-shardable.
    return {**_qwen_fields(s), "shared_expert_intermediate_size": s.shared_size or s.expert_size}


_QWEN_NORM = "set norm_topk_prob to match, or keep the switchyard checkpoint"
MIXTRAL = MoEFamily("mixtral", "MixtralSparseMoeBlock", _mixtral_fields, hints={
    "norm_topk_prob": "Mixtral always renormalizes the top-k weights; use norm_topk_prob=True, or upcycle a "
                      "Qwen2/Qwen3 model instead (qwen2_moe/qwen3_moe export norm_topk_prob either way)",
    "shared": "Mixtral has no shared expert; upcycle Qwen2 instead (Qwen2-MoE has one)",
    "dense_layers": "Mixtral has no dense layers: patch every layer (no every_n/layers), or upcycle Qwen2/Qwen3 "
                    "instead (the export targets that keep dense layers are Qwen2-MoE and Qwen3-MoE, by "
                    "mlp_only_layers)",
})
QWEN2_MOE = MoEFamily("qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen2_moe_fields, True, True, hints={
    "shared": "Qwen2-MoE's shared expert always has a sigmoid gate: use shared_expert_gate=True"})
QWEN3_MOE = MoEFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock", _qwen_fields, True, hints={
    "shared": "Qwen3-MoE has no shared expert; upcycle Qwen2 instead (Qwen2-MoE has one)"})
OLMOE = MoEFamily("olmoe", "OlmoeSparseMoeBlock")
DEEPSEEK_V3 = MoEFamily("deepseek_v3", "DeepseekV3MoE")

EXPORTS: dict[str, MoEFamily] = {
    "llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE, "qwen3": QWEN3_MOE,  # upcycled
    "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE, "olmoe": OLMOE, "deepseek_v3": DEEPSEEK_V3,
}


def _no_attention_bias(cfg: Any) -> list[str]:
    return ["attention_bias=True: Mixtral's attention has no biases"] if getattr(cfg, "attention_bias", False) else []


SOURCE_CHECKS: dict[str, Callable[[Any], list[str]]] = {"llama": _no_attention_bias}


def supported_exports() -> str:
    return ", ".join(f"{src}→{fam.model_type}" for src, fam in EXPORTS.items())


def _class_name(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)


def _target_class(model: nn.Module, family: MoEFamily) -> str:
    """The target family's class for the task ``model``'s class serves (``LlamaForSequenceClassification`` →
    ``MixtralForSequenceClassification``, ``LlamaModel`` → ``MixtralModel``), read from transformers' Auto maps."""
    from transformers.models.auto import modeling_auto

    name, source = type(model).__name__, model.config.model_type
    tasks = [(attr, mapping) for attr in dir(modeling_auto) if attr.endswith("_MAPPING_NAMES")
             and isinstance(mapping := getattr(modeling_auto, attr), dict) and mapping.get(source) == name]
    for _, mapping in tasks:
        if isinstance(mapping.get(family.model_type), str):
            return mapping[family.model_type]
    if tasks:
        task = tasks[0][0].removesuffix("_NAMES")
        raise ValueError(f"{_class_name(family.model_type)}'s family has no class for what {name} does ({task}); "
                         f"export a {_class_name(source)} instead, {KEEP_SWITCHYARD}")
    raise ValueError(f"{name} is not a transformers class of {source}; export a model of a transformers class, "
                     f"{KEEP_SWITCHYARD}")


def _windows(cfg: Any) -> list[int | None]:
    """Per-layer sliding window as the model applies it (layer_types if the config has them)."""
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None) or None
    if isinstance(types, list) and len(types) == n:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n


# -- planning: target config and the checks ----------------------------------------------------------------
def _target_config(model: nn.Module, family: MoEFamily, record: dict, layers: list[MoELayer]) -> Any:
    from transformers import AutoConfig

    source = model.config
    values = {k: v for k, v in source.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "auto_map", "switchyard")}
    values["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if "layer_types" not in AutoConfig.for_model(family.model_type).to_dict():
        # the target would carry it unused (Qwen3-MoE windows every layer), and _check would trust it
        values.pop("layer_types", None)
    moe = MoEConfig.from_dict(record["moe"])
    if source.model_type == family.model_type:  # adopted: same class; write back what overrides changed
        if hasattr(source, "router_aux_loss_coef"):
            values["router_aux_loss_coef"] = moe.aux_loss_coef
        if not any(type(m).__name__ == family.block for m in model.modules()):  # no HF block left to change
            values["num_experts_per_tok"] = moe.top_k
            if "norm_topk_prob" in values:
                values["norm_topk_prob"] = moe.norm_topk_prob
        return AutoConfig.for_model(family.model_type, **values)
    assert family.upcycled_fields is not None
    n_layers = source.num_hidden_layers
    dense = [i for i in range(n_layers) if i not in record["layer_indices"]]
    if dense and not family.dense_layers_ok:
        raise ValueError(f"cannot export {source.model_type} to {_class_name(family.model_type)}: layers {dense} of "
                         f"{n_layers} stayed dense; {family.hints['dense_layers']}; {KEEP_SWITCHYARD}")
    shared = layers[0].shared_experts
    shape = Shape(moe, layers[0].intermediate_size, shared.up_proj.weight.shape[0] if shared is not None else None,
                  dense)
    return AutoConfig.for_model(family.model_type, **{**values, **family.upcycled_fields(shape)})


def _semantics(cfg: MoEConfig, layer: MoELayer) -> dict[str, Any]:
    shared = layer.shared_experts
    values = {name: getattr(cfg, name) for name in SEMANTIC_FIELDS if name != "shared"}
    values["intermediate_size"] = layer.intermediate_size
    values["shared"] = ((shared.up_proj.weight.shape[0], cfg.shared_expert_gate) if shared is not None else None)
    return values


def _describe(name: str, value: Any) -> str:
    if name != "shared":
        return f"{name}={value!r}"
    if value is None:
        return "no shared expert"
    return f"a shared expert of size {value[0]} ({'sigmoid-gated' if value[1] else 'no gate'})"


def _expected(target_config: Any, family: MoEFamily) -> dict[str, Any]:
    """What the target's block computes, read back through the adopt code (parity-tested with HF)."""
    cfg = moe_config_from_hf(target_config, family.block)
    values = {name: getattr(cfg, name) for name in SEMANTIC_FIELDS if name != "shared"}
    if cfg.num_shared_experts:
        size = cfg.shared_expert_intermediate_size or values["intermediate_size"] * cfg.num_shared_experts
        values["shared"] = (size, cfg.shared_expert_gate)
    else:
        values["shared"] = None
    return values


def _check(model: nn.Module, target_config: Any, family: MoEFamily, record: dict, layers: list[MoELayer]) -> bool:
    """ValueError naming every setting the target cannot compute; True if a zero shared expert is added."""
    cls = _class_name(family.model_type)
    moe = MoEConfig.from_dict(record["moe"])
    ours = _semantics(moe, layers[0])
    theirs = _expected(target_config, family)
    zero_shared = family.always_shared_expert and ours["shared"] is None
    if zero_shared:
        ours["shared"] = theirs["shared"]
    problems = [f"{_describe(k, ours[k])} but {cls} computes {_describe(k, theirs[k])}"
                + (f" ({family.hints[k]})" if k in family.hints else "") for k in SEMANTIC_FIELDS if ours[k] != theirs[k]]
    problems += SOURCE_CHECKS.get(model.config.model_type, lambda c: [])(model.config)
    if _windows(model.config) != _windows(target_config):
        problems.append(f"sliding windows per layer {_windows(model.config)} become {_windows(target_config)} in {cls}")
    if problems:
        raise ValueError(f"cannot export {model.config.model_type} to {cls}: " + "; ".join(problems)
                         + f"; {KEEP_SWITCHYARD}")
    if moe.capacity_factor is not None:
        log.warning("capacity_factor=%s drops tokens in training only; %s is dropless", moe.capacity_factor, cls, ranks=[0])
    dropped = {k: getattr(moe, k) for k in ("seq_aux_loss_coef", "z_loss_coef") if getattr(moe, k)}
    if dropped:
        log.warning("%s has no equivalent of %s (training losses); not exported", cls, dropped, ranks=[0])
    return zero_shared


# -- mapping tensors ------------------------------------------------------------------------------------
def _expert_tensors(layer: MoELayer, experts: nn.Module) -> dict[str, torch.Tensor]:
    """Our fused [E, 2F, H] / [E, H, F] in the target experts' layout (inverse of adopt's reading)."""
    gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    f = down.shape[-1]
    if isinstance(experts, nn.ModuleList):
        names = next(n for n in _PER_EXPERT_NAMES if all(hasattr(experts[0], a) for a in n))
        out = {}
        for i in range(gate_up.shape[0]):
            for name, value in zip(names, (gate_up[i, :f], gate_up[i, f:], down[i])):
                out[f"experts.{i}.{name}.weight"] = value
        return out
    if not getattr(experts, "is_concatenated", True):  # rows g0, u0, g1, u1, …
        gate_up = torch.stack([gate_up[:, :f], gate_up[:, f:]], dim=2).reshape(gate_up.shape)
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return {"experts.gate_up_proj": gate_up, "experts.down_proj": down}


def _block_tensors(layer: MoELayer, block: nn.Module, family: MoEFamily, zero_shared: bool) -> dict[str, torch.Tensor]:
    adapter = BLOCK_ADAPTERS[family.block]
    out = {"gate.weight": layer.router.weight.detach(), **_expert_tensors(layer, block.experts)}
    if layer.router.expert_bias is not None:
        out["gate.e_score_correction_bias"] = layer.router.expert_bias.detach()
    if layer.shared_experts is not None:
        out.update({f"{adapter.shared_attr}.{k}": v.detach() for k, v in layer.shared_experts.state_dict().items()})
        if layer.shared_expert_gate is not None:
            out[f"{adapter.shared_gate_attr}.weight"] = layer.shared_expert_gate.weight.detach()
    elif zero_shared:  # output 0: act(0) * 0 → down 0
        dtype, device = layer.router.weight.dtype, layer.router.weight.device
        shared = block.get_submodule(adapter.shared_attr)
        out.update({f"{adapter.shared_attr}.{k}": torch.zeros(v.shape, dtype=dtype, device=device)
                    for k, v in shared.state_dict().items()})
        out[f"{adapter.shared_gate_attr}.weight"] = torch.zeros(1, layer.hidden_size, dtype=dtype, device=device)
    return out


def export_dir(path: str | Path) -> Path:
    """``path`` as the export directory (an empty one, the working directory, refused)."""
    return nonempty_path(path, "the export", "the directory for the transformers checkpoint, e.g. ./model-hf")


def _is_staging(entry: Path) -> bool:
    """An export's staging directory (ours, a concurrent one's or a killed one's leftover): not the user's data."""
    return entry.name.startswith(_STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink()


def _check_destination(out: Path, model_type: str) -> None:
    """Only a new or empty directory, or an earlier export of this family (its config.json carries ``EXPORT_KEY``),
    may be written: the export replaces config.json and deletes weight files it did not write, which would destroy a
    switchyard checkpoint (``--out`` = ``--model``), the model it was adopted from or upcycled from, a downloaded
    model of the same ``model_type``, or any other files. transformers' save_pretrained only logs (and writes
    nothing) when ``out`` is a file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"export path {out} is a file; give a directory for the transformers checkpoint")
    if not out.is_dir():
        return
    fix = "export into a new or empty directory"
    config_file = out / "config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    if config.get(CONFIG_KEY):
        raise ValueError(f"{out} holds a switchyard checkpoint; exporting there would overwrite its config.json and "
                         f"lose it: {fix}")
    if config.get(EXPORT_KEY):
        if config.get("model_type") != model_type:
            raise ValueError(f"{out} holds an earlier export of a {config.get('model_type')} model; exporting a "
                             f"{model_type} there would mix the two: {fix} (or delete {out} first)")
        return  # an earlier export of this family: replaced
    held = sorted(entry.name for entry in out.iterdir() if not _is_staging(entry))
    if not held:
        return
    if config_file.is_file():
        raise ValueError(f"{out} holds a {config.get('model_type')} model that is no switchyard export ({config_file} "
                         f"has no {EXPORT_KEY!r} mark): exporting there would overwrite its config.json and weights; "
                         f"{fix} (an export written by a switchyard older than that mark is refused too: delete "
                         f"{out} first, or choose another directory)")
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    raise ValueError(f"{out} is not empty ({shown}) and holds no earlier export (no config.json): exporting there "
                     f"would overwrite or delete its files: {fix}")


def _staging_prefix() -> str:
    return f"{_STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}."


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is no probe on Windows: never judge a process dead there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_dead_staging(out: Path) -> None:
    """Remove the staging directories that exports killed before cleaning up (SIGKILL, OOM, power loss) left in
    ``out``: each holds a whole checkpoint. Only this host's processes can be probed, so one written from another
    host (a shared file system) or without an owner in its name is kept and reported. A live pid keeps its
    directory: a concurrent export, or a reused pid (then the leftover is only kept, never a running export lost)."""
    host = socket.gethostname()
    for entry in sorted(out.glob(f"{_STAGING_PREFIX}*")):
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = _STAGING_OWNER.match(entry.name)
        if owner is None or owner["host"] != host:
            who = f"pid {owner['pid']} on host {owner['host']}" if owner else "an unknown process"
            log.warning("%s looks like an export's staging directory, written by %s: it is kept, as that export may "
                        "still be running; if no export into %s is running, delete it by hand", entry, who, out,
                        ranks=[0])
            continue
        if _pid_alive(int(owner["pid"])):
            log.info("kept %s: pid %s on this host is running (a concurrent export?)", entry, owner["pid"], ranks=[0])
            continue
        # claim it under our own pid first: of two exports cleaning up at once one wins the rename, and if this one
        # is killed while removing, the next export finds a dead pid again
        claimed = out / f"{_staging_prefix()}{secrets.token_hex(4)}"
        try:
            try:
                entry.rename(claimed)
            except FileNotFoundError:  # another export claimed it first
                continue
            shutil.rmtree(claimed)
        except OSError as err:
            log.warning("could not remove %s (left by a killed export, pid %s): %s; delete it by hand",
                        claimed if claimed.exists() else entry, owner["pid"], err, ranks=[0])
            continue
        log.info("removed %s, left by an export that is no longer running (pid %s on this host)", entry, owner["pid"],
                 ranks=[0])


def _save(target: nn.Module, tokenizer: Any, out: Path, shard_bytes: int | None) -> None:
    """Save into a hidden directory inside ``out`` (same file system, even when ``out`` is a mount point), then
    move the files up (``_move_up``): a failed save leaves ``out`` as it was (but for killed exports' staging
    directories, which go first)."""
    created = not out.exists()
    if not created:
        _remove_dead_staging(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=out))
    try:
        target.save_pretrained(staging, **({"max_shard_size": shard_bytes} if shard_bytes is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _move_up(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    staging.rmdir()


def _move_order(name: str) -> tuple[bool, bool, str]:
    # config.json (with EXPORT_KEY) first: an export killed while moving up leaves a directory marked as an export,
    # which the next export replaces, not one of weights without a config, which it would refuse. An index last: the
    # shards it names are in place before it is
    return name != "config.json", name.endswith(".index.json"), name


def _move_up(staging: Path, out: Path) -> None:
    """Move the complete export in ``staging`` into ``out``, then take away the earlier export's weight files that
    this one did not write: transformers' save_pretrained leaves an unsharded ``model.safetensors`` (which
    from_pretrained reads instead of the new shards) or a sharded index.

    Nothing of the earlier export is lost before every new file is in place: each earlier file a new one replaces
    is first hard-linked into a second hidden directory (``out``'s entry stays, so config.json keeps its mark
    throughout), stale weight files are moved there, not deleted, and that directory is removed only at the end.
    An exception on the way (a failed rename, KeyboardInterrupt) removes the new files moved so far and moves the
    earlier ones back: ``out`` is as it was. A kill on the way runs none of that and can leave a mix, as documented
    (docs/checkpoints.md): with the same file names (the same shard layout) each rename replaces one file in
    place, atomically but one at a time, so the weights can be part new, part earlier; with another layout the
    weights from_pretrained reads are at every moment all the earlier ones or all the new ones (it reads an unsharded
    file before an index, and an index is moved after its shards), though maybe beside the new config.json. The
    next export removes the killed one's hidden directories and replaces the mix."""
    new = sorted((entry.name for entry in staging.iterdir()), key=_move_order)
    stale = sorted(entry.name for entry in out.iterdir() if _WEIGHT_FILES.match(entry.name) and entry.name not in new)
    earlier = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=out))  # a killed export's: removed like staging
    moved: list[str] = []  # new files now in out
    kept: list[str] = []  # earlier files now (also) in `earlier`
    try:
        for name in new:
            if os.path.lexists(out / name):
                _keep(out / name, earlier / name)
                kept.append(name)
            os.replace(staging / name, out / name)
            moved.append(name)
        for name in stale:
            os.replace(out / name, earlier / name)
            kept.append(name)
    except BaseException:
        if _put_back(out, earlier, moved, kept):
            shutil.rmtree(earlier, ignore_errors=True)
        raise
    shutil.rmtree(earlier, ignore_errors=True)


def _keep(path: Path, backup: Path) -> None:
    """Keep ``path`` as it is now at ``backup``: a hard link (no copy, and ``path`` stays in place until a new file
    replaces it); a rename where the file system has no hard links (then a kill before the new file is moved in
    leaves ``path`` without that file: without config.json, the next export refuses the directory)."""
    try:
        os.link(path, backup, follow_symlinks=False)
    except (OSError, NotImplementedError):
        os.replace(path, backup)


def _put_back(out: Path, earlier: Path, moved: list[str], kept: list[str]) -> bool:
    """Undo a failed ``_move_up``: the new files moved into ``out`` go, the earlier ones kept in ``earlier`` come
    back. False, after an error naming what is where, if any could not."""
    failed = []
    for name in moved:
        if name not in kept:
            try:
                (out / name).unlink()
            except FileNotFoundError:
                pass
            except OSError:
                failed.append(name)
    for name in kept:
        try:
            os.replace(earlier / name, out / name)
        except OSError:
            failed.append(name)
    if failed:
        log.error("the export into %s failed and %s could not be put back as they were; the earlier export's files "
                  "that are not in %s are in %s: move them back by hand before exporting into %s again (that export "
                  "would remove %s)", out, sorted(failed), out, earlier, out, earlier, ranks=[0])
    return not failed


def export_hf(model: nn.Module, path: str | Path, tokenizer: Any = None,
              max_shard_size: int | str | None = None) -> str:
    """Write ``model`` as a plain transformers MoE checkpoint in ``path``; returns the path.

    The model is only read (the written tensors share its storage while saving). ``max_shard_size`` (e.g.
    ``"5GB"``) splits the weights into shards with an index; default: transformers' own.
    """
    model = _uncompiled(model)  # torch.compile's wrapper is no transformers class; the model it wraps is exported
    out = export_dir(path)
    shard_bytes = _parse_size(max_shard_size) if max_shard_size is not None else None
    target, zero_shared = _plan(model, out)
    cls = type(target).__name__
    if zero_shared:
        log.info("%s needs a shared expert and this model has none: wrote a zero shared expert (down_proj = 0, "
                 "outputs unchanged)", cls, ranks=[0])
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    _save(target, tokenizer, out, shard_bytes)
    log.info("exported %s (%s) to %s", cls, model.config.model_type, out, ranks=[0])
    return str(out)


def export_refusal(model: nn.Module) -> str | None:
    """Why ``switchyard export`` would refuse this patched model (any destination), or None; nothing is written
    (a meta-device model will do)."""
    try:
        _plan(_uncompiled(model), None)
    except ValueError as err:
        return str(err)
    return None


def check_export(path: str | Path, out: str | Path) -> None:
    """Every refusal of exporting the switchyard checkpoint at ``path`` into ``out``, before its weights are read:
    the model is rebuilt from config.json on the meta device (as ``from_pretrained`` rebuilds it) and taken through
    the export's checks and its strict tensor mapping, so a layout the target cannot hold (Mixtral with dense layers
    left by every_n/layers) is not found only after gigabytes are loaded. A directory that is no switchyard
    checkpoint is refused here as ``from_pretrained`` would refuse it."""
    from transformers import AutoConfig

    from switchyard.hf.checkpoint import _repatch, read_record, recover_interrupted_save

    out = export_dir(out)
    recover_interrupted_save(path)
    record = read_record(Path(path))
    config = AutoConfig.from_pretrained(path)
    family = EXPORTS.get(config.model_type)
    if family is not None:  # the destination first: it needs no model (--out naming --model, or another model)
        _check_destination(out, family.model_type)
    delattr(config, CONFIG_KEY)
    model = empty_model(config)
    try:
        _repatch(model, record, None)
    except KeyError as err:
        raise ValueError(f"{Path(path) / 'config.json'}: its {CONFIG_KEY!r} record has no {err}: a truncated or "
                         "hand-edited file; save the model again") from None
    setattr(model.config, CONFIG_KEY, copy.deepcopy(record))
    _plan(model, out)


def _plan(model: nn.Module, out: Path | None) -> tuple[nn.Module, bool]:
    """The target model holding ``model``'s tensors (shared storage) after every check, and whether it has a zero
    shared expert; nothing is written. A meta-device ``model`` gives a meta-device target (``check_export``).
    ``out`` None: the model's own checks only, no destination (whether a model could be exported at all)."""
    record = switchyard_record(model)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    sharded = sorted({l.ep_size for l in layers if l.ep_size > 1})
    if sharded:
        raise ValueError(f"this model is expert-parallel (ep={sharded[0]}): each rank holds only its experts; "
                         "switchyard.save_pretrained it, then run `switchyard export --model <that dir> --out <dir>` "
                         "in one process")
    model_type = model.config.model_type
    family = EXPORTS.get(model_type)
    if family is None or (model_type != family.model_type and record["mode"] != "upcycle"):
        raise ValueError(f"no standard transformers MoE class fits {model_type} (supported exports: "
                         f"{supported_exports()}): keep it as a switchyard checkpoint (switchyard.save_pretrained; a "
                         "fine-tune's checkpoints already are), which launch/serve.py --model <dir> serves and "
                         "switchyard.from_pretrained loads; plain transformers and vLLM cannot load it")
    if out is not None:
        _check_destination(out, family.model_type)
    target_config = _target_config(model, family, record, layers)
    target_config.architectures = [_target_class(model, family)]
    setattr(target_config, EXPORT_KEY, {"version": _EXPORT_MARK_VERSION, "from": model_type})
    zero_shared = _check(model, target_config, family, record, layers)
    target = empty_model(target_config)
    prefixes = moe_prefixes(model)
    cls = type(target).__name__
    wrong = [p for p in prefixes if type(target.get_submodule(p)).__name__ != family.block]
    if wrong:
        raise ValueError(f"{cls} has no {family.block} at {wrong}; its layer layout differs from this model's")
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(tuple(f"{p}." for p in prefixes))}
    for prefix in prefixes:
        layer = model.get_submodule(prefix)
        block = target.get_submodule(prefix)
        state.update({f"{prefix}.{k}": v for k, v in _block_tensors(layer, block, family, zero_shared).items()})
    try:
        target.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"cannot map this model's tensors onto {cls}: {err}") from err
    target.tie_weights()
    return target, zero_shared


__all__ = ["EXPORTS", "EXPORT_KEY", "MoEFamily", "check_export", "export_dir", "export_hf", "supported_exports"]
