"""A killed export (SIGKILL: no cleanup runs) leaves its hidden staging directory, a whole checkpoint, inside the
export path. The next export there removes it, and only it: a running export's (a live pid on this host), one from
another host and one without an owner in its name are kept and reported by path."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
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
