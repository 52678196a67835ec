"""Router parity with transformers' own routers (the oracle), plus edge cases and expert-bias updates.

Run: /work/main/.venv/bin/python -m pytest -q tests/unit/test_router.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from switchyard.config import MoEConfig
from switchyard.moe.router import Router, RouterOutput

H, T = 32, 64


def _random_hf_router(router: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight))
    return router.eval()


def _ours_from(hf_router: torch.nn.Module, config: MoEConfig) -> Router:
    ours = Router(H, config)
    with torch.no_grad():
        ours.weight.copy_(hf_router.weight)
        if config.expert_bias:
            ours.expert_bias.copy_(hf_router.e_score_correction_bias)
    return ours.eval()


def _assert_parity(hf_router: torch.nn.Module, ours: Router, x_TH: torch.Tensor) -> RouterOutput:
    with torch.no_grad():
        hf_logits, hf_weights, hf_idx = hf_router(x_TH)
        out = ours(x_TH)
    assert out.logits_TE.dtype == out.scores_TE.dtype == out.topk_weight_TK.dtype == torch.float32
    assert out.topk_idx_TK.dtype == torch.int64
    torch.testing.assert_close(out.logits_TE, hf_logits, rtol=0, atol=0)
    assert torch.equal(out.topk_idx_TK, hf_idx)
    torch.testing.assert_close(out.topk_weight_TK, hf_weights, rtol=0, atol=1e-6)
    return out


def _mixtral(top_k: int, num_experts: int = 8):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(
        hidden_size=H, intermediate_size=64, num_local_experts=num_experts, num_experts_per_tok=top_k
    )
    return _random_hf_router(MixtralTopKRouter(cfg))


@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_mixtral_parity(top_k: int) -> None:
    hf = _mixtral(top_k)
    ours = _ours_from(hf, MoEConfig(num_experts=8, top_k=top_k))  # defaults = Mixtral
    out = _assert_parity(hf, ours, torch.randn(T, H))
    torch.testing.assert_close(out.topk_weight_TK.sum(-1), torch.ones(T))
    torch.testing.assert_close(out.scores_TE, torch.softmax(out.logits_TE, -1))


@pytest.mark.parametrize(
    "family,norm",
    [(f, n) for f in ("qwen2_moe", "qwen3_moe", "olmoe") for n in (False, True)],
)
def test_softmax_family_parity(family: str, norm: bool) -> None:
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig as Cfg
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as HFRouter
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig as Cfg
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as HFRouter
    else:
        from transformers import OlmoeConfig as Cfg
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter as HFRouter
    cfg = Cfg(hidden_size=H, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
    hf = _random_hf_router(HFRouter(cfg), seed=1)
    ours = _ours_from(hf, MoEConfig(num_experts=16, top_k=4, norm_topk_prob=norm))
    out = _assert_parity(hf, ours, torch.randn(T, H))
    if not norm:
        assert (out.topk_weight_TK.sum(-1) < 1).all()


@pytest.mark.parametrize("norm,n_group,topk_group", [(True, 4, 2), (False, 4, 2), (True, 1, 1), (True, 8, 3)])
def test_deepseek_v3_parity(norm: bool, n_group: int, topk_group: int) -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, K, scale = 16, 4, 2.5
    cfg = DeepseekV3Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=scale, norm_topk_prob=norm,
    )
    hf = _random_hf_router(DeepseekV3TopkRouter(cfg), seed=2)
    with torch.no_grad():
        hf.e_score_correction_bias.copy_(torch.randn(E) * 0.3)
    ours_cfg = MoEConfig(
        num_experts=E, top_k=K, score_func="sigmoid", norm_topk_prob=norm, expert_bias=True,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale,
    )
    ours = _ours_from(hf, ours_cfg)
    x_TH = torch.randn(T, H)
    out = _assert_parity(hf, ours, x_TH)
    torch.testing.assert_close(out.scores_TE, torch.sigmoid(out.logits_TE))
    # the bias must matter for the choice but never enter the weights
    plain = torch.topk(out.scores_TE, K, dim=-1)[1].sort(-1).values
    assert not torch.equal(plain, out.topk_idx_TK.sort(-1).values)
    raw = out.scores_TE.gather(1, out.topk_idx_TK)
    expected = raw / (raw.sum(-1, keepdim=True) + 1e-20) if norm else raw
    torch.testing.assert_close(out.topk_weight_TK, expected * scale)
    if n_group > 1:  # every token's experts lie in at most topk_group groups
        groups_TK = out.topk_idx_TK // (E // n_group)
        assert max(len(set(row.tolist())) for row in groups_TK) <= topk_group


def test_softmax_after_topk_matches_formula() -> None:
    torch.manual_seed(3)
    router = Router(H, MoEConfig(num_experts=8, top_k=3, softmax_before_topk=False)).eval()
    with torch.no_grad():
        out = router(torch.randn(T, H))
    top_logits_TK, idx_TK = torch.topk(out.logits_TE, 3, dim=-1)
    assert torch.equal(out.topk_idx_TK, idx_TK)
    torch.testing.assert_close(out.topk_weight_TK, torch.softmax(top_logits_TK, dim=-1), rtol=0, atol=1e-6)
    top1 = Router(H, MoEConfig(num_experts=8, top_k=1, softmax_before_topk=False)).eval()
    with torch.no_grad():
        assert torch.equal(top1(torch.randn(T, H)).topk_weight_TK, torch.ones(T, 1))


@pytest.mark.parametrize(
    "config",
    [
        MoEConfig(num_experts=8, top_k=2),
        MoEConfig(num_experts=8, top_k=2, softmax_before_topk=False),
        MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", expert_bias=True, n_group=4, topk_group=2),
    ],
)
def test_empty_input(config: MoEConfig) -> None:
    router = Router(H, config)
    x_TH = torch.randn(0, H, requires_grad=True)
    out = router(x_TH)
    assert out.logits_TE.shape == out.scores_TE.shape == (0, 8)
    assert out.topk_idx_TK.shape == out.topk_weight_TK.shape == (0, 2)
    out.logits_TE.sum().backward()
    assert router.weight.grad is not None and torch.count_nonzero(router.weight.grad) == 0


def test_leading_dims_flattened_and_bf16_input() -> None:
    router = Router(H, MoEConfig())
    x = torch.randn(2, 5, H)
    out = router(x)
    assert out.topk_idx_TK.shape == (10, 2)
    out_bf16 = router(x.bfloat16())
    assert out_bf16.logits_TE.dtype == torch.float32 and out_bf16.topk_weight_TK.dtype == torch.float32


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_logits_stay_fp32_under_autocast(score_func: str) -> None:
    """Under ``torch.autocast`` (HF Trainer's bf16 with fp32 weights) the router's GEMM ran in bf16: bf16
    logits, and for sigmoid bf16 combine weights, where docs/moe-layer.md promises fp32 routing."""
    router = Router(H, MoEConfig(score_func=score_func))
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(T, H, requires_grad=True)
    want = router(x)
    grad_w, grad_x = torch.autograd.grad(want.topk_weight_TK.sum() + want.logits_TE.square().sum(), (router.weight, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
        got_grads = torch.autograd.grad(got.topk_weight_TK.sum() + got.logits_TE.square().sum(), (router.weight, x))
    assert got.logits_TE.dtype == got.scores_TE.dtype == got.topk_weight_TK.dtype == torch.float32
    assert torch.equal(got.logits_TE, want.logits_TE) and torch.equal(got.topk_weight_TK, want.topk_weight_TK)
    assert torch.equal(got_grads[0], grad_w) and torch.equal(got_grads[1], grad_x)


def test_jitter_training_only_and_seeded() -> None:
    router = Router(H, MoEConfig(router_jitter=0.1))
    x_TH = torch.randn(T, H)
    router.eval()
    assert torch.equal(router(x_TH).logits_TE, router(x_TH).logits_TE)
    clean = router(x_TH).logits_TE
    router.train()
    torch.manual_seed(7)
    first = router(x_TH).logits_TE
    torch.manual_seed(7)
    second = router(x_TH).logits_TE
    assert torch.equal(first, second)
    assert not torch.allclose(first, clean)


def test_expert_bias_buffer_stays_fp32_and_persistent() -> None:
    router = Router(H, MoEConfig(score_func="sigmoid", expert_bias=True)).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32
    assert "expert_bias" in router.state_dict()
    assert "expert_bias" not in Router(H, MoEConfig()).state_dict()


def test_update_expert_bias_direction() -> None:
    router = Router(H, MoEConfig(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.01))
    router.update_expert_bias(torch.tensor([10, 2, 2, 2]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    router.update_expert_bias(torch.tensor([4.0, 4.0, 4.0, 4.0]))  # balanced: no change
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    with pytest.raises(ValueError):
        Router(H, MoEConfig()).update_expert_bias(torch.zeros(8))
    with pytest.raises(ValueError):
        router.update_expert_bias(torch.zeros(5))


def _update_bias_on_rank() -> list[float]:
    rank = dist.get_rank()
    router = Router(H, MoEConfig(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.5))
    # rank 0 overloads expert 0, rank 1 overloads expert 1 more; only the sum decides the sign.
    counts = torch.tensor([6.0, 0.0, 1.0, 1.0]) if rank == 0 else torch.tensor([0.0, 9.0, 1.0, 1.0])
    router.update_expert_bias(counts, group=dist.group.WORLD)
    return router.expert_bias.tolist()


def test_update_expert_bias_sums_over_ranks() -> None:
    from harness import run_on_ranks

    biases = run_on_ranks(_update_bias_on_rank, 2, timeout_s=60)
    # summed counts [6, 9, 2, 2], mean 4.75: experts 0 and 1 overloaded on both ranks
    assert biases[0] == biases[1] == [-0.5, -0.5, 0.5, 0.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_logits_grads_equal_autograds(dtype: torch.dtype) -> None:
    """The router's logits op (saves x in its own dtype, not an fp32 copy) == F.linear on fp32 copies."""
    from switchyard.moe.router import router_logits_fp32

    torch.manual_seed(0)
    x = torch.randn(T, H).to(dtype).requires_grad_(True)
    w = (torch.randn(8, H) * 0.02).to(dtype).requires_grad_(True)
    grad = torch.randn(T, 8)
    ours = router_logits_fp32(x, w)
    ours.backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref.float(), w_ref.float())
    ref.backward(grad)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref) and torch.equal(x.grad, x_ref.grad) and torch.equal(w.grad, w_ref.grad)
    with torch.no_grad():  # the graph-free path (decode) gives the same logits
        assert torch.equal(router_logits_fp32(x, w), ref)


