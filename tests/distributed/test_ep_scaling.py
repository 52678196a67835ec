"""benchmarks/ep_scaling.py: its cost model against hand-computed bytes, and its logic on 4 gloo ranks
(AutoEP's layer at autoep_size = EP included).

The byte counts the benchmark reports are checked against an independent oracle: a spy on the
dispatcher's all-to-all that counts the off-rank rows it really hands to torch.distributed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch.distributed as dist

from harness import REPO_ROOT, load_script, run_on_ranks

pytestmark = pytest.mark.distributed

BENCH_PATH = REPO_ROOT / "benchmarks" / "ep_scaling.py"


def _load_benchmark() -> ModuleType:
    if "ep_scaling_bench" in sys.modules:
        return sys.modules["ep_scaling_bench"]
    return load_script(BENCH_PATH, "ep_scaling_bench")


def test_cost_model_matches_hand_computed_bytes() -> None:
    bench = _load_benchmark()
    # mixtral, EP=2, 8192 tokens, bf16: half the 8192*2 copies of 4096*2 bytes leave the rank
    m = bench.cost_model(bench.SHAPES["mixtral_8x7b"], tokens=8192, ep=2, bytes_per_elem=2)
    assert m["dispatch_bytes"] == 67_108_864
    assert m["forward_bytes"] == 134_217_728
    assert m["fwd_bwd_bytes"] == 268_435_456
    assert m["counts_bytes"] == 2 * 4 * 8
    assert m["weights_bytes"] == 8192 * 2 * 4 / 2  # the folded routing weights: one fp32 per copy that leaves
    # olmoe, EP=8: 8192*8*2048*2 * 7/8
    o = bench.cost_model(bench.SHAPES["olmoe"], tokens=8192, ep=8, bytes_per_elem=2)
    assert o["dispatch_bytes"] == 234_881_024 and o["fwd_bwd_bytes"] == 4 * 234_881_024
    assert o["counts_bytes"] == 8 * 8 * 8
    # qwen3, EP=64, 100 tokens, fp32: 100*8*2048*4 * 63/64
    q = bench.cost_model(bench.SHAPES["qwen3_30b_a3b"], tokens=100, ep=64, bytes_per_elem=4)
    assert math.isclose(q["dispatch_bytes"], 6_451_200) and q["counts_bytes"] == 64 * 2 * 8
    rows = bench.cost_table(8192, 2)
    assert [(r["shape"], r["ep"]) for r in rows if r["shape"] == "mixtral_8x7b"] == [
        ("mixtral_8x7b", 2), ("mixtral_8x7b", 4), ("mixtral_8x7b", 8)]  # EP must divide 8 experts
    assert len(rows) == 3 + 6 + 6


def test_cost_model_only_needs_no_process_group(capsys) -> None:
    assert _load_benchmark().run(["--cost-model-only"]) == {}
    out = capsys.readouterr().out
    assert "qwen3_30b_a3b" in out and "1,057.0" in out  # olmoe/qwen3 fwd+bwd MB at EP=64
    assert not dist.is_initialized()


def test_refuses_to_overwrite_committed_results_with_cpu_numbers() -> None:
    with pytest.raises(SystemExit):
        _load_benchmark().parse_args(["--tiny", "--out", str(REPO_ROOT / "benchmarks/results/ep_scaling.json")])


def _run_with_spy(argv: list[str]) -> tuple[dict, list[tuple[int, int]], str | None]:
    """Run the benchmark, recording (group size, off-rank bytes sent) of every dispatcher all-to-all;
    then run it again with combine broken on rank 1 only and return the guard's error on this rank."""
    import switchyard.moe.dispatcher as dispatcher_mod

    bench = _load_benchmark()
    original = dispatcher_mod.all_to_all
    calls: list[tuple[int, int]] = []

    def spy(x, output_splits, input_splits, group=None):
        size = dist.get_world_size(group)
        if size > 1:
            me = dist.get_rank(group)
            row_bytes = math.prod(x.shape[1:]) * x.element_size()
            calls.append((size, (sum(input_splits) - input_splits[me]) * row_bytes))
        return original(x, output_splits, input_splits, group)

    dispatcher_mod.all_to_all = spy
    try:
        results = bench.run(argv)
    finally:
        dispatcher_mod.all_to_all = original
    # the round-trip guard: one rank's wrong combine must stop every rank before timing
    combine = dispatcher_mod.TokenDispatcher.combine
    if dist.get_rank() == 1:
        dispatcher_mod.TokenDispatcher.combine = lambda self, *a: combine(self, *a) * 1.5
    try:
        bench.run(["--tiny", "--shape", "olmoe", "--ep-sizes", "2", "--out", argv[argv.index("--out") + 1]])
        guard_error = None
    except RuntimeError as exc:
        guard_error = str(exc)
    finally:
        dispatcher_mod.TokenDispatcher.combine = combine
    return results, calls, guard_error


