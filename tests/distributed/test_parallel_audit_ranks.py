"""ProcessGroupManager and DeepSpeed on gloo ranks: after ``deepspeed.initialize(mpu=manager.mpu)`` every group
DeepSpeed reduces or partitions over is the manager's; groups that are not end in an error on every rank; shapes
that do not fit the world fail on every rank before any group exists."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import collect_rank_errors, run_on_ranks

pytestmark = pytest.mark.distributed

SHAPES_4 = [dict(ep=2), dict(ep=4), dict(tp=2, ep=2), dict(tp=2, ep=2, etp=1), dict(tp=2, pp=2)]


def _ranks(group) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


def _toy_engine(manager, mpu=True, **ds_extra):
    """``deepspeed.initialize`` on a dense layer and one expert module tagged with the manager's group name."""
    import deepspeed
    import torch.nn as nn
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from switchyard.parallel.deepspeed_groups import DeepSpeedMoEModule, tag_expert_parameters

    ep = manager.size("ep")

    class Experts(DeepSpeedMoEModule):
        def __init__(self):
            self._init_expert_module(num_experts=ep, ep_size=ep, expert_group_name=manager.ep_group_name)
            self.weight = nn.Parameter(torch.ones(4))
            tag_expert_parameters(self, manager.ep_group_name)

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(4, 4), Experts())
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, **ds_extra}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=0.1), config=config,
                                      mpu=manager.mpu if mpu else None)
    return engine


def _mpu_answers(mpu) -> dict[str, object]:
    """Every getter of the mpu, groups as their rank lists."""
    answers = {}
    for name in dir(mpu):
        if name.startswith("get_"):
            value = getattr(mpu, name)()
            answers[name] = _ranks(value) if isinstance(value, dist.ProcessGroup) else value
    return answers


def _expected_mpu(mine: dict[str, list[int]], rank: int) -> dict[str, object]:
    want = {}
    for prefixes, kind in ((("tensor_model", "slice"), "tp"), (("data",), "dp"),
                           (("pipeline_model", "pipe"), "pp"), (("expert_model",), "ep"),
                           (("expert_data",), "edp"), (("expert_tensor",), "etp")):
        for prefix in prefixes:
            want[f"get_{prefix}_parallel_group"] = mine[kind]
            want[f"get_{prefix}_parallel_rank"] = mine[kind].index(rank)
            want[f"get_{prefix}_parallel_world_size"] = len(mine[kind])
    # DeepSpeed's model-parallel group is one replica of the model, tp × pp (its PipelineParallelGrid's); the rank
    # in it is the tensor-parallel rank (ZeRO counts a replicated parameter on tp rank 0 of every stage)
    want["get_model_parallel_group"] = mine["mp"]
    want["get_model_parallel_world_size"] = len(mine["mp"])
    want["get_model_parallel_rank"] = mine["tp"].index(rank)
    want["get_tensor_model_parallel_src_rank"] = mine["tp"][0]
    want["get_data_parallel_group_ranks"] = mine["dp"]
    return want


def _deepspeed_sees_our_groups(shapes) -> list[str]:
    from deepspeed.utils import groups as ds_groups

    from switchyard import ProcessGroupManager
    from switchyard.parallel import rank_layout
    from switchyard.parallel.layout import rank_coordinates

    rank, wrong = dist.get_rank(), []

    def check(shape, what, got, want):
        if got != want:
            wrong.append(f"rank {rank} {shape} {what}: DeepSpeed/mpu has {got}, switchyard {want}")

    for shape in shapes:
        manager = ProcessGroupManager(**shape)
        mine = {kind: next(g for g in groups if rank in g)
                for kind, groups in rank_layout(dist.get_world_size(), **shape).items()}
        coords = rank_coordinates(dist.get_world_size(), **shape)  # the ranks of this rank's data-parallel replica
        mine["mp"] = [r for r, c in enumerate(coords) if c["dp"] == coords[rank]["dp"]]
        answers = _mpu_answers(manager.mpu)
        for name, want in _expected_mpu(mine, rank).items():
            check(shape, f"mpu.{name}()", answers.get(name), want)
        engine = _toy_engine(manager)
        name = manager.ep_group_name
        check(shape, "dense reduction group", _ranks(engine.data_parallel_group), mine["dp"])
        check(shape, "sequence-data reduction group", _ranks(engine.seq_data_parallel_group), mine["dp"])
        check(shape, "dp_world_size", engine.dp_world_size, len(mine["dp"]))
        check(shape, "mp_world_size", engine.mp_world_size, len(mine["mp"]))
        check(shape, "expert group names", sorted(engine.expert_parallel_group), [name])
        check(shape, "largest expert group", ds_groups._get_max_expert_size_name(), name)
        check(shape, "expert-parallel group", _ranks(engine.expert_parallel_group[name]), mine["ep"])
        check(shape, "expert-data-parallel group", _ranks(engine.expert_data_parallel_group[name]), mine["edp"])
        check(shape, "dense broadcast source", ds_groups._get_broadcast_src_rank(), mine["dp"][0])
        check(shape, "expert broadcast source", ds_groups._get_expert_broadcast_src_rank(name), mine["edp"][0])
        check(shape, "expert tensor parallel size", ds_groups._get_expert_model_parallel_world_size(), len(mine["etp"]))
        zero = engine.optimizer
        for index, group in enumerate(zero.real_dp_process_group):
            kind = "edp" if zero.is_moe_param_group[index] else "dp"
            check(shape, f"ZeRO partition group of param group {index}", _ranks(group), mine[kind])
        check(shape, "ZeRO model-parallel group", _ranks(zero.model_parallel_group), mine["mp"])
    return wrong


