"""Rank 0 ↔ the other ranks: the step protocol, rank 0's serving loop, the workers' loop.

    rank 0 (main thread)                          rank r > 0 (main thread)
    ─────────────────────                         ────────────────────────
    uvicorn in a thread ── submit ──▶ Engine
    loop: plan = engine.step() ── broadcast ──▶   loop: plan = channel.recv()
          runner.execute(plan)   ◀── all-to-alls ──▶      runner.execute(plan)
          idle: heartbeat every heartbeat_s ──▶          (empty plan: nothing to run)
    SIGTERM: drain, stop uvicorn, STOP plan ──▶   return 0
    a step fails (a rank died): the in-flight requests get OpenAI errors, new ones 503, uvicorn stops, rank 0 raises

Plans travel on a gloo group of their own (CPU, even when the model runs on NCCL), so an idle
worker blocks in a cheap CPU receive, not in a GPU collective; rank 0 sends an empty plan every
``heartbeat_s`` while idle, so that wait never reaches the collective timeout. Workers ignore
SIGTERM/SIGINT (the deepspeed launcher forwards its signals to every rank): rank 0 decides when
everyone stops, after the in-flight requests are answered, so every rank exits 0.
"""

from __future__ import annotations

import datetime
import signal
import threading
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist

from switchyard.log import get_logger
from switchyard.parallel.manager import DEFAULT_TIMEOUT_S
from switchyard.serve.engine import Engine, ModelRunner, StepPlan

log = get_logger(__name__)

FAILED_GRACE_S = 2.0  # after a failed step: how long uvicorn may take to write the requests' error responses


class ControlChannel:
    """Broadcasts small step plans from rank 0 to every rank (no-op in a world of one)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.timeout_s = timeout_s
        self.group = None
        if self.world_size > 1:
            # every rank creates it, in the same order relative to the other groups
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def send(self, plan: StepPlan) -> None:
        if self.world_size > 1:
            dist.broadcast_object_list([plan.to_wire()], src=0, group=self.group)

    def recv(self) -> StepPlan:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return StepPlan.from_wire(box[0])


def check_heartbeat(heartbeat_s: float, channel: ControlChannel) -> None:
    """Idle workers wait for the next plan at most the channel's timeout: a heartbeat rarer than half of it would
    let that wait time out while the server is idle. Every rank knows both numbers, so every rank raises."""
    if channel.world_size > 1 and heartbeat_s > channel.timeout_s / 2:
        raise ValueError(f"heartbeat_s={heartbeat_s:g} must be at most half the collective timeout "
                         f"({channel.timeout_s:g}s, SWITCHYARD_DIST_TIMEOUT_S) or the other ranks' wait for the next "
                         f"step times out while the server is idle; lower heartbeat_s to at most "
                         f"{channel.timeout_s / 2:g} or raise SWITCHYARD_DIST_TIMEOUT_S")


def worker_loop(runner: ModelRunner, channel: ControlChannel) -> int:
    """Ranks > 0: run every plan rank 0 sends until the stop plan; returns the exit code."""

    def note(signum: int, frame: Any) -> None:
        log.info("rank got %s: waiting for rank 0 to finish the in-flight requests and stop",
                 signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)
    while True:
        plan = channel.recv()
        if plan.stop:
            log.info("stop plan received after %d forwards", runner.forwards)
            return 0
        runner.execute(plan)


class Rank0Loop:
    """Rank 0's main thread: the engine loop, with the HTTP server in a thread and SIGTERM draining."""

    def __init__(self, engine: Engine, channel: ControlChannel, server: Any, heartbeat_s: float = 30.0,
                 drain_timeout_s: float = 300.0, poll_s: float = 0.05,
                 on_started: Callable[[], None] | None = None) -> None:
        self.engine, self.channel, self.server, self.on_started = engine, channel, server, on_started
        self.heartbeat_s, self.drain_timeout_s, self.poll_s = heartbeat_s, drain_timeout_s, poll_s
        self._drain_started: float | None = None
        self._force = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        # only flags: a signal handler may interrupt the engine while it holds a lock
        if self.engine.draining and signum == signal.SIGINT:
            self._force = True  # Ctrl-C twice: stop now, aborting what is in flight
        self.engine.begin_drain()  # SIGTERM (even repeated, as launchers forward it): drain

    def run(self) -> int:
        try:  # the server checks this before loading (check_heartbeat); a loop built by hand is checked here
            check_heartbeat(self.heartbeat_s, self.channel)
        except ValueError as err:
            log.error("%s", err)
            self.channel.send(StepPlan(stop=True))
            return 2
        thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        thread.start()
        while not getattr(self.server, "started", False):
            if not thread.is_alive():
                log.error("the HTTP server failed to start (port in use?); stopping every rank")
                self.channel.send(StepPlan(stop=True))
                return 1
            time.sleep(0.02)
        if self.on_started is not None:
            self.on_started()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        code, clean = 0, False
        last_sent = time.monotonic()
        try:
            while True:
                if self.engine.draining:
                    if self._drain_started is None:
                        self._drain_started = time.monotonic()
                        log.info("draining: no new requests; finishing %d in flight", self.engine.in_flight())
                    if self.engine.idle():
                        break
                    if self._force or time.monotonic() - self._drain_started > self.drain_timeout_s:
                        why = "a second signal" if self._force else f"the drain timeout ({self.drain_timeout_s:g}s)"
                        log.warning("%s: aborting what is left", why)
                        # each waiting client gets a 503 shutting_down (a stream: an error event), not a 200 with a
                        # finish reason no OpenAI client knows and a [DONE] that says it is complete
                        self.engine.abort_all(f"the server is shutting down and {why} stopped this request before "
                                              "it finished; send it again (to another server)")
                if not thread.is_alive():
                    log.error("the HTTP server thread died; stopping every rank")
                    code = 1
                    break
                if self.engine.step() is not None:
                    last_sent = time.monotonic()
                    continue
                if time.monotonic() - last_sent > self.heartbeat_s:
                    self.engine.heartbeat()
                    last_sent = time.monotonic()
                self.engine.wait_for_work(self.poll_s)
            clean = True
        except Exception as err:
            # a step failed, most often a collective whose peer died: no request in flight can finish now
            reason = self._failure(err)
            log.error("a step failed (traceback below): %s; the requests in flight (%d sequences) get an error now "
                      "and every rank stops", reason, self.engine.in_flight())
            self.engine.fail(reason)  # in flight: an error each at once; /health and new requests: 503
            # their error responses are written within milliseconds; uvicorn's graceful shutdown waits for those
            # writes, never as long as its usual timeout for requests that cannot finish
            self.server.config.timeout_graceful_shutdown = FAILED_GRACE_S
            raise
        finally:
            self.server.should_exit = True
            thread.join(timeout=30)
            if clean:  # after an error the others may sit in a collective: exiting nonzero ends them
                self.channel.send(StepPlan(stop=True))
        log.info("served %d steps; every rank stops now", self.engine.steps)
        return code

    def _failure(self, err: BaseException) -> str:
        """What a client is told about a failed step: a collective failing in a world of several ranks means
        a worker rank died or stopped answering (gloo says "Connection reset by peer"); else rank 0's own error."""
        in_collective = any("torch/distributed/" in frame.filename.replace("\\", "/")
                            for frame in traceback.extract_tb(err.__traceback__))
        if self.channel.world_size > 1 and in_collective:
            return "an expert-parallel worker rank exited or stopped answering (a collective with it failed)"
        return f"the engine failed on rank 0 ({type(err).__name__}; the cause is in the server's log)"
