"""Crash-proof checkpoints: a directory is either complete or ignored.

Layout of ``<output_dir>/checkpoints/``::

    step_000050/            a complete checkpoint (renamed from step_000050.partial/ once every rank is done)
      engine/rank00000.pt   each rank's optimizer partition, lr scheduler and step counters (exact resume)
      model/                switchyard safetensors checkpoint (serve, export, resume at another ep)
      rng/rank00000.safetensors   each rank's RNG states
      meta.json             format, step, world/ep/ZeRO layout, optimizer class, data position, run config
      COMPLETE              written last, before the rename
    latest                  name of the newest complete checkpoint (replaced atomically)

Killing the job at any moment leaves at worst a ``*.partial`` directory, which resume skips and the
next save removes; ``latest`` only ever names a renamed, complete directory. Saving a step that exists
already (after resuming from an earlier one) renames the old one to ``step_N.replaced.partial`` and the
new one into place; a kill between the two leaves ``step_N`` missing, and ``recover`` (run by resume and
by the next save) renames the complete new one, or else the old one, to ``step_N``. Pruned steps are
renamed to ``*.pruned.partial`` before they are deleted, so a kill mid-delete leaves no ``step_N`` with
files missing. Everything is fsynced before the rename that publishes it.

Why not ``engine.save_checkpoint``: DeepSpeed 0.19's MoE checkpoint path parses expert keys of its own
MoE class (``deepspeed_moe.experts.deepspeed_experts.N``) and fails on any other layer. Model weights go
to safetensors in global expert ids instead; the optimizer's per-rank state (ZeRO partition or full
state at stage 0) is saved per rank, which is exact when resuming on the same layout.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from switchyard.log import get_logger

if TYPE_CHECKING:
    from switchyard.train.run_config import RunConfig

log = get_logger(__name__)

PARTIAL = ".partial"
MARKER = "COMPLETE"
REPLACED = f".replaced{PARTIAL}"  # a step's earlier checkpoint, set aside while a new save of it swaps in
PRUNED = f".pruned{PARTIAL}"  # a pruned step, being deleted
FORMAT = 1  # meta.json's "format": bump when a checkpoint's files change meaning; a newer one is refused


@dataclass
class ResumePoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def layout_changes(self, world_size: int, ep: int, zero_stage: int, optimizer: str | None = None,
                       tp: int = 1, etp: int | None = None, pp: int = 1, pp_layers: list[int] | None = None
                       ) -> list[str]:
        """What differs from the layout the engine state was saved under, as ``name old → new``; any difference
        means reshard the weights and restart the optimizer. ``optimizer`` is the engine's optimizer class (its
        state dict's format: ZeRO-0 fp32 steps torch's optimizer, ZeRO-0 bf16 a DeepSpeed wrapper, and neither
        loads the other's). A value a checkpoint from before it was recorded lacks counts as the same."""
        # etp: which experts (whole, or one FFN slice) a rank's optimizer partition holds; recorded since tp was
        # pp layers: each stage's decoder layers (None at pp = 1), which set what a stage's optimizer partition holds
        now = {"world": world_size, "ep": ep, "tp": tp, "etp": tp if etp is None else etp, "pp": pp,
               "pp layers": pp_layers, "ZeRO stage": zero_stage, "optimizer": optimizer}
        saved_tp = self.meta.get("tp", 1)
        saved = {"world": self.meta.get("world_size"), "ep": self.meta.get("ep"), "tp": saved_tp,
                 "etp": self.meta.get("etp", saved_tp), "pp": self.meta.get("pp", 1),
                 "pp layers": self.meta.get("pp_layers", pp_layers),
                 "ZeRO stage": self.meta.get("zero_stage", zero_stage),
                 "optimizer": self.meta.get("engine_optimizer", optimizer)}
        return [f"{k} {saved[k]} → {now[k]}" for k in now if now[k] is not None and saved[k] != now[k]]

    def same_layout(self, world_size: int, ep: int, zero_stage: int, optimizer: str | None = None,
                    tp: int = 1, etp: int | None = None, pp: int = 1, pp_layers: list[int] | None = None) -> bool:
        """Whether the engine state (partitioned by ZeRO over this layout) loads as saved; else reshard the
        weights and restart the optimizer."""
        return not self.layout_changes(world_size, ep, zero_stage, optimizer, tp, etp, pp, pp_layers)


