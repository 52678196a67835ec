"""Triton launches from a cache of compiled kernels, without Triton's per-call Python.

    @fast_launch
    @triton.jit
    def _my_kernel(...): ...

    _my_kernel[grid](*args, **constexprs_and_options)     # as with a plain @triton.jit kernel

Why: ``kernel[grid](...)`` re-derives on every call what it launches (options, the cache key as a string, knob
lookups, launch metadata), ~17 µs of host time for a trivial kernel and ~43 µs for the router's 22 arguments on
an H200 machine (scratch probe, docs/performance.md "Host time before GEMM 1"). At the start of a layer's
forward the device waits for exactly these launches. Here a call runs Triton's own binder (its C
specialization of the arguments: dtypes, 16-byte alignment of pointers, divisibility of integers), looks the
kernel up under that specialization and the call's options, and calls the compiled kernel's launcher: the
same kernel Triton would pick, launched as Triton launches it, ~2.5x less host time.

The first call with a new specialization goes through ``kernel[grid](...)`` (compiling it if needed) and keeps
what it returns. Calls go through ``kernel[grid](...)`` every time where this cannot take the short path: a
Triton other than the checked versions (``CHECKED_TRITON``: the launcher's argument convention is internal), a
launch hook set (Triton's profiler reads them), ``SWITCHYARD_TRITON_FAST_LAUNCH=0``, a kernel Triton interprets
(``TRITON_INTERPRET=1`` makes ``@triton.jit`` an ``InterpretedFunction``), a trace by ``torch.compile`` (dynamo
knows Triton's own launch, not this one). Triton's global knobs (debug, instrumentation) are read when a kernel
is first kept, not per call: change them before the first launch, as with Triton's own cache.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# versions whose JITFunction.run this mirrors (GPU-tested: tests/unit/test_triton_launch.py)
CHECKED_TRITON = ((3, 6),)
ENV_VAR = "SWITCHYARD_TRITON_FAST_LAUNCH"


def _checked_version() -> bool:
    try:
        return tuple(int(part) for part in triton.__version__.split(".")[:2]) in CHECKED_TRITON
    except ValueError:
        return False


ENABLED = os.environ.get(ENV_VAR, "1") != "0" and _checked_version()


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: Triton 3.6 keeps them in a ``HookChain`` (empty: none), older ones a callable."""
    return hook is not None and getattr(hook, "calls", True) != []


class FastLaunch:
    """A ``@triton.jit`` kernel whose ``[grid](...)`` launches from the cache above; ``.fn`` is the kernel."""

    __slots__ = ("fn", "compiled", "compiles")

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.compiled: dict[tuple, Any] = {}
        self.compiles = isinstance(fn, JITFunction)  # not an InterpretedFunction: there is a launcher to keep

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def run(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        runtime = knobs.runtime
        if (not ENABLED or not self.compiles or _hooked(runtime.launch_enter_hook)
                or _hooked(runtime.launch_exit_hook) or torch.compiler.is_compiling()):
            return self.fn[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        bound, specialization, options = self.fn.device_caches[device][-1](*args, **kwargs)
        try:
            key = (device, tuple(specialization), tuple(options.items()))
            kernel = self.compiled.get(key)
        except TypeError:  # an argument Triton specializes to something unhashable: its own path
            return self.fn[grid](*args, **kwargs)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            self.compiled[key] = kernel
            return kernel
        size = len(grid)
        kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1,
                   driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
                   *bound.values())
        return kernel


def fast_launch(fn: Any) -> FastLaunch:
    """Wrap a ``@triton.jit`` kernel (one that is launched, not one called from other kernels)."""
    return FastLaunch(fn)
