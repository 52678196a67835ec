"""The multi-rank harness itself: failures name the rank, hangs end in seconds; a script's forked ranks are set up as
the deepspeed launcher sets its ranks up."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness import run_deepspeed_launcher, run_on_ranks, run_script_on_ranks

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


# what a rank of a launched script sees: its arguments, the launcher's rank variables, where it runs, how it is named
RANK_SCRIPT = """
import json, os, sys, time
mode = os.environ.get("SWITCHYARD_PROBE_MODE", "report")
rank = int(os.environ.get("RANK", "0"))
names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "CROSS_RANK", "CROSS_SIZE",
         "OMP_NUM_THREADS", "PYTHONUNBUFFERED"]
print("RANK_REPORT " + json.dumps({"argv": sys.argv[1:], "env": {n: os.environ.get(n) for n in names},
                                    "port": "MASTER_PORT" in os.environ, "cwd": os.getcwd(), "path0": sys.path[0],
                                    "main": __name__, "probe": os.environ.get("SWITCHYARD_PROBE")}), flush=True)
if mode == "fail_rank1" and rank == 1:
    print("rank 1 fails on purpose", flush=True)
    sys.exit(3)
if mode == "fail_rank1" or mode == "hang":
    time.sleep(600)
"""


def _reports(output: str) -> list[dict]:
    lines = [line for line in output.splitlines() if line.startswith("RANK_REPORT ")]
    return sorted((json.loads(line.split(" ", 1)[1]) for line in lines),
                  key=lambda r: r["env"]["RANK"] or "0")


@pytest.mark.parametrize("ranks", [1, 2])
def test_forked_script_ranks_see_what_the_deepspeed_launchers_ranks_see(tmp_path, ranks):
    """The oracle is DeepSpeed's own launcher (or, for one rank, a plain ``python script``): the same arguments
    (``--local_rank=N`` first), rank variables, working directory, ``sys.path[0]`` and ``__main__``."""
    script = tmp_path / "probe.py"
    script.write_text(RANK_SCRIPT)
    forked = run_script_on_ranks(script, ranks, ["a", "--zz=1"], timeout_s=60, env={"SWITCHYARD_PROBE": "x"})
    if ranks == 1:
        from harness import run_script

        real = run_script(script, ["a", "--zz=1"], timeout_s=60, env={"SWITCHYARD_PROBE": "x"})
    else:
        real = run_deepspeed_launcher(script, ranks, ["a", "--zz=1"], timeout_s=60, env={"SWITCHYARD_PROBE": "x"})
    assert forked.returncode == real.returncode == 0, forked.stdout[-3000:] + real.stdout[-3000:]
    want, got = _reports(real.stdout), _reports(forked.stdout)
    assert len(got) == len(want) == ranks
    assert got == want
    assert got[0]["main"] == "__main__" and got[0]["probe"] == "x" and got[0]["path0"] == str(tmp_path)


def test_the_first_failing_rank_ends_the_others_and_is_the_exit_status(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(RANK_SCRIPT)
    started = time.monotonic()
    result = run_script_on_ranks(script, 2, timeout_s=120, env={"SWITCHYARD_PROBE_MODE": "fail_rank1"})
    assert result.returncode == 3 and "rank 1 fails on purpose" in result.stdout
    assert len(_reports(result.stdout)) == 2  # rank 0's output before it was ended is kept
    assert time.monotonic() - started < 60


def test_a_hung_script_fails_within_the_timeout(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(RANK_SCRIPT)
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)on 2 forked ranks did not finish within 5s.*RANK_REPORT"):
        run_script_on_ranks(script, 2, timeout_s=5, env={"SWITCHYARD_PROBE_MODE": "hang"})
    assert time.monotonic() - started < 30


def test_an_environment_the_preloaded_modules_may_have_read_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"env sets \['HF_HUB_OFFLINE'\].*use run_deepspeed_launcher"):
        run_script_on_ranks(tmp_path / "never_run.py", 2, env={"HF_HUB_OFFLINE": "1"})
