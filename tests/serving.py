"""A server in this process (the engine loop and uvicorn on threads) for the tests that talk to it over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def in_process_server(model: Any, tok: Any, name: str, key: str, max_batch: int, max_model_len: int
                      ) -> Iterator[tuple[str, Any]]:
    """``(root URL, engine)`` of ``model`` served as ``name`` behind ``key``; no EOS ids, so every answer runs to its
    max_tokens whatever this torch build's tiny weights say. One torch thread while it runs (the engine's own)."""
    import uvicorn

    from switchyard.parallel.ports import free_port
    from switchyard.serve.app import create_app
    from switchyard.serve.config import ServeConfig
    from switchyard.serve.engine import Engine, ModelRunner
    from switchyard.serve.metrics import ServeMetrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(ModelRunner(model, decode="sequential", max_batch=max_batch, max_model_len=max_model_len), tok,
                    eos_token_ids=[])
    app = create_app(engine, tok, name, ServeConfig(model=name, api_key=key), ServeMetrics())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    stop = threading.Event()

    def engine_loop() -> None:
        while not stop.is_set():
            if engine.step() is None:
                engine.wait_for_work(0.02)

    workers = [threading.Thread(target=server.run, daemon=True), threading.Thread(target=engine_loop, daemon=True)]
    for worker in workers:
        worker.start()
    try:
        while not server.started:
            assert workers[0].is_alive(), "uvicorn did not start"
            workers[0].join(0.02)
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        stop.set()
        for worker in workers:
            worker.join(10)
        torch.set_num_threads(threads)
