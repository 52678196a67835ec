"""Our rank layout against the two references it claims to follow, for every valid shape of small worlds.

Megatron-Core: ``RankGenerator`` with order ``tp-cp-ep-dp-pp`` (cp = 1), one generator for the dense part (ep = 1)
and one for the experts (tp = etp, dp = edp); re-implemented here from its documented equation, independently
of ``switchyard.parallel.layout``. DeepSpeed: its own group creators, run for each rank against a fake
``torch.distributed``; with etp = tp the one its MoE uses with expert tensor parallelism (from the mpu), with
etp = 1 the one without.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deepspeed.utils import groups as ds_groups

from switchyard.deepspeed import fill_deepspeed_config
from switchyard.parallel import rank_coordinates, rank_layout
from switchyard.parallel.layout import local_expert_ids
from switchyard.parallel.mpu import DeepSpeedMPU

REPO = Path(__file__).resolve().parents[2]


def _shapes(max_world: int):
    """Every (world, tp, pp, ep, etp) the manager accepts, world 1..max_world."""
    for world in range(1, max_world + 1):
        for tp in range(1, world + 1):
            for pp in range(1, world // tp + 1):
                if world % (tp * pp):
                    continue
                dp = world // (tp * pp)
                for etp in sorted({1, tp}):
                    for ep in range(1, tp * dp // etp + 1):
                        if (tp * dp) % (ep * etp) == 0:
                            yield world, tp, pp, ep, etp


def _megatron_groups(world: int, sizes: dict[str, int], kind: str) -> list[list[int]]:
    """Megatron-Core's groups of ``kind``: global = Σ coord·stride over order tp-cp-ep-dp-pp; a group fixes every
    coordinate but ``kind``'s."""
    order = ["tp", "cp", "ep", "dp", "pp"]
    strides, stride = {}, 1
    for axis in order:
        strides[axis] = stride
        stride *= sizes[axis]
    assert stride == world
    others = [a for a in order if a != kind]
    groups = set()
    for rank in range(world):
        base = sum((rank // strides[a]) % sizes[a] * strides[a] for a in others)
        groups.add(tuple(base + i * strides[kind] for i in range(sizes[kind])))
    return sorted(sorted(g) for g in groups)


def test_layout_is_megatron_cores_for_every_shape_up_to_world_64():
    count = 0
    for world, tp, pp, ep, etp in _shapes(64):
        count += 1
        dp = world // (tp * pp)
        dense = {"tp": tp, "cp": 1, "ep": 1, "dp": dp, "pp": pp}
        expert = {"tp": etp, "cp": 1, "ep": ep, "dp": tp * dp // (ep * etp), "pp": pp}
        want = {
            "tp": _megatron_groups(world, dense, "tp"),
            "dp": _megatron_groups(world, dense, "dp"),
            "pp": _megatron_groups(world, dense, "pp"),
            "etp": _megatron_groups(world, expert, "tp"),
            "ep": _megatron_groups(world, expert, "ep"),
            "edp": _megatron_groups(world, expert, "dp"),
        }
        assert rank_layout(world, tp=tp, pp=pp, ep=ep, etp=etp) == want, (world, tp, pp, ep, etp)
    assert count > 4000


def test_expert_data_parallel_group_is_exactly_the_ranks_holding_the_same_experts():
    """What ZeRO partitions expert state over and DeepSpeed sums expert gradients over: the ranks whose expert
    weights are the same tensors (same pipeline stage, same experts, same expert-tensor shard)."""
    for world, tp, pp, ep, etp in _shapes(64):
        coords = rank_coordinates(world, tp=tp, pp=pp, ep=ep, etp=etp)
        holders: dict[tuple, list[int]] = {}
        for rank, c in enumerate(coords):
            experts = tuple(local_expert_ids(2 * ep, ep, c["ep"]))
            holders.setdefault((c["pp"], experts, c["etp"]), []).append(rank)
        layout = rank_layout(world, tp=tp, pp=pp, ep=ep, etp=etp)
        assert sorted(holders.values()) == layout["edp"], (world, tp, pp, ep, etp)
        # and an expert-parallel group holds every expert once per shard: the all-to-all reaches all of them
        for group in layout["ep"]:
            held = sorted(e for r in group for e in local_expert_ids(2 * ep, ep, coords[r]["ep"]))
            assert held == list(range(2 * ep)), (world, tp, pp, ep, etp, group)


class _FakeDist:
    """Just enough of ``deepspeed.comm`` for DeepSpeed's group creators to run as one rank of ``world``."""

    def __init__(self, world: int, rank: int) -> None:
        self.world, self.rank = world, rank

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group=None) -> int:
        return self.world

    def get_rank(self, group=None) -> int:
        return self.rank

    def new_group(self, ranks):
        return tuple(ranks)


class _SizesMPU:
    def __init__(self, tp: int, pp: int, dp: int) -> None:
        self.get_tensor_model_parallel_world_size = lambda: tp
        self.get_model_parallel_world_size = lambda: tp
        self.get_pipeline_model_parallel_world_size = lambda: pp
        self.get_data_parallel_world_size = lambda: dp


def _deepspeeds_groups(monkeypatch, world, tp, pp, ep, etp, rank):
    """The (ep, edp) ranks DeepSpeed's own creator gives ``rank``, in a fresh registry."""
    for registry in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                     "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        monkeypatch.setattr(ds_groups, registry, {})
    monkeypatch.setattr(ds_groups, "dist", _FakeDist(world, rank))
    mpu = _SizesMPU(tp, pp, world // (tp * pp))
    monkeypatch.setattr(ds_groups, "mpu", mpu)
    if etp == tp and tp > 1:  # deepspeed.moe.layer.MoE with enable_expert_tensor_parallelism
        ds_groups._create_expert_data_and_model_parallel(ep, mpu)
    else:  # without it (experts whole on every rank): consecutive ranks per pipeline stage
        ds_groups._create_expert_and_data_parallel(ep)
    name = f"ep_size_{ep}"
    return (sorted(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name]),
            sorted(ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name]))


def test_deepspeeds_own_expert_groups_are_ours_for_every_shape_up_to_world_16(monkeypatch):
    """Registering ours first means DeepSpeed never builds its own; had it built them, they would be the same."""
    monkeypatch.setattr(ds_groups, "log_dist", lambda *args, **kwargs: None)
    for world, tp, pp, ep, etp in _shapes(16):
        layout = rank_layout(world, tp=tp, pp=pp, ep=ep, etp=etp)
        for rank in range(world):
            ep_ranks, edp_ranks = _deepspeeds_groups(monkeypatch, world, tp, pp, ep, etp, rank)
            assert ep_ranks in layout["ep"] and rank in ep_ranks, (world, tp, pp, ep, etp, rank, ep_ranks)
            assert edp_ranks in layout["edp"] and rank in edp_ranks, (world, tp, pp, ep, etp, rank, edp_ranks)


def test_deepspeeds_expert_tensor_parallel_rank_lists_are_ours_up_to_world_64():
    """The pure rank-list generator behind DeepSpeed's etp = tp creator, for the larger worlds."""
    for world, tp, pp, ep, etp in _shapes(64):
        if etp != tp:
            continue
        ep_groups, edp_groups = ds_groups._get_expert_parallel_ranks(world, tp, ep, pp)
        layout = rank_layout(world, tp=tp, pp=pp, ep=ep, etp=etp)
        assert sorted(sorted(g) for g in ep_groups) == layout["ep"], (world, tp, pp, ep)
        assert sorted(sorted(g) for g in edp_groups) == layout["edp"], (world, tp, pp, ep)


# Looked up with hasattr first (Ulysses sequence parallelism), or called on deepspeed.utils.groups, not an mpu
_OPTIONAL = {"get_sequence_parallel_world_size", "get_sequence_parallel_rank", "get_sequence_parallel_group",
             "get_sequence_data_parallel_world_size", "get_sequence_data_parallel_rank",
             "get_sequence_data_parallel_group", "initialize_sequence_parallel", "_init_tp_mesh_device"}


def test_the_mpu_has_every_method_the_installed_deepspeed_calls():
    import deepspeed

    root = Path(deepspeed.__file__).parent
    called = set()
    for path in root.rglob("*.py"):
        called |= set(re.findall(r"\bmpu\.([A-Za-z_]\w*)\(", path.read_text(errors="replace")))
    assert "get_data_parallel_group_ranks" in called and len(called) > 15, sorted(called)
    missing = sorted(name for name in called - _OPTIONAL if not hasattr(DeepSpeedMPU, name))
    assert not missing, f"DeepSpeed {deepspeed.__version__} calls mpu.{missing}, which DeepSpeedMPU lacks"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"expert_parallel": {"enabled": True, "autoep_size": 2}}, "enables AutoEP"),
        ({"tensor_parallel": {"autotp_size": 2}}, "sets tensor_parallel.autotp_size=2"),
        ({"use_data_before_expert_parallelism": True}, "sets use_data_before_expert_parallelism=True"),
    ],
)
def test_deepspeed_settings_that_build_groups_of_their_own_are_refused(tmp_path, extra, message):
    """Each makes DeepSpeed build process groups beside (or instead of) the manager's, or is silently ignored."""
    import json

    base = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**base, **extra}))
    common = dict(micro_batch_size=2, grad_accum=1, dp_size=2, clip=1.0, precision="fp32", ep_size=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        fill_deepspeed_config(path, **common)
    # switched off, they are harmless
    off = {"expert_parallel": {"enabled": False}, "tensor_parallel": {"autotp_size": 1},
           "use_data_before_expert_parallelism": False}
    path.write_text(json.dumps({**base, **off}))
    fill_deepspeed_config(path, **common)
