"""A step that fails on rank 0 (in a world of several ranks: a worker rank died) as the ``openai`` client meets it,
in one process: ``Rank0Loop`` with uvicorn in its thread and a runner that raises on demand.

The ep=2 version, with a worker rank really killed under ``deepspeed``, is in ``test_serve_loading_audit.py``.

    python -m pytest -q tests/unit/test_serve_rank_death.py
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")

MODEL = "serve-tiny-moe"
FAILED = "the engine failed on rank 0 (RuntimeError; the cause is in the server's log)"


def test_a_failed_step_ends_each_request_with_openais_error_and_refuses_new_ones(tmp_path_factory):
    """uvicorn's force exit cancelled the requests the failed engine could not finish: the plain one got its
    text/plain "Internal Server Error", the stream was cut without a word. Now the plain one gets a JSON 500
    ``engine_failed``, the stream a last ``data: {"error": …}`` event (``openai`` raises ``APIError``), a request
    after the failure a JSON 503 naming it, and rank 0 raises within a second or two."""
    import uvicorn
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    import switchyard as sy
    from switchyard.serve.app import create_app
    from switchyard.serve.config import ServeConfig
    from switchyard.serve.engine import Engine, ModelRunner
    from switchyard.serve.loading import build_tiny_moe
    from switchyard.serve.metrics import ServeMetrics
    from switchyard.serve.workers import ControlChannel, Rank0Loop

    base = tmp_path_factory.getbasetemp()
    path = build_tiny_moe(base / MODEL, base / "serve-cache")
    tok = AutoTokenizer.from_pretrained(path)
    runner = ModelRunner(sy.from_pretrained(path), decode="sequential", max_batch=4, max_model_len=128)
    engine = Engine(runner, tok, eos_token_ids=[])  # every answer runs to max_tokens
    app = create_app(engine, tok, MODEL, ServeConfig(model=MODEL), ServeMetrics())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=10))
    fail, ready, streaming = threading.Event(), threading.Event(), threading.Event()
    execute = runner.execute

    def flaky(plan):
        if fail.is_set():
            raise RuntimeError("the step broke")
        return execute(plan)

    runner.execute = flaky
    urls: list[str] = []

    def started() -> None:  # the port uvicorn bound (port=0)
        urls.append(f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1")
        ready.set()

    outcome: dict = {}

    def ask(stream: bool) -> None:
        name = "stream" if stream else "plain"
        ready.wait(60)
        client = openai.OpenAI(base_url=urls[0], api_key="none", max_retries=0, timeout=60)
        body = dict(model=MODEL, prompt="def f(x):", max_tokens=100, temperature=0)
        try:
            if stream:
                chunks = []
                for chunk in client.completions.create(**body, stream=True):
                    chunks.append(chunk)
                    streaming.set()
                outcome[name] = chunks
            else:
                outcome[name] = client.completions.create(**body)
        except Exception as err:  # noqa: BLE001 - what the client sees is the point
            outcome[name] = err

    def break_step() -> None:  # once both requests are decoding
        deadline = time.monotonic() + 60
        while not (streaming.is_set() and len(engine.running) == 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome["failed_at"] = time.monotonic()
        fail.set()

    threads = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
    threads.append(threading.Thread(target=break_step))
    for thread in threads:
        thread.start()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match="the step broke"):
            Rank0Loop(engine, ControlChannel(), server, on_started=started).run()
        stopped_at = time.monotonic()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads_before)
        fail.set()
        for thread in threads:
            thread.join(30)
    assert fail.is_set() and not any(thread.is_alive() for thread in threads), outcome
    plain, stream = outcome["plain"], outcome["stream"]
    assert isinstance(plain, openai.InternalServerError), repr(plain)
    assert plain.response.headers["content-type"] == "application/json", plain.response.text
    assert plain.body == {"message": f"{FAILED}; the server is shutting down", "type": "server_error", "param": None,
                          "code": "engine_failed"}, plain.body
    assert type(stream) is openai.APIError and stream.body == plain.body, repr(stream)
    assert stream.message == plain.body["message"]
    assert stopped_at - outcome["failed_at"] < 5  # the answers written, not uvicorn's 10 s graceful wait

    with TestClient(app) as client:  # what a request arriving after the failure gets (uvicorn is gone)
        late = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"] == {
            "message": f"{FAILED}; the server is shutting down and takes no new requests", "type": "server_error",
            "param": None, "code": "shutting_down"}, late.text
        assert client.get("/health").status_code == 503
