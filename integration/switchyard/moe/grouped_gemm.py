"""The SwiGLU experts' grouped GEMMs, from one of two libraries: torch's ``grouped_mm`` or QuACK's varlen GEMM.

Both products run over rows sorted by expert, grouped by int32 cumulative row offsets ``cu_E1`` (``E + 1``
entries, the first 0: the layout QuACK takes; torch takes ``cu_E1[1:]``):

    rows_by_expert(a_NI, w_EIO, cu_E1)     a[rows of e] @ w[e]                 forward, input gradients
    weight_grad(grad_NO, a_NI, cu_E1)      grad[rows of e].T @ a[rows of e]    weight gradients ([E, O, I])

Backends (a registry: ``BACKENDS``):

    torch   ``F.grouped_mm`` / ``torch._grouped_mm`` (CUTLASS): any device torch supports
    quack   QuACK's ``gemm`` with ``cu_seqlens_m`` / ``cu_seqlens_k`` (CuTe DSL kernels, compiled on first
            use): Hopper GPUs (compute capability 9.x), bf16 / fp16, every row length a multiple of 8
            elements (its copies move 16 bytes). Optional: ``pip install 'switchyard[quack]'``.

Why QuACK: on an H200 its kernels give the same bits as torch's (the same fp32 accumulation order; checked
in tests/unit/test_grouped_gemm.py) and ran the six GEMMs of a qwen3-shaped layer in 3.18 ms against
3.58, mostly in the weight gradients, whose reduction over ~512 rows per expert torch's kernel handles
worst (benchmarks/results/grouped_gemm_quack.json; docs/performance.md, "The grouped GEMMs from QuACK").

Which one runs: ``SWITCHYARD_GROUPED_GEMM`` = ``auto`` (default: quack where it applies and is installed,
else torch), ``torch`` or ``quack`` (an error, before any work, where quack cannot run the call), or
``with use_backend("torch"): ...`` in code. An empty expert gets zero rows / a zero weight gradient from both.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# torch >= 2.10: F.grouped_mm; before: the private op (bf16 only, see experts.py); None: neither
TORCH_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
CHOICES = ("auto", "torch", "quack")
ENV_VAR = "SWITCHYARD_GROUPED_GEMM"
_choice: str | None = None  # set by use_backend; None: the environment variable decides


def _torch_rows(a_NI: Tensor, w_EIO: Tensor, cu_E1: Tensor) -> Tensor:
    if a_NI.shape[0] == 0:  # a rank whose experts got no rows (grouped_mm rejects the stride-0 empty gradient)
        return a_NI.new_zeros((0, w_EIO.shape[2]))
    return TORCH_GROUPED_MM(a_NI, w_EIO, offs=cu_E1[1:])


def _torch_weight_grad(grad_NO: Tensor, a_NI: Tensor, cu_E1: Tensor) -> Tensor:
    if a_NI.shape[0] == 0:
        return a_NI.new_zeros((cu_E1.shape[0] - 1, grad_NO.shape[1], a_NI.shape[1]))
    return TORCH_GROUPED_MM(grad_NO.t(), a_NI, offs=cu_E1[1:])


class _QuackApi(NamedTuple):
    """What switchyard calls in QuACK: its public ``gemm`` and the pieces of it that launch a cached plan
    (private names: the ``[quack]`` extra pins quack-kernels 0.6.x, measured with 0.6.5)."""

    gemm: Callable[..., Tensor]
    gemm_tuned: Any
    gemm_execute: Callable[..., Any]
    tensor_key: Callable[[Tensor], tuple]
    round_nearest: Any
    split_k_serial: Any


@functools.cache
def _quack_api() -> _QuackApi | None:
    """QuACK's functions, or None where it is not installed, cannot load (no GPU driver, say) or lacks them."""
    try:
        from quack.gemm_config import SplitKMode
        from quack.gemm_interface import _gemm_execute, gemm, gemm_tuned
        from quack.gemm_tvm_ffi_utils import tensor_key
        from quack.rounding import RoundingMode
    except Exception:  # noqa: BLE001 - ImportError, or a CuTe DSL install that cannot initialise here
        return None
    return _QuackApi(gemm, gemm_tuned, _gemm_execute, tensor_key, RoundingMode.RN, SplitKMode.SERIAL)


