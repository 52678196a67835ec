"""The multi-rank harness itself: failures name the rank, hangs end in seconds."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed


def _rank_and_sum():
    value = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def test_returns_each_ranks_value():
    assert run_on_ranks(_rank_and_sum, 3, timeout_s=60) == [(0, 3.0), (1, 3.0), (2, 3.0)]


def _rank_two_raises():
    if dist.get_rank() == 2:
        raise RuntimeError("boom on purpose")
    dist.barrier()  # the others block on the failed rank; the harness must not wait for them


def test_failing_rank_number_and_traceback_are_reported():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 2 of 4 failed.*RuntimeError: boom on purpose"):
        run_on_ranks(_rank_two_raises, 4, timeout_s=60)
    assert time.monotonic() - start < 45


def _rank_one_hangs():
    if dist.get_rank() == 1:
        time.sleep(3600)


def test_hang_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"did not finish within 8s"):
        run_on_ranks(_rank_one_hangs, 2, timeout_s=8)
    assert time.monotonic() - start < 20


def _environ_values(names: list[str]) -> list[str | None]:
    return [os.environ.get(name) for name in names]


def test_ranks_get_the_callers_environment_of_each_call(monkeypatch):
    """CPU ranks fork from a server started once per session, with the environment of that moment; each call
    still hands its ranks the caller's current one, as a spawned process inherits it."""
    monkeypatch.setenv("HARNESS_PROBE_GONE", "1")
    assert run_on_ranks(_environ_values, 2, ["HARNESS_PROBE_GONE"], timeout_s=60) == [["1"]] * 2
    monkeypatch.delenv("HARNESS_PROBE_GONE")
    monkeypatch.setenv("HARNESS_PROBE_NEW", "2")
    names = ["HARNESS_PROBE_GONE", "HARNESS_PROBE_NEW"]
    assert run_on_ranks(_environ_values, 2, names, timeout_s=60) == [[None, "2"]] * 2


def _module_settings() -> tuple[float, bool]:
    from switchyard.moe.kernels.ops import fused_kernels_enabled
    from switchyard.parallel.manager import DEFAULT_TIMEOUT_S

    return DEFAULT_TIMEOUT_S, fused_kernels_enabled()


def test_ranks_read_switchyards_import_time_settings_from_the_callers_environment(monkeypatch):
    """switchyard reads some settings when imported (the collective timeout the harness sets per call, the fused
    kernels switch): a rank must import it after its environment is the caller's, not inherit a preloaded copy."""
    monkeypatch.setenv("SWITCHYARD_FUSED_KERNELS", "0")
    results = run_on_ranks(_module_settings, 2, timeout_s=60)
    assert results == [(48.0, False), (48.0, False)]  # 0.8 x timeout_s, as _rank_main sets it
