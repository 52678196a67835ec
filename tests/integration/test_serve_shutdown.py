"""SIGTERM drain under the deepspeed launcher: in-flight requests finish, new ones get 503, every rank exits 0;
a second signal (SIGINT) cuts the drain short: what is left gets OpenAI's 503 error, never finish_reason "abort".

The signal goes to rank 0 (the process serving HTTP), which decides when every rank stops; the
launcher then sees both ranks exit 0 and exits 0 itself — the observable proof that all ranks did.

    python -m pytest -q tests/integration/test_serve_shutdown.py
"""

from __future__ import annotations

import json
import os
import re
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
CUT = 480  # still running when the LONG streams are done: the second signal stops them


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def running(base_url: str) -> float:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^switchyard_num_requests_running ([0-9.e+-]+)$", text, re.M).group(1))


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

        cut: dict[str, object] = {}
        cut_streaming = threading.Event()

        def cut_short(stream: bool) -> None:  # runs past the LONG streams: the second signal ends it unfinished
            try:
                body = dict(model=MODEL, prompt="def g(x):", max_tokens=CUT, temperature=0,
                            extra_body={"ignore_eos": True})
                if stream:
                    for chunk in client.completions.create(**body, stream=True):
                        cut_streaming.set()
                        cut.setdefault("reasons", []).append(chunk.choices[0].finish_reason)  # type: ignore[union-attr]
                else:
                    cut["plain"] = client.completions.create(**body)
            except openai.APIError as err:
                cut["stream" if stream else "plain"] = err

        threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
        cut_threads = [threading.Thread(target=cut_short, args=(stream,)) for stream in (False, True)]
        for t in threads + cut_threads:
            t.start()
        assert all(e.wait(60) for e in [*first_chunk, cut_streaming]), server.output()
        deadline = time.monotonic() + 30
        while running(server.base_url) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
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
        assert "plain" not in cut and "stream" not in cut, cut  # still running
        os.kill(server.rank0_pid(), signal.SIGINT)  # the second signal: stop now, what is left gets an error
        for t in cut_threads:
            t.join(timeout=60)
        plain, stream = cut.get("plain"), cut.get("stream")
        assert isinstance(plain, openai.APIStatusError) and plain.status_code == 503, repr(plain)
        assert plain.body["code"] == "shutting_down", plain.body  # type: ignore[index]
        assert "a second signal stopped this request" in plain.body["message"]  # type: ignore[index]
        assert type(stream) is openai.APIError and stream.body == plain.body, repr(stream)  # its error event
        assert "abort" not in cut.get("reasons", []), cut
        code = server.proc.wait(timeout=60)
        log = server.output(20000)
        assert code == 0, log
        assert log.count("exits successfully") == 2, log
        assert "stop plan received" in log
