"""SIGTERM drain under the deepspeed launcher: in-flight requests finish, new ones get 503, every rank exits 0.

The signal goes to rank 0 (the process serving HTTP), which decides when every rank stops; the
launcher then sees both ranks exit 0 and exits 0 itself — the observable proof that all ranks did.

    python -m pytest -q tests/integration/test_serve_shutdown.py
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("openai")

import openai  # noqa: E402

from switchyard.serve.launcher import ServerProcess  # noqa: E402
from switchyard.serve.loading import build_tiny_moe  # noqa: E402

pytestmark = pytest.mark.distributed

MODEL = "serve-tiny-moe-long"
LONG = 300  # a long context, so the streams are still running while the test looks at the drain


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_sigterm_drains_in_flight_requests_and_every_rank_exits_0(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    model_dir = build_tiny_moe(base / MODEL, base / "serve-cache", max_position_embeddings=512)
    with ServerProcess.start(model_dir, ep=2) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        results: dict[int, tuple[str | None, int]] = {}
        first_chunk = [threading.Event() for _ in range(3)]

        def long_stream(i: int) -> None:
            stream = client.completions.create(model=MODEL, prompt=f"def f{i}(x):", max_tokens=LONG, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            reason, tokens = None, 0
            for chunk in stream:
                first_chunk[i].set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            results[i] = (reason, tokens)

        threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in first_chunk), server.output()
        os.kill(server.rank0_pid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while get(f"{server.base_url}/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(f"{server.base_url}/health") == (503, {"status": "draining"})
        assert len(results) < 3, "the in-flight requests finished before the drain could be observed"
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "shutting_down"  # type: ignore[index]
        for t in threads:
            t.join(timeout=120)
        assert results == {i: ("length", LONG) for i in range(3)}
        code = server.proc.wait(timeout=60)
        log = server.output(20000)
        assert code == 0, log
        assert log.count("exits successfully") == 2, log
        assert "stop plan received" in log
