"""Serving: an OpenAI-compatible HTTP server over an expert-parallel model (docs/serve.md).

Data flow, one file each: ``config`` (settings) → ``loading`` (this rank's model shard) → ``sampling``
(per-token math) → ``slot_cache`` (static KV cache rows, CUDA graphs) → ``runner`` (step plans, prefill,
the decode forward) → ``engine`` (slots, continuous-batching scheduler) →
``workers`` (rank 0 ↔ other ranks step protocol) → ``protocol`` (request/response bodies) → ``app``
(FastAPI) → ``metrics`` (Prometheus) → ``main`` (wires a rank).
``launch/serve.py`` is the command; ``launcher`` starts/stops a server process (tests, benchmarks).
"""

from switchyard.serve.config import ServeConfig

__all__ = ["ServeConfig"]
