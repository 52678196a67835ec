import pytest

from switchyard.parallel import rank_coordinates, rank_layout
from switchyard.parallel.layout import local_expert_ids


def test_worked_example_world8_tp2_ep2():
    layout = rank_layout(8, tp=2, ep=2)
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["pp"] == [[r] for r in range(8)]


def test_worked_example_world8_tp2_ep4_etp1():
    layout = rank_layout(8, tp=2, ep=4, etp=1)
    assert layout["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["etp"] == [[r] for r in range(8)]


def test_pipeline_world8_tp2_pp2_ep2():
    layout = rank_layout(8, tp=2, pp=2, ep=2)
    assert layout["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # ep folds into dp inside each stage; with etp=tp=2 and dp=2 every dp group is one ep group
    assert layout["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["edp"] == [[0], [1], [2], [3], [4], [5], [6], [7]]


def test_pipeline_world8_pp2_ep2_etp1_folds_into_tp():
    layout = rank_layout(8, tp=2, pp=2, ep=2, etp=1)
    assert layout["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_plain_dp_ep():
    layout = rank_layout(4, ep=2)
    assert layout["dp"] == [[0, 1, 2, 3]]
    assert layout["ep"] == [[0, 1], [2, 3]]
    assert layout["edp"] == [[0, 2], [1, 3]]


def _shapes(world):
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for etp in sorted({1, tp}):
                for ep in range(1, tp * dp + 1):
                    if (tp * dp) % (ep * etp) == 0:
                        yield tp, pp, ep, etp


@pytest.mark.parametrize("world", range(1, 9))
def test_every_shape_is_a_partition_and_matches_the_formulas(world):
    """For every valid shape: each kind partitions the world, sizes multiply out, and each rank's
    coordinates reproduce its global rank through both decompositions."""
    count = 0
    for tp, pp, ep, etp in _shapes(world):
        count += 1
        layout = rank_layout(world, tp=tp, pp=pp, ep=ep, etp=etp)
        dp = world // (tp * pp)
        edp = tp * dp // (ep * etp)
        expected_size = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "edp": edp, "etp": etp}
        for kind, groups in layout.items():
            assert sorted(r for g in groups for r in g) == list(range(world)), (kind, tp, pp, ep, etp)
            assert all(len(g) == expected_size[kind] for g in groups), (kind, groups)
        for rank, c in enumerate(rank_coordinates(world, tp=tp, pp=pp, ep=ep, etp=etp)):
            assert rank == c["tp"] + tp * (c["dp"] + dp * c["pp"])
            assert rank == c["etp"] + etp * (c["ep"] + ep * (c["edp"] + edp * c["pp"]))
        # expert-parallel peers never cross a pipeline stage
        stage_of = {r: c["pp"] for r, c in enumerate(rank_coordinates(world, tp=tp, pp=pp, ep=ep, etp=etp))}
        for group in layout["ep"] + layout["edp"]:
            assert len({stage_of[r] for r in group}) == 1
    assert count >= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=6, tp=4), "not divisible by tp\\*pp = 4\\*1 = 4"),
        (dict(world_size=8, tp=2, ep=8), "ep\\*etp = 8\\*2 = 16 does not divide tp\\*dp = 2\\*4 = 8"),
        (dict(world_size=8, tp=4, etp=2), "etp=2 is not supported with tp=4"),
        (dict(world_size=4, ep=0), "ep must be a positive integer, got 0"),
        (dict(world_size=0), "world_size must be a positive integer"),
    ],
)
def test_bad_shapes_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_layout(**kwargs)


def test_local_expert_ids_contiguous_blocks():
    assert local_expert_ids(8, 4, 0) == [0, 1]
    assert local_expert_ids(8, 4, 3) == [6, 7]
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by ep=4"):
        local_expert_ids(6, 4, 0)
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match=f"num_experts must be a positive integer, got {bad!r}"):
            local_expert_ids(bad, 2, 0)


def test_cli_layout_refuses_a_non_positive_expert_count(capsys):
    from switchyard.cli import main

    for extra in ([], ["--json"]):
        with pytest.raises(SystemExit) as exit_info:  # refused by the argument parser, before any layout
            main(["layout", "--world", "8", "--ep", "2", "--num-experts", "0", *extra])
        assert exit_info.value.code == 2
        assert "argument --num-experts: expected a positive integer, got '0'" in capsys.readouterr().err