def step_of(path: Path) -> int:
    """``step_000050`` → 50. Checkpoints are ordered by this number, not by name: ``step_1000000`` sorts
    before ``step_999999`` as text."""
    return int(path.name.split("_", 1)[1].split(".", 1)[0])


def _missing(path: Path) -> list[str]:
    """Why ``path`` is not a complete checkpoint (empty: it is one)."""
    if not path.is_dir():
        return ["no such directory"]
    if path.name.endswith(PARTIAL):
        return [f"its name ends in {PARTIAL} (an unfinished or discarded save)"]
    return [f"no {path / name}" for name in (MARKER, "meta.json") if not (path / name).is_file()]


def _is_complete(path: Path) -> bool:
    return not _missing(path)


def _step_dirs(root: Path) -> list[Path]:
    """``step_N`` entries (no save in progress), lowest step first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.name[5:].isdigit()), key=step_of)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest (lowest step) first."""
    return [p for p in _step_dirs(root) if _is_complete(p)]


def damaged_checkpoints(root: Path) -> list[str]:
    """``step_N`` directories (no save in progress) that are not complete, each with what it lacks: a save publishes
    a directory only once its marker and meta.json are in, so these lost files afterwards (a clean-up of empty
    files takes the empty marker)."""
    return [f"{p.name} ({'; '.join(_missing(p))})" for p in _step_dirs(root) if p.is_dir() and not _is_complete(p)]


def read_meta(path: Path) -> dict[str, Any]:
    """``path``/meta.json, checked: valid JSON, a format this version reads, the keys resume needs. Each error
    names the file (json's own names only a line; a missing key was a bare KeyError)."""
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is not valid JSON ({err}): a truncated or hand-edited checkpoint; resume from "
                         f"another one (checkpoint.resume=<its dir>)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}, not an object")
    written = meta.get("format", 1)  # checkpoints from before the format was recorded are format 1
    if not isinstance(written, int) or written > FORMAT:
        raise ValueError(f"{file} has format {written!r}, but this switchyard reads formats up to {FORMAT}: it was "
                         f"written by a later version; resume it with that version")
    if not isinstance(meta.get("step"), int):
        raise ValueError(f"{file} has no integer 'step' (got {meta.get('step')!r}): not a switchyard fine-tune "
                         f"checkpoint, or a damaged one")
    return meta


def recover(root: Path) -> None:
    """Finish a swap killed between its renames: ``step_N`` missing while ``step_N.replaced.partial`` (the old,
    complete checkpoint) exists. The new ``step_N.partial`` is complete once its marker is written (before the
    first rename), so it wins; else the old one goes back. Safe on several ranks at once: a rank whose rename
    loses the race finds ``step_N`` complete."""
    from switchyard.hf.checkpoint import fsync_dir

    if not root.is_dir():
        return
    for aside in root.glob(f"step_*{REPLACED}"):
        final = root / aside.name[:-len(REPLACED)]
        if final.exists():
            continue
        new = root / f"{final.name}{PARTIAL}"
        source = new if (new / MARKER).is_file() else aside
        try:
            os.rename(source, final)
        except OSError:
            if not _is_complete(final):
                raise
            continue
        fsync_dir(root)
        log.warning("%s: a save was killed while swapping it in; restored the %s checkpoint", final,
                    "new" if source == new else "earlier", ranks=None)


