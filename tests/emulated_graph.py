"""A CPU stand-in for the CUDA graphs of ``MoELayer.cuda_graph``, for tests on any machine.

``EmulatedGraph`` has a captured graph's buffer semantics, at their most hostile: every forward replay
recomputes into the same static outputs and first poisons the gradient buffers (in a real pool they may
share memory with the forward's temporaries); every backward replay writes into the same gradient
buffers. So it tests what ``moe/cuda_graph.py``'s ``_Replay`` and the layer do with those buffers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch

import switchyard.moe.layer as layer_module
from switchyard.moe.cuda_graph import LayerGraph, signature
from switchyard.moe.layer import MoELayer


class EmulatedGraph(LayerGraph):
    """See the module docstring."""

    def __init__(self, core, x_TH, params, substitute) -> None:  # noqa: D107 - LayerGraph's contract
        self.key, self.params, self._pending_node = signature(x_TH, params), tuple(params), None
        self.static_x = x_TH.detach().clone().requires_grad_(x_TH.requires_grad)
        self._substitute = substitute
        outs, _ = self._traced_core(core)
        self.static_outs = tuple(o.detach().clone() for o in outs)
        self.differentiable = tuple(o.requires_grad for o in outs)
        self.static_grad_outs = tuple(torch.empty_like(o) for o in outs if o.requires_grad)
        self.static_grads = tuple(torch.empty_like(t) if t.requires_grad else None for t in (self.static_x, *params))
        live: list = []

        def forward_replay() -> None:
            for g in self.static_grads:
                if g is not None:
                    g.fill_(float("nan"))
            with torch.enable_grad():
                live[:] = self._traced_core(core)  # (outputs, the leaves to differentiate at)
            for static, new in zip(self.static_outs, live[0]):
                static.copy_(new.detach())

        def backward_replay() -> None:
            diff = [o for o in live[0] if o.requires_grad]
            grads = iter(torch.autograd.grad(diff, live[1], self.static_grad_outs, allow_unused=True))
            for static in self.static_grads:
                if static is not None:
                    grad = next(grads)
                    static.copy_(grad) if grad is not None else static.zero_()

        self.fwd_graph = SimpleNamespace(replay=forward_replay)
        self.bwd_graph = SimpleNamespace(replay=backward_replay)


def _pending_rule_only(layer: MoELayer, x_TH: torch.Tensor) -> str | None:
    return "the last replayed forward's backward has not run yet" if layer._graph is not None and layer._graph.pending else None


def use_emulated_graphs(setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Route ``MoELayer.cuda_graph`` through ``EmulatedGraph`` (CPU included): of the rules only the
    pending one stays. ``setattr_``: pytest's ``monkeypatch.setattr`` to undo it after a test."""
    setattr_(layer_module, "LayerGraph", EmulatedGraph)
    setattr_(MoELayer, "_graph_rules_broken", _pending_rule_only)
