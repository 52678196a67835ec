"""benchmarks/serve.py --tiny runs end to end on CPU (engine vs generate, then the HTTP load test).

    python -m pytest -q tests/integration/test_serve_benchmark.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import REPO_ROOT

pytest.importorskip("openai")


def test_serve_benchmark_tiny(tmp_path):
    out = tmp_path / "serve.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SWITCHYARD_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "serve.py"), "--tiny", "--device", "cpu",
               "--batches", "1,3", "--new-tokens", "4", "--clients", "2", "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    results = json.loads(out.read_text())
    for impl in ("switchyard", "transformers_generate"):
        assert set(results["decode"][impl]) == {"1", "3"}, log
        for row in results["decode"][impl].values():
            assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0
    load = results["load_test"]
    assert load["requests"] == 4 and load["tokens"] == 4 * 4 and load["server_exit_code"] == 0
    assert load["ttft_s"]["p50"] <= load["ttft_s"]["p99"] and load["itl_s"]["n"] == 4 * 3
    meta = results["meta"]
    assert meta["tiny"] is True and meta["command"].startswith("python benchmarks/serve.py --tiny")
