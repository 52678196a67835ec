"""switchyard's fused ZeRO-1/2 gradient norm against DeepSpeed's own ``get_grad_norm_direct`` (the oracle), on the
same gradients and the same optimizer state, over two CPU ranks: ZeRO's padding, pipeline-replicated parameters and
model-parallel duplicates are left out alike, and the squares are summed over the data-parallel group alike."""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed


def _norms(model_parallel_rank: int) -> tuple[float, float]:
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
    optimizer = types.SimpleNamespace(model_parallel_rank=model_parallel_rank, device="cpu",
                                      dp_process_group=dist.group.WORLD, model_parallel_group=None)
    optimizer._model_parallel_all_reduce = types.MethodType(DeepSpeedZeroOptimizer._model_parallel_all_reduce, optimizer)
    want = DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, gradients, params)
    got = fused_grad_norm_direct(optimizer, gradients, params)
    return float(got), float(want)


@pytest.mark.parametrize("model_parallel_rank", [0, 1])
def test_fused_norm_equals_deepspeeds(model_parallel_rank):
    results = run_on_ranks(_norms, 2, model_parallel_rank, timeout_s=120)
    for rank, (got, want) in enumerate(results):
        assert want > 0 and got == pytest.approx(want, rel=1e-6), f"rank {rank}: fused {got} vs DeepSpeed's {want}"
    assert results[0] == pytest.approx(results[1], rel=1e-6), "the ranks' norms differ: no data-parallel sum"
