"""Run a function on N ranks (new processes: gloo on CPU, or NCCL with one GPU each) or a script under the
real deepspeed launcher.

Both have a hard timeout: a hang fails the test in seconds and kills every rank. A failing rank's
number and traceback are in the assertion message.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str) -> ModuleType:
    """A script of benchmarks/ or launch/ imported as module ``name``, registered in ``sys.modules`` before it
    runs (its dataclasses look their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _rank_main(payload, environ, rank, world_size, port, results, collective_timeout_s, backend) -> None:
    os.environ.clear()  # a forked rank starts with the server's environment: give it the caller's, as spawn did
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        SWITCHYARD_DIST_TIMEOUT_S=str(collective_timeout_s),
    )
    try:
        fn, args, kwargs = pickle.loads(payload)  # imports fn's module: after the environment is the caller's
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout_s))
        value = fn(*args, **kwargs)
        # plain pickle: tensors travel by value, not as shared-memory handles that die with this process
        results.put((rank, "ok", pickle.dumps(value)))
        code = 0
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer still running or dead: the parent reports it, not this rank
            pass
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    results.close()
    results.join_thread()  # flush the report before the hard exit
    os._exit(code)


# Imported once by the server CPU ranks fork from: ~2 s of a 2-core machine per launch otherwise, ~5 s per rank of a
# forked script (run_script_on_ranks) with the rest: the tiny model's transformers classes (1.1 s: DTensor, dynamo),
# pyplot for the expert-load heatmap (0.9 s) and DeepSpeed's Muon, which its ZeRO optimizer check imports (1.1 s:
# torch.compile at import). Not switchyard (nor this module at import time): its module-level settings read the
# environment (SWITCHYARD_DIST_TIMEOUT_S, SWITCHYARD_FUSED_KERNELS, ...), which each rank must read as the caller
# set it, after _rank_main sets it
_PRELOAD = ["torch", "deepspeed", "transformers", "transformers.models.llama.modeling_llama", "matplotlib.pyplot",
            "deepspeed.runtime.zero.muon.muon_optimizer"]


