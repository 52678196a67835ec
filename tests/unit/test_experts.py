"""GroupedExperts against transformers' MixtralExperts and per-expert nn.Linear references.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_experts.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from switchyard.activations import ACTIVATIONS, get_activation
from switchyard.moe.experts import EXPERT_IMPLS, GroupedExperts

E, H, FF = 4, 16, 24


def _mixtral(experts: GroupedExperts) -> MixtralExperts:
    cfg = MixtralConfig(hidden_size=experts.hidden_size, intermediate_size=experts.intermediate_size,
                        num_local_experts=experts.num_experts, hidden_act=experts.activation,
                        experts_implementation="eager")
    ref = MixtralExperts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.copy_(experts.gate_up_proj)
        ref.down_proj.copy_(experts.down_proj)
    return ref


def _route(num_tokens: int, top_k: int, allowed: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct top-k experts per token drawn from ``allowed`` (others get zero rows)."""
    scores = torch.rand(num_tokens, len(allowed), generator=gen)
    idx_TK = torch.tensor(allowed)[scores.topk(top_k, dim=-1).indices]
    w_TK = torch.rand(num_tokens, top_k, generator=gen).softmax(dim=-1)
    return idx_TK, w_TK


def _sorted_moe(experts: GroupedExperts, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """Permute token copies by expert, run the experts, weight, and sum back per token."""
    k = idx_TK.shape[1]
    perm_N = torch.sort(idx_TK.reshape(-1), stable=True).indices
    token_N = perm_N // k
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=experts.num_experts)
    y_NH = experts(x_TH[token_N], counts_E) * w_TK.reshape(-1)[perm_N, None]
    return torch.zeros_like(x_TH).index_add(0, token_N, y_NH)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, cot)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_matches_mixtral_experts_fwd_and_grads(act: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ours = GroupedExperts(E, H, FF, activation=act)
    ref = _mixtral(ours)
    x_TH = torch.randn(32, H, requires_grad=True)
    idx_TK, w_TK = _route(32, 2, allowed=[0, 2, 3], gen=gen)  # expert 1 gets zero rows
    out = _sorted_moe(ours, x_TH, idx_TK, w_TK)
    expect = ref(x_TH, idx_TK, w_TK)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(out)
    g_ours = _grads(out, [x_TH, ours.gate_up_proj, ours.down_proj], cot)
    g_ref = _grads(expect, [x_TH, ref.gate_up_proj, ref.down_proj], cot)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert g_ours[1][1].abs().max() == 0 and g_ours[2][1].abs().max() == 0


def _linear_reference(ex: GroupedExperts) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Per-expert nn.Linear copies of ``ex``'s weights (independent autograd graph)."""
    w1, b1, w2, b2 = ex.weights()
    ups, downs = nn.ModuleList(), nn.ModuleList()
    for e in range(ex.num_experts):
        up = nn.Linear(ex.hidden_size, w1.shape[1], bias=ex.has_bias)
        down = nn.Linear(ex.intermediate_size, ex.hidden_size, bias=ex.has_bias)
        with torch.no_grad():
            up.weight.copy_(w1[e]), down.weight.copy_(w2[e])
            if ex.has_bias:
                up.bias.copy_(b1[e]), down.bias.copy_(b2[e])
        ups.append(up), downs.append(down)
    return ups, downs


def _run_reference(ex: GroupedExperts, ups: nn.ModuleList, downs: nn.ModuleList, x_NH: torch.Tensor,
                   counts: list[int]) -> torch.Tensor:
    act = get_activation(ex.activation)
    outs = []
    for e, x_nH in enumerate(x_NH.split(counts)):
        h = ups[e](x_nH)
        if ex.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        outs.append(downs[e](h))
    return torch.cat(outs)


def _stack_ref_grads(ex: GroupedExperts, ups: nn.ModuleList, downs: nn.ModuleList) -> list[torch.Tensor]:
    grads = [torch.stack([m.weight.grad for m in ups]), torch.stack([m.weight.grad for m in downs])]
    if ex.has_bias:
        grads[1:1] = [torch.stack([m.bias.grad for m in ups])]
        grads.append(torch.stack([m.bias.grad for m in downs]))
    return grads


def _check_against_linear(ex: GroupedExperts, counts: list[int], atol: float = 1e-5) -> None:
    ups, downs = _linear_reference(ex)
    x = torch.randn(sum(counts), ex.hidden_size)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expect = ex(x_ours, counts), _run_reference(ex, ups, downs, x_ref, counts)
    assert out.shape == (sum(counts), ex.hidden_size)
    torch.testing.assert_close(out, expect, atol=atol, rtol=1e-5)
    cot = torch.randn_like(out)
    ex.zero_grad(set_to_none=True)
    (out * cot).sum().backward()
    (expect * cot).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=atol, rtol=1e-5)
    ours = [p.grad for p in ex.weights() if p is not None]
    for a, b in zip(ours, _stack_ref_grads(ex, ups, downs), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("gated,bias", [(True, True), (False, False), (False, True)])
def test_plain_and_bias_variants_match_linear(gated: bool, bias: bool) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, activation="gelu", gated=gated, bias=bias)
    names = {n: tuple(p.shape) for n, p in ex.named_parameters()}
    up = "gate_up_proj" if gated else "up_proj"
    o = 2 * FF if gated else FF
    expect = {up: (E, o, H), "down_proj": (E, H, FF)}
    if bias:
        expect |= {f"{up}_bias": (E, o), "down_proj_bias": (E, H)}
    assert names == expect
    _check_against_linear(ex, [5, 0, 7, 3])


