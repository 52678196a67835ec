"""Save and load patched models as sharded safetensors that any EP size can read.

    sy.save_pretrained(model, "out/")          # every rank calls it
    model = sy.from_pretrained("out/", groups=ProcessGroupManager(ep=4))

Layout (see docs/checkpoints.md): global rank 0 writes the dense tensors once
(``dense-00001-of-0000N.safetensors``); each EP rank's first expert-data-parallel replica writes its
experts (``experts-ep{r:03d}-of-{ep:03d}-00001-of-0000N.safetensors``), keyed by *global* expert id
(``…mlp.experts.{id}.gate_up_proj``); rank 0 writes one ``switchyard.safetensors.index.json`` covering every
key of the whole model (not transformers' ``model.safetensors.index.json``, which transformers would follow into our
shards and load as the dense model with fresh FFNs, silently), plus ``config.json`` carrying the ``switchyard`` record that rebuilds the model.
Everything is written into ``.<name>.saving`` beside ``out`` and swapped in by two renames (``out`` aside to
``.<name>.replaced``, then the new directory into place): a kill between them leaves ``out`` missing, and the
next load or save renames the earlier checkpoint back (``recover_interrupted_save``).

Loading rebuilds the model with parameters on the meta device (no memory for weights, not even the
dense FFNs or HF experts that patching replaces), re-patches it from the record, and reads exactly this
rank's keys with ``safe_open`` — its own experts and the dense tensors, nothing else — straight into
place (``load_state_dict(assign=True)``). Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from switchyard.config import MoEConfig
from switchyard.deepspeed import zero3
from switchyard.hf.patch import CONFIG_KEY, _uncompiled, moe_layers, patch_model
from switchyard.log import get_logger
from switchyard.moe.layer import EXPERT_PARAM_NAMES
from switchyard.parallel.tensor_parallel import full_state_dict

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

log = get_logger(__name__)

INDEX_NAME = "switchyard.safetensors.index.json"
LEGACY_INDEX_NAME = "model.safetensors.index.json"  # checkpoints saved before 2026-12-02: still read
# Shards, never carried from the earlier save into a new one (nor the ``.tmp`` shards that saves before the
# directory swap left behind when interrupted)
_OUR_FILES = re.compile(r"^((dense|experts-ep\d+-of-\d+)-\d{5}-of-\d{5}\.safetensors(\.tmp)?|"
                        + re.escape(LEGACY_INDEX_NAME) + ")$")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<id>\d+)\.(?P<name>" + "|".join(EXPERT_PARAM_NAMES) + r")$")
# Initializers that need real weights (drop_upcycle reads the dense statistics); rebuilding only needs
# the shapes, which these share with the substitute, and every tensor is overwritten by the load.
_SHAPE_TWIN_INIT = {"drop_upcycle": "copy"}
RECORD_VERSION = 1  # the newest "switchyard" record (patch_model writes it) this version rebuilds a model from


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the tensor."""


# -- shared helpers (also used by export) ---------------------------------------------------------------
def no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' ``no_init_weights`` (5.x: ``transformers.initialization``), or a no-op."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # pragma: no cover - other transformers layouts; parameters are on meta anyway
        return contextlib.nullcontext()
    return ctx()


def empty_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The class ``config.architectures`` names (``AutoModelForCausalLM`` if none) with parameters on meta
    and buffers real, its weights tied as the config says.

    Non-persistent buffers (rotary ``inv_freq``) are computed in ``__init__`` and never saved, so they
    must stay real; everything saved is filled later with ``load_state_dict(assign=True)``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model_class = architecture_class(config)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with no_init_weights(), init_empty_weights(include_buffers=False):
        if model_class is AutoModelForCausalLM:
            model = model_class.from_config(config, **kwargs)
        else:
            model = model_class._from_config(config, **kwargs)  # what the Auto classes call
    model.tie_weights()  # built on meta, a tied head is a parameter of its own until tied: counted twice, saved twice
    return model


