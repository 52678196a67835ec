"""Ranks of a node load an HF model in waves (switchyard.train.load_waves): at most ``at_once`` of them hold the
whole model at a time, the wave size comes from the smallest free host memory of any rank, and a load failing on
one rank fails every rank (none is left waiting for a wave that never ends)."""

from __future__ import annotations

import time

import pytest

from harness import run_on_ranks

pytestmark = pytest.mark.distributed
LOAD_S = 0.6  # each rank's "load"; waves run one after another, so their intervals must not overlap


def _timed_loads(at_once: int | None, available: list[int] | None = None) -> tuple[float, float]:
    import torch.distributed as dist

    from switchyard.train import load_waves

    if available is not None:  # this rank's free host memory, as psutil would report it
        load_waves._available_host_bytes = lambda: available[dist.get_rank()]

    def load() -> tuple[float, float]:
        start = time.monotonic()
        time.sleep(LOAD_S)
        return start, time.monotonic()

    footprint = load_waves.LoadFootprint(loaded_bytes=60, kept_bytes=10)
    return load_waves.load_in_waves(load, lambda: footprint, at_once)


def _overlap(intervals: list[tuple[float, float]]) -> bool:
    (a0, a1), (b0, b1) = sorted(intervals)
    return b0 < a1


def test_one_rank_at_a_time_loads_one_after_the_other():
    intervals = run_on_ranks(_timed_loads, 2, 1, timeout_s=60)
    assert not _overlap(intervals), intervals


def test_all_ranks_at_once_load_together():
    intervals = run_on_ranks(_timed_loads, 2, 2, timeout_s=60)
    assert _overlap(intervals), intervals


def test_auto_wave_size_follows_the_rank_with_the_least_free_memory():
    # both ranks on this host: 2 shares of 10 stay, each loading rank needs 60 more. Rank 1 alone would let both
    # load together (1000 free); rank 0's 100 fits one loader (100 - 20 = 80 >= 60, < 120), which every rank obeys
    intervals = run_on_ranks(_timed_loads, 2, None, [100, 1000], timeout_s=60)
    assert not _overlap(intervals), intervals
    intervals = run_on_ranks(_timed_loads, 2, None, [1000, 1000], timeout_s=60)
    assert _overlap(intervals), intervals


def _failing_load(failing_rank: int) -> str:
    import torch.distributed as dist

    from switchyard.train import load_waves

    ran = []

    def load() -> None:
        ran.append(dist.get_rank())
        if dist.get_rank() == failing_rank:
            raise ValueError("model.safetensors is truncated")

    try:
        load_waves.load_in_waves(load, lambda: load_waves.LoadFootprint(1, 1), 1)
    except ValueError as err:  # the failing rank's own; CheckpointError (a ValueError) on the others
        return f"{type(err).__name__}: {err} (loaded: {bool(ran)})"
    return "no error"


def test_a_failed_load_in_the_first_wave_stops_every_rank_before_its_own_wave():
    results = run_on_ranks(_failing_load, 2, 0, timeout_s=60)
    assert results[0] == "ValueError: model.safetensors is truncated (loaded: True)"
    assert results[1] == ("CheckpointError: loading the model failed on rank 0: ValueError: model.safetensors is "
                          "truncated (loaded: False)")


def test_a_failed_load_in_the_last_wave_reaches_the_ranks_that_finished():
    results = run_on_ranks(_failing_load, 2, 1, timeout_s=60)
    assert results[0] == ("CheckpointError: loading the model failed on rank 1: ValueError: model.safetensors is "
                          "truncated (loaded: True)")
    assert results[1] == "ValueError: model.safetensors is truncated (loaded: True)"
