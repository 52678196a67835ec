"""A stale build lock of DeepSpeed's CPU communication op: an error naming the file, not a silent hang.

On CPU ranks DeepSpeed compiles its shared-memory all-reduce (``deepspeed_shm_comm``) on first use, through torch's
JIT extension build, under a lock file in the build directory that torch waits on with no timeout. A rank killed
while it compiles leaves the file behind, and every later CPU run then hangs inside ``deepspeed.initialize`` without
printing anything. :func:`check_build_lock` runs first: it waits (saying so) while a fresh lock says another process
is compiling, and raises ``FileExistsError`` (the file should not be there) with its path and the fix once the lock
is older than any build takes. It first points the build where ``make install`` built the op
(:func:`build_in_this_environment`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from switchyard.log import get_logger

log = get_logger(__name__)

SHM_OP = "deepspeed_shm_comm"
STALE_AFTER_S = 300.0  # the op compiles in well under a minute on 2 cores; older locks belong to no build


def _lock_age_s(lock: Path) -> float | None:
    try:
        return time.time() - lock.stat().st_mtime
    except FileNotFoundError:  # the build finished between the checks
        return None


def build_lock_path(name: str = SHM_OP) -> Path:
    """Where torch's JIT build of extension ``name`` keeps its lock (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def build_in_this_environment() -> None:
    """In a virtual environment: torch's JIT builds go to ``<env>/torch_extensions`` (unless ``TORCH_EXTENSIONS_DIR``
    says otherwise) with the environment's ninja first on ``PATH``, as the Makefile runs everything. Run bare
    (``.venv/bin/deepspeed …`` without activating), a rank found the system's ninja and torch's directory shared by
    every environment: it compiled the op again (88 s on 2 cores) although ``make install`` had built it, and two
    ninja versions sharing one directory each took the other's build for stale and rebuilt it in turn."""
    if sys.prefix == sys.base_prefix:  # no virtual environment: torch's default directory is this one's
        return
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    bin_dir = os.path.join(sys.prefix, "bin")
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def check_build_lock(name: str = SHM_OP, stale_after_s: float = STALE_AFTER_S, poll_s: float = 0.1) -> None:
    """Return once no build of ``name`` holds its lock; raise ``FileExistsError`` for a lock older than
    ``stale_after_s``. Only CPU ranks build the op (GPU runs communicate over NCCL)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    build_in_this_environment()
    lock, told = build_lock_path(name), False
    while (age := _lock_age_s(lock)) is not None:
        if age > stale_after_s:
            raise FileExistsError(
                f"{lock} is {age:.0f} s old: a process killed while compiling DeepSpeed's CPU communication op left "
                f"it behind, and torch would wait on it forever. If no other job is compiling that op now, delete "
                f"it (rm {lock}) and start again")
        if not told:
            log.warning("waiting for %s: another process is compiling DeepSpeed's CPU communication op (an error "
                        "after %.0f s if the lock is left over from a killed build)", lock, stale_after_s)
            told = True
        time.sleep(poll_s)
