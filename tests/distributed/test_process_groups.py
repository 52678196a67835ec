"""ProcessGroupManager on real gloo ranks: groups, DeepSpeed's engine with our mpu, mismatch errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import collect_rank_errors, run_on_ranks

pytestmark = pytest.mark.distributed

SHAPES_4 = [dict(ep=2), dict(ep=4), dict(tp=2, ep=2), dict(tp=2, ep=2, etp=1), dict(pp=2, ep=2), dict(tp=2, pp=2)]


def _allreduce_every_group(shapes):
    from switchyard import ProcessGroupManager
    from switchyard.parallel import rank_layout

    rank = dist.get_rank()
    for shape in shapes:
        manager = ProcessGroupManager(**shape)
        layout = rank_layout(dist.get_world_size(), **shape)
        for kind, groups in layout.items():
            (mine,) = [g for g in groups if rank in g]
            assert manager.ranks(kind) == mine, (shape, kind)
            assert manager.size(kind) == len(mine) and manager.rank(kind) == mine.index(rank)
            value = torch.tensor([float(rank + 1)])
            dist.all_reduce(value, group=manager.group(kind))
            assert value.item() == sum(r + 1 for r in mine), (shape, kind, value.item(), mine)
        mpu = manager.mpu
        assert mpu.get_data_parallel_world_size() == manager.size("dp")
        assert mpu.get_tensor_model_parallel_rank() == manager.rank("tp")
        assert mpu.get_pipeline_model_parallel_world_size() == manager.size("pp")
        assert mpu.get_tensor_model_parallel_src_rank() == manager.ranks("tp")[0]
    return True


def test_every_group_all_reduces_over_exactly_its_ranks():
    assert run_on_ranks(_allreduce_every_group, 4, SHAPES_4, timeout_s=120) == [True] * 4


def _register_with_deepspeed(shape):
    from deepspeed.utils import groups as ds_groups

    from switchyard import ProcessGroupManager

    manager = ProcessGroupManager(**shape)
    name = manager.ep_group_name
    assert ds_groups._get_expert_parallel_group(name) is manager.group("ep")
    assert ds_groups._get_expert_data_parallel_group(name) is manager.group("edp")
    assert list(ds_groups._get_expert_data_parallel_group_ranks(name)) == manager.ranks("edp")
    return name


def test_expert_groups_are_registered_under_deepspeeds_names():
    assert run_on_ranks(_register_with_deepspeed, 4, dict(tp=2, ep=2), timeout_s=120) == ["ep_size_2"] * 4


# --- DeepSpeed engine: ZeRO-2 step with our mpu, compared with one process on the global batch -----

ROWS_PER_RANK, HIDDEN, LR, MAX_NORM = 6, 4, 0.5, 1.0


def _global_inputs(num_batches: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(num_batches, ROWS_PER_RANK, HIDDEN, generator=gen)


def _initial_params(ep: int):
    gen = torch.Generator().manual_seed(99)
    dense_w = torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.5
    expert_w = torch.randn(ep, HIDDEN, generator=gen) + 1.0  # one elementwise "expert" per EP rank
    return dense_w, expert_w


def _reference_step(dp: int, ep: int):
    """One process, the whole global batch: loss = mean over data-parallel batches (what DP means)."""
    dense_w, expert_w = (p.clone().requires_grad_(True) for p in _initial_params(ep))
    x = _global_inputs(dp)
    losses = []
    for b in range(dp):
        h = x[b] @ dense_w.T
        expert_of_row = torch.arange(ROWS_PER_RANK) % ep
        y = h * expert_w[expert_of_row]
        losses.append((y**2).mean())
    torch.stack(losses).mean().backward()
    # DeepSpeed clips by the global norm over dense and expert gradients: a check that it sums the
    # expert part over the right groups too
    norm = torch.cat([dense_w.grad.flatten(), expert_w.grad.flatten()]).norm()
    scale = min(1.0, MAX_NORM / (norm.item() + 1e-6))
    assert scale < 1.0, "the test batch should be large enough to exercise clipping"
    return dense_w - LR * scale * dense_w.grad, expert_w - LR * scale * expert_w.grad


def _engine_step(shape):
    import deepspeed
    import torch.nn as nn
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from switchyard import ProcessGroupManager
    from switchyard.parallel import all_to_all
    from switchyard.parallel.deepspeed_groups import DeepSpeedMoEModule, tag_expert_parameters

    manager = ProcessGroupManager(**shape)
    ep, ep_rank, dp = manager.size("ep"), manager.rank("ep"), manager.size("dp")

    class OneExpertPerRank(DeepSpeedMoEModule):
        def __init__(self, weight):
            self._init_expert_module(num_experts=ep, ep_size=ep, expert_group_name=manager.ep_group_name)
            self.weight = nn.Parameter(weight.clone())
            tag_expert_parameters(self, manager.ep_group_name)

        def forward(self, h):
            # row i goes to expert i % ep, i.e. to EP rank i % ep; send, scale, send back
            order = torch.argsort(torch.arange(h.shape[0]) % ep, stable=True)
            send = [int(((torch.arange(h.shape[0]) % ep) == r).sum()) for r in range(ep)]
            counts = torch.tensor(send)
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=manager.group("ep"))
            recv = recv_counts.tolist()
            arrived = all_to_all(h[order], recv, send, manager.group("ep"))
            back = all_to_all(arrived * self.weight, send, recv, manager.group("ep"))
            out = torch.empty_like(back)
            out[order] = back
            return out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            dense_w, expert_w = _initial_params(ep)
            self.dense = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.dense.weight.data.copy_(dense_w)
            self.moe = OneExpertPerRank(expert_w[ep_rank])

        def forward(self, x):
            return (self.moe(self.dense(x)) ** 2).mean()

    model = Model()
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "all"}
    )
    optimizer = torch.optim.SGD(groups, lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": ROWS_PER_RANK,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": MAX_NORM,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=manager.mpu)
    assert engine.has_moe_layers
    x = _global_inputs(dp)[manager.rank("dp")]  # every rank of one tp group sees the same batch
    loss = engine(x)
    engine.backward(loss)
    engine.step()
    return {"dense": model.dense.weight.detach().clone(), "expert": model.moe.weight.detach().clone(),
            "ep_rank": ep_rank, "dp": dp}


@pytest.mark.parametrize("shape", [dict(ep=2), dict(tp=2, ep=2)], ids=["dp2xep2", "tp2xep2"])
def test_deepspeed_zero2_step_matches_one_process(shape):
    results = run_on_ranks(_engine_step, 4, shape, timeout_s=240)
    dp = results[0]["dp"]
    ep = shape["ep"]
    want_dense, want_expert = _reference_step(dp, ep)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["dense"], want_dense, msg=f"dense weight on rank {rank}")
        torch.testing.assert_close(res["expert"], want_expert[res["ep_rank"]], msg=f"expert weight on rank {rank}")


def _mismatched_settings():
    from switchyard import ProcessGroupManager

    ep = 4 if dist.get_rank() == 1 else 2
    ProcessGroupManager(ep=ep)


def test_mismatched_settings_raise_on_every_rank_within_seconds():
    import time

    start = time.monotonic()
    errors = collect_rank_errors(_mismatched_settings, 4, timeout_s=60)
    assert all(e is not None and "different parallel settings" in e for e in errors), errors
    assert "rank 1: tp=1, pp=1, ep=4" in errors[0]
    assert time.monotonic() - start < 60


def _not_an_int_on_one_rank():
    from switchyard import ProcessGroupManager

    ProcessGroupManager(ep="2" if dist.get_rank() == 0 else 2)


def _not_an_int_everywhere():
    from switchyard import ProcessGroupManager

    ProcessGroupManager(tp="2")


def test_settings_that_are_not_integers_raise_on_every_rank_within_seconds():
    import time

    start = time.monotonic()
    errors = collect_rank_errors(_not_an_int_on_one_rank, 2, timeout_s=60)
    assert all(e is not None and "rank 0: tp=1, pp=1, ep=<not an integer>" in e for e in errors), errors
    errors = collect_rank_errors(_not_an_int_everywhere, 2, timeout_s=60)
    assert all(e is not None and "tp must be a positive integer, got '2'" in e for e in errors), errors
    assert time.monotonic() - start < 60


def _invalid_everywhere():
    from switchyard import ProcessGroupManager

    ProcessGroupManager(ep=3)


def test_invalid_settings_raise_before_any_group():
    errors = collect_rank_errors(_invalid_everywhere, 4, timeout_s=60)
    assert all(e is not None and "ep*etp = 3*1 = 3 does not divide tp*dp = 1*4 = 4" in e for e in errors), errors


def _second_manager_replaces_the_first():
    from deepspeed.utils import groups as ds_groups

    from switchyard import ProcessGroupManager

    ProcessGroupManager(ep=4)
    manager = ProcessGroupManager(ep=2)
    # DeepSpeed picks the largest registered ep group for its overflow check and for which ranks write
    # checkpoint files: a stale ep_size_4 from the first manager would be chosen over ours
    return (sorted(ds_groups._EXPERT_PARALLEL_GROUP), sorted(ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS),
            ds_groups._get_max_expert_size_name(), manager.ep_group_name)


def test_a_new_manager_replaces_the_previous_managers_deepspeed_groups():
    for keys, rank_keys, largest, ours in run_on_ranks(_second_manager_replaces_the_first, 4, timeout_s=120):
        assert keys == rank_keys == ["ep_size_2"] and largest == ours == "ep_size_2", (keys, rank_keys, largest)
