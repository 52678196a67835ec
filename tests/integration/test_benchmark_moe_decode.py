"""benchmarks/moe_decode.py --tiny runs end to end on CPU, every implementation's output at every token
count is checked against transformers' block (a fast but wrong decode path must show in the JSON), and the
implementations are timed interleaved (one call each per iteration, in a fresh order) with paired ratios."""

from __future__ import annotations

import json
import random

import torch

from harness import REPO_ROOT, load_script, run_script_on_ranks

IMPLS = ("switchyard", "switchyard_sorted", "hf_grouped_mm", "hf_batched_mm", "deepspeed_autoep")


def _moe_decode():
    return load_script(REPO_ROOT / "benchmarks" / "moe_decode.py", "moe_decode_test")


def test_moe_decode_benchmark_tiny_checks_outputs(tmp_path):
    out = tmp_path / "moe_decode.json"
    proc = run_script_on_ranks(REPO_ROOT / "benchmarks" / "moe_decode.py", 1,
                               ["--tiny", "--shapes", "mixtral_8x7b", "olmoe", "--tokens", "1", "8", "--iters", "2",
                                "--warmup", "0", "--rounds", "2", "--out", str(out)], timeout_s=300)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    results = json.loads(out.read_text())
    meta = results["meta"]
    assert meta["tiny"] is True and meta["tokens"] == [1, 8]
    assert (meta["iters"], meta["warmup"], meta["rounds"], meta["seed"]) == (2, 0, 2, 0) and meta["timing"]
    for shape in ("mixtral_8x7b", "olmoe"):
        assert "reference_error" not in results[shape], results[shape]
        for impl in IMPLS:
            row = results[shape][impl]
            assert "error" not in row, (shape, impl, row, log)
            for t in ("1", "8"):
                cell = row[t]
                assert 0 < cell["latency_min_us"] <= cell["latency_us"], (shape, impl, t, cell)
                assert len(cell["pipelined_rounds_us"]) == 2 and cell["pipelined_us"] > 0, (shape, impl, t, cell)
                # fp32, dropless, the same weights: the same function as transformers' block
                assert cell["rel_err_vs_hf"] < 1e-4, (shape, impl, t, cell)
                # switchyard's latency over each other impl's, paired per iteration
                ratios = cell.get("paired_ratio_vs")
                if impl == "switchyard":
                    assert set(ratios) == set(IMPLS) - {"switchyard"} and all(r > 0 for r in ratios.values()), cell
                else:
                    assert ratios is None, (shape, impl, t, cell)
        sy = results[shape]["switchyard"]
        assert sy["path_1"] == "small_batch"
        # the label says what decode runs, not the experts impl a training step would take
        assert "swiglu" not in sy["variant"] and "small_batch" in sy["variant"], sy["variant"]
        assert "sort +" in results[shape]["switchyard_sorted"]["variant"]


def test_each_iteration_calls_every_impl_once_in_a_fresh_seeded_order():
    md = _moe_decode()
    called: list[str] = []
    calls = {name: (lambda name=name: called.append(name)) for name in ("a", "b", "c", "d")}

    def boom() -> None:
        called.append("broken")
        raise RuntimeError("kernel failed")

    errors: dict[str, str] = {}
    lat_us = md.interleaved_latencies({**calls, "broken": boom}, torch.device("cpu"), 6, random.Random(0), errors)
    assert set(lat_us) == set(calls) and all(len(v) == 6 and min(v) > 0 for v in lat_us.values())
    assert set(errors) == {"broken"} and "kernel failed" in errors["broken"]  # called once, then left out
    assert called.count("broken") == 1
    called.remove("broken")
    orders = [tuple(called[i:i + 4]) for i in range(0, len(called), 4)]
    assert len(orders) == 6 and all(sorted(o) == ["a", "b", "c", "d"] for o in orders)
    assert len(set(orders)) > 1  # shuffled afresh per iteration, not one fixed order


def test_the_call_order_is_reproducible_from_the_seed():
    md = _moe_decode()

    def order(seed: int) -> list[str]:
        called: list[str] = []
        calls = {name: (lambda name=name: called.append(name)) for name in ("a", "b", "c", "d")}
        md.interleaved_latencies(calls, torch.device("cpu"), 5, random.Random(seed), {})
        return called

    assert order(0) == order(0) and order(0) != order(1)


def test_pipelined_rounds_alternate_the_order():
    md = _moe_decode()
    called: list[str] = []
    calls = {name: (lambda name=name: called.append(name)) for name in ("a", "b", "c")}
    per_round = md.pipelined_rounds(calls, torch.device("cpu"), 2, 3, {})
    assert all(len(v) == 3 for v in per_round.values())
    # each impl timed once per round (2 forwards back to back), rounds forward, reversed, forward
    assert called == [name for name in "abc" "cba" "abc" for _ in range(2)]


def test_paired_ratio_is_the_median_of_per_iteration_ratios():
    md = _moe_decode()
    # per iteration 0.5, 2, 3.33: median 2; the medians taken apart (2 vs 2) would say 1
    lat_us = {"switchyard": [1.0, 2.0, 10.0], "other": [2.0, 1.0, 3.0], "same": [1.0, 2.0, 10.0]}
    assert md.paired_ratios(lat_us, "switchyard") == {"other": 2.0, "same": 1.0}