@pytest.mark.gpu
def test_fp32_logits_on_cuda_16_bit_match_the_fp32_route() -> None:
    """bf16 on CUDA: tensor-core GEMMs (fp32 output forward; backward on the logits' gradient rounded to
    bf16) against the fp32 route: forward to summation order, gradients to bf16 rounding."""
    from switchyard.moe.router import router_logits_fp32

    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda").to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(64, 256, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn(512, 64, device="cuda")
    ours = router_logits_fp32(x, w)
    ours.backward(grad)
    x_ref, w_ref = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = x_ref @ w_ref.t()
    ref.backward(grad.double())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    assert ours.dtype == torch.float32 and rel(ours, ref) < 1e-6
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel(x.grad, x_ref.grad) < 1e-2 and rel(w.grad, w_ref.grad) < 1e-2


# -- the fused softmax top-k router (moe/kernels/router_fused.py) -------------------------------------------
def _kernel_math(x: torch.Tensor, w: torch.Tensor, top_k: int, normalize: bool, scale: float):
    """What the Triton kernel computes, in torch: logits, softmax, top-k of the scores, renormalised, scaled."""
    logits = x.float() @ w.float().t()
    scores = logits.softmax(-1)
    val, idx = scores.topk(top_k, dim=-1)
    return logits, scores, idx, (val / val.sum(-1, keepdim=True) if normalize else val) * scale


