"""Helpers the benchmark scripts share: a one-rank world, device sync and memory, timing, run metadata.

Imported as a plain module (``import bench_common``) by benchmarks/moe_layer.py, finetune.py, ep_scaling.py
and serve.py, which put this folder on ``sys.path`` first; nothing here imports switchyard.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------------------

_DIST_READY = False


def ensure_world(device: torch.device) -> None:
    """A one-rank world for DeepSpeed's (and switchyard's) process groups, no launcher needed; idempotent."""
    global _DIST_READY
    if _DIST_READY:
        return
    import deepspeed

    if not torch.distributed.is_initialized():
        from switchyard.parallel.ports import free_port

        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    _DIST_READY = True


# ----------------------------------------------------------------------------------------------------------
# Device: sync, memory, timing, kernels
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gb(nbytes: int | None) -> float | None:
    """Bytes as GiB, 3 decimals; None stays None."""
    return None if nbytes is None else round(nbytes / 2**30, 3)


def mem_allocated(device: torch.device) -> int | None:
    """Bytes allocated on the device now; None off CUDA."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device, baseline: int | None) -> float | None:
    """GiB of peak allocation since the last ``reset_peak`` above ``baseline``; None off CUDA."""
    if device.type != "cuda" or baseline is None:
        return None
    return gb(torch.cuda.max_memory_allocated(device) - baseline)


def time_step_ms(step: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one ``step()``: CUDA events on CUDA, time.perf_counter elsewhere. The caller makes
    the device idle first (``synchronize``), so only this step is counted."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def time_back_to_back_ms(step: Callable[[], object], zero: Callable[[], None], device: torch.device,
                         iters: int) -> float:
    """Milliseconds per step of ``iters`` steps issued back to back (no synchronize between them), timed
    as one ``time_step_ms``: the device's throughput, with each step's host work overlapping the previous
    step's kernels, as inside a model where the layer before keeps the device busy."""
    def all_steps() -> None:
        for _ in range(iters):
            zero()
            step()

    synchronize(device)
    return time_step_ms(all_steps, device) / iters


def autoep_kernel(experts: Any) -> str:
    """Which expert kernel a DeepSpeed AutoEPMoELayer's ``experts`` runs."""
    if getattr(experts, "use_triton_grouped_mm", False):
        return "triton grouped GEMM"
    if getattr(experts, "use_grouped_mm", False):
        return f"torch._grouped_mm, gate_up_impl={getattr(experts, 'gate_up_impl', '?')}"
    return "per-expert for-loop"


# ----------------------------------------------------------------------------------------------------------
# Command line and run metadata
# ----------------------------------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else a parser error naming the value and the range.
    Counts such as ``--iters 0`` used to be swapped for the default (``args.iters or 20``) or run as given;
    with this type an omitted option is still None (its default), and a given one is used or refused."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range; pass an integer >= {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type by it in its own messages
    return parse


def fill_counts(args: argparse.Namespace, **defaults: tuple[int, int]) -> None:
    """Give each omitted count (None) its default: ``name=(with --tiny, without)``; a given count stays."""
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)


def resolve_out(parser: argparse.ArgumentParser, args: argparse.Namespace, default_out: Path, tiny_name: str,
                cpu_warning: str) -> None:
    """``args.out``: ``default_out`` (the committed results), or a temp file ``tiny_name`` with ``--tiny``,
    which may never write ``default_out`` (a parser error); a full run on CPU prints ``cpu_warning``."""
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / tiny_name if args.tiny else default_out
    if args.tiny and args.out.resolve() == default_out.resolve():
        parser.error(f"--tiny numbers must not overwrite {default_out.relative_to(REPO_ROOT)}; pass another --out")
    if not args.tiny and args.device.type == "cpu":
        print(f"warning: {cpu_warning}; use --tiny to test the logic", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------


def _versions(optional: Iterable[str] = ("deepspeed",), *, required: Iterable[str] = ("transformers",),
              python: bool = False, error_detail: bool = True) -> dict[str, str | None]:
    """``{"torch", *required, ["python"], *optional}`` versions, in that order. A ``required`` module that
    does not import raises; an ``optional`` one is recorded as ``"unavailable (ExcType[: message])"``
    (the message only with ``error_detail``)."""
    out: dict[str, str | None] = {"torch": torch.__version__}
    for mod in required:
        out[mod] = importlib.import_module(mod).__version__
    if python:
        out["python"] = platform.python_version()
    for mod in optional:
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as exc:  # noqa: BLE001
            out[mod] = (f"unavailable ({type(exc).__name__}: {exc})" if error_detail
                        else f"unavailable ({type(exc).__name__})")
    return out


def _git_commit() -> str | None:
    """The commit measured, ``<sha>+dirty`` when tracked files differ from it (uncommitted changes, or a stale
    ``.git`` under a newer tree: the numbers are of code no commit holds); SWITCHYARD_GIT_COMMIT wins (the GPU
    machine gets a tree without a usable .git)."""
    if os.environ.get("SWITCHYARD_GIT_COMMIT"):
        return os.environ["SWITCHYARD_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", out):
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30)
    except Exception:  # noqa: BLE001
        return None
    return out if status.returncode == 0 and not status.stdout.strip() else f"{out}+dirty"


def launcher_prefix(world: int) -> list[str]:
    """How this process was started, for a result's ``meta.command``: torchrun, deepspeed or plain python."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return ["torchrun", "--nproc_per_node", str(world)]
    if "CROSS_RANK" in os.environ:
        return ["deepspeed", "--num_gpus", str(world)]
    return ["python"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