def find_resume(root: Path, resume: str | None) -> ResumePoint | None:
    """``None`` → start fresh; ``"auto"`` → ``latest`` if it is complete, else the complete one of the highest
    step; else a checkpoint path. Starting fresh, or from another directory's checkpoint, is refused where
    ``root`` holds a run's checkpoints: this run's pruning would delete them."""
    recover(root)
    damaged = damaged_checkpoints(root)
    if resume in (None, "auto") and damaged and not complete_checkpoints(root):
        # neither fresh (it would overwrite them, metrics first) nor auto (it took them for an empty directory)
        raise ValueError(
            f"{root} holds checkpoints of a run, none complete: {', '.join(damaged)}. Put the missing files back "
            f"(an empty COMPLETE marker is lost to clean-ups of empty files: `touch` it once the directory is "
            f"whole) and resume with checkpoint.resume=auto, name one with checkpoint.resume=<dir>, or choose "
            f"another output_dir")
    if resume is None:
        found = complete_checkpoints(root)
        if found:
            raise ValueError(
                f"{root} already holds checkpoints of a run ({found[0].name} … {found[-1].name}); a fresh run there "
                f"would overwrite its metrics and prune its checkpoints. Continue that run with "
                f"checkpoint.resume=auto (or --resume auto), or choose another output_dir"
            )
        return None
    if resume == "auto":
        pointer = root / "latest"
        candidate = root / pointer.read_text().strip() if pointer.is_file() else None
        if candidate is None or not _is_complete(candidate):
            named = candidate
            found = complete_checkpoints(root)
            candidate = found[-1] if found else None
            if named is not None and candidate is not None and named.is_dir():
                log.warning("resume=auto: %s, which latest names, is not complete (%s): resuming from %s instead, "
                            "and this run's save at step %d will replace it", named, "; ".join(_missing(named)),
                            candidate.name, step_of(named), ranks=[0])
        if candidate is None:
            log.info("resume=auto: no complete checkpoint under %s, starting fresh", root, ranks=[0])
            return None
    else:
        candidate = Path(resume)
        missing = _missing(candidate)
        if missing:
            hint = (f"; {candidate} holds checkpoints: name one of them, or use checkpoint.resume=auto"
                    if complete_checkpoints(candidate) or complete_checkpoints(candidate / "checkpoints") else "")
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete switchyard checkpoint: "
                             f"{'; '.join(missing)}{hint}")
        others = complete_checkpoints(root)
        if others and candidate.resolve().parent != root.resolve():
            raise ValueError(
                f"{root} holds checkpoints of another run ({others[0].name} … {others[-1].name}), and "
                f"checkpoint.resume={resume!r} is not one of them: saving there would prune them and rewrite that "
                f"run's metrics. Choose another output_dir, or continue that run with checkpoint.resume=auto"
            )
    return ResumePoint(candidate, read_meta(candidate))


def check_resume_config(point: ResumePoint, config: RunConfig) -> None:
    """Refuse to resume a checkpoint whose run had other ``RESUME_FIXED`` settings (the checkpoint's model
    and data position would silently win over the config)."""
    if not isinstance(point.meta.get("config"), dict):
        raise ValueError(f"{point.path / 'meta.json'} records no run config ('config'), which a resume is checked "
                         f"against: not a switchyard fine-tune checkpoint, or a damaged one")
    mismatches = config.resume_mismatches(point.meta["config"])
    if mismatches:
        raise ValueError(
            f"cannot resume {point.path}: it was written with other settings ({'; '.join(mismatches)}). Resume "
            f"with the checkpoint's settings, or start a fresh run in another output_dir (model.source="
            f"{point.path / 'model'} starts from its weights)"
        )


def prunable(complete: list[Path], final: Path, keep: int) -> list[Path]:
    """Checkpoints to delete after writing ``final``: steps older than it beyond the ``keep - 1`` newest. Never
    ``final`` nor later steps (left by a run resumed from an earlier checkpoint)."""
    older = sorted((p for p in complete if step_of(p) < step_of(final)), key=step_of)
    return older[:max(0, len(older) - (keep - 1))]


