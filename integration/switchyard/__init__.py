"""switchyard: expert-parallel Mixture-of-Experts for Hugging Face models under DeepSpeed.

``import switchyard`` stays light: the names that pull in DeepSpeed or transformers load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from switchyard import parallel
from switchyard.config import MoEConfig, ParallelConfig
from switchyard.parallel import ProcessGroupManager

__version__ = "0.1.0"

_LAZY = {
    "MoELayer": ("switchyard.moe.layer", "MoELayer"),
    "patch_model": ("switchyard.hf.patch", "patch_model"),
    "save_pretrained": ("switchyard.hf.checkpoint", "save_pretrained"),
    "from_pretrained": ("switchyard.hf.checkpoint", "from_pretrained"),
    "export_hf": ("switchyard.hf.export", "export_hf"),
    "hf": ("switchyard.hf", None),
    "moe": ("switchyard.moe", None),
}

__all__ = ["MoEConfig", "ParallelConfig", "ProcessGroupManager", "parallel", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'switchyard' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)
