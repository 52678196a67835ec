"""A build lock left by a rank killed while DeepSpeed compiled its CPU all-reduce op: an error, not a silent hang.

torch's JIT extension build waits on the lock file with no timeout (``torch.utils.cpp_extension.FileBaton``); the
oracle for the lock's place is torch's own ``_get_build_directory`` under ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from switchyard.deepspeed.build_lock import SHM_OP, build_lock_path, check_build_lock


@pytest.fixture
def lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = build_lock_path()
    assert path == tmp_path / SHM_OP / "lock"  # where torch's FileBaton puts it
    return path


def test_no_lock_returns_at_once(lock):
    started = time.monotonic()
    check_build_lock()
    assert time.monotonic() - started < 1


def test_a_stale_lock_is_an_error_naming_the_file_and_the_fix(lock):
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(FileExistsError, match=rf"{lock} is 3\d\d\d s old: a process killed while compiling DeepSpeed's "
                                           rf"CPU communication op left it behind.*rm {lock}"):
        check_build_lock()
    assert lock.exists()  # another job might still be building: the user decides


def test_a_build_in_progress_is_waited_for(lock):
    lock.write_text("")
    threading.Timer(0.5, lock.unlink).start()  # the other process's build ends
    started = time.monotonic()
    check_build_lock(poll_s=0.05)
    assert 0.4 < time.monotonic() - started < 5


def test_a_lock_that_outlives_any_build_while_waited_on_is_an_error(lock):
    lock.write_text("")
    with pytest.raises(FileExistsError, match="s old: a process killed while compiling"):
        check_build_lock(stale_after_s=0.3, poll_s=0.05)


def test_the_op_is_built_in_the_virtual_environment_with_its_ninja(tmp_path, monkeypatch):
    """Run without the Makefile's environment, ranks built the op in torch's shared directory with the system's
    ninja, although ``make install`` had built it in the venv: 88 s of compiling, and two ninjas rebuilding in turn."""
    import sys

    from switchyard.deepspeed.build_lock import build_in_this_environment

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "ninja").write_text("")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    build_in_this_environment()
    assert build_lock_path() == venv / "torch_extensions" / SHM_OP / "lock"  # torch's own _get_build_directory
    assert os.environ["PATH"] == f"{venv / 'bin'}:/usr/bin:/bin"
    build_in_this_environment()  # once is enough
    assert os.environ["PATH"] == f"{venv / 'bin'}:/usr/bin:/bin"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # the user's choice stands
    build_in_this_environment()
    assert build_lock_path() == tmp_path / "mine" / SHM_OP / "lock"