def test_zero_row_experts_get_zero_grads() -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, bias=True)
    _check_against_linear(ex, [0, 6, 0, 0])
    assert ex.gate_up_proj.grad[[0, 2, 3]].abs().max() == 0
    assert ex.down_proj_bias.grad[[0, 2, 3]].abs().max() == 0


@pytest.mark.parametrize("counts_as", [list, torch.tensor])
def test_empty_input_forward_and_backward(counts_as) -> None:
    ex = GroupedExperts(E, H, FF, bias=True)
    x = torch.zeros(0, H, requires_grad=True)
    y = ex(x, counts_as([0] * E))
    assert y.shape == (0, H)
    y.sum().backward()
    assert x.grad.shape == (0, H)
    for p in ex.parameters():
        assert p.grad is not None and p.grad.abs().max() == 0


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, bias=True)
    ex16 = GroupedExperts(E, H, FF, bias=True, dtype=torch.bfloat16)
    ex16.load_state_dict(ex.state_dict())
    counts = [9, 0, 4, 3]
    x = torch.randn(16, H)
    y32 = ex(x, counts)
    x16 = x.bfloat16().requires_grad_()
    y16 = ex16(x16, counts)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=3e-2)
    y16.float().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and ex16.gate_up_proj.grad.dtype == torch.bfloat16


def test_fp32_input_into_bf16_weights_returns_fp32() -> None:
    ex = GroupedExperts(E, H, FF, dtype=torch.bfloat16)
    assert ex(torch.randn(5, H), [1, 1, 1, 2]).dtype == torch.float32


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_activation_runs(act: str) -> None:
    torch.manual_seed(0)
    _check_against_linear(GroupedExperts(E, H, FF, activation=act), [3, 2, 0, 4])
    _check_against_linear(GroupedExperts(E, H, FF, activation=act, gated=False), [1, 0, 2, 4])


def test_init_is_deterministic_and_linear_like() -> None:
    torch.manual_seed(3)
    a = GroupedExperts(E, H, FF, bias=True)
    torch.manual_seed(3)
    b = GroupedExperts(E, H, FF, bias=True)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert a.gate_up_proj.abs().max() <= H**-0.5 and a.down_proj.abs().max() <= FF**-0.5
    assert a.gate_up_proj.std() > 0.5 * H**-0.5 / 3**0.5  # not a degenerate (e.g. all-E fan-in) bound


def test_impl_validation_and_auto_on_cpu() -> None:
    ex = GroupedExperts(2, 8, 8)
    assert set(EXPERT_IMPLS) >= {"grouped_mm", "loop"}
    assert ex.resolve_impl(torch.zeros(1, 8)) == "loop"
    with pytest.raises(ValueError, match="impl"):
        ex.impl = "nope"
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(2, 8, 8, activation="nope")


def _reference_grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Autograd-able stand-in with grouped_mm's contract (int32 cumulative offsets, [E, in, out])."""
    assert offs.dtype == torch.int32 and w_EIO.shape[0] == offs.numel()
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([x @ w for x, w in zip(x_NI.split(counts), w_EIO.unbind(0))])


@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 0, 0]])
def test_grouped_mm_glue_on_cpu_with_reference_kernel(monkeypatch, counts: list[int]) -> None:
    """The CUDA path's offsets, per-row bias gather and its custom backward, run on CPU."""
    import switchyard.moe.experts as experts_mod

    monkeypatch.setattr(experts_mod, "_GROUPED_MM", _reference_grouped_mm)
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, bias=True, impl="grouped_mm")
    _check_against_linear(ex, counts)
    x = torch.randn(sum(counts), H, requires_grad=True)
    ex(x, torch.tensor(counts)).sum().backward()  # expanded (stride-0) output grad


