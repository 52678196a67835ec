"""The routed part of an MoE layer's training step, forward and backward, as two CUDA graph replays.

    layer.cuda_graph = True            # opt in, per layer (MoELayer attribute; default False)
    out = layer(x); out.backward(g)    # the first eligible call captures, later ones replay

Why: at ep=1 the layer's routed path (router → slot sort → gather → grouped GEMMs → combine) has no host
sync, so it can be captured, and its eager form is host-bound: before grouped GEMM 1 the device waits
while Python issues ~25 ops and launches, and again at the start of the backward (docs/performance.md,
"Where the time goes"). A replay issues all of them at once.

What runs where: ``LayerGraph`` captures ``core(x_TH) -> (out_TH, logits_TE, scores_TE, idx_TK,
weight_TK, counts_E)`` and the backward of its differentiable outputs with respect to ``x_TH`` and every
parameter that requires grad. ``MoELayer.forward`` computes what is outside the graph eagerly from those
outputs: shared experts, router losses (their gradient enters the graph through ``logits``/``scores``)
and the stats.

Rules, each checked on every call (a call that breaks one runs eagerly; nothing is ever wrong, at worst slow):
- training, grad enabled, CUDA, not under ``torch.autocast``, parameters not partitioned by ZeRO-3,
  ep = 1, dropless (no capacity factor), no router jitter, fused kernels on, an experts impl without host
  syncs (``MoELayer._graph_rules_broken``); the same input shape, dtype, ``requires_grad`` and parameter
  storage as at capture (storage moved or ``requires_grad`` changed: the graph is captured again).
- A forward's backward must run before the layer's next forward replays: the graph's buffers hold that
  forward's activations. A forward while one is pending runs eagerly (pipeline schedules that run two
  forwards of a layer before their backwards, a forward whose loss is never backpropagated).
- Not under activation checkpointing's recomputation (the graph saves nothing autograd could recompute):
  leave ``cuda_graph`` off for checkpointed layers.

Memory: the graph keeps a private pool with its forward activations, its backward's temporaries and its
gradient buffers between steps; eager frees the last two after each backward. Gradients are handed to
autograd as those buffers (no copy), and they share the pool with the forward's temporaries: they hold
their values until the layer's next forward. So a parameter's ``.grad`` that still is one of them when the
next forward replays (gradient accumulation) is cloned first, and accumulation stays exact; the gradient
of a leaf input (rare: hidden states are not leaves) is valid until that next forward.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

CoreOutputs = tuple[torch.Tensor, ...]
WARMUP_STEPS = 3  # eager passes on a side stream before capture: lazy inits (cuBLAS handles, Triton) stay out


class LayerGraph:
    """One captured forward + backward of ``core`` for one input signature."""

    def __init__(self, core: Callable[[torch.Tensor], CoreOutputs], x_TH: torch.Tensor,
                 params: Sequence[torch.Tensor]) -> None:
        """``params``: every tensor ``core`` reads by address besides ``x_TH`` (parameters and buffers)."""
        self.key = signature(x_TH, params)
        self.params = tuple(params)
        self.static_x = x_TH.detach().clone().requires_grad_(x_TH.requires_grad)
        inputs = self._grad_inputs()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                outs = core(self.static_x)
                diff = [o for o in outs if o.requires_grad]
                torch.autograd.grad(diff, inputs, [torch.zeros_like(o) for o in diff], allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.pool = torch.cuda.graph_pool_handle()
        self.fwd_graph, self.bwd_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd_graph, pool=self.pool):
            self.static_outs = tuple(core(self.static_x))
        self.differentiable = tuple(o.requires_grad for o in self.static_outs)
        diff = [o for o in self.static_outs if o.requires_grad]
        self.static_grad_outs = tuple(torch.empty_like(o) for o in diff)
        with torch.cuda.graph(self.bwd_graph, pool=self.pool):
            grads = torch.autograd.grad(diff, inputs, self.static_grad_outs, allow_unused=True)
        grads_by_input = dict(zip((id(t) for t in inputs), grads))
        self.static_grads = tuple(grads_by_input.get(id(t)) for t in (self.static_x, *self.params))
        self.pending = False

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied layer captures its own graph (this one reads the original's tensors)

    def __reduce__(self):
        return _no_graph, ()

    def _grad_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.static_x, *self.params) if t.requires_grad)

    def matches(self, x_TH: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
        return signature(x_TH, params) == self.key

    def run(self, x_TH: torch.Tensor) -> CoreOutputs:
        """Replay the forward under autograd: outputs alias the graph's buffers until the next replay."""
        return _Replay.apply(self, x_TH, *self.params)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: LayerGraph, x_TH: torch.Tensor, *params: torch.Tensor):  # type: ignore[override]
        # Autograd takes the returned gradient buffers as .grad without a copy. They share the pool with the
        # forward's temporaries, so the forward replay overwrites them: a .grad still being one (gradient
        # accumulation) becomes a copy first.
        for param, static in zip(params, graph.static_grads[1:]):
            if static is not None and param.grad is not None and param.grad.data_ptr() == static.data_ptr():
                param.grad = param.grad.clone()
        graph.static_x.copy_(x_TH)
        graph.fwd_graph.replay()
        graph.pending = True
        ctx.graph = graph
        outs = tuple(o.detach() for o in graph.static_outs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outs, graph.differentiable) if not d))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs: torch.Tensor):  # type: ignore[override]
        graph: LayerGraph = ctx.graph
        if not graph.pending:
            raise RuntimeError("backward ran twice through one replay of an MoE layer's CUDA graph (retain_graph=True), "
                               "but the first one overwrote the saved activations; set layer.cuda_graph = False for that")
        grads_of_diff = [g for g, d in zip(grad_outs, graph.differentiable) if d]
        for static, grad in zip(graph.static_grad_outs, grads_of_diff):
            if grad is None:
                static.zero_()
            elif static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        graph.bwd_graph.replay()
        graph.pending = False
        return (None, *(g.detach() if g is not None else None for g in graph.static_grads))


def _no_graph() -> None:
    return None


def signature(x_TH: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple:
    """What a capture depends on: the input's shape, dtype, device and grad flag; each parameter's storage
    and grad flag (the graph reads and writes raw addresses)."""
    return (tuple(x_TH.shape), x_TH.dtype, x_TH.device, x_TH.requires_grad,
            tuple((p.data_ptr(), p.requires_grad) for p in params))
