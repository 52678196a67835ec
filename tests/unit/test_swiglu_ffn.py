"""The SwiGLU expert Function (swiglu_ffn.py) against autograd's per-expert loop, on CPU.

The grouped backend runs torch's own CPU grouped_mm (forward only is called: the Function writes the
backward itself), so the same code that runs on CUDA is checked here; dims are multiples of 4 for its
16-byte alignment rule.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_swiglu_ffn.py
"""

from __future__ import annotations

import pytest
import torch

from switchyard.moe.experts import GroupedExperts
from switchyard.moe.swiglu_ffn import swiglu_ffn
from tiny_models import saved_tensor_shapes

E, H, FF = 4, 16, 24
IMPLS = ("swiglu_grouped", "swiglu_per_expert")


@pytest.fixture(params=["late", "usual"])
def down_grad_order(request, monkeypatch) -> str:
    """Both orders of GEMM 2's weight gradient (swiglu_ffn.py's module doc), whatever the shapes' rule says."""
    import switchyard.moe.swiglu_ffn as swiglu_mod

    monkeypatch.setattr(swiglu_mod, "late_down_grad_saves_memory", lambda *shape: request.param == "late")
    return request.param


def _fwd_and_grads(ex: GroupedExperts, x: torch.Tensor, counts: list[int], cot: torch.Tensor) -> list[torch.Tensor]:
    ex.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = ex(x, torch.tensor(counts))
    (y * cot).sum().backward()
    return [y.detach(), x.grad, ex.gate_up_proj.grad, ex.down_proj.grad]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 9, 0, 0], [0, 0, 0, 0]])