def architecture_class(config: Any) -> type:
    """The transformers class ``config.architectures`` names (``AutoModelForCausalLM`` if none): what a model saved
    with this config is rebuilt as, its task head included."""
    from transformers import AutoModelForCausalLM

    names = getattr(config, "architectures", None) or []
    model_class = _transformers_class(names[0]) if names else AutoModelForCausalLM
    if model_class is None:
        raise CheckpointError(f"config.json's architectures={names} names no class of the installed transformers")
    return model_class


def _transformers_class(name: str) -> type | None:
    import transformers

    found = getattr(transformers, name, None)
    return found if isinstance(found, type) else None


def _saved_config(model: nn.Module) -> Any:
    """A copy of ``model.config`` recording what transformers' save_pretrained records: the class that
    ``from_pretrained`` rebuilds and the weights' dtype (the user's in-memory config is left alone).

    Refuses a class that cannot be rebuilt by name (a subclass, remote code) before anything is written.
    """
    name = type(model).__name__
    if _transformers_class(name) is not type(model):
        raise ValueError(
            f"{name} is not a class of transformers, so from_pretrained could not rebuild it from config.json's "
            f"architectures; patch and save an instance of a transformers model class (e.g. AutoModelForCausalLM's)"
        )
    config = copy.deepcopy(model.config)
    config.architectures = [name]
    config.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return config


def switchyard_record(model: nn.Module) -> dict[str, Any]:
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not record:
        raise ValueError(
            f"{type(model).__name__} is not patched by switchyard (no model.config.{CONFIG_KEY}); "
            "call switchyard.patch_model first, or save it with its own save_pretrained"
        )
    return record


def moe_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the model's MoE layers (the state-dict prefix of their keys)."""
    from switchyard.moe.layer import MoELayer

    return [name for name, module in model.named_modules() if isinstance(module, MoELayer)]


def _parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int of bytes, a string of digits (bytes: what the CLI's ``--max-shard-size 200000``
    passes), or a number with a unit (``"2GB"``, ``"500MB"``, ``"1.5GiB"``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive_size(size, size)
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    if isinstance(size, str) and (digits := re.fullmatch(r"\s*(\d+)\s*B?\s*", size.upper())):
        return _positive_size(int(digits.group(1)), size)
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)\s*", size.upper()) if isinstance(size, str) else None
    if not found:
        raise ValueError(f"max_shard_size={size!r} is not a size like '2GB', '500MB' or a whole number of bytes "
                         "(200000, as an int or a string of digits)")
    return _positive_size(int(float(found.group(1)) * units[found.group(2)]), size)


def nonempty_path(path: str | Path, what: str, give: str) -> Path:
    """``path``; an empty one is refused: ``Path("")`` is the working directory, which is what an unset variable in a
    script (``--out "$OUT"``) would silently name."""
    if not str(path).strip():
        raise ValueError(f"{what} path is empty ({str(path)!r}; an unset variable?): give {give}")
    return Path(path)


def _positive_size(nbytes: int, given: int | str) -> int:
    if nbytes < 1:  # 0 or less would put every tensor in a file of its own
        raise ValueError(f"max_shard_size={given!r} must be at least one byte, e.g. '2GB'")
    return nbytes


