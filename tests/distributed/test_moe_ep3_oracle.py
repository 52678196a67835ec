"""EP = 3 on gloo ranks against a per-token loop written here (not the layer's own ep=1 path).

6 experts over 3 ranks (2 each); uneven token counts, a rank with no tokens, experts that receive no
token (the router sends everything to two experts), a step where every rank is empty, and gated shared
experts (computed while the dispatch all-to-all is in flight) with an empty rank. The oracle
routes each token in float64 with Python sorting and runs each chosen expert's FFN one token at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS = 8, 12, 6


def _oracle(layer, x_TH: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * expert_{e(t, k)}(x[t]) with softmax → top-k → renormalise, per token;
    ``w1``, ``w2``: every expert's weights (all ranks' experts)."""
    cfg = layer.config
    weight = layer.router.weight.detach().double()
    out = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        x = x_TH[t].double()
        scores = (weight @ x).softmax(-1)
        chosen = sorted(range(cfg.num_experts), key=lambda e: (-scores[e].item(), e))[: cfg.top_k]
        total = sum(scores[e] for e in chosen)
        for e in chosen:
            gate, up = (w1[e] @ x).chunk(2)
            out[t] += scores[e] / total * (w2[e] @ (torch.nn.functional.silu(gate) * up))
        if layer.shared_experts is not None:  # Qwen2-MoE: sigmoid(gate . x) * down(silu(gate_proj x) * up_proj x)
            se = layer.shared_experts
            a = torch.nn.functional.silu(se.gate_proj.weight.double() @ x) * (se.up_proj.weight.double() @ x)
            out[t] += torch.sigmoid(layer.shared_expert_gate.weight.double() @ x) * (se.down_proj.weight.double() @ a)
    return out


def _ep3_cases(fused: bool) -> list[str]:
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.kernels import set_fused_kernels
    from switchyard.moe.layer import MoELayer

    set_fused_kernels(fused)
    manager = ProcessGroupManager(ep=3)
    rank = dist.get_rank()
    checked = []
    for name, counts, skew, shared in (("uneven", [5, 1, 9], False, 0), ("rank1_empty", [4, 0, 7], False, 0),
                                       ("idle_experts", [6, 3, 2], True, 0), ("all_empty", [0, 0, 0], False, 0),
                                       ("shared_rank2_empty", [3, 8, 0], False, 1)):
        config = MoEConfig(num_experts=EXPERTS, top_k=2, aux_loss_coef=0.0, num_shared_experts=shared,
                           shared_expert_gate=shared > 0)
        torch.manual_seed(0)
        layer = MoELayer(config, HIDDEN, FFN, groups=manager, dtype=torch.float64)
        with torch.no_grad():
            layer.router.weight.normal_(0, 3.0)
            if skew:  # for positive inputs only experts 0 and 1 (both on rank 0) win: ranks 1, 2 get nothing
                layer.router.weight[:2] = 0.0
                layer.router.weight[2:] = -50.0
        w1 = [torch.empty_like(layer.experts.gate_up_proj) for _ in range(3)]
        w2 = [torch.empty_like(layer.experts.down_proj) for _ in range(3)]
        dist.all_gather(w1, layer.experts.gate_up_proj.detach().contiguous())
        dist.all_gather(w2, layer.experts.down_proj.detach().contiguous())
        gen = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(counts[rank], HIDDEN, generator=gen, dtype=torch.float64)
        if skew:
            x = x.abs()
        x.requires_grad_(True)
        y = layer(x)
        want = _oracle(layer, x.detach(), torch.cat(w1), torch.cat(w2))
        torch.testing.assert_close(y.detach(), want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name} rank {rank}: {m}")
        y.sum().backward()  # every rank takes part in the backward's all-to-alls, also with no tokens
        assert x.grad.shape == x.shape
        assert layer.experts.gate_up_proj.grad is not None
        if skew and rank > 0:
            assert layer.experts.gate_up_proj.grad.abs().max() == 0
        total = layer.last_stats.tokens_per_expert_E.clone()
        dist.all_reduce(total)
        assert int(total.sum()) == 2 * sum(counts), f"{name}: {total.tolist()}"
        checked.append(name)
    return checked


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_ep3_matches_a_per_token_loop(fused: bool):
    results = run_on_ranks(_ep3_cases, 3, fused, timeout_s=180)
    assert all(r == ["uneven", "rank1_empty", "idle_experts", "all_empty", "shared_rank2_empty"] for r in results)
