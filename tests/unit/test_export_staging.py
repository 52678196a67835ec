"""A killed export (SIGKILL: no cleanup runs) leaves its hidden staging directory, a whole checkpoint, inside the
export path. The next export there removes it, and only it: a running export's (a live pid on this host), one from
another host and one without an owner in its name are kept and reported by path. An export that fails while its
files are moved up out of staging puts the earlier export back as it was. A torch.compile'd model is staged and
written as the model it wraps."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
import switchyard.hf.export as export
from harness import REPO_ROOT
from tiny_models import build, ids

_KILLED_EXPORT = """
import os, signal, sys
import switchyard as sy
from tiny_models import build


class KillingTokenizer:  # the weights are staged by now; the kill lands before anything is moved up
    def save_pretrained(self, path):
        os.kill(os.getpid(), signal.SIGKILL)


model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
sy.export_hf(model, sys.argv[1], tokenizer=KillingTokenizer())
"""


def _killed_export(out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(out)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    (left,) = out.iterdir()
    assert left.name.startswith(".export-") and (left / "model.safetensors").is_file()
    return left


def _leftover(out: Path, name: str) -> Path:
    """A staging directory another export is (or was) writing: another model's config and weights in it."""
    path = out / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"not the export's weights")
    return path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def test_the_next_export_removes_a_killed_exports_staging_dir_and_only_that(tmp_path):
    out = tmp_path / "hf"
    dead = _killed_export(out)
    running = _leftover(out, f".export-{os.getpid()}@{socket.gethostname()}.a1b2c3d4")  # this process: alive
    other_host = _leftover(out, ".export-4242@elsewhere.example.org.e5f6g7h8")
    unknown = _leftover(out, ".export-k9_x8y7z")  # no owner in the name (an older switchyard's)
    kept = {p: {f.name: f.read_bytes() for f in p.iterdir()} for p in (running, other_host, unknown)}

    records = _Records()
    logging.getLogger("switchyard").addHandler(records)
    try:
        model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
        # neither the leftovers' llama config (foreign-directory refusal) nor their weights (stale-file check) count
        sy.export_hf(model, out)
    finally:
        logging.getLogger("switchyard").removeHandler(records)

    assert not dead.exists()
    assert {p: {f.name: f.read_bytes() for f in p.iterdir()} for p in kept} == kept
    hidden = {p.name for p in out.iterdir() if p.name.startswith(".")}
    assert hidden == {running.name, other_host.name, unknown.name}  # no claimed or staging dir of ours left
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(ids()).logits, model(ids()).logits, atol=1e-5, rtol=1e-5)

    infos = [m for level, m in records.messages if level == logging.INFO]
    warnings = [m for level, m in records.messages if level == logging.WARNING]
    assert any(str(dead) in m and "removed" in m for m in infos), infos
    assert any(str(running) in m and "kept" in m for m in infos), infos
    for path, who in ((other_host, "pid 4242 on host elsewhere.example.org"), (unknown, "an unknown process")):
        assert any(str(path) in m and who in m and "delete it by hand" in m for m in warnings), warnings


def _patched(shift: float = 0.0) -> torch.nn.Module:
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    if shift:
        with torch.no_grad():  # another model of the same shape and family: other weights, other logits
            for param in model.parameters():
                param.add_(shift * torch.randn_like(param))
    return model


def _files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in out.iterdir()}


# the moves up of a sharded re-export over an unsharded one: config.json, generation_config.json, 2 shards, the
# index, then the earlier model.safetensors taken away; the 2nd is what the audit's repro made fail
@pytest.mark.parametrize("fail_at, hard_links", [*((n, True) for n in range(1, 7)), (2, False), (5, False)],
                         ids=lambda v: str(v) if isinstance(v, int) else ("links" if v else "no-links"))
def test_a_move_up_that_fails_leaves_the_earlier_export_as_it_was(tmp_path, monkeypatch, fail_at, hard_links):
    out = tmp_path / "hf"
    earlier_model, new_model = _patched(), _patched(shift=0.05)
    sy.export_hf(earlier_model, out)  # unsharded: model.safetensors
    before = _files(out)
    with torch.no_grad():
        earlier_logits, new_logits = earlier_model(ids()).logits, new_model(ids()).logits
    assert not torch.allclose(earlier_logits, new_logits, atol=1e-3)  # else the check below would prove nothing

    real_replace, moves = os.replace, []

    def failing_replace(src, dst):  # count only renames into or out of `out` (not whatever save_pretrained does)
        if out in (Path(src).parent, Path(dst).parent):
            moves.append(Path(src).name)
            if len(moves) == fail_at:
                raise OSError(f"injected failure of move {fail_at}")
        return real_replace(src, dst)

    def no_link(*args, **kwargs):
        raise OSError("no hard links on this file system")

    monkeypatch.setattr(export.os, "replace", failing_replace)
    if not hard_links:
        monkeypatch.setattr(export.os, "link", no_link)
    with pytest.raises(OSError, match=f"injected failure of move {fail_at}"):
        sy.export_hf(new_model, out, max_shard_size="200KB")  # two shards and an index: other names
    monkeypatch.undo()

    assert len(moves) >= fail_at  # the failure came on the way
    assert _files(out) == before  # same names, same bytes, no staging directory left
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(ids()).logits, earlier_logits, atol=1e-5, rtol=1e-5)


def test_a_compiled_model_exports_as_the_model_it_wraps(tmp_path):
    model = _patched()
    compiled = torch.compile(model)  # only wraps: nothing compiles before a first call, which this test never makes
    assert export.export_refusal(compiled) is None
    sy.export_hf(model, tmp_path / "plain")
    assert sy.export_hf(compiled, tmp_path / "compiled") == str(tmp_path / "compiled")
    assert _files(tmp_path / "compiled") == _files(tmp_path / "plain")
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled").eval()
        torch.testing.assert_close(hf(ids()).logits, model(ids()).logits, atol=1e-5, rtol=1e-5)
