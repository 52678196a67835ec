"""switchyard.moe.kernels.launch: a cached launch runs the kernel Triton would pick for the arguments' specialization.

GPU only (Triton launches); the kernels that use it are GPU-tested against their PyTorch math in their own files.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _add_kernel(interpreted: bool = False):
    """The kernel as ``@triton.jit`` makes it, or (``interpreted``) as it does under ``TRITON_INTERPRET=1``."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from switchyard.moe.kernels.launch import fast_launch

    def add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, x + alpha * tl.load(y_ptr + offs, mask=mask), mask=mask)

    return fast_launch(InterpretedFunction(add) if interpreted else triton.jit(add))


def _launch(add, x: torch.Tensor, y: torch.Tensor, alpha: float, block: int = 64) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    add[((n + block - 1) // block,)](x, y, out, n, alpha, BLOCK=block)
    return out


def test_cached_launches_match_the_math_across_specializations() -> None:
    """Aligned and misaligned pointers, n = 1, n divisible by 16 or not, another dtype, another constexpr: each is a
    specialization of its own (a kernel compiled for 16-byte-aligned pointers must not run a misaligned view), and
    the second call of each goes through the cache."""
    from switchyard.moe.kernels import launch

    if not launch.ENABLED:
        pytest.skip(f"Triton {__import__('triton').__version__} is not one the short path was checked with")
    add = _add_kernel()
    base = torch.randn(1001, device="cuda")
    other = torch.randn(1001, device="cuda")
    cases = [(base[:512], other[:512], 1.0, 64), (base[1:513], other[1:513], 0.5, 64), (base[:1], other[:1], 2.0, 64),
             (base[:77], other[:77], -1.0, 64), (base.half()[:256], other.half()[:256], 3.0, 64),
             (base[:512], other[:512], 1.0, 128)]
    for round_ in range(2):
        for x, y, alpha, block in cases:
            got = _launch(add, x, y, alpha, block)
            torch.testing.assert_close(got, x + alpha * y, rtol=1e-3, atol=1e-3, msg=f"round {round_}, n={x.numel()}")
        if round_ == 0:
            kept = len(add.compiled)
    assert kept == len(add.compiled) >= 5  # the second round compiled nothing new
    assert len({id(k) for k in add.compiled.values()}) >= 5


def test_a_launch_hook_takes_tritons_own_path() -> None:
    """Triton's profiler sets launch hooks; the cached path would skip them, so it steps aside."""
    from triton import knobs

    add = _add_kernel()
    x = torch.randn(300, device="cuda")
    _launch(add, x, x, 1.0)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    chain = knobs.runtime.launch_enter_hook  # Triton 3.6: a HookChain
    chain.add(hook)
    try:
        torch.testing.assert_close(_launch(add, x, x, 1.0), 2 * x)
    finally:
        chain.remove(hook)
    assert len(seen) == 1


def test_an_interpreted_kernel_runs_through_tritons_interpreter() -> None:
    """``TRITON_INTERPRET=1`` (kernels on CPU tensors, for debugging) has no compiled launcher to keep."""
    add = _add_kernel(interpreted=True)
    x = torch.randn(300)
    torch.testing.assert_close(_launch(add, x, x, 1.0), 2 * x)
    assert add.compiled == {}


def test_under_torch_compile_tracing_the_launch_is_tritons_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamo traces ``kernel[grid](...)`` into its graph; the cached launcher would be opaque Python to it."""
    add = _add_kernel()
    x = torch.randn(300, device="cuda")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(_launch(add, x, x, 1.0), 2 * x)
    torch.testing.assert_close(_launch(add, x, x, 1.0), 2 * x)
    assert add.compiled == {}
