"""Expert tensor parallelism (etp = tp) changes where each expert's FFN slice runs, never what the layer computes.

Oracle: the same weights in one unsharded ``MoELayer`` in one process, run on each data-parallel rank's tokens
separately (the ranks of a tp group share their dp rank's tokens). Outputs, input gradients, router gradients
(summed over dp) and expert gradients (gathered over etp, summed over edp) must match, and the etp ranks' router
gradients must be the same bits. ``full_state_dict`` gives the reference's tensors, and loads back.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks
from tiny_models import assert_same_over_group, moe_layer_pair

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS = 16, 24, 4
TOL = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "swiglu": dict(),
    "swiglu_bias": dict(bias=True),
    "plain_gelu": dict(gated=False, activation="gelu"),
    "plain_gelu_bias": dict(gated=False, activation="gelu", bias=True),
}


def _check_training(shape: dict, fold: bool = False) -> list[str]:
    """``fold``: the sharded layer's SwiGLU experts take the routing weights (``swiglu_grouped``, the only case that
    can), the reference weights its combine as ever; each FFN slice weights its partial output."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.parallel.tensor_parallel import full_state_dict
    from switchyard.parallel.tensor_shards import gather_tensor, shard_of

    manager = ProcessGroupManager(**shape)
    etp, etp_group = manager.size("etp"), manager.group("etp")
    counts = [5 + 3 * r for r in range(manager.size("dp"))]
    checked = []
    for name, kwargs in ({"swiglu": CASES["swiglu"]} if fold else CASES).items():
        config = MoEConfig(num_experts=EXPERTS, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001, **kwargs)
        reference, layer = moe_layer_pair(config, HIDDEN, FFN, manager)
        assert layer.experts.intermediate_size == FFN // etp and layer.intermediate_size == FFN
        combine_weights = []
        if fold:
            layer.experts.impl = "swiglu_grouped"
            combine = layer.dispatcher.combine

            def recording_combine(y, plan, weight, combine=combine):  # what the combine weights the rows with
                combine_weights.append(weight)
                return combine(y, plan, weight)

            layer.dispatcher.combine = recording_combine
        gen = torch.Generator().manual_seed(1)
        x_all, g_all = torch.randn(sum(counts), HIDDEN, generator=gen), torch.randn(sum(counts), HIDDEN, generator=gen)
        ref_out, ref_xgrad = [], []
        for x, g in zip(x_all.split(counts), g_all.split(counts)):
            x = x.clone().requires_grad_(True)
            y = reference(x)
            ((y * g).sum() + reference.aux_loss).backward()
            ref_out.append(y.detach())
            ref_xgrad.append(x.grad)

        dp_rank = manager.rank("dp")
        x = x_all.split(counts)[dp_rank].clone().requires_grad_(True)
        y = layer(x)
        ((y * g_all.split(counts)[dp_rank]).sum() + layer.aux_loss).backward()
        where = f"{name} on rank {dist.get_rank()}"
        assert combine_weights == ([None] if fold else []), f"{where}: the combine weighted the rows again"
        torch.testing.assert_close(y, ref_out[dp_rank], **TOL, msg=lambda m: f"{where}: output: {m}")
        torch.testing.assert_close(x.grad, ref_xgrad[dp_rank], **TOL, msg=lambda m: f"{where}: input grad: {m}")

        ref_params = dict(reference.named_parameters())
        for pname, param in layer.named_parameters():
            grad, shard = param.grad, shard_of(param)
            if pname.startswith("experts."):
                # still DeepSpeed expert parameters; only the FFN slices count as model-parallel in its norm
                assert param.allreduce is False and param.group_name == manager.ep_group_name, pname
                assert getattr(param, "tensor_model_parallel", False) == (pname != "experts.down_proj_bias"), pname
                if shard is not None:
                    grad = gather_tensor(grad, shard, etp_group, etp)
                    full = gather_tensor(param.detach(), shard, etp_group, etp)
                    torch.testing.assert_close(full, ref_params[pname].detach()[layer.local_expert_ids], rtol=0, atol=0)
                dist.all_reduce(grad, group=manager.group("edp"))
                want = ref_params[pname].grad[layer.local_expert_ids]
            else:
                assert_same_over_group(grad, etp_group, etp, f"{where}: the grad of {pname} (etp group)")
                dist.all_reduce(grad, group=manager.group("dp"))
                want = ref_params[pname].grad
            torch.testing.assert_close(grad, want, **TOL, msg=lambda m: f"{where}: grad of {pname}: {m}")

        # the full state dict (per-expert keys) equals the reference's; it loads into a sharded layer, which keeps
        # its own slices
        state, ref_state, full = layer.state_dict(), reference.state_dict(), full_state_dict(layer, manager)
        assert set(full) == set(state) and set(full) <= set(ref_state)
        for key, value in full.items():
            torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0, msg=lambda m: f"{where}: {key}: {m}")
        _, again = moe_layer_pair(config, HIDDEN, FFN, manager)
        with torch.no_grad():
            for param in again.experts.parameters():
                param.zero_()
        again.load_state_dict(full)
        for key, value in again.state_dict().items():
            assert torch.equal(value, state[key]), f"{where}: {key} after loading the full state dict"
        checked.append(name)
    return checked


