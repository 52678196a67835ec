"""Crash-proof checkpoints: a directory is either complete or ignored.

Layout of ``<output_dir>/checkpoints/``::

    step_000050/            a complete checkpoint (renamed from step_000050.partial/ once every rank is done)
      engine/rank00000.pt   each rank's optimizer partition, lr scheduler and step counters (exact resume)
      model/                switchyard safetensors checkpoint (serve, export, resume at another ep)
      rng/rank00000.safetensors   each rank's RNG states
      meta.json             step, world/ep layout, run config
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


@dataclass
class ResumePoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def same_layout(self, world_size: int, ep: int, zero_stage: int) -> bool:
        """Whether the engine state (partitioned by ZeRO over this layout) loads as saved; else reshard the
        weights and restart the optimizer. A checkpoint from before ``zero_stage`` was recorded counts as same."""
        return (self.meta.get("world_size") == world_size and self.meta.get("ep") == ep
                and self.meta.get("zero_stage", zero_stage) == zero_stage)


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(PARTIAL) and (path / MARKER).is_file() and (path / "meta.json").is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if _is_complete(p)), key=lambda p: p.name)


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
    """``None`` → start fresh (refused where another run's checkpoints are: its pruning would delete them);
    ``"auto"`` → newest complete (``latest`` if it is complete); else a path."""
    recover(root)
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
            found = complete_checkpoints(root)
            candidate = found[-1] if found else None
        if candidate is None:
            log.info("resume=auto: no complete checkpoint under %s, starting fresh", root, ranks=[0])
            return None
    else:
        candidate = Path(resume)
        if not _is_complete(candidate):
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete switchyard checkpoint "
                             f"(needs {MARKER} and meta.json; partial saves end in {PARTIAL})")
    return ResumePoint(candidate, json.loads((candidate / "meta.json").read_text()))


def check_resume_config(point: ResumePoint, config: RunConfig) -> None:
    """Refuse to resume a checkpoint whose run had other ``RESUME_FIXED`` settings (the checkpoint's model
    and data position would silently win over the config)."""
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
    older = [p for p in complete if p.name < final.name]
    return older[:max(0, len(older) - (keep - 1))]


def save_rng(path: Path, rank: int) -> None:
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    path.mkdir(parents=True, exist_ok=True)
    save_file(states, str(path / f"rank{rank:05d}.safetensors"))


def load_rng(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    file = path / f"rank{rank:05d}.safetensors"
    if not file.is_file():
        log.warning("no RNG state %s; continuing with the current generator", file, ranks=None)
        return
    states = load_file(str(file))
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


def _read_engine_state(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"checkpoint is missing {file}: was it written with a different number of ranks?")
    return torch.load(file, map_location="cpu", weights_only=False)  # our own file, written by save_engine_state


def load_engine_state(engine, path: Path, rank: int, dp_rank: int, dp_size: int) -> None:
    """Restore this rank's optimizer partition, scheduler and counters (same layout only). A file missing or
    unreadable on any rank fails every rank (the others would wait for it in the first training step)."""
    from switchyard.hf.checkpoint import on_every_rank

    state = on_every_rank(f"resuming from {path.parent}", _read_engine_state, path / f"rank{rank:05d}.pt")
    if engine.zero_optimization_stage() >= 1:
        # ZeRO indexes a list of every data-parallel rank's state by this rank's dp rank; ours is enough
        states = [None] * dp_size
        states[dp_rank] = state["optimizer"]
        engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(state["optimizer"])
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.micro_steps = state["micro_steps"]


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
    on_every_rank(what, lambda: _publish(root, partial, final, {**meta, "step": step}, keep) if rank == 0 else None)
    return final
