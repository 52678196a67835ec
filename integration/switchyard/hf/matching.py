"""Which FFNs to swap: every layer, every n-th, explicit indices, or module names (exact, suffix, regex).

Name matching follows peft's rules: a plain string matches a module whose qualified name equals it or
ends with ``"." + string``; a string starting with ``"re:"`` must ``re.fullmatch`` the qualified
name. Excludes use the same rules and win over targets.
"""

from __future__ import annotations

import re
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
        if every_n is not None and (not isinstance(every_n, int) or every_n < 1):
            raise ValueError(f"every_n must be a positive integer, got {every_n!r}")
        as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v) if v is not None else None  # noqa: E731
        return cls(
            layers=tuple(layers) if layers is not None else None,
            every_n=every_n,
            targets=as_tuple(targets),
            exclude=as_tuple(exclude) or (),
        )


def name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def layer_index_of(name: str) -> int | None:
    """The first integer path component (``model.layers.7.mlp`` → 7), the decoder layer's index."""
    found = _LAYER_INDEX.search("." + name)
    return int(found.group(1)) if found else None


def sites_from_names(model: nn.Module, targets: Sequence[str]) -> list[FFNSite]:
    """Sites for user-named modules (architectures outside the registry)."""
    sites = []
    for name, module in model.named_modules():
        if not name or not any(name_matches(name, t) for t in targets):
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        index = layer_index_of(name)
        sites.append(FFNSite(index if index is not None else len(sites), name, parent, attribute))
    return sites


def select(sites: list[FFNSite], selection: Selection, num_layers: int) -> list[FFNSite]:
    """The sites the selection keeps, or ``ValueError`` naming what did not match."""
    if selection.layers is not None:
        bad = [i for i in selection.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
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