def _check_inference_and_errors() -> list[str]:
    """tp=2 on 2 ranks: eval on the sort, small-batch and all-experts paths, serving's replicated tokens; the
    refusals (router jitter; an FFN width etp does not divide); etp=1 leaves the experts whole."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(tp=2)
    checked = []
    for name, kwargs in CASES.items():
        reference, layer = moe_layer_pair(MoEConfig(num_experts=EXPERTS, top_k=2, **kwargs), HIDDEN, FFN, manager)
        reference.eval(), layer.eval()
        layer.replicated_tokens = True  # ep=1: the same forward; what serving sets
        for tokens, all_experts in ((1, 0), (3, 0), (4, 64), (40, 0)):  # small-batch, all-experts, sort
            reference.all_experts_tokens = layer.all_experts_tokens = all_experts
            x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                path = layer.inference_path(x, layer.router(x).topk_idx_TK)
                torch.testing.assert_close(layer(x), reference(x), **TOL, msg=lambda m: f"{name}, {path}: {m}")
            checked.append(f"{name}:{path}")
    # etp=1 splits the tokens over the tp ranks instead (tests/distributed/test_moe_token_split_tp.py): experts whole
    whole = MoELayer(MoEConfig(num_experts=EXPERTS), HIDDEN, FFN, groups=ProcessGroupManager(tp=2, etp=1))
    whole.shard_experts_tensor_parallel()
    assert whole.tp_token_slices == 2 and whole.experts.etp_size == 1 and whole.experts.intermediate_size == FFN
    jittery = MoELayer(MoEConfig(num_experts=EXPERTS, router_jitter=0.01), HIDDEN, FFN, groups=manager)
    with pytest.raises(ValueError, match="router_jitter=0.01 with expert tensor parallelism"):
        jittery.shard_experts_tensor_parallel()
    odd = MoELayer(MoEConfig(num_experts=EXPERTS), HIDDEN, 25, groups=manager)
    with pytest.raises(ValueError, match="intermediate size 25 does not split over etp=2"):
        odd.shard_experts_tensor_parallel()
    assert odd.experts.gate_up_proj.shape == (EXPERTS, 50, HIDDEN)  # untouched
    return checked


@pytest.mark.parametrize("world, shape", [(2, dict(tp=2)), (4, dict(tp=2, ep=2))], ids=["tp2", "tp2xep2"])
def test_expert_tensor_parallel_matches_one_process(world, shape):
    results = run_on_ranks(_check_training, world, shape, timeout_s=60)
    assert all(r == list(CASES) for r in results)


@pytest.mark.parametrize("world, shape", [(2, dict(tp=2)), (4, dict(tp=2, ep=2))], ids=["tp2", "tp2xep2"])
def test_expert_tensor_parallel_with_folded_routing_weights_matches_one_process(world, shape):
    """The SwiGLU experts' FFN slices each weight their partial outputs (the all-reduce sums weighted slices) and
    give partial routing-weight gradients, which the etp group sums: outputs and every gradient as the weighted
    combine in one process, the router's gradient the same bits on the etp ranks."""
    results = run_on_ranks(_check_training, world, shape, True, timeout_s=60)
    assert all(r == ["swiglu"] for r in results)


def test_expert_tensor_parallel_inference_paths_and_refusals():
    results = run_on_ranks(_check_inference_and_errors, 2, timeout_s=60)
    paths = {r.split(":")[1] for r in results[0]}
    assert paths == {"small_batch", "all_experts", "None"}, paths


def test_unsharded_layer_is_left_alone():
    from switchyard import MoEConfig
    from switchyard.moe.layer import MoELayer

    layer = MoELayer(MoEConfig(num_experts=EXPERTS, bias=True), HIDDEN, FFN)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.shard_experts_tensor_parallel()
    assert layer.experts.etp_size == 1
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