def save_rng(path: Path, rank: int) -> None:
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    path.mkdir(parents=True, exist_ok=True)
    save_file(states, str(path / f"rank{rank:05d}.safetensors"))


def _read_rng(file: Path) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        return None
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {file}: truncated or corrupt ({err}); resume from another checkpoint") from None


def load_rng(path: Path, rank: int) -> None:
    """This rank's RNG states. Collective: a corrupt file on one rank fails every rank (the others would wait
    for it in the first step); a missing one only warns, the run continuing with the current generator."""
    from switchyard.hf.checkpoint import on_every_rank

    file = path / f"rank{rank:05d}.safetensors"
    states = on_every_rank(f"resuming from {path.parent}", _read_rng, file)
    if states is None:
        log.warning("no RNG state %s; continuing with the current generator (router jitter and dropout draw other "
                    "numbers than the uninterrupted run)", file, ranks=None)
        return
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def inject_fault(point: str, step: int) -> None:
    """Crash-safety test hook: ``SWITCHYARD_FAULT=<point>:<rank>:<step>`` SIGKILLs that rank at that
    point ("step": after the optimizer step; "save": mid-save, before the checkpoint is complete)."""
    spec = os.environ.get("SWITCHYARD_FAULT")
    if not spec:
        return
    want_point, want_rank, want_step = spec.split(":")
    if want_point == point and int(want_rank) == dist.get_rank() and int(want_step) == step:
        log.warning("SWITCHYARD_FAULT=%s: killing rank %d", spec, dist.get_rank(), ranks=None)
        os.kill(os.getpid(), 9)


def save_engine_state(engine, path: Path, rank: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "optimizer": engine.optimizer.state_dict(),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "micro_steps": engine.micro_steps,
    }
    torch.save(state, path / f"rank{rank:05d}.pt")


ENGINE_KEYS = ("optimizer", "lr_scheduler", "global_steps", "global_samples")


