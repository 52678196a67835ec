"""MoELayer.cuda_graph under DeepSpeed's engine: ZeRO 0, 1 and 2 with gradient accumulation on 2 data-parallel
ranks give the same parameters as the eager layer. The graphs are the CPU stand-in of tests/emulated_graph.py,
whose forward replays poison the gradient buffers, so what is tested is how the replayed gradients reach
DeepSpeed's hooks and buffers (handed over without a copy, accumulated over micro-batches, reduced)."""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS, TOKENS, LR, STEPS, ACCUM = 8, 12, 4, 6, 0.1, 3, 2


def _train(stages: list[int]) -> dict[bool, dict[int, dict[str, torch.Tensor]]]:
    """{graph: {stage: parameters}}: every stage eager, then every stage graphed, in one launch (the emulated
    graphs are routed in after the eager runs, which never see them)."""
    import deepspeed
    import torch.nn as nn
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from emulated_graph import use_emulated_graphs
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(ep=1)
    dp_rank = manager.rank("dp")

    class Tiny(nn.Module):
        def __init__(self, graph: bool) -> None:
            super().__init__()
            self.proj = nn.Linear(HIDDEN, HIDDEN)
            self.moe = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=2, num_shared_experts=1, aux_loss_coef=0.01),
                                HIDDEN, FFN, groups=manager)
            self.moe.cuda_graph = graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.moe(torch.tanh(self.proj(x))) ** 2).mean() + self.moe.aux_loss

    batches = torch.randn(STEPS, ACCUM, manager.size("dp"), TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3))
    out: dict[bool, dict[int, dict[str, torch.Tensor]]] = {}
    for graph in (False, True):
        if graph:
            use_emulated_graphs()
        out[graph] = {}
        for stage in stages:
            torch.manual_seed(0)
            model = Tiny(graph)
            groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                           "name": "p"})
            config = {"train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": ACCUM,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "gradient_clipping": 0.0, "steps_per_print": 10**9}
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=LR), config=config,
                                              mpu=manager.mpu)
            for step in range(STEPS):
                for micro in range(ACCUM):
                    engine.backward(engine(batches[step, micro, dp_rank]))
                    engine.step()
            assert (model.moe._graph is not None) == graph
            out[graph][stage] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def test_zero_steps_with_accumulation_match_eager():
    stages = [0, 1, 2]
    for rank, by_graph in enumerate(run_on_ranks(_train, 2, stages, timeout_s=300)):
        want_by_stage, got_by_stage = by_graph[False], by_graph[True]
        for stage in stages:
            for key, want in want_by_stage[stage].items():
                torch.testing.assert_close(got_by_stage[stage][key], want, atol=1e-6, rtol=1e-6,
                                           msg=f"ZeRO-{stage} rank {rank}: {key}")
