"""The multi-rank harness itself: failures name the rank, hangs end in seconds."""

from __future__ import annotations

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