def _read_engine_state(file: Path) -> dict[str, Any]:
    if not file.is_file():
        # only a resume in the checkpoint's own layout reads engine files (another layout reshards the model instead)
        raise ValueError(f"checkpoint is missing {file}, though its meta.json records this run's layout: the "
                         f"checkpoint is damaged; resume from another one (checkpoint.resume=<dir>)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)  # our own file, written by save_engine_state
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types; none names the file
        raise ValueError(f"cannot read {file} ({type(err).__name__}: {err}): truncated or corrupt; resume from "
                         f"another checkpoint") from None
    missing = [key for key in ENGINE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{file} lacks {missing}: not written by this switchyard's save_engine_state")
    return state


def _hyperparameters(optimizer) -> tuple[list[dict[str, Any]], Any]:
    """The optimizer's per-group settings (all but ``params``) and ZeRO's ``clip_grad``: what this run's config
    built, which a loaded state dict would replace with the checkpoint's."""
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return groups, getattr(optimizer, "clip_grad", None)


def set_step(engine, step: int) -> None:
    """DeepSpeed's counters at optimizer step ``step`` of this run. ``micro_steps`` must be a multiple of this
    run's ``gradient_accumulation_steps``: the engine steps the optimizer when ``micro_steps + 1`` is one, so a
    count saved under another accumulation (2 × 4 steps = 8, resumed at 3) would step after the first micro-batch
    and carry the rest of the batch into the next step. DeepSpeed's own load_checkpoint leaves it at 0."""
    engine.global_steps = step
    engine.micro_steps = step * engine.gradient_accumulation_steps()


def load_engine_state(engine, path: Path, rank: int, dp_rank: int, dp_size: int) -> None:
    """Restore this rank's optimizer partition (moments, fp32 master weights), scheduler and counters (same
    layout only). The optimizer's hyperparameters stay this run's (weight decay, momentum, ZeRO's clipping: a
    state dict would bring the checkpoint's, silently overriding a changed config). A file missing or unreadable
    on any rank fails every rank (the others would wait for it in the first training step)."""
    from switchyard.hf.checkpoint import on_every_rank

    state = on_every_rank(f"resuming from {path.parent}", _read_engine_state, path / f"rank{rank:05d}.pt")
    groups, clip = _hyperparameters(engine.optimizer)
    if engine.zero_optimization_stage() >= 1:
        # ZeRO indexes a list of every data-parallel rank's state by this rank's dp rank; ours is enough
        states = [None] * dp_size
        states[dp_rank] = state["optimizer"]
        engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(state["optimizer"])
    for group, mine in zip(engine.optimizer.param_groups, groups, strict=True):
        group.update(mine)
    if clip is not None:
        engine.optimizer.clip_grad = clip
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_step(engine, state["global_steps"])
    engine.global_samples = state["global_samples"]


def _prepare_dirs(root: Path, partial: Path) -> None:
    recover(root)  # before the sweep: a killed swap's only complete copy may be a *.partial
    for stale in root.glob(f"*{PARTIAL}"):  # left by a job killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)


def _write_pointer(root: Path, name: str) -> None:
    """``latest`` = ``name``, replaced atomically and durably (a torn or lost pointer falls back to the newest
    complete step, which may be another run branch's)."""
    from switchyard.hf.checkpoint import fsync_dir

    pointer_tmp = root / "latest.tmp"
    with open(pointer_tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / "latest")
    fsync_dir(root)


def _publish(root: Path, partial: Path, final: Path, meta: dict[str, Any], keep: int) -> None:
    """Mark ``partial`` complete and rename it to ``final``. A ``final`` already there (this step saved again
    after resuming from an earlier one) is set aside only now, when its replacement is complete; ``recover``
    finishes the swap if the job dies between the renames."""
    from switchyard.hf.checkpoint import fsync_dir, fsync_tree

    (partial / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    fsync_tree(partial)  # every rank's files are on disk before the marker says so
    (partial / MARKER).write_text("")
    fsync_dir(partial)  # the marker is empty: its directory entry is all there is to flush
    replaced = root / f"{final.name}{REPLACED}"
    if final.exists():
        os.rename(final, replaced)  # no such directory: _prepare_dirs removed every *.partial
    os.rename(partial, final)
    _write_pointer(root, final.name)  # its fsync of root makes the renames durable too
    shutil.rmtree(replaced, ignore_errors=True)
    for old in prunable(complete_checkpoints(root), final, keep):
        doomed = root / f"{old.name}{PRUNED}"
        try:
            os.rename(old, doomed)  # one atomic step from complete to ignored; the delete may then be cut anywhere
        except OSError as err:  # the new checkpoint is published: a prune left for later must not fail the save
            log.warning("could not prune %s (%s); it stays", old, err, ranks=[0])
            continue
        fsync_dir(root)
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(engine, model, tokenizer, groups, root: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it; a failure on any rank raises on every rank. Returns the final directory."""
    from switchyard.hf.checkpoint import on_every_rank, save_pretrained

    rank = dist.get_rank()
    final = root / f"step_{step:06d}"
    partial = root / f"step_{step:06d}{PARTIAL}"
    what = f"saving checkpoint {final}"
    on_every_rank(what, lambda: _prepare_dirs(root, partial) if rank == 0 else None)
    on_every_rank(what, save_engine_state, engine, partial / "engine", rank)
    save_pretrained(model, partial / "model", groups=groups, tokenizer=tokenizer)
    on_every_rank(what, save_rng, partial / "rng", rank)
    inject_fault("save", step)
    record = {**meta, "format": FORMAT, "step": step}
    on_every_rank(what, lambda: _publish(root, partial, final, record, keep) if rank == 0 else None)
    # the model's own save line named the staging directory (*.partial), gone now
    log.info("checkpoint of step %d complete: %s (model: %s)", step, final, final / "model", ranks=[0])
    return final