def test_benchmark_on_four_gloo_ranks(tmp_path: Path) -> None:
    out = tmp_path / "ep.json"
    argv = ["--tiny", "--shape", "olmoe", "--ep-sizes", "2", "4", "--out", str(out)]
    per_rank = run_on_ranks(_run_with_spy, 4, argv, timeout_s=60)
    for rank, (results, calls, guard_error) in enumerate(per_rank):
        assert guard_error is not None and "round trip is wrong on ranks [1]" in guard_error, guard_error
        assert list(results) == ["olmoe"] and list(results["olmoe"]) == [2, 4]
        for ep, entry in results["olmoe"].items():
            for key in ("dispatcher_ms", "raw_a2a_ms", "layer_ms", "tokens_per_s", "dispatcher_gbps", "raw_a2a_gbps",
                        "autoep_layer_ms"):
                assert entry[key] > 0, (ep, key, entry[key])
            assert math.isclose(entry["vs_autoep"], entry["autoep_layer_ms"] / entry["layer_ms"])
            assert entry["local_experts"] == 64 // ep and len(entry["rank_input_splits"]) == ep
            # the bytes reported == the off-rank bytes the dispatcher really sent (dispatch + combine)
            sent = [b for size, b in calls if size == ep]
            assert len(sent) >= 2 + 2 * 2, sent  # guard's dispatch+combine, timed steps, layer forwards
            assert entry["rank_bytes_sent"] == sent[0] + sent[1]
            assert set(sent) <= {sent[0], sent[1]}  # every timed call moved the same bytes
            assert entry["bytes_sent_per_rank"][rank] == entry["rank_bytes_sent"]
            assert len(entry["layer_ms_per_rank"]) == 4
            assert math.isclose(entry["tokens_per_s"], 4 * 64 / (entry["layer_ms"] * 1e-3))
        assert results["olmoe"][2]["weak_scaling_eff"] == 1.0 == results["olmoe"][2]["autoep_weak_scaling_eff"]
    doc = json.loads(out.read_text())  # from the first run: the guard stops the second before writing
    assert set(doc) == {"results", "cost_model", "meta"} and set(doc["results"]["olmoe"]) == {"2", "4"}
    assert doc["meta"]["world_size"] == 4 and doc["meta"]["backend"] == "gloo" and doc["meta"]["tiny"]


def test_shared_expert_needs_no_autoep() -> None:
    with pytest.raises(SystemExit):
        _load_benchmark().parse_args(["--tiny", "--shared-ffn", "96"])


def _run_shared(argv: list[str]) -> tuple[dict, int]:
    """The benchmark with a shared expert; also how many dispatches started their all-to-all in flight."""
    import switchyard.moe.dispatcher as dispatcher_mod

    original = dispatcher_mod.all_to_all_start
    started = []

    def spy(*args, **kwargs):
        started.append(1)
        return original(*args, **kwargs)

    dispatcher_mod.all_to_all_start = spy
    try:
        return _load_benchmark().run(argv), len(started)
    finally:
        dispatcher_mod.all_to_all_start = original


def test_shared_expert_overlap_ab_on_two_gloo_ranks(tmp_path: Path) -> None:
    argv = ["--tiny", "--shape", "olmoe", "--ep-sizes", "2", "--shared-ffn", "96", "--no-autoep",
            "--out", str(tmp_path / "ep.json")]
    for results, started in run_on_ranks(_run_shared, 2, argv, timeout_s=60):
        entry = results["olmoe_shared96"][2]
        assert entry["layer_ms"] > 0 and entry["layer_no_overlap_ms"] > 0
        assert math.isclose(entry["overlap_speedup"], entry["layer_no_overlap_ms"] / entry["layer_ms"])
        assert len(entry["overlap_round_ms"]) == 4 and min(entry["overlap_round_ms"]) > 0
        # warm-up + timed forwards of the two rounds with the overlap on (1 warm-up, 2 timed each)
        assert started == 2 * (1 + 2), started
    assert json.loads((tmp_path / "ep.json").read_text())["meta"]["shared_ffn"] == 96


def _run_plain(argv: list[str]) -> dict:
    return _load_benchmark().run(argv)


def test_weak_scaling_is_against_the_smallest_ep_whatever_the_order_given(tmp_path: Path) -> None:
    """--ep-sizes 2 1: EP=1 is the weak-scaling baseline (efficiency 1.0), not whichever size came first."""
    argv = ["--tiny", "--shape", "olmoe", "--ep-sizes", "2", "1", "2", "--no-autoep", "--out", str(tmp_path / "ep.json")]
    for results in run_on_ranks(_run_plain, 2, argv, timeout_s=60):
        per_ep = results["olmoe"]
        assert list(per_ep) == [1, 2]
        assert per_ep[1]["weak_scaling_eff"] == 1.0
        assert math.isclose(per_ep[2]["weak_scaling_eff"], per_ep[1]["layer_ms"] / per_ep[2]["layer_ms"])
