"""The grouped GEMMs' library choice (moe/grouped_gemm.py): torch's grouped_mm or QuACK's varlen GEMM.

On CPU: the choice, its environment variable and its errors (a bad value, or ``quack`` asked for where it
cannot run, fails before any work). On a Hopper GPU with QuACK installed (``-m gpu``): QuACK's products
equal torch's bit for bit, empty experts included, and a whole SwiGLU experts step (forward, backward,
CUDA graph replay) is the same under either library.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_grouped_gemm.py
"""

from __future__ import annotations

import pytest
import torch

from switchyard.moe import grouped_gemm
from switchyard.moe.experts import GroupedExperts
from switchyard.moe.swiglu_ffn import swiglu_ffn


def test_environment_variable_and_use_backend(monkeypatch) -> None:
    monkeypatch.delenv(grouped_gemm.ENV_VAR, raising=False)
    assert grouped_gemm.requested() == "auto"
    monkeypatch.setenv(grouped_gemm.ENV_VAR, " Torch ")
    assert grouped_gemm.requested() == "torch"
    with grouped_gemm.use_backend("quack"):
        assert grouped_gemm.requested() == "quack"
        with grouped_gemm.use_backend("auto"):
            assert grouped_gemm.requested() == "auto"
        assert grouped_gemm.requested() == "quack"
    assert grouped_gemm.requested() == "torch"
    monkeypatch.setenv(grouped_gemm.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match=r"SWITCHYARD_GROUPED_GEMM='cutlass' is not one of \('auto', 'torch', 'quack'\)"):
        grouped_gemm.requested()
    with pytest.raises(ValueError, match="'triton' is not one of"):
        with grouped_gemm.use_backend("triton"):
            pass


def test_cpu_operands_take_torch_and_forcing_quack_fails_first(monkeypatch) -> None:
    x = torch.randn(8, 16)
    w1, w2 = torch.randn(2, 48, 16), torch.randn(2, 16, 24)
    assert grouped_gemm.backend_for(x, w1, w2) == "torch"
    monkeypatch.setenv(grouped_gemm.ENV_VAR, "quack")
    with pytest.raises(RuntimeError, match="SWITCHYARD_GROUPED_GEMM=quack, but quack") as err:
        swiglu_ffn(x, w1, w2, torch.tensor([5, 3]), "grouped")
    assert "'auto' or 'torch'" in str(err.value)
    # the per-expert backend runs no grouped GEMM: the choice does not apply
    assert swiglu_ffn(x, w1, w2, torch.tensor([5, 3]), "per_expert").shape == (8, 16)


def test_why_quack_cannot_run(monkeypatch) -> None:
    """The verdict on what the operands are (device, dtypes, row lengths); cached, as a layer asks once per forward."""
    imported = []
    monkeypatch.setattr(grouped_gemm, "_quack_api", lambda: imported.append(1))
    grouped_gemm._quack_unfit.cache_clear()
    assert "Hopper" in grouped_gemm.quack_unfit(torch.randn(2, 8))
    assert not imported  # operands off a Hopper GPU never import QuACK
    # the operands' verdict without the cache, on a pretend Hopper device (no GPU needed to name one)
    monkeypatch.setattr(grouped_gemm, "_hopper", lambda index: True)
    hopper, bf, half = torch.device("cuda", 0), torch.bfloat16, torch.half

    def unfit(dtypes: set, widths: set) -> str | None:
        return grouped_gemm._quack_unfit.__wrapped__(hopper, frozenset(dtypes), frozenset(widths))

    assert "not installed" in unfit({bf}, {8})
    monkeypatch.setattr(grouped_gemm, "_quack_api", lambda: object())
    assert "bf16 or fp16" in unfit({torch.float32}, {8})
    assert "bf16 or fp16" in unfit({bf, half}, {8})
    assert "[8, 12]" in unfit({bf}, {8, 12})
    assert unfit({bf}, {16, 24}) is None
    grouped_gemm._quack_unfit.cache_clear()
    # what it reads off the operands: every tensor's row length, and a 3-D weight's other dim
    asked = []
    monkeypatch.setattr(grouped_gemm, "_quack_unfit", lambda *key: asked.append(key))
    grouped_gemm.quack_unfit(torch.randn(2, 16, dtype=bf), torch.randn(3, 40, 16, dtype=bf), torch.randn(3, 16, 24, dtype=bf))
    assert asked == [(torch.device("cpu"), frozenset({bf}), frozenset({16, 40, 24}))]