def test_equals_autograd_loop_fp32(impl: str, counts: list[int], down_grad_order: str) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF)
    x, cot = torch.randn(sum(counts), H), torch.randn(sum(counts), H)
    ex.impl = "loop"
    want = _fwd_and_grads(ex, x, counts, cot)
    ex.impl = impl
    got = _fwd_and_grads(ex, x, counts, cot)
    for name, g, w in zip(("y", "x.grad", "gate_up.grad", "down.grad"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert torch.count_nonzero(ex.gate_up_proj.grad[empty]) == 0 and torch.count_nonzero(ex.down_proj.grad[empty]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_rounds_like_the_fused_kernels(impl: str, down_grad_order: str) -> None:
    """bf16 against an fp64 reference: the same error level as the autograd grouped composition's."""
    torch.manual_seed(0)
    counts = [12, 4, 0, 16]
    ex = GroupedExperts(E, H, FF, dtype=torch.bfloat16, impl=impl)
    ref = GroupedExperts(E, H, FF, dtype=torch.float64, impl="loop")
    ref.load_state_dict(ex.state_dict())
    x, cot = torch.randn(32, H), torch.randn(32, H)
    want = _fwd_and_grads(ref, x.double(), counts, cot.double())
    for g, w in zip(_fwd_and_grads(ex, x.bfloat16(), counts, cot.bfloat16()), want, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.double() - w).norm() / w.norm() < 2e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_grad_and_no_grad_forward(impl: str, down_grad_order: str) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, impl=impl)
    counts = torch.tensor([3, 1, 0, 4])
    x = torch.randn(8, H, requires_grad=True)
    y = ex(x, counts)
    y.sum().backward()  # a stride-0 grad
    with torch.no_grad():
        torch.testing.assert_close(ex(x, counts), y.detach(), rtol=0, atol=0)
    ex.impl = "loop"
    torch.testing.assert_close(ex(x, counts), y, rtol=1e-6, atol=1e-6)


def test_saves_x_and_h_only() -> None:
    """What the Function is for: of the activations only x [n, H] and h [n, 2F] are kept for the
    backward; a = silu(gate) * up [n, F] is not (autograd's composition keeps all three)."""
    torch.manual_seed(0)
    n = 64
    for impl in IMPLS:
        ex = GroupedExperts(E, H, FF, impl=impl)
        with saved_tensor_shapes() as packed:
            ex(torch.randn(n, H, requires_grad=True), torch.tensor([16] * E))
        activations = sorted(s for s in packed if s[0] == n)
        assert activations == [(n, H), (n, 2 * FF)], (impl, packed)  # x for GEMM 1, h for the SwiGLU


def test_second_backward_is_an_error_not_wrong_grads(down_grad_order: str) -> None:
    ex = GroupedExperts(E, H, FF, impl="swiglu_grouped")
    y = ex(torch.randn(8, H, requires_grad=True), torch.tensor([2, 2, 2, 2]))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.sum().backward()


def test_impl_needs_gated_silu_without_bias_and_auto_stays_the_loop_on_cpu() -> None:
    for kwargs in ({"bias": True}, {"activation": "gelu"}, {"gated": False}):
        with pytest.raises(ValueError, match="gated silu experts without bias"):
            GroupedExperts(E, H, FF, impl="swiglu_grouped", **kwargs)
    assert GroupedExperts(E, H, FF).resolve_impl(torch.zeros(1, H)) == "loop"
    with pytest.raises(ValueError, match="backend"):
        swiglu_ffn(torch.zeros(1, H), torch.zeros(E, 2 * FF, H), torch.zeros(E, H, FF), torch.tensor([1, 0, 0, 0]), "x")


def test_auto_picks_per_expert_gemms_only_for_few_big_experts_in_training(monkeypatch) -> None:
    import switchyard.moe.experts as experts_mod

    monkeypatch.setattr(experts_mod, "grouped_mm_available", lambda device: True)  # as on an H200
    few = GroupedExperts(8, 64, 128, device="meta")
    many = GroupedExperts(64, 64, 128, device="meta")
    rows_big = 8 * experts_mod.PER_EXPERT_MIN_GEMM_MACS // (64 * 128)  # average GEMM exactly at the bound
    x_big, x_small = torch.empty(rows_big, 64, device="meta"), torch.empty(rows_big // 2, 64, device="meta")
    assert few.resolve_impl(x_big) == "swiglu_per_expert"
    assert few.resolve_impl(x_small) == "swiglu_grouped"
    assert many.resolve_impl(torch.empty(8 * rows_big, 64, device="meta")) == "swiglu_grouped"
    with torch.no_grad():  # inference keeps autograd-free grouped_mm
        assert few.resolve_impl(x_big) == "grouped_mm"
    assert GroupedExperts(8, 64, 128, bias=True, device="meta").resolve_impl(x_big) == "grouped_mm"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_grads(impl: str, use_reentrant: bool, down_grad_order: str) -> None:
    """Under torch.utils.checkpoint the saved h is a recomputed tensor that the backward overwrites in
    place; the gradients must equal those of the plain graph."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, impl=impl)
    counts = torch.tensor([5, 0, 7, 4])
    x, cot = torch.randn(16, H), torch.randn(16, H)
    want = _fwd_and_grads(ex, x, counts.tolist(), cot)
    ex.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_()
    y = checkpoint(lambda t: ex(t, counts), xc, use_reentrant=use_reentrant)
    (y * cot).sum().backward()
    for g, w in zip([y.detach(), xc.grad, ex.gate_up_proj.grad, ex.down_proj.grad], want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_on_cuda_matches_the_loop(impl: str, dtype: torch.dtype, down_grad_order: str) -> None:
    """On CUDA the backward is one Triton pass writing the SwiGLU gradient over h and the recomputed product
    over its gradient: against autograd's loop (fp32: the loop's tolerance; bf16: an fp64 reference)."""
    torch.manual_seed(0)
    e, h, ff = 8, 256, 384  # widths the kernel blocks cover partly (384 = 256 + 128)
    counts = [40, 0, 96, 7, 128, 1, 0, 64]
    ex = GroupedExperts(e, h, ff, dtype=dtype, device="cuda", impl=impl)
    ref = GroupedExperts(e, h, ff, dtype=torch.float64, device="cuda", impl="loop")
    ref.load_state_dict(ex.state_dict())
    x, cot = torch.randn(sum(counts), h, device="cuda"), torch.randn(sum(counts), h, device="cuda")
    want = _fwd_and_grads(ref, x.double(), counts, cot.double())
    got = _fwd_and_grads(ex, x.to(dtype), counts, cot.to(dtype))
    for name, g, w in zip(("y", "x.grad", "gate_up.grad", "down.grad"), got, want, strict=True):
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_backward_writes_the_forward_product_in_place(dtype: torch.dtype) -> None:
    """The product written over ``da`` has the forward kernel's bits; the gradient over ``h`` equals the
    out-of-place kernel's."""
    from switchyard.moe.kernels import triton_kernels as tk
    from switchyard.moe.kernels.ops import silu_mul_backward_, silu_mul_forward

    torch.manual_seed(0)
    h_NO = torch.randn(300, 2 * 3000, device="cuda", dtype=dtype)  # 3000: two column blocks, a masked tail
    da_NF = torch.randn(300, 3000, device="cuda", dtype=dtype)
    want_a, (want_dh, _) = silu_mul_forward(h_NO), tk.silu_mul_bwd(h_NO, da_NF)
    assert silu_mul_backward_(h_NO, da_NF, product_into_da=True) is None
    torch.testing.assert_close(da_NF, want_a, rtol=0, atol=0)
    torch.testing.assert_close(h_NO, want_dh, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_weighted_silu_mul_kernels_match_their_pytorch_math(dtype: torch.dtype) -> None:
    """The routing weight folded into the SwiGLU (Triton): forward, the gradients of h and of the weights (two column
    blocks: the weights' gradient summed over blocks), and the weighted product written over da, against the same
    functions with the kernels off (their PyTorch math)."""
    from switchyard.moe.kernels import set_fused_kernels
    from switchyard.moe.kernels.ops import silu_mul_backward_, silu_mul_forward

    torch.manual_seed(0)
    h_NO = torch.randn(300, 2 * 3000, device="cuda", dtype=dtype)
    da_NF = torch.randn(300, 3000, device="cuda", dtype=dtype)
    w_N = torch.rand(300, device="cuda")
    results = []
    for fused in (True, False):
        set_fused_kernels(fused)
        try:
            h, da = h_NO.clone(), da_NF.clone()
            a = silu_mul_forward(h, w_N)
            dw = silu_mul_backward_(h, da, product_into_da=True, row_weight_N=w_N)
            results.append((a, h, da, dw))
        finally:
            set_fused_kernels(True)
    (a, dh, product, dw), (a_ref, dh_ref, product_ref, dw_ref) = results
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(a, a_ref, **tol)
    torch.testing.assert_close(product, a, rtol=0, atol=0)  # the forward's bits, written by the backward
    torch.testing.assert_close(dh, dh_ref, **tol)
    assert dw.dtype == torch.float32 and dw.shape == (300,)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_backward_product_into_da_on_cpu(dtype: torch.dtype) -> None:
    """The PyTorch fallback: the same gradient with or without the product, and the product bitwise
    ``silu_mul_forward``'s."""
    from switchyard.moe.kernels.ops import silu_mul_backward_, silu_mul_forward

    torch.manual_seed(0)
    h_NO, da_NF = torch.randn(10, 2 * FF, dtype=dtype), torch.randn(10, FF, dtype=dtype)
    want_a = silu_mul_forward(h_NO)
    want_dh = h_NO.clone()
    silu_mul_backward_(want_dh, da_NF.clone())
    silu_mul_backward_(h_NO, da_NF, product_into_da=True)
    torch.testing.assert_close(da_NF, want_a, rtol=0, atol=0)
    torch.testing.assert_close(h_NO, want_dh, rtol=0, atol=0)


def test_late_down_grad_rule_on_the_benchmark_shapes() -> None:
    """Late where GEMM 2's weight gradient outweighs its operands (8192 tokens: mixtral, qwen3), not elsewhere."""
    from switchyard.moe.swiglu_ffn import late_down_grad_saves_memory

    assert late_down_grad_saves_memory(8192 * 2, 8, 4096, 14336)  # mixtral: 0.44 + 0.125 vs 0.875 GiB
    assert late_down_grad_saves_memory(8192 * 8, 128, 2048, 768)  # qwen3: 352 vs 384 MiB
    assert not late_down_grad_saves_memory(8192 * 8, 64, 2048, 1024)  # olmoe
    assert not late_down_grad_saves_memory(8192 * 2, 8, 1536, 4096)  # the fine-tune benchmark's model


@pytest.mark.parametrize("impl", IMPLS)
def test_late_order_writes_down_proj_grad_after_gate_up_grad(impl: str, down_grad_order: str) -> None:
    """The late order's point: down_proj's gradient arrives after GEMM 1's backward (when grad_h is gone)."""
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, impl=impl)
    arrived: list[str] = []
    for name in ("gate_up_proj", "down_proj"):
        getattr(ex, name).register_post_accumulate_grad_hook(lambda p, name=name: arrived.append(name))
    ex(torch.randn(16, H, requires_grad=True), torch.tensor([4, 4, 4, 4])).sum().backward()
    want = ["gate_up_proj", "down_proj"] if down_grad_order == "late" else ["down_proj", "gate_up_proj"]
    assert arrived == want


def test_late_order_only_with_an_input_gradient(down_grad_order: str) -> None:
    """Frozen inputs (no grad into x) keep the usual order: the sink's backward would never run."""
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, impl="swiglu_grouped")
    ex(torch.randn(16, H), torch.tensor([4, 4, 4, 4])).sum().backward()
    assert ex.down_proj.grad is not None and ex.gate_up_proj.grad is not None
    ex.zero_grad(set_to_none=True)
    x = torch.randn(16, H, requires_grad=True)
    (g_x, g_down) = torch.autograd.grad(ex(x, torch.tensor([4, 4, 4, 4])).sum(), [x, ex.down_proj])
    ex.impl = "loop"
    want_x, want_down = torch.autograd.grad(ex(x, torch.tensor([4, 4, 4, 4])).sum(), [x, ex.down_proj])
    torch.testing.assert_close(g_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_down, want_down, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_late_order_lowers_the_backward_peak_on_cuda(impl: str, monkeypatch) -> None:
    """On a few-wide-experts layer the late order's backward peak is lower by what the module doc says:
    min(E·H·F − N·(H + F), N·F) elements (down_proj's gradient against the operands kept for it, or what GEMM 1's
    backward frees: its grad_h beyond them and its saved x_NH, which the layer does not keep otherwise)."""
    import switchyard.moe.swiglu_ffn as swiglu_mod

    e, h, ff, rows = 8, 1024, 3584, 4096  # the first term is the smaller: 10.5M vs 14.7M elements
    assert swiglu_mod.late_down_grad_saves_memory(rows, e, h, ff)
    counts = torch.tensor([rows // e] * e)
    ex = GroupedExperts(e, h, ff, dtype=torch.bfloat16, device="cuda", impl=impl)
    x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    peaks = {}
    for late in (False, True, False, True):
        monkeypatch.setattr(swiglu_mod, "late_down_grad_saves_memory", lambda *shape, late=late: late)
        ex.zero_grad(set_to_none=True)
        x.grad = None
        y = ex(x * 1.0, counts)  # x_NH held by the graph alone, as the layer's gathered rows are
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y.sum().backward()
        torch.cuda.synchronize()
        peaks[late] = torch.cuda.max_memory_allocated() - base
        del y
    saved = min(e * h * ff - rows * (h + ff), rows * ff) * 2  # bytes, bf16
    assert 0.8 * saved <= peaks[False] - peaks[True] <= 1.2 * saved, (peaks, saved)