# -- saving ---------------------------------------------------------------------------------------------
def _gather(value: Any, group: "dist.ProcessGroup | None" = None) -> list[Any]:
    """Every rank's ``value`` (small: key→file maps), or ``[value]`` in one process."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _drop_tied(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor (the first, e.g. ``embed_tokens`` before ``lm_head``)."""
    kept: dict[tuple, str] = {}
    out, dropped = {}, {}
    for key, t in tensors.items():
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in kept:
            dropped[key] = kept[ident]
            continue
        if ident is not None:
            kept[ident] = key
        out[key] = t
    return out, dropped


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, stem: str, max_bytes: int) -> tuple[dict[str, str], int]:
    """Greedy shards of at most ``max_bytes`` (a bigger tensor gets its own); returns key→file, bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().contiguous()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(v.numel() * v.element_size() for v in shard.values())
    return weight_map, total


# -- the directory swap ---------------------------------------------------------------------------------
def swap_paths(out: Path) -> tuple[Path, Path]:
    """(staging, aside) beside ``out``: where a save writes, and where the earlier checkpoint waits during the
    swap. Both are hidden and named after ``out``, so a recovery finds them from ``out`` alone."""
    return out.with_name(f".{out.name}.saving"), out.with_name(f".{out.name}.replaced")


def recover_interrupted_save(path: str | Path) -> None:
    """A save killed between its two renames leaves ``path`` missing and the earlier, complete checkpoint aside:
    rename it back. Safe on several ranks at once (the one that loses the race finds ``path`` restored)."""
    out = Path(path).resolve()  # as save_pretrained swaps it: a symlink's target
    _, aside = swap_paths(out)
    if out.exists() or not aside.is_dir():
        return
    try:
        os.rename(aside, out)
    except OSError as err:
        if not out.is_dir():
            raise CheckpointError(f"{out} is missing and its earlier checkpoint is at {aside} (a save was killed "
                                  f"mid-swap), but renaming it back failed ({err}): rename {aside} to {out}") from err
        return
    fsync_dir(out.parent)
    log.warning("%s: a save was killed while swapping directories; restored the earlier checkpoint from %s",
                out, aside, ranks=None)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (a power loss may otherwise undo them out of order)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk before a rename publishes it: a rename is
    journaled, and without this a power loss could keep the rename and lose the data it published."""
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder) / name
            if file.is_symlink():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def check_save_target(out: Path) -> None:
    """Refuse what the directory swap cannot replace, before anything is written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; save_pretrained writes a directory: choose another path")
    config_file = out / "config.json"
    if config_file.is_file() and not _read_json(config_file).get(CONFIG_KEY):
        raise ValueError(
            f"{out} holds another model ({config_file} has no {CONFIG_KEY!r} record): saving there would overwrite "
            "its config.json and index; save into a new directory (or one holding a switchyard checkpoint)"
        )
    cwd = Path.cwd().resolve()
    if cwd == out or out in cwd.parents:
        raise ValueError(f"{out} is the working directory or holds it, and a save replaces the directory by renaming "
                         "it: save into a subdirectory, or run from elsewhere")
    if os.path.ismount(out):
        raise ValueError(f"{out} is a mount point, which cannot be renamed, and a save replaces the directory by "
                         f"renaming it: save into a subdirectory of {out}")


def _prepare(out: Path) -> None:
    """Put back an earlier checkpoint a killed save left aside, refuse targets the swap cannot replace, drop
    what an interrupted save left beside ``out``, and create the staging directory."""
    recover_interrupted_save(out)
    check_save_target(out)
    staging, aside = swap_paths(out)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)  # out is there, so this is a finished swap's leftover
    staging.mkdir(parents=True)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy on disk; the earlier directory is deleted next), or a copy across devices."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(out: Path, staging: Path) -> None:
    """Keep the earlier directory's other files (a tokenizer, a README) that the new save did not write; its
    shards go (another EP size or shard count would leave files the new index does not list)."""
    if not out.is_dir():
        return
    for entry in out.iterdir():
        target = staging / entry.name
        if _OUR_FILES.match(entry.name) or target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _swap(out: Path, staging: Path) -> None:
    """Replace ``out`` by the complete ``staging``. Between the two renames ``out`` is missing and the earlier
    checkpoint is aside, whole: ``recover_interrupted_save`` puts it back if the process dies there."""
    _, aside = swap_paths(out)
    fsync_tree(staging)
    had_earlier = out.exists()
    if had_earlier:
        os.rename(out, aside)
    try:
        os.rename(staging, out)
    except OSError:
        if had_earlier:
            os.rename(aside, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


def agree(error: BaseException | None, what: str, group: "dist.ProcessGroup | None" = None) -> None:
    """Raise on every rank if any rank failed ``what``: a rank raising alone would leave its peers blocked in
    the next collective. Collective: every rank (of ``group``, default all) calls it, with its own error or None."""
    failures = _gather(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(failures) if msg]
    if failed:
        rank, msg = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {msg}")


def on_every_rank(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on this rank; if it fails on any rank, it raises on every rank (``agree``)."""
    error: BaseException | None = None
    result = None
    try:
        result = fn(*args)
    except Exception as err:  # noqa: BLE001 - raised again on this rank by agree
        error = err
    agree(error, what)
    return result