# QuACK's launch plans for the varlen products, by operand metadata (least recently used first):
# {key: (config, split_k, dynamic, dispatch plan)}
_quack_plans: OrderedDict[tuple, tuple] = OrderedDict()
QUACK_PLANS_KEPT = 64


def _quack_product(a: Tensor, b: Tensor, out: Tensor, cu_E1: Tensor, varlen: str) -> Tensor:
    """``out = a @ b`` per group through QuACK's varlen GEMM (``varlen``: "m" rows grouped, "k" the reduction).

    QuACK's ``gemm`` re-derives the launch (config, operand checks, dispatch key) on every varlen call; it
    caches the result only for its non-varlen calls. Here the first call for an operand layout runs QuACK's
    own untuned path, which returns that plan, and later calls launch it with QuACK's ``_gemm_execute``, as
    its non-varlen cache does: 33 / 31 µs of host time per call (rows / weight gradient) instead of 38 / 47,
    about torch's grouped_mm's (a scratch probe on an H200, docs/performance.md). The key holds what the plan
    was built from (dtypes, shapes, strides, the device), the row count included, so it hits when a layer
    sees the same number of rows again (every step of a fixed-shape batch at ep = 1; with ep > 1 the rows
    received vary, and the least recently used of ``QUACK_PLANS_KEPT`` plans is dropped). Data pointers and the
    offsets' values are per call. Empty products take QuACK's empty path (no launch); under ``torch.compile``
    QuACK's public ``gemm`` (its custom-op route)."""
    api = _quack_api()
    offsets = {"cu_seqlens_m": cu_E1, "cu_seqlens_k": None} if varlen == "m" else \
        {"cu_seqlens_m": None, "cu_seqlens_k": cu_E1}
    if torch.compiler.is_compiling():
        return api.gemm(a, b, out=out, tuned=False, **offsets)
    if out.numel() == 0:
        return out
    if a.numel() == 0:
        return out.zero_()
    key = (varlen, api.tensor_key(a), api.tensor_key(b), api.tensor_key(out), api.tensor_key(cu_E1), a.device)
    plan = _quack_plans.get(key)
    if plan is None:  # compiles the kernel on its first use in this process (seconds)
        try:
            _quack_plans[key] = api.gemm_tuned.fn(a, b, out, C=None, config=None, **offsets)
        except Exception as exc:
            raise RuntimeError(
                f"QuACK's grouped GEMM could not run a {tuple(a.shape)} x {tuple(b.shape)} {a.dtype} product "
                f"({type(exc).__name__}: {exc}); {ENV_VAR}=torch runs torch's grouped_mm instead") from exc
        if len(_quack_plans) > QUACK_PLANS_KEPT:
            _quack_plans.popitem(last=False)
        return out
    _quack_plans.move_to_end(key)
    config, split_k, dynamic, dispatch = plan
    api.gemm_execute(a, b, out, None, bias=None, alpha=1.0, beta=1.0, A_idx=None, batch_idx_permute=None,
                     add_to_output=False, dynamic_scheduler=dynamic, config=config, rounding_mode=api.round_nearest,
                     sr_seed=0, concat_layout=None, SFA=None, SFB=None, split_k=split_k,
                     split_k_mode=api.split_k_serial, dispatch_plan=dispatch, **offsets)
    return out


def _quack_rows(a_NI: Tensor, w_EIO: Tensor, cu_E1: Tensor) -> Tensor:
    return _quack_product(a_NI, w_EIO, a_NI.new_empty((a_NI.shape[0], w_EIO.shape[2])), cu_E1, "m")


