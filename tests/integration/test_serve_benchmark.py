"""benchmarks/serve.py --tiny runs end to end on CPU (engine vs generate, then the HTTP load test).

    python -m pytest -q tests/integration/test_serve_benchmark.py
"""

from __future__ import annotations

import json

import pytest

from harness import REPO_ROOT, run_script

pytest.importorskip("openai")


def test_serve_benchmark_tiny(tmp_path):
    out = tmp_path / "serve.json"
    proc = run_script(REPO_ROOT / "benchmarks" / "serve.py",
                      ["--tiny", "--device", "cpu", "--batches", "1,3", "--new-tokens", "4", "--clients", "2",
                       "--out", str(out)],
                      timeout_s=300, env={"SWITCHYARD_CACHE": str(tmp_path / "cache"), "SWITCHYARD_GIT_COMMIT": "0123abc"})
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    results = json.loads(out.read_text())
    for impl in ("switchyard", "transformers_generate"):
        assert set(results["decode"][impl]) == {"1", "3"}, log
        for row in results["decode"][impl].values():
            assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0
    for row in results["decode"]["switchyard"].values():  # fp32, greedy: the same tokens as generate()
        assert row["same_tokens_as_generate"] == 1.0 and row["same_prefix_as_generate"] == 1.0, row
    load = results["load_test"]
    assert load["requests"] == 4 and load["tokens"] == 4 * 4 and load["server_exit_code"] == 0
    assert load["ttft_s"]["p50"] <= load["ttft_s"]["p99"] and load["itl_s"]["n"] == 4 * 3
    meta = results["meta"]
    assert meta["tiny"] is True and meta["command"].startswith("python benchmarks/serve.py --tiny")
    assert meta["git_commit"] == "0123abc"  # SWITCHYARD_GIT_COMMIT wins (the device's tree has no usable .git)


def test_serve_benchmark_refuses_fewer_than_two_new_tokens(tmp_path):
    """Decode speed is B*(N-1) tokens over the time after the first token: N=1 would report 0 tok/s."""
    proc = run_script(REPO_ROOT / "benchmarks" / "serve.py", ["--tiny", "--new-tokens", "1", "--out",
                                                              str(tmp_path / "serve.json")], timeout_s=120)
    assert proc.returncode == 2 and "--new-tokens 1" in proc.stderr, proc.stderr[-2000:]