def save_pretrained(model: nn.Module, path: str | Path, groups: "ProcessGroupManager | None" = None,
                    max_shard_size: int | str = "2GB", tokenizer: Any = None) -> None:
    """Write ``model`` (patched by ``switchyard.patch_model``) as a switchyard checkpoint.

    Call it on every rank when distributed: experts are written by the ranks that hold them and the
    index needs every writer's key list. ``groups`` defaults to the one the MoE layers were built with.
    Saving over an earlier switchyard checkpoint replaces it only once every new file is written, and a kill
    at any moment leaves the earlier or the new checkpoint (see ``_swap``); a failure on any rank raises on
    every rank.
    """
    model = _uncompiled(model)  # torch.compile's wrapper calls (and saves as) the model it wraps
    record = switchyard_record(model)
    layers = moe_layers(model)
    groups = groups if groups is not None else layers[0].groups if layers else None
    pp, stage = (groups.size("pp"), groups.rank("pp")) if groups is not None else (1, 0)
    if not layers and pp == 1:  # a pipeline stage may hold none; the whole model must hold some
        raise ValueError("model.config.switchyard is set but the model holds no MoE layers")
    config = _saved_config(model)
    ep, ep_rank = (groups.size("ep"), groups.rank("ep")) if groups is not None else (layers[0].ep_size, layers[0].ep_rank)
    assert all((l.ep_size, l.ep_rank) == (ep, ep_rank) for l in layers), "MoE layers disagree on their EP rank"
    max_bytes = _parse_size(max_shard_size)
    nonempty_path(path, "save_pretrained", "the checkpoint's directory")
    # resolved: a symlink's target is what gets replaced, and "." names the directory, not the process's cwd
    rank, out = dist.get_rank() if _distributed() else 0, Path(path).resolve()
    staging, _ = swap_paths(out)
    # one writer per expert block: the first rank of its expert-data-parallel group, after the etp shards are gathered;
    # one for the dense tensors of each pipeline stage (rank 0 without pipelining)
    writes_experts = groups.rank("edp") == 0 and groups.rank("etp") == 0 if groups is not None else rank == 0
    writes_dense = groups.rank("dp") == 0 and groups.rank("tp") == 0 if groups is not None else rank == 0
    in_stage = f"-pp{stage:03d}-of-{pp:03d}" if pp > 1 else ""  # each stage's files are its own
    on_every_rank(f"save_pretrained({out})", lambda: _prepare(out) if rank == 0 else None)
    error: BaseException | None = None

    def written_here(param: nn.Parameter) -> bool:
        return writes_experts if getattr(param, "allreduce", True) is False else writes_dense

    if zero3.is_partitioned(model):  # ZeRO-3 partitions gathered (tp is 1 there), kept only where this rank writes
        with zero3.gathered_parameters(model, written_here):
            state = model.state_dict()
    elif groups is not None:  # tensor-parallel shards gathered, kept only where this rank writes them
        state = full_state_dict(model, groups, written_here)
    else:
        state = model.state_dict()
    prefixes = tuple(f"{p}.experts." for p in moe_prefixes(model))
    expert_keys = [k for k in state if k.startswith(prefixes) and _EXPERT_KEY.match(k)]
    # what this rank wrote: key → file, bytes, tied names dropped, expert keys, experts per layer
    mine: dict[str, Any] = {"files": {}, "bytes": 0, "tied": {}, "experts": [],
                            "num_experts": layers[0].num_experts if layers else None}
    try:
        if writes_dense:
            dense, mine["tied"] = _drop_tied({k: v for k, v in state.items() if k not in set(expert_keys)})
            weight_map, nbytes = _write_shards(dense, staging, f"dense{in_stage}", max_bytes)
            mine["files"].update(weight_map)
            mine["bytes"] += nbytes
        if writes_experts:
            weight_map, nbytes = _write_shards({k: state[k] for k in expert_keys}, staging,
                                               f"experts-ep{ep_rank:03d}-of-{ep:03d}{in_stage}", max_bytes)
            mine["files"].update(weight_map)
            mine["bytes"] += nbytes
            mine["experts"] = expert_keys
    except Exception as err:  # noqa: BLE001 - disk full, permissions: the earlier checkpoint is still intact
        error = err
    try:
        agree(error, f"save_pretrained({out})")
        parts = _gather(mine)
        if rank == 0:
            try:
                index = _index(parts, record, ep)
                (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
                config.save_pretrained(staging)
                generates = getattr(model, "can_generate", lambda: False)()
                if getattr(model, "generation_config", None) is not None and generates:
                    model.generation_config.save_pretrained(staging)
                if tokenizer is not None:
                    tokenizer.save_pretrained(staging)
                _carry_over(out, staging)
                _swap(out, staging)
                files = {name for part in parts for name in part["files"].values()}
                log.info("saved %s: %d tensors in %d files, experts from %d EP ranks%s", out,
                         sum(len(p["files"]) for p in parts), len(files), ep,
                         f" in {pp} pipeline stages" if pp > 1 else "", ranks=[0])
            except Exception as err:  # noqa: BLE001 - raised again on this rank by agree
                error = err
        agree(error, f"save_pretrained({out})")
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _index(parts: list, record: dict, ep: int) -> dict[str, Any]:
    """The index over every writer's (key → file, bytes, tied names, experts per layer); pipeline stages each
    wrote their own layers."""
    weight_map: dict[str, str] = {}
    tied: dict[str, str] = {}
    for part in parts:
        weight_map.update(part["files"])
        tied.update(part["tied"])
    num_experts = next(p["num_experts"] for p in parts if p["num_experts"] is not None)
    # Every layer's every expert must have a writer; a hole means some rank did not call save_pretrained.
    names = {(m["prefix"], m["name"]) for p in parts for m in map(_EXPERT_KEY.match, p["experts"]) if m}
    holes = [f"{p}.experts.{i}.{n}" for p, n in sorted(names) for i in range(num_experts)
             if f"{p}.experts.{i}.{n}" not in weight_map]
    assert not holes, f"no rank wrote {len(holes)} expert tensors, e.g. {holes[:3]}"
    metadata = {"total_size": sum(p["bytes"] for p in parts), "format": "switchyard", "version": record.get("version", 1),
                "num_experts": num_experts, "saved_ep": ep, "tied_weights": tied}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


# -- loading --------------------------------------------------------------------------------------------
def _read_json(file: Path) -> dict[str, Any]:
    """``file``'s JSON object, or a CheckpointError naming the file (json's own error names only a line)."""
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}): a truncated or hand-edited file") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object")
    return data


