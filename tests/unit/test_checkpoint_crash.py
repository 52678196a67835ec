"""A kill at any file-system step of a save (model checkpoint or fine-tune step) leaves the earlier or the new
checkpoint, complete and bit-identical, for the next load or resume; never a mix, never an error.

A kill is simulated by making the n-th mutating call (rename, replace, unlink, rmdir, link, mkdir, fsync, the
shard writer) raise, and every call after it too: a killed process runs no cleanup, so except-handlers that
touch the disk must not get to, either. Every n from 1 to the number of calls a whole save makes is tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import switchyard as sy
import switchyard.hf.checkpoint as ckpt
from switchyard.hf.patch import moe_layers
from switchyard.train import checkpointing
from tiny_models import build

_OS_CALLS = ("rename", "replace", "unlink", "rmdir", "link", "mkdir", "fsync")


class Killed(BaseException):
    """Not an Exception: nothing in the code under test may catch it, as nothing runs after a SIGKILL."""


@contextlib.contextmanager
def killed_at(n: int | None) -> Iterator[list[str]]:
    """Count the mutating calls (``n=None``), or die at the n-th: it and every later one raise ``Killed``."""
    calls: list[str] = []
    originals = {name: getattr(os, name) for name in _OS_CALLS}
    originals_save = ckpt.save_file

    def wrap(name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):
            calls.append(name)
            if n is not None and len(calls) >= n:
                raise Killed(f"killed at call {n} ({name})")
            return real(*args, **kwargs)
        return call

    for name, real in originals.items():
        setattr(os, name, wrap(name, real))
    ckpt.save_file = wrap("save_file", originals_save)
    try:
        yield calls
    finally:
        for name, real in originals.items():
            setattr(os, name, real)
        ckpt.save_file = originals_save


def _crash_points(save: Callable[[], None]) -> range:
    with killed_at(None) as calls:
        save()
    assert len(calls) > 10, calls  # the count covers writes, renames, fsyncs and deletes
    return range(1, len(calls) + 1)


# -- model checkpoints (save_pretrained over an earlier save) -------------------------------------------
def _model(init: str, scale: float) -> torch.nn.Module:
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, init=init))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(scale)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _which(loaded: torch.nn.Module, versions: dict[str, dict[str, torch.Tensor]]) -> str:
    """The one version every tensor of ``loaded`` equals, bit for bit (a mix matches none)."""
    state = loaded.state_dict()
    matches = [name for name, want in versions.items()
               if state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)]
    assert len(matches) == 1, f"loaded a mix of {sorted(versions)} (matches {matches})"
    return matches[0]


@pytest.mark.parametrize("new_shards", ["same_names", "other_names"])
def test_a_save_killed_at_any_step_loads_the_old_or_the_new_checkpoint(new_shards, tmp_path):
    old, new = _model("drop_upcycle", 50.0), _model("copy", 20.0)
    versions = {"old": _state(old), "new": _state(new)}
    records = {"old": old.config.switchyard, "new": new.config.switchyard}
    new_size = "40KB" if new_shards == "same_names" else "2GB"
    out = tmp_path / "ckpt"

    def save_old() -> None:
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        sy.save_pretrained(old, out, max_shard_size="40KB")
        (out / "README.md").write_text("kept across saves")

    save_old()
    for n in _crash_points(lambda: sy.save_pretrained(new, out, max_shard_size=new_size)):
        save_old()
        with killed_at(n), pytest.raises(Killed):
            sy.save_pretrained(new, out, max_shard_size=new_size)
        loaded = sy.from_pretrained(out)
        got = _which(loaded, versions)
        assert loaded.config.switchyard == records[got], f"kill at {n}: {got}'s tensors with the other's config"
        assert (out / "README.md").read_text() == "kept across saves", f"kill at {n}"
        listed = set(json.loads((out / ckpt.INDEX_NAME).read_text())["weight_map"].values())
        assert listed == {p.name for p in out.glob("*.safetensors")}, f"kill at {n}: stray or missing shards"
        sy.save_pretrained(new, out, max_shard_size=new_size)  # the next save cleans up after the killed one
        assert _which(sy.from_pretrained(out), versions) == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], f"kill at {n}: leftovers"


def test_an_interrupted_swap_is_undone_by_the_load_and_refused_targets_write_nothing(tmp_path, monkeypatch):
    model = _model("copy", 20.0)
    out = tmp_path / "ckpt"
    sy.save_pretrained(model, out)
    staging, aside = ckpt.swap_paths(out)
    out.rename(aside)  # the state a kill between the swap's two renames leaves
    staging.mkdir()
    assert _which(sy.from_pretrained(out), {"saved": _state(model)}) == "saved"
    assert out.is_dir() and not aside.exists()

    (tmp_path / "file").write_text("")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"file is a file, not a directory"):
        sy.save_pretrained(model, tmp_path / "file")
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match=r"ckpt is the working directory or holds it.*save into a subdirectory"):
        sy.save_pretrained(model, ".")  # renaming the cwd away would strand the process in a deleted directory
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_serving_plan_and_fine_tune_readers_undo_an_interrupted_swap(tmp_path):
    """Readers that look at the directory before ``from_pretrained`` (the server's model check, ``switchyard
    plan``, the fine-tune source) put back a checkpoint a killed re-save left aside, as the load does."""
    from switchyard.cli import main as cli_main
    from switchyard.serve.loading import resolve_model_dir

    model = _model("copy", 20.0)
    out = tmp_path / "ckpt"
    sy.save_pretrained(model, out)
    _, aside = ckpt.swap_paths(out)
    out.rename(aside)
    assert resolve_model_dir(str(out)) == out and out.is_dir() and not aside.exists()
    out.rename(aside)
    assert cli_main(["plan", "--model", str(out), "--world", "1"]) == 0
    assert out.is_dir() and not aside.exists()


# -- fine-tune checkpoints (step directories and the latest pointer) ------------------------------------
def _step(root: Path, name: str, tag: str) -> dict[str, bytes]:
    """A step directory as save_checkpoint leaves it before _publish: per-rank files and a model dir."""
    path = root / name
    for rel in ("engine/rank00000.pt", "engine/rank00001.pt", "model/dense-00001-of-00001.safetensors",
                "rng/rank00000.safetensors"):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(f"{tag}:{rel}".encode() * 64)
    return _tree(path)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _saved(root: Path, step: int, tag: str, keep: int = 2) -> dict[str, bytes]:
    """save_checkpoint's file-system steps, around per-rank files written by hand."""
    partial = root / f"step_{step:06d}{checkpointing.PARTIAL}"
    checkpointing._prepare_dirs(root, partial)
    _step(root, partial.name, tag)
    checkpointing._publish(root, partial, root / f"step_{step:06d}", {"step": step, "tag": tag}, keep)
    return _tree(root / f"step_{step:06d}")


