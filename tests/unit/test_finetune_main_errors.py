"""What ``launch/finetune.py`` prints when the run stops early: every rank writes its error to the launcher's shared
stderr, so each message is one line in one write (two writes, the text and then print's newline, let two ranks' lines
run together), and Ctrl-C, which reaches every rank, is that one line and exit 130 instead of a traceback per rank."""

from __future__ import annotations

import importlib.util
import io

import pytest

from harness import REPO_ROOT


class _Writes(io.StringIO):
    """A stderr that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.fixture
def launcher(monkeypatch):
    spec = importlib.util.spec_from_file_location("finetune_launcher", REPO_ROOT / "launch" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "check_world", lambda config: None)  # no process group in the test's process
    return module


def _run(launcher, monkeypatch, tmp_path, raised: BaseException) -> tuple[int, _Writes]:
    import switchyard.train.loop as loop

    def train(config):
        raise raised

    monkeypatch.setattr(loop, "train", train)
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    code = launcher.main(["--config", str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml"), "parallel.ep=1",
                          f"output_dir={tmp_path / 'run'}"])
    return code, stderr


def test_ctrl_c_is_one_line_and_exit_130(launcher, monkeypatch, tmp_path):
    code, stderr = _run(launcher, monkeypatch, tmp_path, KeyboardInterrupt())
    assert code == 130
    assert stderr.calls == ["finetune: interrupted; the newest complete checkpoint in output_dir is intact: continue "
                            "with --resume auto\n"], stderr.calls


def test_an_error_found_while_building_is_one_write_of_one_line(launcher, monkeypatch, tmp_path):
    code, stderr = _run(launcher, monkeypatch, tmp_path, ValueError("data.path=/nowhere does not exist; fix it"))
    assert code == 2
    assert stderr.calls == ["finetune: error: data.path=/nowhere does not exist; fix it\n"], stderr.calls
    with pytest.raises(RuntimeError, match="a bug"):  # not a user mistake: its traceback is kept
        _run(launcher, monkeypatch, tmp_path, RuntimeError("a bug"))
