"""One rank-aware logger: ``log.info(msg, ranks=[0])`` prints only on the listed global ranks."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[%(asctime)s] [switchyard] [rank %(rank)s] %(message)s"


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch without distributed
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _global_rank()
        return True


class RankLogger(logging.LoggerAdapter):
    """Adds ``ranks=[...]``: log only on those global ranks (None = every rank)."""

    def log(self, level, msg, *args, ranks: list[int] | None = None, **kwargs):  # type: ignore[override]
        if ranks is not None and _global_rank() not in ranks:
            return
        super().log(level, msg, *args, **kwargs)

    def debug(self, msg, *args, ranks=None, **kwargs):  # type: ignore[override]
        self.log(logging.DEBUG, msg, *args, ranks=ranks, **kwargs)

    def info(self, msg, *args, ranks=None, **kwargs):  # type: ignore[override]
        self.log(logging.INFO, msg, *args, ranks=ranks, **kwargs)

    def warning(self, msg, *args, ranks=None, **kwargs):  # type: ignore[override]
        self.log(logging.WARNING, msg, *args, ranks=ranks, **kwargs)

    def error(self, msg, *args, ranks=None, **kwargs):  # type: ignore[override]
        self.log(logging.ERROR, msg, *args, ranks=ranks, **kwargs)


def get_logger(name: str) -> RankLogger:
    root = logging.getLogger("switchyard")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"))
        root.propagate = False
    return RankLogger(logging.getLogger(name), {})
