"""switchyard's fused ZeRO-1/2 gradient norm against DeepSpeed's own ``get_grad_norm_direct`` (the oracle), on the
same gradients and the same optimizer state, over two CPU ranks: ZeRO's padding, pipeline-replicated parameters and
model-parallel duplicates are left out alike, and the squares are summed over the data-parallel group alike."""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed


def _norms() -> dict[int, tuple[float, float]]:
    import types

    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from switchyard.deepspeed.grad_norm import fused_grad_norm_direct

    deepspeed.init_distributed()  # joins the world already there
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(10 + rank)  # every rank its own gradients: the dp sum matters
    grads = [torch.randn(shape, generator=gen).to(dtype) for shape, dtype in
             [((64, 32), torch.bfloat16), ((1000,), torch.float32), ((7, 3), torch.bfloat16), ((5,), torch.float32),
              ((9,), torch.float32)]]
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    params[2].ds_pipe_replicated = True  # counted on another stage
    params[3].model_parallel = True  # a tensor-parallel shard: counted on every model-parallel rank
    padding = torch.full((4,), 1e3)
    padding._zero_padding = True  # ZeRO's alignment padding: never counted
    gradients = grads[:2] + [padding] + grads[2:]
    out = {}
    for model_parallel_rank in (0, 1):  # 1: only the model-parallel parameter counts
        optimizer = types.SimpleNamespace(model_parallel_rank=model_parallel_rank, device="cpu",
                                          dp_process_group=dist.group.WORLD, model_parallel_group=None)
        optimizer._model_parallel_all_reduce = types.MethodType(DeepSpeedZeroOptimizer._model_parallel_all_reduce,
                                                                optimizer)
        want = DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, gradients, params)
        got = fused_grad_norm_direct(optimizer, gradients, params)
        out[model_parallel_rank] = (float(got), float(want))
    return out


def test_fused_norm_equals_deepspeeds():
    results = run_on_ranks(_norms, 2, timeout_s=120)
    for rank, norms in enumerate(results):
        for model_parallel_rank, (got, want) in norms.items():
            assert want > 0 and got == pytest.approx(want, rel=1e-6), \
                f"rank {rank}, model-parallel rank {model_parallel_rank}: fused {got} vs DeepSpeed's {want}"
    for key in results[0]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), "the ranks' norms differ: no dp sum"


def _stage3_norms() -> dict[tuple[int, str], tuple[float, float]]:
    """ZeRO-3: a dense sub-group partitioned over the data-parallel group, and an expert sub-group placed as
    ``prepare_for_zero3`` places switchyard's experts (summed over the expert-parallel group too)."""
    import types

    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.deepspeed.grad_norm import fused_grad_norm_direct_stage3
    from switchyard.deepspeed.zero3 import prepare_for_zero3
    from switchyard.moe.layer import MoELayer

    deepspeed.init_distributed()  # joins the world already there
    manager = ProcessGroupManager(ep=2)  # registers the expert groups with DeepSpeed
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2), 8, 12, groups=manager)
    assert prepare_for_zero3(layer) > 0
    gen = torch.Generator().manual_seed(20 + dist.get_rank())
    experts = [p for p in layer.parameters() if getattr(p, "ds_zero_placement_family", None) == "autoep_expert"]
    dense = [p for p in layer.parameters() if all(p is not e for e in experts)] + [torch.nn.Parameter(torch.empty(6))]
    dense[-1].model_parallel = True
    for param in experts:
        param.ds_process_group = param.ds_zero_partition_process_group  # what zero.Init sets from the placement
    out = {}
    for model_parallel_rank in (0, 1):  # 1: only the model-parallel parameter counts
        optimizer = types.SimpleNamespace(model_parallel_rank=model_parallel_rank, device="cpu",
                                          dp_process_group=dist.group.WORLD, model_parallel_group=None,
                                          _partition_group_spans_model_parallel={}, _global_ranks=Stage3._global_ranks)
        for name in ("_assert_same_partition_group", "_get_param_partition_group", "_grad_norm_counts_every_rank",
                     "_autoep_expert_parallel_group", "_model_parallel_all_reduce"):
            setattr(optimizer, name, types.MethodType(getattr(Stage3, name), optimizer))
        for kind, params in (("dense", dense), ("experts", experts)):
            gradients = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
            want = Stage3.get_grad_norm_direct(optimizer, gradients, params)
            got = fused_grad_norm_direct_stage3(optimizer, gradients, params)
            out[(model_parallel_rank, kind)] = (float(got), float(want))
    return out


def test_fused_stage3_norm_equals_deepspeeds():
    results = run_on_ranks(_stage3_norms, 2, timeout_s=120)
    for rank, norms in enumerate(results):
        for (model_parallel_rank, kind), (got, want) in norms.items():
            counted = model_parallel_rank == 0 or kind == "dense"  # the dense group holds a model-parallel param
            assert (want > 0) == counted and got == pytest.approx(want, rel=1e-6), \
                f"rank {rank}, model-parallel rank {model_parallel_rank}, {kind}: fused {got} vs DeepSpeed's {want}"
    for key in results[0]:  # summed over the partition group, and the experts over the expert-parallel group too
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), f"{key}: the ranks' norms differ"