def test_expert_bias_gradcheck() -> None:
    from switchyard.moe.experts import _ExpertBias

    y = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    eid = torch.tensor([0, 0, 2, 2, 2, 2, 2])  # expert 1 empty
    assert torch.autograd.gradcheck(lambda y, b: _ExpertBias.apply(y, b, eid), (y, b))


def _fwd_and_grads(ex: GroupedExperts, x: torch.Tensor, counts: list[int], cot: torch.Tensor) -> list[torch.Tensor]:
    xi = x.clone().requires_grad_()
    y = ex(xi, torch.tensor(counts, device=x.device))
    assert y.dtype == x.dtype
    params = [p for p in ex.weights() if p is not None]
    return [y, *torch.autograd.grad(y, [xi, *params], cot)]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("counts", [[40, 0, 17, 71], [0, 0, 0, 0], [0, 128, 0, 0]])
def test_grouped_mm_matches_loop_on_cuda_bf16(bias: bool, counts: list[int]) -> None:
    """Both paths in bf16 against an fp64 loop reference: same error level, nothing path-specific."""
    torch.manual_seed(0)
    ex = GroupedExperts(4, 128, 256, bias=bias, device="cuda", dtype=torch.bfloat16)
    auto = ex.resolve_impl(torch.zeros(1, 128, device="cuda"))
    assert auto == ("grouped_mm" if bias else "swiglu_grouped")  # grad mode: training picks the Function
    with torch.no_grad():
        assert ex.resolve_impl(torch.zeros(1, 128, device="cuda")) == "grouped_mm"
    ref = GroupedExperts(4, 128, 256, bias=bias, device="cuda", dtype=torch.float64, impl="loop")
    ref.load_state_dict(ex.state_dict())
    x = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
    cot = torch.randn_like(x)
    expect = _fwd_and_grads(ref, x.double(), counts, cot.double())
    impls = ("grouped_mm", "loop") if bias else ("grouped_mm", "loop", "swiglu_grouped", "swiglu_per_expert")
    for impl in impls:
        ex.impl = impl
        for got, want in zip(_fwd_and_grads(ex, x, counts, cot), expect, strict=True):
            assert got.dtype == torch.bfloat16
            if want.numel() and want.abs().max() > 0:
                assert _rel_err(got, want) < 1e-2, impl
            elif got.numel():  # zero-row experts: exactly zero grads
                assert got.abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_matches_loop_on_cuda_fp32(bias: bool) -> None:
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch._grouped_mm before 2.10 is bf16-only")
    torch.manual_seed(0)
    ex = GroupedExperts(4, 64, 96, bias=bias, device="cuda")
    counts = [33, 0, 1, 30]
    x = torch.randn(sum(counts), 64, device="cuda")
    cot = torch.randn_like(x)
    ex.impl = "loop"
    want = _fwd_and_grads(ex, x, counts, cot)
    for impl in ("grouped_mm",) if bias else ("grouped_mm", "swiglu_grouped", "swiglu_per_expert"):
        ex.impl = impl
        for a, b in zip(_fwd_and_grads(ex, x, counts, cot), want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=impl)


@pytest.mark.gpu
def test_grouped_mm_backward_accepts_expanded_grad() -> None:
    """``y.sum().backward()`` hands grouped_mm a stride-0 grad, which its backward rejects raw."""
    ex = GroupedExperts(4, 64, 128, device="cuda", dtype=torch.bfloat16, impl="grouped_mm")
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ex(x, torch.tensor([8, 8, 0, 16], device="cuda")).sum().backward()
    assert x.grad is not None and ex.gate_up_proj.grad[2].abs().max() == 0


@pytest.mark.parametrize("gated, bias, activation", [(True, False, "silu"), (False, True, "gelu")])
def test_gathered_mm_equals_the_loop_and_ignores_rows_past_the_counts(gated, bias, activation) -> None:
    """The graph-capture path: per-row gathered weights; trailing rows (serving's replicated mode) are
    computed with some expert but never read."""
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, FF, activation=activation, gated=gated, bias=bias)
    counts = [2, 0, 3, 1]
    x = torch.randn(sum(counts) + 4, H, dtype=torch.float64)
    ex = ex.double()
    ex.impl = "loop"
    want = ex(x[: sum(counts)], torch.tensor(counts))
    ex.impl = "gathered_mm"
    got = ex(x, torch.tensor(counts))
    assert got.shape == x.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got[: sum(counts)], want, rtol=1e-12, atol=1e-12)