def _router_loss(logits, scores, weight, seed: int = 1) -> torch.Tensor:
    """A loss touching all three differentiable outputs: combine weights, balance (scores), z-loss (logits)."""
    g = torch.Generator().manual_seed(seed)
    gw = torch.randn(weight.shape, generator=g).to(weight.device)
    gs = torch.randn(scores.shape, generator=g).to(scores.device)
    return (weight * gw).sum() + (scores * gs).sum() + torch.logsumexp(logits, -1).square().mean()


@pytest.mark.parametrize("normalize, scale", [(False, 1.0), (True, 1.0), (True, 2.5)])
def test_fused_softmax_topk_backward_equals_autograd(normalize: bool, scale: float, monkeypatch) -> None:
    """The written-out backward against autograd through the same math (fp32, CPU: the forward stands in for
    the Triton kernel, which the GPU tests below check on its own)."""
    from switchyard.moe.kernels import router_fused

    monkeypatch.setattr(router_fused, "_rk", type("TorchKernel", (), {"softmax_topk": staticmethod(_kernel_math)}))
    torch.manual_seed(0)
    x = torch.randn(T, H, requires_grad=True)
    w = (torch.randn(8, H) * 0.3).requires_grad_(True)
    logits, scores, idx, weight = router_fused.softmax_topk(x, w, 3, normalize, scale)
    _router_loss(logits, scores, weight).backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = _kernel_math(x_ref, w_ref, 3, normalize, scale)
    _router_loss(ref[0], ref[1], ref[3]).backward()
    assert torch.equal(idx, ref[2])
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("experts, top_k, normalize, scale", [(64, 8, False, 1.0), (128, 8, True, 1.0),
                                                              (8, 2, True, 1.0), (12, 4, False, 2.5), (256, 8, True, 1.0)])