def test_deepspeed_reduces_and_partitions_over_exactly_our_groups():
    for wrong in run_on_ranks(_deepspeed_sees_our_groups, 4, SHAPES_4, timeout_s=240):
        assert not wrong, "\n".join(wrong)


def _engine_with_groups_not_ours(case: str) -> None:
    from deepspeed.utils import groups as ds_groups

    from switchyard import ProcessGroupManager

    if case == "no mpu":  # DeepSpeed's data-parallel group is then the world, ours one rank per tp group
        _toy_engine(ProcessGroupManager(tp=2), mpu=False)
    elif case == "data before expert":
        _toy_engine(ProcessGroupManager(ep=2), use_data_before_expert_parallelism=True)
    else:  # an expert group DeepSpeed built itself, as a deepspeed.moe.layer.MoE(ep_size=1) or AutoEP would
        import deepspeed

        manager = ProcessGroupManager(ep=2)
        deepspeed.init_distributed()  # joins the world already there
        ds_groups._create_expert_and_data_parallel(1)
        _toy_engine(manager)


@pytest.mark.parametrize("case, message", [
    ("no mpu", "DeepSpeed reduces dense gradients of rank"),
    ("data before expert", "use_data_before_expert_parallelism=true"),
    ("foreign expert group", "DeepSpeed holds expert groups ['ep_size_1'] beside switchyard's ['ep_size_2']"),
])
def test_deepspeed_groups_that_are_not_ours_raise_on_every_rank(case, message):
    errors = collect_rank_errors(_engine_with_groups_not_ours, 2, case, timeout_s=120)
    assert all(e is not None and message in e for e in errors), errors


BAD_SHAPES_4 = [
    (dict(tp=3), "world size 4 is not divisible by tp*pp = 3*1 = 3"),
    (dict(tp=2, pp=3), "world size 4 is not divisible by tp*pp = 2*3 = 6"),
    (dict(ep=3), "ep*etp = 3*1 = 3 does not divide tp*dp = 1*4 = 4"),
    (dict(tp=2, ep=4), "ep*etp = 4*2 = 8 does not divide tp*dp = 2*2 = 4"),
    (dict(tp=2, pp=2, ep=4, etp=1), "ep*etp = 4*1 = 4 does not divide tp*dp = 2*1 = 2"),
]


def _bad_shapes_before_any_group() -> list[str]:
    """Each shape's error on this rank, with ``new_group`` replaced by a trap: no group may be built first."""
    from switchyard import ProcessGroupManager

    def trap(*args, **kwargs):
        raise AssertionError("new_group called before the shape was validated")

    real, dist.new_group = dist.new_group, trap
    messages = []
    try:
        for shape, _ in BAD_SHAPES_4:
            try:
                ProcessGroupManager(**shape)
                messages.append(f"{shape}: built")
            except ValueError as err:
                messages.append(str(err))
    finally:
        dist.new_group = real
    return messages


def test_shapes_that_do_not_fit_fail_on_every_rank_before_any_group():
    for messages in run_on_ranks(_bad_shapes_before_any_group, 4, timeout_s=120):
        for (shape, want), got in zip(BAD_SHAPES_4, messages):
            assert want in got, (shape, got)


def _etp_said_two_ways() -> list[int]:
    from switchyard import ProcessGroupManager

    manager = ProcessGroupManager(tp=2, ep=1, etp=None if dist.get_rank() == 0 else 2)
    return manager.ranks("etp")


def test_etp_left_default_on_one_rank_and_written_out_on_another_is_one_setting():
    assert run_on_ranks(_etp_said_two_ways, 2, timeout_s=60) == [[0, 1], [0, 1]]
