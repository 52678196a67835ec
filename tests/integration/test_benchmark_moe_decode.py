"""benchmarks/moe_decode.py --tiny runs end to end on CPU, and every implementation's output at every token
count is checked against transformers' block (a fast but wrong decode path must show in the JSON)."""

from __future__ import annotations

import json

from harness import REPO_ROOT, run_script

IMPLS = ("switchyard", "switchyard_sorted", "hf_grouped_mm", "hf_batched_mm", "deepspeed_autoep")


def test_moe_decode_benchmark_tiny_checks_outputs(tmp_path):
    out = tmp_path / "moe_decode.json"
    proc = run_script(REPO_ROOT / "benchmarks" / "moe_decode.py",
                      ["--tiny", "--shapes", "mixtral_8x7b", "olmoe", "--tokens", "1", "8", "--iters", "1",
                       "--warmup", "0", "--out", str(out)], timeout_s=300)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    results = json.loads(out.read_text())
    meta = results["meta"]
    assert meta["tiny"] is True and meta["tokens"] == [1, 8]
    for shape in ("mixtral_8x7b", "olmoe"):
        assert "reference_error" not in results[shape], results[shape]
        for impl in IMPLS:
            row = results[shape][impl]
            assert "error" not in row, (shape, impl, row, log)
            for t in ("1", "8"):
                assert row[t]["latency_us"] > 0
                # fp32, dropless, the same weights: the same function as transformers' block
                assert row[t]["rel_err_vs_hf"] < 1e-4, (shape, impl, t, row[t])
        assert results[shape]["switchyard"]["path_1"] == "small_batch"