def inner_model_hint(path: Path) -> str:
    """For a directory without config.json: the model directory inside it, when it is a fine-tune checkpoint
    (``step_N/model``) or a fine-tune's run directory (``checkpoints/step_N/model``); else empty."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return f" ({path} is a fine-tune checkpoint: pass its model directory, {path / 'model'})"
    steps = sorted((path / "checkpoints").glob("step_*/model/config.json"))
    if steps:
        return f" ({path} is a fine-tune's run directory: pass a checkpoint's model directory, e.g. {steps[-1].parent})"
    return ""


def read_record(path: Path) -> dict[str, Any]:
    """config.json's switchyard record, or a CheckpointError saying what this directory is."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist; is {path} a saved model directory?{inner_model_hint(path)}")
    raw = _read_json(config_file)
    if not raw.get(CONFIG_KEY):
        raise CheckpointError(
            f"{config_file} has no {CONFIG_KEY!r} record: not a switchyard checkpoint; load it with "
            "transformers or patch it with switchyard.patch_model"
        )
    record = raw[CONFIG_KEY]
    version = record.get("version", 1) if isinstance(record, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version > RECORD_VERSION:
        raise CheckpointError(f"{config_file}: its {CONFIG_KEY!r} record has version {version!r}, but this "
                              f"switchyard reads versions up to {RECORD_VERSION}: written by a later switchyard; load "
                              "it with that")
    return record


def index_path(path: Path) -> Path:
    """The checkpoint's index: ``INDEX_NAME``, or the name older checkpoints wrote."""
    legacy = path / LEGACY_INDEX_NAME
    return legacy if not (path / INDEX_NAME).is_file() and legacy.is_file() else path / INDEX_NAME


def _read_index(path: Path) -> dict[str, Any]:
    index_file = index_path(path)
    if not index_file.is_file():
        raise CheckpointError(f"{index_file} is missing; switchyard checkpoints list every tensor there")
    index = _read_json(index_file)
    if not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_file} has no weight_map")
    return index


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Patching warns about step-0 initialization, which the load overwrites: noise when loading."""
    logger, level = logging.getLogger(name), logging.getLogger(name).level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _repatch(model: nn.Module, record: dict[str, Any], groups: "ProcessGroupManager | None") -> None:
    """Re-apply ``patch_model`` exactly as recorded (on meta parameters: only shapes matter here)."""
    from switchyard.hf.architectures import adapter_for

    kwargs: dict[str, Any] = {"layers": record["layer_indices"]}
    moe = None
    if record["mode"] == "adopt":
        kwargs["overrides"] = record.get("overrides") or {}
    else:
        moe = MoEConfig.from_dict(record["moe"])
        moe.init = _SHAPE_TWIN_INIT.get(moe.init, moe.init)
        kwargs["seed"] = record.get("seed", 0)
        try:
            registry = adapter_for(model)
            sites = [s.qualified_name for s in registry.sites(model) if s.layer_index in record["layer_indices"]]
        except ValueError:
            sites = None
        if sites != record["modules"]:  # it was patched by module name with an explicit adapter
            kwargs.update(adapter=record["adapter"], targets=record["modules"])
    with _quiet("switchyard.hf"):
        patch_model(model, moe, groups, **kwargs)


def _check_experts(model: nn.Module, weight_map: dict[str, str], index_file: Path) -> None:
    found: dict[str, set[int]] = defaultdict(set)
    for key in weight_map:
        m = _EXPERT_KEY.match(key)
        if m:
            found[m["prefix"]].add(int(m["id"]))
    for prefix in moe_prefixes(model):
        want = model.get_submodule(prefix).num_experts
        ids = found.get(prefix, set())
        have = max(ids) + 1 if ids else 0
        if have != want:
            raise CheckpointError(
                f"{index_file}: {prefix} has {have} experts in the checkpoint (max expert id + 1) but "
                f"config.json's switchyard record says num_experts={want}"
            )


@contextlib.contextmanager
def _open(file: Path) -> Iterator[Any]:
    if not file.is_file():
        raise CheckpointError(f"shard file {file} (listed in {index_path(file.parent).name}) is missing")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as err:
        raise CheckpointError(f"cannot read {file}: truncated or corrupt safetensors file ({err})") from err


def _plan(model: nn.Module, wanted: dict[str, torch.Tensor], weight_map: dict[str, str], tied: dict[str, str],
          index_file: Path, elsewhere: set[str] = frozenset(), expert_prefixes: set[str] | None = None
          ) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """{file: [(model key, checkpoint key)]} for this rank, and the tied parameters to share again.

    Strict both ways: every key of this rank's model must be in the index, and every key of the index
    must belong to the model (another EP rank's experts do, and with a pipeline stage read alone the ``elsewhere``
    keys of the other stages, whose MoE layers are among ``expert_prefixes``; anything else means a different model).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    retie = {k: v for k, v in tied.items() if k in params and v in params}
    plan: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in wanted:
        source = key if key in weight_map else tied.get(key)
        if key in retie:
            continue
        if source not in weight_map:
            raise CheckpointError(f"tensor {key} is not in {index_file} (the model built from config.json has it)")
        plan[weight_map[source]].append((key, source))
    prefixes = set(moe_prefixes(model)) if expert_prefixes is None else expert_prefixes
    others = [k for k in weight_map if k not in wanted and k not in elsewhere
              and not ((m := _EXPERT_KEY.match(k)) and m["prefix"] in prefixes)]
    if others:
        raise CheckpointError(f"{index_file} lists {len(others)} tensors the model built from config.json does not "
                              f"have, e.g. {others[:3]}")
    return dict(plan), retie