def test_fused_softmax_topk_on_cuda_matches_the_unfused_router(experts: int, top_k: int, normalize: bool,
                                                              scale: float) -> None:
    """The Triton router against the unfused ops on the same bf16 input: logits to fp32 summation order,
    the top-k of its own scores exactly, gradients (x, w) to bf16 rounding; the Router module takes it."""
    from switchyard.moe.kernels.router_fused import softmax_topk, softmax_topk_supported

    torch.manual_seed(experts)
    x = torch.randn(700, 256, device="cuda").to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(experts, 256, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_(True)
    assert softmax_topk_supported(x, w, top_k)
    logits, scores, idx, weight = softmax_topk(x, w, top_k, normalize, scale)
    _router_loss(logits, scores, weight).backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = _kernel_math(x_ref, w_ref, top_k, normalize, scale)
    _router_loss(ref[0], ref[1], ref[3]).backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(logits, ref[0]) < 1e-5 and rel(scores, ref[1]) < 1e-5
    own_val, own_idx = scores.topk(top_k, dim=-1)  # the kernel's choice, from its own scores
    assert torch.equal(idx, own_idx)
    own_w = (own_val / own_val.sum(-1, keepdim=True) if normalize else own_val) * scale
    torch.testing.assert_close(weight, own_w, rtol=1e-6, atol=1e-7)
    assert rel(x.grad, x_ref.grad) < 2e-2 and rel(w.grad, w_ref.grad) < 2e-2

    config = MoEConfig(num_experts=experts, top_k=top_k, norm_topk_prob=normalize, routed_scaling_factor=scale)
    router = Router(256, config).cuda().to(torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(w)
        out = router(x.detach())  # graph-free call: the kernel without the Function
    assert torch.equal(out.topk_idx_TK, idx) and torch.equal(out.topk_weight_TK, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("experts, top_k, normalize, scale", [(64, 8, False, 1.0), (128, 8, True, 1.0),
                                                              (8, 2, True, 1.0), (12, 4, False, 2.5), (256, 8, True, 1.0),
                                                              (60, 1, True, 1.0)])
@pytest.mark.parametrize("given", [("scores", "weight", "logits"), ("weight",), ("scores",), ("logits", "weight")])
def test_softmax_topk_backward_kernel_matches_its_torch_form(experts: int, top_k: int, normalize: bool, scale: float,
                                                             given: tuple[str, ...]) -> None:
    """The one-launch router backward against ``logits_grad`` (fp32 out: to fp32 rounding; in bf16 out: the
    same values rounded once), for any subset of the three incoming gradients; rows not a multiple of the block."""
    from switchyard.moe.kernels.router_fused import logits_grad
    from switchyard.moe.kernels.router_kernels import softmax_topk_backward

    torch.manual_seed(experts + top_k)
    num_tokens = 700
    logits = torch.randn(num_tokens, experts, device="cuda")
    scores = logits.softmax(-1)
    val, idx = scores.topk(top_k, dim=-1)
    weight = (val / val.sum(-1, keepdim=True) if normalize else val) * scale
    grads = {"scores": torch.randn_like(scores), "weight": torch.randn_like(weight),
             "logits": torch.randn_like(logits)}
    args = [grads[k] if k in given else None for k in ("scores", "weight", "logits")]
    want = logits_grad(scores, idx, weight, *args, normalize, scale)
    got = softmax_topk_backward(scores, idx, weight, *args, normalize, scale, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got16 = softmax_topk_backward(scores, idx, weight, *args, normalize, scale, torch.bfloat16)
    torch.testing.assert_close(got16.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-5)