@pytest.mark.parametrize("late_down_grad", [False, True])
def test_the_backward_runs_in_the_forwards_library(late_down_grad: bool, monkeypatch) -> None:
    """On CPU, a stand-in "quack" (torch's products, counted) chosen at the forward: the backward's four products
    (the late ``down_proj`` gradient too) run in it even when the choice changed in between, and the results are
    torch's."""
    import switchyard.moe.swiglu_ffn as swiglu_mod

    monkeypatch.setattr(swiglu_mod, "late_down_grad_saves_memory", lambda *shape: late_down_grad)
    calls: list[str] = []
    rows, wgrad = grouped_gemm.BACKENDS["torch"]
    monkeypatch.setitem(grouped_gemm.BACKENDS, "quack", (
        lambda *a: calls.append("rows") or rows(*a), lambda *a: calls.append("wgrad") or wgrad(*a)))
    monkeypatch.setattr(grouped_gemm, "quack_unfit", lambda *t: None)
    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 24, impl="swiglu_grouped")
    counts, x, cot = torch.tensor([5, 0, 7, 4]), torch.randn(16, 16), torch.randn(16, 16)
    with grouped_gemm.use_backend("torch"):
        want = [t.clone() for t in _experts_step(ex, x, counts, cot)]
    assert not calls
    with grouped_gemm.use_backend("quack"):
        xq = x.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        y = ex(xq, counts)
    assert calls == ["rows", "rows"]
    with grouped_gemm.use_backend("torch"):
        (y * cot).sum().backward()
    assert sorted(calls) == ["rows"] * 4 + ["wgrad"] * 2
    for got, w in zip((xq.grad, ex.gate_up_proj.grad, ex.down_proj.grad), want[1:], strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def _experts_step(ex: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, cot: torch.Tensor) -> list[torch.Tensor]:
    ex.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = ex(x, counts)
    (y * cot).sum().backward()
    return [y.detach(), x.grad, ex.gate_up_proj.grad, ex.down_proj.grad]


def test_no_rows_at_all_on_torchs_grouped_gemms() -> None:
    """An EP rank whose experts got no token: forward and backward run, the gradients are zeros."""
    ex = GroupedExperts(4, 16, 24, impl="swiglu_grouped")
    y, x_grad, gate_up_grad, down_grad = _experts_step(ex, torch.empty(0, 16), torch.zeros(4, dtype=torch.long),
                                                   torch.empty(0, 16))
    assert y.shape == (0, 16) and x_grad.shape == (0, 16)
    assert torch.count_nonzero(gate_up_grad) == 0 and torch.count_nonzero(down_grad) == 0


# -- GPU: QuACK against torch ---------------------------------------------------------------------------------

def _quack_here() -> bool:
    return torch.cuda.is_available() and grouped_gemm.quack_unfit(
        torch.empty(1, 8, device="cuda", dtype=torch.bfloat16)) is None


needs_quack = pytest.mark.skipif(not _quack_here(), reason="needs a Hopper GPU with quack installed")


def _routing(num_experts: int, rows: int, empty: tuple[int, ...]) -> torch.Tensor:
    """Random counts per expert summing to ``rows``, zero for the experts in ``empty``."""
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(num_experts, generator=g) + 0.5
    weights[list(empty)] = 0
    counts = torch.distributions.Multinomial(rows, weights / weights.sum()).sample().long()
    return counts


@pytest.mark.gpu
@needs_quack
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("empty", [(), (0, 5, 31)])
def test_quack_products_equal_torch_bit_for_bit(dtype: torch.dtype, empty: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    num_experts, hidden, width, rows = 32, 512, 384, 6000
    counts = _routing(num_experts, rows, empty).cuda()
    cu = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    a = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = torch.randn(num_experts, 2 * width, hidden, device="cuda", dtype=dtype) / hidden ** 0.5
    g = torch.randn(rows, 2 * width, device="cuda", dtype=dtype)
    plans_before = len(grouped_gemm._quack_plans)
    for call in range(2):  # the first call builds QuACK's launch plan, the second launches it with new data
        a.normal_()
        g.normal_()
        w.normal_().div_(hidden ** 0.5)
        for name, args in (("rows", (a, w.transpose(-2, -1), cu)), ("rows_t", (g, w, cu))):
            want = grouped_gemm.rows_by_expert(*args, "torch")
            got = grouped_gemm.rows_by_expert(*args, "quack")
            assert torch.equal(got, want), (name, call)
        torch.empty(num_experts, 2 * width, hidden, device="cuda", dtype=dtype).fill_(7)  # dirty the allocator
        want = grouped_gemm.weight_grad(g, a, cu, "torch")
        got = grouped_gemm.weight_grad(g, a, cu, "quack")
        assert torch.equal(got, want), call
        if empty:
            assert torch.count_nonzero(got[list(empty)]) == 0
        if call == 0:
            plans_after_first = len(grouped_gemm._quack_plans)
    # the second call added no plan: it launched the first call's (an earlier case of the same shapes may have built them)
    assert plans_after_first == len(grouped_gemm._quack_plans) and plans_after_first <= plans_before + 3


@pytest.mark.gpu
@needs_quack
def test_quack_with_no_rows_at_all() -> None:
    """An EP rank whose experts got no token: no launch, empty rows, zero weight gradients."""
    cu = torch.zeros(5, device="cuda", dtype=torch.int32)
    a = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    assert grouped_gemm.rows_by_expert(a, w, cu, "quack").shape == (0, 32)
    g = torch.empty(0, 32, device="cuda", dtype=torch.bfloat16)
    grad = grouped_gemm.weight_grad(g, a, cu, "quack")
    assert grad.shape == (4, 32, 64) and torch.count_nonzero(grad) == 0


@pytest.mark.gpu
@needs_quack
@pytest.mark.parametrize("late_down_grad", [False, True])
def test_swiglu_experts_step_is_the_same_under_either_library(late_down_grad: bool, monkeypatch) -> None:
    import switchyard.moe.swiglu_ffn as swiglu_mod

    monkeypatch.setattr(swiglu_mod, "late_down_grad_saves_memory", lambda *shape: late_down_grad)
    torch.manual_seed(0)
    ex = GroupedExperts(16, 256, 192, dtype=torch.bfloat16, impl="swiglu_grouped").cuda()
    counts = _routing(16, 3000, (3,)).cuda()
    x, cot = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16), torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    with grouped_gemm.use_backend("torch"):
        want = _experts_step(ex, x, counts, cot)[1:]
        with torch.no_grad():
            want_y = ex(x, counts)
    with grouped_gemm.use_backend("quack"):
        got = _experts_step(ex, x, counts, cot)[1:]
        with torch.no_grad():
            got_y = ex(x, counts)
    assert torch.equal(got_y, want_y)
    for name, g, w in zip(("x.grad", "gate_up.grad", "down.grad"), got, want, strict=True):
        assert torch.equal(g, w), name


@pytest.mark.gpu
@needs_quack
def test_quack_products_replay_in_a_cuda_graph() -> None:
    torch.manual_seed(0)
    counts = _routing(8, 1024, (2,)).cuda()
    cu = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    a = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16)
    grouped_gemm.rows_by_expert(a, w, cu, "quack")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_gemm.rows_by_expert(a, w, cu, "quack")
    a.copy_(torch.randn_like(a))
    graph.replay()
    assert torch.equal(out, grouped_gemm.rows_by_expert(a, w, cu, "torch"))