_FFN_TENSOR = re.compile(r"(^|\.)(experts|shared_experts?|mlp|feed_forward|ffn)\.")


def _read_tensors(path: Path, plan: dict[str, list[tuple[str, str]]], wanted: dict[str, torch.Tensor],
                  device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """Read ``plan`` lazily, file by file; every tensor's shape is checked before it is read."""
    out: dict[str, torch.Tensor] = {}
    for name, pairs in plan.items():
        file = path / name
        with _open(file) as handle:
            present = set(handle.keys())
            for key, source in pairs:
                if source not in present:
                    raise CheckpointError(f"{file} lacks tensor {source}, which {index_path(path).name} places there")
                shape = tuple(handle.get_slice(source).get_shape())
                target = wanted[key]
                if shape != tuple(target.shape):
                    # the likely cause for an FFN or expert tensor: a layer resized after the config was written
                    hint = ("; if that model's layers had FFNs of different sizes, config.json (one size) cannot "
                            "rebuild them: load the tensors into a model built with those sizes "
                            "(docs/upcycling.md)") if _FFN_TENSOR.search(key) else ""
                    raise CheckpointError(f"{file}: tensor {source} has shape {shape} in the checkpoint but the "
                                          f"model built from config.json expects {tuple(target.shape)}{hint}")
                try:
                    tensor = handle.get_tensor(source)
                except SafetensorError as err:
                    raise CheckpointError(f"cannot read tensor {source} from {file}: corrupt file ({err})") from err
                out[key] = tensor.to(device=device or "cpu", dtype=target.dtype)
    return out


def from_pretrained(path: str | Path, groups: "ProcessGroupManager | None" = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, stage: tuple | None = None) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` at any EP size; each rank reads only its experts.

    ``stage=(index, count)`` or ``(index, count, layers per stage)``: build and read that pipeline stage only, the
    model ``switchyard.train.pipeline.split_model`` would cut from the whole one (the other stages' tensors are not
    read).

    The model's class is the one config.json's ``architectures`` names (``AutoModelForCausalLM`` if none);
    ``dtype`` defaults to the one in config.json; ``device`` to CPU. Returns the model in eval mode.
    With ``groups`` every rank calls it, and an error on any rank (a missing expert file only it reads) is
    raised on every rank instead of leaving the others to hang in their next collective. A save killed mid-swap
    (``path`` missing, the earlier checkpoint aside) is undone first (``recover_interrupted_save``).
    """
    if groups is None or not _distributed():
        return _load(Path(path), groups, dtype, device, stage)
    return on_every_rank(f"from_pretrained({path})", _load, Path(path), groups, dtype, device, stage)


def _load(path: Path, groups: "ProcessGroupManager | None", dtype: torch.dtype | None,
          device: torch.device | str | None, stage: tuple | None = None) -> nn.Module:
    from transformers import AutoConfig, GenerationConfig

    from switchyard.train.pipeline import SPLIT_ATTR, split_model

    recover_interrupted_save(path)
    record = read_record(path)
    index = _read_index(path)
    config = AutoConfig.from_pretrained(path)
    delattr(config, CONFIG_KEY)
    model = empty_model(config, dtype)
    _repatch(model, record, groups)
    setattr(model.config, CONFIG_KEY, copy.deepcopy(record))
    _check_experts(model, index["weight_map"], index_path(path))

    whole, prefixes = set(model.state_dict()), set(moe_prefixes(model))
    if stage is not None:
        split_model(model, *stage)
    wanted = model.state_dict(keep_vars=True)
    tied = index.get("metadata", {}).get("tied_weights", {})
    plan, retie = _plan(model, wanted, index["weight_map"], tied, index_path(path), whole - set(wanted), prefixes)
    state = _read_tensors(path, plan, wanted, device)
    # assign=True makes new Parameter objects: keep DeepSpeed's expert tags (allreduce, group_name) and HF's flags
    attributes = {name: dict(p.__dict__) for name, p in model.named_parameters(remove_duplicate=False)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= set(retie), f"planned read mismatch: {unexpected[:3]} {missing[:3]}"
    for dropped, kept in retie.items():  # stored once, shared again as saved
        parent, _, leaf = dropped.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(kept))
    if getattr(model, SPLIT_ATTR, None) is None:  # a stage holds its tied head as split_model made it
        model.tie_weights()
    for name, param in model.named_parameters(remove_duplicate=False):
        for attr, value in attributes.get(name, {}).items():
            setattr(param, attr, value)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:5]}"
    if device is not None:
        model.to(device)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
