"""Server settings: one validated dataclass, filled from a YAML file and then the command line.

    ServeConfig.load("configs/serve/tiny.yaml", {"port": 8001})   # CLI flags win over the file
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from switchyard.config import check_field_type

DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODE_MODES = ("auto", "static", "batched", "sequential")  # switchyard.serve.runner.DECODE_MODES (kept import-light here)
API_KEY_ENV = "SWITCHYARD_API_KEY"  # the key where neither the flag nor the file gives one
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's (uvicorn.config.LOG_LEVELS)


@dataclass
class ServeConfig:
    model: str = ""  # switchyard checkpoint, exported / original HF MoE dir, or "tiny"
    ep: int = 1
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # Bearer token for every endpoint but /health
    served_model_name: str | None = None  # default: the model directory's name
    dtype: str = "auto"  # "auto": config.json's dtype (fp32 for the tiny model)
    max_batch: int = 16  # sequences decoding at once (slots); more requests wait
    decode: str = "auto"  # static (fixed-shape KV cache, CUDA graphs) where possible, else batched; or sequential
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_n: int = 8  # largest `n` (choices per request) accepted
    max_prompts: int = 16  # largest batch of prompts in one /v1/completions request
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    heartbeat_s: float = 30.0  # idle rank 0 pings the other ranks so their wait never times out
    drain_timeout_s: float = 300.0  # SIGTERM: longest wait for in-flight requests before stopping anyway
    log_level: str = "info"

    def __post_init__(self) -> None:
        hints = get_type_hints(ServeConfig)
        for f in dataclasses.fields(self):  # YAML's `api_key: 12345` is an int: name it, don't crash on it later
            check_field_type(f.name, getattr(self, f.name), hints[f.name])
        for name in ("ep", "max_batch", "max_n", "max_prompts", "default_max_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2 or null, got {self.max_model_len!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode={self.decode!r} is not one of {DECODE_MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.log_level.lower() not in LOG_LEVELS:  # else uvicorn's KeyError, on rank 0 only, after loading
            raise ValueError(f"log_level={self.log_level!r} is not one of {LOG_LEVELS}")
        for name in ("heartbeat_s", "drain_timeout_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(f"api_key must not be empty; leave it out (and {API_KEY_ENV} unset) to serve without a key")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty; leave it out to use the model directory's name")

    def model_id(self, path: Path) -> str:
        """The id the API serves the model as: ``served_model_name``, else the directory's name (``--model .``
        included); a fine-tune checkpoint's ``<run>/checkpoints/step_N/model`` is ``<run>-step_N`` (every one of them
        is named ``model``)."""
        if self.served_model_name:
            return self.served_model_name
        path = path.resolve()
        step, checkpoints, run = path.parent, path.parent.parent, path.parent.parent.parent
        if path.name == "model" and step.name.startswith("step_") and checkpoints.name == "checkpoints" and run.name:
            return f"{run.name}-{step.name}"
        return path.name

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "ServeConfig":
        """Fields from ``path`` (YAML), then ``overrides`` (None values skipped); unknown keys are errors. Without
        an ``api_key`` in either, ``SWITCHYARD_API_KEY``'s value: a key on the command line is in the launcher's
        log and in every local user's ``ps``."""
        values: dict[str, Any] = {}
        if path is not None:
            import yaml

            path = Path(path)
            if not path.is_file():
                raise ValueError(f"serve config {path} does not exist")
            values = yaml.safe_load(path.read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if values.get("api_key") is None and os.environ.get(API_KEY_ENV) is not None:
            values["api_key"] = os.environ[API_KEY_ENV]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        return cls(**values)
