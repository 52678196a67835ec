"""benchmarks/bench_common.py: the commit a result's meta names is the code that ran."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harness import REPO_ROOT, load_script

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _bench_common():
    return load_script(REPO_ROOT / "benchmarks" / "bench_common.py", "bench_common_test")


def test_git_commit_marks_a_tree_that_differs_from_its_commit(tmp_path, monkeypatch):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "layer.py").write_text("x = 1\n")
    git("add", "layer.py")
    git("commit", "-q", "-m", "one")
    sha = git("rev-parse", "HEAD")
    bc = _bench_common()
    monkeypatch.setattr(bc, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("SWITCHYARD_GIT_COMMIT", raising=False)
    assert bc._git_commit() == sha
    (tmp_path / "notes.txt").write_text("untracked files are not the measured code\n")
    assert bc._git_commit() == sha
    (tmp_path / "layer.py").write_text("x = 2\n")  # the measured code is not the commit's
    assert bc._git_commit() == f"{sha}+dirty"
    monkeypatch.setenv("SWITCHYARD_GIT_COMMIT", "abc1234")  # set by whoever knows what the tree is
    assert bc._git_commit() == "abc1234"
