"""The unsorted inference paths equal the sort-based path: small-batch (experts on the unsorted copies)
and all-experts (every local expert on every token, then the combine picks each token's K rows).

    python -m pytest -q tests/unit/test_moe_small_batch.py

Oracles: the layer's own sort → grouped experts → combine path on the same weights (every router
configuration, capacity drops, 1–16 tokens); a per-copy ``F.linear`` loop for each op itself; one process
for 2 gloo ranks in serving's replicated mode; on CUDA (gpu-marked) the PyTorch fallback and an fp64
reference for the Triton kernels, and eager for a CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import switchyard.moe.layer as layer_mod
from harness import run_on_ranks
from switchyard import MoEConfig
import switchyard.moe.kernels.ops as kernel_ops
from switchyard.moe.all_experts import all_experts_swiglu_combine
from switchyard.moe.kernels import routed_swiglu_combine, routed_swiglu_combine_torch
from switchyard.moe.kernels.routed import routed_kernels_apply
from switchyard.moe.layer import INFERENCE_PATHS, MoELayer

HIDDEN, FFN, EXPERTS = 16, 24, 8

ROUTERS = {
    "softmax_top2_norm": dict(top_k=2),
    "softmax_top4_no_norm": dict(top_k=4, norm_topk_prob=False),
    "topk_on_logits": dict(top_k=2, softmax_before_topk=False),
    "sigmoid_bias_groups": dict(top_k=2, score_func="sigmoid", expert_bias=True, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5),
    "capacity_probs": dict(top_k=2, eval_capacity_factor=0.5, drop_policy="probs"),
    "capacity_position": dict(top_k=4, eval_capacity_factor=0.75, drop_policy="position"),
    "shared_gate": dict(top_k=2, num_shared_experts=1, shared_expert_gate=True),
}


class _Spy:
    """Counts calls of one unsorted inference path (a key of ``INFERENCE_PATHS``): which path a forward took."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: str = "small_batch") -> None:
        self.calls = 0
        real = INFERENCE_PATHS[path]

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setitem(INFERENCE_PATHS, path, spy)


def _layer(kwargs: dict, dtype: torch.dtype = torch.float32, device: str = "cpu", **layer_kw) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=EXPERTS, **kwargs), HIDDEN, FFN, dtype=dtype, device=device, **layer_kw)
    with torch.no_grad():
        layer.router.weight.mul_(20)  # a sharp router: top-k choices far from ties
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(EXPERTS) * 0.1)
    return layer.eval()