def _quack_weight_grad(grad_NO: Tensor, a_NI: Tensor, cu_E1: Tensor) -> Tensor:
    out_EOI = grad_NO.new_empty((cu_E1.shape[0] - 1, grad_NO.shape[1], a_NI.shape[1]))
    return _quack_product(grad_NO.t(), a_NI, out_EOI, cu_E1, "k")


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def quack_unfit(*tensors: Tensor) -> str | None:
    """Why QuACK cannot run a product of these operands (None: it can). Only Hopper operands import QuACK."""
    first = tensors[0]
    widths = frozenset(t.shape[-1] for t in tensors) | frozenset(t.shape[-2] for t in tensors if t.dim() == 3)
    return _quack_unfit(first.device, frozenset(t.dtype for t in tensors), widths)


@functools.lru_cache(maxsize=256)
def _quack_unfit(device: torch.device, dtypes: frozenset[torch.dtype], widths: frozenset[int]) -> str | None:
    """``quack_unfit`` on what it reads of the operands: a layer asks once per forward, with the same answer."""
    if device.type != "cuda" or not _hopper(device.index if device.index is not None else torch.cuda.current_device()):
        return f"quack's kernels here are for Hopper GPUs (compute capability 9.x); the operands are on {device}"
    if _quack_api() is None:
        return "quack is not installed, or is not a version this code knows (pip install 'switchyard[quack]')"
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.bfloat16, torch.float16):
        return f"quack takes bf16 or fp16 operands of one dtype, got {sorted(map(str, dtypes))}"
    if any(w % 8 for w in widths):
        return f"quack needs every row length to be a multiple of 8 elements (16 bytes), got {sorted(widths)}"
    return None


BACKENDS: dict[str, tuple[Callable[[Tensor, Tensor, Tensor], Tensor], Callable[[Tensor, Tensor, Tensor], Tensor]]] = {
    "torch": (_torch_rows, _torch_weight_grad),
    "quack": (_quack_rows, _quack_weight_grad),
}


def requested() -> str:
    """The backend asked for: ``use_backend``'s, else ``SWITCHYARD_GROUPED_GEMM``'s (default ``auto``)."""
    choice = _choice if _choice is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {CHOICES}; unset it or pick one of those")
    return choice


def backend_for(*tensors: Tensor) -> str:
    """The backend that runs a product of these operands (raises if ``quack`` was asked for and cannot)."""
    choice = requested()
    if choice == "torch":
        return "torch"
    why_not = quack_unfit(*tensors)
    if choice == "quack" and why_not is not None:
        raise RuntimeError(f"{ENV_VAR}=quack, but {why_not}; set it to 'auto' or 'torch'")
    return "torch" if why_not is not None else "quack"


@contextlib.contextmanager
def use_backend(choice: str) -> Iterator[None]:
    """Run the block's grouped GEMMs with ``choice`` (one of ``CHOICES``), whatever the environment says.

    Process-wide (not per thread). It decides at each forward; that forward's backward keeps its library, and
    a CUDA graph keeps the one it was captured with."""
    global _choice
    if choice not in CHOICES:
        raise ValueError(f"grouped GEMM backend {choice!r} is not one of {CHOICES}")
    previous, _choice = _choice, choice
    try:
        yield
    finally:
        _choice = previous


def rows_by_expert(a_NI: Tensor, w_EIO: Tensor, cu_E1: Tensor, backend: str) -> Tensor:
    """``a[rows of e] @ w[e]`` for every expert e (``w`` as ``[E, in, out]``, any strides)."""
    return BACKENDS[backend][0](a_NI, w_EIO, cu_E1)


def weight_grad(grad_NO: Tensor, a_NI: Tensor, cu_E1: Tensor, backend: str) -> Tensor:
    """``grad[rows of e].T @ a[rows of e]`` for every expert e: ``[E, O, I]``, zeros for an empty expert."""
    return BACKENDS[backend][1](grad_NO, a_NI, cu_E1)
