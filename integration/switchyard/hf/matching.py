"""Which FFNs to swap: every layer, every n-th, explicit indices, or module names (exact, suffix, regex).

Name matching follows peft's rules: a plain string matches a module whose qualified name equals it or
ends with ``"." + string``; a string starting with ``"re:"`` must ``re.fullmatch`` the qualified
name. Excludes use the same rules and win over targets.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from switchyard.hf.architectures import FFNSite

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Selection:
    """The user's choice of layers; all fields optional and combinable (their intersection)."""

    layers: tuple[int, ...] | None = None
    every_n: int | None = None
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        layers: Sequence[int] | None = None,
        every_n: int | None = None,
        targets: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
    ) -> "Selection":
        if every_n is not None and (not isinstance(every_n, int) or isinstance(every_n, bool) or every_n < 1):
            raise ValueError(f"every_n must be a positive integer, got {every_n!r}")
        indices = tuple(layers) if isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)) else None
        if layers is not None and (indices is None or not all(_is_int(i) for i in indices)):
            raise ValueError(f"layers must be a list of layer indices, got {layers!r}; e.g. layers=[0, 2]")
        return cls(
            layers=tuple(operator.index(i) for i in indices) if indices is not None else None,
            every_n=every_n,
            targets=_patterns("targets", targets),
            exclude=_patterns("exclude", exclude) or (),
        )


def _is_int(value: object) -> bool:
    """An integer of any kind (int, numpy, a 0-d integer tensor), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _patterns(name: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """Module-name patterns as a tuple, each a string and each ``re:`` regex compiled once to check it."""
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else (value,)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{name} must be module names (strings), got {pattern!r} in {value!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"{name} pattern {pattern!r} is not a valid regular expression ({e})") from None
    return patterns


def name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def layer_index_of(name: str) -> int | None:
    """The first integer path component (``model.layers.7.mlp`` → 7), the decoder layer's index."""
    found = _LAYER_INDEX.search("." + name)
    return int(found.group(1)) if found else None


def sites_from_names(model: nn.Module, targets: Sequence[str]) -> list[FFNSite]:
    """Sites for user-named modules (architectures outside the registry); ``ValueError`` listing the
    first layer's modules, the likely spellings, when no name matches."""
    sites = []
    for name, module in model.named_modules():
        if not name or not any(name_matches(name, t) for t in targets):
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        index = layer_index_of(name)
        sites.append(FFNSite(index if index is not None else len(sites), name, parent, attribute))
    if not sites:
        names = [n for n, _ in model.named_modules() if _FIRST_LAYER_CHILD.fullmatch(n)]
        names = names or [n for n, _ in model.named_children()]
        raise ValueError(f"no module of {type(model).__name__} matched targets={list(targets)}; the first layer's "
                         f"modules are: {', '.join(names[:12]) + (' …' if len(names) > 12 else '') or 'none'}")
    return sites


# a direct child of the first decoder layer, e.g. "model.layers.0.mlp"
_FIRST_LAYER_CHILD = re.compile(r"(?:.*\.)?0\.[^.]+")


def select(sites: list[FFNSite], selection: Selection, num_layers: int) -> list[FFNSite]:
    """The sites the selection keeps, or ``ValueError`` naming what did not match."""
    if selection.layers is not None:
        bad = [i for i in selection.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {num_layers} layers (0 … "
                             f"{num_layers - 1}): fix layers={list(selection.layers)} (moe.layers in a run config)")
    chosen = []
    for site in sites:
        if selection.layers is not None and site.layer_index not in selection.layers:
            continue
        if selection.every_n is not None and site.layer_index % selection.every_n != 0:
            continue
        if selection.targets is not None and not any(name_matches(site.qualified_name, t) for t in selection.targets):
            continue
        if any(name_matches(site.qualified_name, e) for e in selection.exclude):
            continue
        chosen.append(site)
    if not chosen:
        candidates = ", ".join(s.qualified_name for s in sites[:4]) + (" …" if len(sites) > 4 else "")
        raise ValueError(
            f"no FFN matched layers={selection.layers} every_n={selection.every_n} targets={selection.targets} "
            f"exclude={list(selection.exclude)}; candidates are: {candidates or 'none'}"
        )
    return chosen