def _rank_context(backend: str) -> mp.context.BaseContext:
    """Where CUDA is, every rank is spawned (a process that imported deepspeed has asked CUDA for its
    devices; a child forked from it could not use CUDA). Elsewhere the ranks fork from a server that
    imported ``_PRELOAD`` and nothing else: each starts as a fresh process would after those imports."""
    import torch

    if backend == "nccl" or torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return each rank's return value.

    ``backend``: ``gloo`` (CPU ranks) or ``nccl`` (rank r on GPU r). ``fn`` must be importable (module
    level). Raises ``AssertionError`` naming the first failing rank with its traceback, or the ranks still
    running when ``timeout_s`` passes.
    """
    ctx = _rank_context(backend)
    results = ctx.Queue()
    from switchyard.parallel.ports import free_port

    port = free_port()
    collective_timeout_s = max(5.0, timeout_s * 0.8)
    payload = pickle.dumps((fn, args, kwargs))
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(payload, dict(os.environ), rank, world_size, port, results, collective_timeout_s, backend),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                silent = [r for r in dead if r not in values and r not in errors]
                if silent:  # died without reporting (segfault, os._exit from a library)
                    time.sleep(0.5)  # give the queue a moment to deliver a late report
                    if all(r not in errors and r not in values for r in silent):
                        for r in silent:
                            errors[r] = f"rank {r} exited with code {procs[r].exitcode} without a report"
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            if errors:
                break  # one failure is enough: do not wait for peers blocked on it
        if errors:
            rank = min(errors)
            raise AssertionError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
        missing = [r for r in range(world_size) if r not in values]
        if missing:
            raise AssertionError(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s (hang?)")
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [values[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)


def collect_rank_errors(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0, **kwargs: Any) -> dict[int, str]:
    """Run ``fn`` on every rank expecting each to raise; returns {rank: traceback} for all ranks.

    Used to prove that a distributed mistake fails on *every* rank instead of hanging some.
    """
    return run_on_ranks(_capture_error, world_size, fn, args, kwargs, timeout_s=timeout_s)


def _capture_error(fn, args, kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()
    return None


def script_environ(env: dict[str, str] | None) -> dict[str, str]:
    """The environment the tests run scripts in: the caller's, one OpenMP thread (spinning OpenMP barriers make a busy
    2-core machine far slower than one thread), unbuffered output, then ``env``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def run_script(
    script: str | Path, args: list[str] | None = None, timeout_s: float = 300.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python script args`` in one process, in ``script_environ(env)``."""
    return subprocess.run([sys.executable, str(script), *(args or [])], cwd=REPO_ROOT, env=script_environ(env),
                          capture_output=True, text=True, timeout=timeout_s)


def run_deepspeed_launcher(
    script: str | Path,
    num_ranks: int,
    script_args: list[str] | None = None,
    timeout_s: float = 280.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N script args`` on CPU ranks; kills the whole process tree on timeout (the default
    stays below pytest-timeout's 300 s, so this kill, not pytest's, ends a hung launch: no orphaned ranks)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    from switchyard.parallel.ports import free_port

    port = free_port()
    command = [str(launcher), "--num_gpus", str(num_ranks), "--master_port", str(port), str(script)]
    command += script_args or []
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=script_environ(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish within {timeout_s:.0f}s:\n{out[-6000:]}")
    result = subprocess.CompletedProcess(command, proc.returncode, out, "")
    result.master_port = port  # names the run's DeepSpeed /dev/shm segments (deepspeed_allreduce_buffer_*_<port>_<rank>)
    return result


def _script_rank_main(script: str, argv: list[str], environ: dict[str, str], log_path: str) -> None:
    """One rank of ``run_script_on_ranks``: what ``python -u script argv`` would do in a fresh process with the
    caller's environment, its output in ``log_path``, forked from the server that imported ``_PRELOAD``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)  # python -u: a killed rank's lines are there
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(REPO_ROOT)
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))  # as `python script` puts the script's folder first
    code = 0
    try:
        import runpy

        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:  # as the interpreter ends on it: an int or None is the status, anything else printed
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then exit status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_script_on_ranks(
    script: str | Path,
    num_ranks: int,
    script_args: list[str] | None = None,
    timeout_s: float = 280.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``script`` on ``num_ranks`` CPU ranks set up as the deepspeed launcher sets them up (its rank environment and
    ``--local_rank=N``; ``num_ranks=1``: a plain ``python script``, no rank environment), each forked from the
    server that imported ``_PRELOAD``: ~4 s of the launcher's and its node agent's imports and ~5 s of each rank's
    fewer on a 2-core machine (a 3-step 2-rank fine-tune: 6–9 s instead of ~14). For the tests whose subject is the
    script's work, not the launcher: those that test the launcher use ``run_deepspeed_launcher``. Like the
    launcher, the first rank to fail ends the others (after a 2 s grace: every rank's own error line gets out) and
    is the exit status; stdout holds each rank's output in rank order. Where CUDA is, ranks could not fork: the
    real launcher runs instead. ``env`` may not change what the server's imports read, so it may only set
    ``SWITCHYARD_*`` variables."""
    unsafe = sorted(k for k in (env or {}) if not k.startswith("SWITCHYARD_"))
    if unsafe:
        raise ValueError(f"run_script_on_ranks: env sets {unsafe}, which the preloaded modules may have read at "
                         "import; use run_deepspeed_launcher (or run_script) for those")
    ctx = _rank_context("gloo")
    if ctx.get_start_method() != "forkserver":
        if num_ranks == 1:
            return run_script(script, script_args, timeout_s=timeout_s, env=env)
        return run_deepspeed_launcher(script, num_ranks, script_args, timeout_s=timeout_s, env=env)
    import tempfile

    from switchyard.parallel.ports import free_port

    base = script_environ(env)
    port = free_port()
    if num_ranks > 1:
        base |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(num_ranks),
                 "LOCAL_SIZE": str(num_ranks), "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        log_paths = [os.path.join(logs, f"rank{rank}.log") for rank in range(num_ranks)]
        procs = []
        for rank in range(num_ranks):
            environ = base | ({"RANK": str(rank), "LOCAL_RANK": str(rank)} if num_ranks > 1 else {})
            argv = ([f"--local_rank={rank}"] if num_ranks > 1 else []) + list(script_args or [])
            procs.append(ctx.Process(target=_script_rank_main, args=(str(script), argv, environ, log_paths[rank])))
        for p in procs:
            p.start()
        deadline, first_failure, timed_out = time.monotonic() + timeout_s, None, False
        try:
            while any(p.exitcode is None for p in procs):
                failed = [p for p in procs if p.exitcode not in (None, 0)]
                if failed and first_failure is None:
                    first_failure = (failed[0].exitcode, time.monotonic())
                if first_failure is not None and time.monotonic() - first_failure[1] > 2.0:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
            for p in procs:
                p.join(timeout=5)
        out = "".join(Path(path).read_text(errors="replace") for path in log_paths if Path(path).exists())
    command = [sys.executable, "-u", str(script), *(script_args or [])]
    if timed_out:
        raise AssertionError(f"{' '.join(command)} on {num_ranks} forked ranks did not finish within "
                             f"{timeout_s:.0f}s:\n{out[-6000:]}")
    codes = [p.exitcode for p in procs]
    code = first_failure[0] if first_failure is not None else next((c for c in codes if c), 0)
    result = subprocess.CompletedProcess(command, code, out, "")
    result.master_port = port if num_ranks > 1 else None  # one process picks its own
    return result
