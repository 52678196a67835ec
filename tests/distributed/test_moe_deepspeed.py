"""DeepSpeed's engine with switchyard MoE layers: it sees them as MoE, reduces expert gradients over our
expert-data-parallel group, and one ZeRO step equals the single-process step on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS, TOKENS, LR = 8, 12, 4, 6, 0.1


def _model(groups):
    import torch.nn as nn

    from switchyard import MoEConfig
    from switchyard.moe.layer import MoELayer

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(HIDDEN, HIDDEN)
            self.moe = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=2, num_shared_experts=1), HIDDEN, FFN, groups=groups)

        def forward(self, x):
            h = self.moe(torch.tanh(self.proj(x)))
            return (h**2).mean() + self.moe.aux_loss

    torch.manual_seed(0)
    return Tiny()


def _batches(dp):
    return torch.randn(dp, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))


def _reference(dp):
    model = _model(None)
    loss = torch.stack([model(b) for b in _batches(dp)]).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _zero_steps(stages):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from switchyard import ProcessGroupManager

    manager = ProcessGroupManager(ep=2)
    dp = manager.size("dp")
    out = {}
    for stage in stages:
        model = _model(manager)
        reference_sd = _model(None).state_dict()
        model.load_state_dict(reference_sd)  # experts resharded from global ids
        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
        config = {
            "train_micro_batch_size_per_gpu": TOKENS,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=LR), config=config,
                                          mpu=manager.mpu)
        assert engine.has_moe_layers and engine.num_experts == [EXPERTS]
        loss = engine(_batches(dp)[manager.rank("dp")])
        engine.backward(loss)
        engine.step()
        out[stage] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def test_zero_steps_match_single_process_on_global_batch():
    stages = [0, 1, 2]
    results = run_on_ranks(_zero_steps, 4, stages, timeout_s=300)
    want = _reference(4)
    # the reference state dict is in global expert ids too: each rank's local experts are keys of it
    for rank, per_stage in enumerate(results):
        for stage, state in per_stage.items():
            for key, value in state.items():
                torch.testing.assert_close(value, want[key], atol=1e-5, rtol=1e-5,
                                           msg=f"ZeRO-{stage} rank {rank}: {key}")
