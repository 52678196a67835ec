"""switchyard's fused ZeRO step (``zero_step.py``) against DeepSpeed's own ``step`` with torch's AdamW (the oracle), on
two CPU ranks (dp2 × ep2: the dense groups partitioned over two ranks, padding on the last one; the expert groups over
one): the same weights, fp32 masters, moments, step counts and gradient norms after every step, bit for bit, with
weight decay on some groups, a learning-rate schedule, clipping that bites, a step DeepSpeed takes in between (a step
hook on the optimizer) and a last step whose gradients are NaN (skipped in fp32 and at ZeRO-3; in bf16 at ZeRO-1/2,
without the overflow check, DeepSpeed's clip multiplies them by 0, which leaves NaN, and the weights go NaN alike)."""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS, TOKENS, STEPS = 8, 12, 4, 6, 4
NAN_STEP = STEPS - 1  # last: in bf16 at ZeRO-1/2 (no overflow check) its NaN gradients make every weight NaN
HOOKED_STEP = 1  # a step hook makes this step DeepSpeed's: the next fused one must count on from it


def _model(groups, dtype):
    import torch.nn as nn

    from switchyard import MoEConfig
    from switchyard.moe.layer import MoELayer

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(HIDDEN, HIDDEN)
            self.moe = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=2), HIDDEN, FFN, groups=groups)

        def forward(self, x):
            return (self.moe(torch.tanh(self.proj(x))).float() ** 2).mean() + self.moe.aux_loss.float()

    torch.manual_seed(0)
    return Tiny().to(dtype)


def _both_steps(stage: int, dtype_name: str) -> dict[bool, dict]:
    """DeepSpeed's step, then the fused one, in the same ranks (one process group for both engines)."""
    from switchyard import ProcessGroupManager

    manager = ProcessGroupManager(ep=2)
    return {fused: _steps(manager, stage, dtype_name, fused) for fused in (False, True)}


def _steps(manager, stage: int, dtype_name: str, fused: bool) -> dict:
    import switchyard.deepspeed.zero_step as zero_step
    from switchyard.deepspeed import initialize, optimizer_param_groups

    passes = []  # the one pass ran (a step that falls back never calls it)
    one_pass = zero_step.adamw_update_
    zero_step.adamw_update_ = lambda *args: passes.append(1) or one_pass(*args)
    dtype = getattr(torch, dtype_name)
    model = _model(manager, dtype)
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}  # every tensor split
    config = {"train_micro_batch_size_per_gpu": TOKENS, "zero_optimization": zero,
              "gradient_clipping": 1e-2, "steps_per_print": 10**9,
              # the launcher's bf16 configs: no overflow check, so a NaN step is zeroed by the clip at ZeRO-1/2
              "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": False}}
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.1), lr=1e-2, betas=(0.8, 0.9),
                                  foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    engine, *_ = initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                            mpu=manager.mpu, fused_step=fused)
    installed = "step" in vars(engine.optimizer)  # install_fused_step sets it on the instance
    assert installed == fused, f"ZeRO-{stage}: fused step installed: {installed}"
    gen = torch.Generator().manual_seed(7 + manager.rank("dp"))
    trace = []
    for step in range(STEPS):
        x = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
        if step == NAN_STEP:
            x[0, 0] = float("nan")
        engine.backward(engine(x))
        inner = engine.optimizer.optimizer
        hook = inner.register_step_pre_hook(lambda *_: None) if step == HOOKED_STEP else None
        engine.step()  # with a step hook on the optimizer, DeepSpeed's step (torch's AdamW) takes this one
        if hook is not None:
            hook.remove()
        norm = engine.get_global_grad_norm()
        trace.append((_weights(engine, model, stage), float(norm) if norm is not None else None))
    zero_step.adamw_update_ = one_pass
    groups = len(inner.param_groups) if stage < 3 else len(engine.optimizer.fp32_partitioned_groups_flat)
    ran = (STEPS - 1 - (stage == 3 or dtype != torch.bfloat16)) * groups  # not the hooked step, nor a skipped NaN one
    assert len(passes) == (ran if fused else 0), f"ZeRO-{stage} {dtype_name}: {len(passes)} passes, not {ran}"
    states = [{k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()} for state in inner.state.values()]
    return {"trace": trace, "states": states, "lr": [g["lr"] for g in inner.param_groups]}