@pytest.mark.parametrize("case", ["resave_step", "new_step_prunes"])
def test_a_training_save_killed_at_any_step_resumes_a_complete_checkpoint(case, tmp_path):
    """'killing the job at any moment, including mid-save, never leaves the latest pointer on a partial
    checkpoint': resume=auto finds a complete step, and every step it could list is whole."""
    root = tmp_path / "checkpoints"
    step = 5 if case == "resave_step" else 7

    def earlier_run() -> dict[str, dict[str, bytes]]:
        shutil.rmtree(root, ignore_errors=True)
        return {"step_000003": _saved(root, 3, "a3"), "step_000005": _saved(root, 5, "a5")}

    def save() -> None:
        _saved(root, step, "b")

    earlier_run()
    points = _crash_points(save)
    earlier_run()
    new = _saved(root, step, "b")
    for n in points:
        whole = earlier_run()
        with killed_at(n), pytest.raises(Killed):
            save()
        point = checkpointing.find_resume(root, "auto")
        assert point is not None, f"kill at {n}: nothing to resume"
        allowed = [new, whole.get(point.path.name)] if point.path.name == f"step_{step:06d}" else [whole[point.path.name]]
        assert _tree(point.path) in allowed, f"kill at {n}: resumed a partial or mixed {point.path.name}"
        assert point.path.name >= "step_000005", f"kill at {n}: resumed {point.path.name}, older than needed"
        for listed in checkpointing.complete_checkpoints(root):  # none half-deleted by a pruning cut short
            assert _tree(listed) in [new, whole.get(listed.name)], f"kill at {n}: {listed.name} is not whole"

        whole = earlier_run()  # the same kill, then the next save of a later step straight away: its sweep of
        with killed_at(n), pytest.raises(Killed):  # *.partial must not delete the only complete copy of a step
            save()
        later = _saved(root, 9, "c", keep=3)  # prunes step 3 at most
        assert _tree(root / "step_000009") == later
        assert _tree(root / "step_000005") in [new, whole["step_000005"]], f"kill at {n}, then a save: lost step 5"
