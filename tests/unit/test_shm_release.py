"""The /dev/shm segment DeepSpeed's CPU all-reduce gives each rank of a gloo run (~66 MiB of RAM, never unlinked by
DeepSpeed): the launchers unlink their rank's own at the end (``release_shm_allreduce_buffer``); the fine-tune's
launcher test checks that a whole run leaves none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from switchyard.parallel.manager import release_shm_allreduce_buffer
from switchyard.parallel.ports import free_port


def test_a_rank_unlinks_only_its_own_deepspeed_shm_segment(monkeypatch):
    """Segments are named by uid, master address and port, and rank: a rank removes its own name only."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    port = free_port()
    names = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in (0, 1)]
    for name in names:
        name.write_bytes(b"x")
    try:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("RANK", "1")
        release_shm_allreduce_buffer()
        assert names[0].exists() and not names[1].exists()
        release_shm_allreduce_buffer()  # gone already: nothing to do
    finally:
        for name in names:
            name.unlink(missing_ok=True)