def _weights(engine, model, stage: int) -> dict[str, torch.Tensor]:
    """What the step wrote: the model's weights (at ZeRO-3 each rank's partition of them) and the fp32 masters."""
    optimizer = engine.optimizer
    if stage == 3:
        weights = {name: p.ds_tensor.detach().clone() for name, p in model.named_parameters()}
        masters = optimizer.fp32_partitioned_groups_flat
    else:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        masters = optimizer.single_partition_of_fp32_groups
    return weights | {f"master {i}": m.detach().clone() for i, m in enumerate(masters)}


@pytest.mark.parametrize("stage,dtype_name", [(1, "float32"), (2, "float32"), (2, "bfloat16"), (3, "bfloat16")])
def test_fused_step_equals_deepspeeds(stage, dtype_name):
    per_rank = run_on_ranks(_both_steps, 2, stage, dtype_name, timeout_s=180)
    for rank, (want, got) in enumerate((both[False], both[True]) for both in per_rank):
        assert got["lr"] == want["lr"]
        for step, ((want_state, want_norm), (got_state, got_norm)) in enumerate(zip(want["trace"], got["trace"])):
            where = f"ZeRO-{stage} {dtype_name} rank {rank} step {step}"
            assert got_norm == want_norm or (got_norm != got_norm and want_norm != want_norm), \
                f"{where}: gradient norm {got_norm} vs DeepSpeed's {want_norm}"
            for key, value in want_state.items():  # bit for bit, NaN where DeepSpeed's is NaN
                torch.testing.assert_close(got_state[key], value, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m, k=key: f"{where}: {k}: {m}")
        first, last = want["trace"][0][0], want["trace"][-1][0]
        assert any(not torch.equal(first[k], last[k]) for k in first), "no parameter moved: nothing was compared"
        assert len(got["states"]) == len(want["states"]) > 0
        for got_state, want_state in zip(got["states"], want["states"]):
            assert got_state.keys() == want_state.keys(), f"optimizer state keys {got_state.keys()}"
            for key, value in want_state.items():
                torch.testing.assert_close(got_state[key], value, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m, k=key: f"rank {rank}: optimizer state {k}: {m}")
                assert got_state[key].device == value.device and got_state[key].dtype == value.dtype, key


def _installed(optimizer_kinds: list[str]) -> dict[str, bool]:
    from switchyard import ProcessGroupManager

    manager = ProcessGroupManager(ep=1)
    return {kind: _installed_for(manager, kind) for kind in optimizer_kinds}


def _installed_for(manager, optimizer_kind: str) -> bool:
    from switchyard.deepspeed import initialize, optimizer_param_groups

    model = _model(manager, torch.float32)
    groups = optimizer_param_groups(model, weight_decay=0.1)
    optimizer = {"adamw": lambda: torch.optim.AdamW(groups), "amsgrad": lambda: torch.optim.AdamW(groups, amsgrad=True),
                 "sgd": lambda: torch.optim.SGD(groups, lr=0.1)}[optimizer_kind]()
    config = {"train_micro_batch_size_per_gpu": TOKENS, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True}
    engine, *_ = initialize(model=model, optimizer=optimizer, config=config, mpu=manager.mpu)
    return "step" in vars(engine.optimizer)


def test_settings_no_step_would_fuse_keep_deepspeeds_step():
    """SGD and AdamW with amsgrad run DeepSpeed's step: the fused one is not installed (nor logged) for them."""
    [got] = run_on_ranks(_installed, 1, ["adamw", "amsgrad", "sgd"], timeout_s=120)
    assert got == {"adamw": True, "amsgrad": False, "sgd": False}, got
