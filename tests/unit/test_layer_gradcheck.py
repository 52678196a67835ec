"""float64 gradcheck of the whole MoE layer on tiny shapes: input, router weight, expert and shared weights.

Run: /work/main/.venv/bin/python -m pytest -q tests/unit/test_layer_gradcheck.py

The routing is piecewise constant in the inputs, so the router is made sharp (no top-k choice within
gradcheck's eps of a tie) and the check covers the combine weights' dependence on the router weight.
A float64 layer must compute in float64 throughout (routing, SwiGLU), on the fused and unfused paths alike.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from switchyard import MoEConfig
from switchyard.moe.kernels import set_fused_kernels
from switchyard.moe.kernels.ops import silu_mul, silu_mul_backward_
from switchyard.moe.layer import MoELayer

CASES = {
    "softmax_norm": dict(top_k=2),
    "softmax_raw_scaled": dict(top_k=3, norm_topk_prob=False, routed_scaling_factor=2.0),
    "switch": dict(top_k=2, softmax_before_topk=False),
    "sigmoid_groups_bias": dict(top_k=2, score_func="sigmoid", n_group=2, topk_group=1, expert_bias=True),
    "capacity": dict(top_k=2, capacity_factor=0.5),
    "shared_gate": dict(top_k=1, num_shared_experts=1, shared_expert_gate=True),
    "plain_gelu_bias": dict(top_k=2, gated=False, activation="gelu", bias=True),
}


@pytest.fixture(params=[True, False], ids=["fused", "unfused"])
def fused(request):
    set_fused_kernels(request.param)
    yield request.param
    set_fused_kernels(True)


@pytest.mark.parametrize("case", list(CASES))
def test_layer_gradcheck_float64(case: str, fused: bool) -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, aux_loss_coef=0.0, **CASES[case]), 3, 2, dtype=torch.float64).train()
    with torch.no_grad():
        layer.router.weight.mul_(100)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.05, 0.0]))
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def run(x_TH: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, values)), (x_TH,))

    assert run(x, *params).dtype == torch.float64
    assert layer.last_router_output.topk_weight_TK.dtype == torch.float64
    assert gradcheck(run, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", ["softmax_raw_scaled", "capacity"])
def test_folded_routing_weights_in_float64_equal_the_gradchecked_path(case: str) -> None:
    """The SwiGLU Function (per-expert backend: float64 on CPU) takes the routing weights inside the experts; it
    refuses a second backward (gradcheck's), so it is held to the weighted combine, gradchecked above: outputs and
    every gradient in float64 to 1e-12."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, aux_loss_coef=0.0, **CASES[case]), 3, 2, dtype=torch.float64).train()
    layer.experts.impl = "swiglu_per_expert"
    with torch.no_grad():
        layer.router.weight.mul_(100)
    x, cotangent = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    results = []
    for fold in (True, False):
        layer.fold_routing_weights = fold
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        (out * cotangent).sum().backward()
        results.append([out.detach(), x_in.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_silu_mul_fallbacks_keep_float64() -> None:
    """The PyTorch SwiGLU (CPU) computes in at least fp32, not at most: float64 stays float64."""
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(silu_mul, (h,), eps=1e-6, atol=1e-8)
    gate, up = h.detach().chunk(2, dim=-1)
    da = torch.randn(4, 3, dtype=torch.float64)
    grad = h.detach().clone()
    silu_mul_backward_(grad, da.clone())
    want = torch.autograd.grad((torch.nn.functional.silu(h[:, :3]) * h[:, 3:]), h, da)[0]
    torch.testing.assert_close(grad, want, atol=1e-14, rtol=1e-12)
    assert gate.dtype == up.dtype == torch.float64
