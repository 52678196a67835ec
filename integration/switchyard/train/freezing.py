"""``train.freeze``: parameters the fine-tune leaves as they are, named by glob patterns.

The launcher builds the model itself, so a user cannot set ``requires_grad`` by hand as with a model of their own; a
frozen parameter gets no gradient and is left out of the optimizer's groups (``optimizer_param_groups`` skips it), so
ZeRO keeps no optimizer state for it. Patterns are matched with ``fnmatch`` against the names of
``named_parameters`` (``*`` crosses dots); tied names count (``lm_head.weight`` names the embedding it shares). The
patterns are checked on the whole model built on the meta device before any weight is read: each must match a
parameter, and something must stay trainable. An MoE layer's experts are one stacked tensor per projection
(``….mlp.experts.gate_up_proj``), so all experts of a layer freeze together.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

EXAMPLES_SHOWN = 6


@dataclass(frozen=True)
class FreezePlan:
    """What ``patterns`` freeze of a whole model: parameters counted once each (tied ones once)."""

    frozen_tensors: int
    frozen_params: int
    total_params: int


def _names_by_parameter(model: nn.Module) -> dict[nn.Parameter, list[str]]:
    names: dict[nn.Parameter, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param, []).append(name)
    return names


def _matched(names: list[str], patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def check_freeze(model: nn.Module, patterns: Sequence[str]) -> FreezePlan:
    """Every pattern matches some parameter of ``model`` (the whole model, e.g. on the meta device) and some
    parameter stays trainable; else a ValueError naming the pattern and parameter names to choose from."""
    by_param = _names_by_parameter(model)
    all_names = [name for names in by_param.values() for name in names]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            shown = ", ".join(all_names[:EXAMPLES_SHOWN])
            raise ValueError(
                f"train.freeze pattern {pattern!r} matches no parameter of {type(model).__name__} (names look like "
                f"{shown}, …; `*` matches any characters, dots included, e.g. '*.self_attn.*'); fix or drop it")
    frozen = [p for p, names in by_param.items() if _matched(names, patterns)]
    total = sum(p.numel() for p in by_param)
    if len(frozen) == len(by_param):
        raise ValueError(f"train.freeze {list(patterns)} freezes every parameter of {type(model).__name__}: nothing "
                         "would train; leave some parameters out of the patterns")
    return FreezePlan(len(frozen), sum(p.numel() for p in frozen), total)


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> int:
    """Set ``requires_grad=False`` on this rank's parameters that ``patterns`` match; returns how many tensors.
    Names are the whole model's: a pipeline stage and a tensor-parallel shard keep them."""
    count = 0
    for param, names in _names_by_parameter(model).items():
        if _matched(names, patterns):
            param.requires_grad_(False)
            count += 1
    return count
