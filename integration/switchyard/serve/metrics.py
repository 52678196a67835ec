"""Prometheus metrics of the server (prometheus-client), in a registry of its own.

    switchyard_requests_total{endpoint,status}      HTTP requests answered
    switchyard_prompt_tokens_total                   prompt tokens submitted to the engine
    switchyard_generation_tokens_total               tokens generated
    switchyard_time_to_first_token_seconds           arrival → first token (histogram)
    switchyard_time_per_output_token_seconds         gap between a sequence's tokens (histogram)
    switchyard_e2e_request_latency_seconds           arrival → last token of a sequence (histogram)
    switchyard_num_requests_running / _waiting       sequences in a slot / queued for one
    switchyard_sequences_finished_total{finish_reason}   stop, length, abort
    switchyard_engine_steps_total                    scheduler steps run
    switchyard_expert_tokens_total{layer,expert}     tokens routed to each expert (MoE layers' last_stats)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _ExpertCollector(Collector):
    """Reads the runner's per-expert counts at scrape time (no work on the engine's hot path)."""

    def __init__(self, counts: Callable[[], list[list[int]] | None], layer_names: list[str]) -> None:
        self.counts, self.layer_names = counts, layer_names

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily("switchyard_expert_tokens", "Tokens routed to each expert (rank 0's view; "
                                     "every rank sees the same tokens)", labels=["layer", "expert"])
        for layer, row in zip(self.layer_names, self.counts() or []):
            for expert, value in enumerate(row):
                family.add_metric([layer, str(expert)], value)
        yield family


class ServeMetrics:
    """Engine hooks (``step``, ``first_token``, …) and HTTP counters, exposed by ``render()``."""

    def __init__(self, expert_counts: Callable[[], list[list[int]] | None] | None = None,
                 layer_names: list[str] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("switchyard_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens_total = Counter("switchyard_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("switchyard_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("switchyard_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("switchyard_time_per_output_token_seconds", "Time between a sequence's tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("switchyard_e2e_request_latency_seconds", "Arrival to last token of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("switchyard_num_requests_running", "Sequences holding a slot", registry=r)
        self.waiting = Gauge("switchyard_num_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.finished_total = Counter("switchyard_sequences_finished", "Finished sequences", ["finish_reason"],
                                      registry=r)
        self.steps = Counter("switchyard_engine_steps", "Scheduler steps run", registry=r)
        for reason in ("stop", "length", "abort"):
            self.finished_total.labels(finish_reason=reason)
        if expert_counts is not None:
            r.register(_ExpertCollector(expert_counts, layer_names or []))

    # -- engine hooks (engine thread) -------------------------------------------------------------------
    def step(self, running: int, waiting: int, ran: bool = True) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        if ran:
            self.steps.inc()

    def prompt_tokens(self, n: int) -> None:
        self.prompt_tokens_total.inc(n)

    def generated_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def finished(self, seq: Any) -> None:
        self.finished_total.labels(finish_reason=seq.finish_reason).inc()
        self.e2e.observe(time.monotonic() - seq.arrival_time)

    # -- HTTP side --------------------------------------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