def _forward(layer: MoELayer, x: torch.Tensor, rows: int, all_experts_tokens: int | None = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layer.small_batch_rows, layer.all_experts_tokens = rows, all_experts_tokens
    with torch.no_grad():
        out = layer(x)
    return out, layer.last_stats.tokens_per_expert_E, layer.last_stats.dropped_copies


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_small_batch_equals_sorted_path(router: str, tokens: int, monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    layer = _layer(ROUTERS[router])
    x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    want, want_counts, want_dropped = _forward(layer, x, 0)
    assert spy.calls == 0
    got, got_counts, got_dropped = _forward(layer, x, tokens * layer.config.top_k)  # at the threshold: taken
    assert spy.calls == 1
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got_counts, want_counts) and got_counts.dtype == want_counts.dtype
    assert int(got_dropped) == int(want_dropped)
    if router.startswith("capacity") and tokens == 8:
        assert int(got_dropped) > 0  # the case exercises the keep mask


def test_above_the_threshold_takes_the_sorted_path(monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    layer = _layer(ROUTERS["softmax_top2_norm"])
    x = torch.randn(9, HIDDEN)
    out, _, _ = _forward(layer, x, 17)  # 18 copies > 17
    assert spy.calls == 0
    torch.testing.assert_close(out, _forward(layer, x, 18)[0], atol=1e-6, rtol=1e-5)
    assert spy.calls == 1
    assert MoELayer.small_batch_rows is None  # the class default is untouched


@pytest.mark.parametrize("num_experts, top_k, limit", [(8, 2, 16), (64, 8, 128), (4, 1, 8)])
def test_default_threshold_is_two_copies_per_expert_up_to_128(num_experts, top_k, limit, monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    layer = MoELayer(MoEConfig(num_experts=num_experts, top_k=top_k), HIDDEN, FFN).eval()
    assert limit == min(layer_mod.SMALL_BATCH_MAX_ROWS, layer_mod.SMALL_BATCH_ROWS_PER_EXPERT * num_experts)
    with torch.no_grad():
        layer(torch.randn(limit // top_k, HIDDEN))
        assert spy.calls == 1
        layer(torch.randn(limit // top_k + 1, HIDDEN))
        assert spy.calls == 1


@pytest.mark.parametrize("case", ["grad", "gelu", "bias", "pinned_impl", "kernels_off"])
def test_other_cases_keep_the_sorted_path(case: str, monkeypatch) -> None:
    spies = [_Spy(monkeypatch, path) for path in INFERENCE_PATHS]
    kwargs = {"gelu": dict(activation="gelu", gated=False), "bias": dict(bias=True)}.get(case, {})
    layer = _layer(dict(top_k=2, **kwargs))
    layer.all_experts_tokens = 64
    if case == "pinned_impl":
        layer.experts.impl = "loop"
    if case == "kernels_off":
        monkeypatch.setattr(kernel_ops, "_ENABLED", False)  # restored after the test
    with torch.set_grad_enabled(case == "grad"):
        layer(torch.randn(2, HIDDEN))  # small-batch size
        layer(torch.randn(9, HIDDEN))  # all-experts size
    assert [spy.calls for spy in spies] == [0, 0]


def _per_copy_reference(x, w1, w2, idx, weight, keep, first):
    """fp64, one copy at a time with F.linear: the definition."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k]) - first
            if not 0 <= e < w1.shape[0] or (keep is not None and not keep[t, k]):
                continue
            gate, up = F.linear(x[t].double(), w1[e].double()).chunk(2)
            out[t] += float(weight[t, k]) * F.linear(F.silu(gate) * up, w2[e].double())
    return out


def _replicated_unsorted(router: str, path: str) -> list[tuple[int, int]]:
    """On each of 2 ranks: a replicated-tokens ep=2 layer on ``path`` vs one ep=1 layer on the sorted path."""
    from switchyard import ProcessGroupManager

    calls = []
    real = INFERENCE_PATHS[path]

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    INFERENCE_PATHS[path] = spy
    manager = ProcessGroupManager(ep=2, register_with_deepspeed=False)
    reference = _layer(ROUTERS[router])
    reference.small_batch_rows = reference.all_experts_tokens = 0
    layer = _layer(ROUTERS[router], groups=manager)
    layer.load_state_dict(reference.state_dict())
    layer.replicated_tokens = True
    # small_batch: 8 tokens x top-4 is past the default for 8 experts; all_experts: forced on CPU
    layer.small_batch_rows, layer.all_experts_tokens = (64, 0) if path == "small_batch" else (0, 64)
    checked = []
    for tokens in ((1, 3, 8) if path == "small_batch" else (8, 12, 16)):  # one token: a rank may hold none of its experts
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        before = len(calls)
        with torch.no_grad():
            want, got = reference(x), layer(x)
        assert len(calls) == before + 1, f"the {path} path did not run"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"{router}, {tokens} tokens")
        assert torch.equal(layer.last_stats.tokens_per_expert_E, reference.last_stats.tokens_per_expert_E)
        checked.append((tokens, int(layer.last_stats.dropped_copies)))
    return checked


@pytest.mark.distributed
@pytest.mark.parametrize("router, path", [
    ("softmax_top4_no_norm", "small_batch"), ("sigmoid_bias_groups", "small_batch"), ("capacity_probs", "small_batch"),
    ("shared_gate", "small_batch"), ("sigmoid_bias_groups", "all_experts"), ("capacity_probs", "all_experts")])
def test_replicated_tokens_on_two_ranks_match_one_process(router: str, path: str) -> None:
    rank0, rank1 = run_on_ranks(_replicated_unsorted, 2, router, path, timeout_s=120)
    assert rank0 == rank1 and len(rank0) == 3


# -- the all-experts path -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [8, 9, 16])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_all_experts_equals_sorted_path(router: str, tokens: int, monkeypatch) -> None:
    spy = _Spy(monkeypatch, "all_experts")
    layer = _layer(ROUTERS[router])
    x = torch.randn(2, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    want, want_counts, want_dropped = _forward(layer, x, 0)
    assert spy.calls == 0
    got, got_counts, got_dropped = _forward(layer, x, 0, all_experts_tokens=2 * tokens)  # at the limit: taken
    assert spy.calls == 1
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got_counts, want_counts) and got_counts.dtype == want_counts.dtype
    assert int(got_dropped) == int(want_dropped)
    if router.startswith("capacity"):
        assert int(got_dropped) > 0  # the case exercises the keep mask


def test_which_inference_path() -> None:
    """all-experts up to its token limit while T * K >= 2E; else small-batch up to its rows; else sorted.
    On CPU the all-experts default is off (its extra FLOPs pay only where weight reads dominate)."""
    layer = _layer(dict(top_k=2))  # 8 experts: small-batch up to 16 copies, all-experts from 16 copies

    def path(tokens: int) -> str | None:
        return layer.inference_path(torch.zeros(tokens, HIDDEN), torch.zeros(tokens, 2, dtype=torch.long))

    with torch.no_grad():
        assert [path(t) for t in (1, 8, 9, 64)] == ["small_batch", "small_batch", None, None]
        layer.all_experts_tokens = 32
        assert [path(t) for t in (7, 8, 32, 33)] == ["small_batch", "all_experts", "all_experts", None]
        layer.small_batch_rows = 0
        assert [path(t) for t in (7, 8)] == [None, "all_experts"]  # 7 tokens x top-2 < 2 x 8 experts
    assert path(8) is None  # grad enabled: nothing unsorted
    assert MoELayer.all_experts_tokens is None and layer_mod.ALL_EXPERTS_MAX_TOKENS == 128


@pytest.mark.parametrize("op", [routed_swiglu_combine, all_experts_swiglu_combine], ids=["small_batch", "all_experts"])
@pytest.mark.parametrize("first, with_keep", [(0, False), (3, True)])
def test_ops_equal_a_per_copy_loop(op, first: int, with_keep: bool) -> None:
    """Copies of experts outside [first, first + L) or not kept add nothing; counts cover every global expert."""
    gen = torch.Generator().manual_seed(0)
    num_local, top_k, tokens, num_experts = 4, 3, 5, 10
    x = torch.randn(tokens, HIDDEN, generator=gen)
    w1 = torch.randn(num_local, 2 * FFN, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(num_local, HIDDEN, FFN, generator=gen) / FFN**0.5
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weight = torch.rand(tokens, top_k, generator=gen)
    keep = torch.rand(tokens, top_k, generator=gen) > 0.3 if with_keep else None
    out, counts = op(x, w1, w2, idx, weight, keep, first_expert=first, num_experts=num_experts)
    torch.testing.assert_close(out.double(), _per_copy_reference(x, w1, w2, idx, weight, keep, first),
                               atol=1e-5, rtol=1e-5)
    kept = keep if keep is not None else torch.ones_like(idx, dtype=torch.bool)
    assert counts.tolist() == [int(kept[idx == e].sum()) for e in range(num_experts)]
    empty, empty_counts = op(x[:0], w1, w2, idx[:0], weight[:0], num_experts=num_experts)
    assert empty.shape == (0, HIDDEN) and empty_counts.sum() == 0
    with pytest.raises(ValueError, match="shapes do not fit"):
        op(x, w1, w2[:, :, :-1], idx, weight)


def test_all_experts_op_all_local_equals_masked_rows() -> None:
    """The ep=1 shortcut (no masks) and the masked rows give the same output."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, HIDDEN, generator=gen)
    w1 = torch.randn(EXPERTS, 2 * FFN, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, FFN, generator=gen) / FFN**0.5
    idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(6)])
    weight = torch.rand(6, 2, generator=gen)
    plain, _ = all_experts_swiglu_combine(x, w1, w2, idx, weight)
    masked, _ = all_experts_swiglu_combine(x, w1, w2, idx, weight, torch.ones_like(idx, dtype=torch.bool))
    torch.testing.assert_close(plain, masked, atol=0, rtol=0)


# -- CUDA ---------------------------------------------------------------------------------------------------
def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, first, with_keep", [(1, 0, False), (8, 2, True), (13, 0, True)])
def test_triton_kernels_match_the_fallback(dtype: torch.dtype, tokens: int, first: int, with_keep: bool) -> None:
    """Odd widths (masked tails), copies of other ranks' experts, dropped copies, and a duplicate expert per
    block of tokens: both against an fp64 reference, and against each other."""
    gen = torch.Generator().manual_seed(tokens)
    num_local, top_k, hidden, ffn, num_experts = 6, 4, 272, 200, 12
    x = torch.randn(tokens, hidden, generator=gen).cuda().to(dtype)
    w1 = (torch.randn(num_local, 2 * ffn, hidden, generator=gen) / hidden**0.5).cuda().to(dtype)
    w2 = (torch.randn(num_local, hidden, ffn, generator=gen) / ffn**0.5).cuda().to(dtype)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).cuda()
    weight = torch.rand(tokens, top_k, generator=gen).cuda()
    keep = (torch.rand(tokens, top_k, generator=gen) > 0.3).cuda() if with_keep else None
    assert routed_kernels_apply(x, w1, w2)
    got, counts = routed_swiglu_combine(x, w1, w2, idx, weight, keep, first_expert=first, num_experts=num_experts)
    fallback = routed_swiglu_combine_torch(x, w1, w2, idx, weight, keep, first)
    ref = _per_copy_reference(x.cpu(), w1.cpu(), w2.cpu(), idx.cpu(), weight.cpu(), keep.cpu() if keep is not None
                              else None, first).cuda()
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel_err(got, ref) < tol and _rel_err(fallback, ref) < tol
    assert _rel_err(got, fallback.double()) < (1e-6 if dtype == torch.float32 else 5e-3)
    kept = keep if keep is not None else torch.ones_like(idx, dtype=torch.bool)
    assert counts.tolist() == [int(kept[idx == e].sum()) for e in range(num_experts)]


@pytest.mark.gpu
@pytest.mark.parametrize("path, tokens", [("small_batch", 8), ("all_experts", 24)])
@pytest.mark.parametrize("router", ["softmax_top4_no_norm", "capacity_probs"])
def test_layer_unsorted_on_cuda_equals_sorted_and_graph_replay(router: str, path: str, tokens: int,
                                                               monkeypatch) -> None:
    spy = _Spy(monkeypatch, path)
    layer = _layer(ROUTERS[router], dtype=torch.bfloat16, device="cuda")
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    want, want_counts, _ = _forward(layer, x, 0)
    assert spy.calls == 0
    limits = (64, 0) if path == "small_batch" else (0, 64)
    got, got_counts, _ = _forward(layer, x, *limits)
    assert spy.calls == 1
    assert _rel_err(got, want.double()) < 2e-2 and torch.equal(got_counts, want_counts)
    if path == "all_experts":
        _forward(layer, x, 0, None)  # the CUDA default takes it too
        assert spy.calls == 2
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        layer(static_x)  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        eager = layer(static_x)
    torch.testing.assert_close(static_out, eager, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_experts_op_on_cuda_matches_the_per_copy_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    num_local, top_k, tokens, hidden, ffn, num_experts = 6, 4, 40, 272, 200, 12
    x = torch.randn(tokens, hidden, generator=gen)
    w1 = torch.randn(num_local, 2 * ffn, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_local, hidden, ffn, generator=gen) / ffn**0.5
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weight = torch.rand(tokens, top_k, generator=gen)
    keep = torch.rand(tokens, top_k, generator=gen) > 0.3
    ref = _per_copy_reference(x, w1, w2, idx, weight, keep, 2).cuda()
    got, counts = all_experts_swiglu_combine(*(t.cuda().to(dtype) for t in (x, w1, w2)), idx.cuda(), weight.cuda(),
                                             keep.cuda(), first_expert=2, num_experts=num_experts)
    assert got.dtype == dtype and _rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert counts.tolist() == [int(keep[idx == e].sum()) for e in range(num_experts)]
