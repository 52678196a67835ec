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
- training, grad enabled, something to differentiate (the input or a router / expert parameter requires grad),
  CUDA, not under ``torch.autocast``, parameters not partitioned by ZeRO-3,
  ep = 1, etp = 1 (experts not sharded), dropless (no capacity factor), no router jitter, fused kernels on,
  an experts impl without host syncs (``MoELayer._graph_rules_broken``); the same input shape, dtype,
  ``requires_grad`` and parameter storage as at capture (storage moved or ``requires_grad`` changed: the graph is
  captured again).
- A forward's backward must run before the layer's next forward replays: the graph's buffers hold that
  forward's activations. A forward while one is pending runs eagerly (pipeline schedules that run two
  forwards of a layer before their backwards). A replayed forward whose autograd graph is freed without a
  backward (its loss dropped) is no longer pending: nothing can read those buffers any more.
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

import weakref
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

CoreOutputs = tuple[torch.Tensor, ...]
Substitute = Callable[[Sequence[torch.Tensor]], ContextManager[None]]
WARMUP_STEPS = 3  # eager passes on a side stream before capture: lazy inits (cuBLAS handles, Triton) stay out


class LayerGraph:
    """One captured forward + backward of ``core`` for one input signature."""

    def __init__(self, core: Callable[[torch.Tensor], CoreOutputs], x_TH: torch.Tensor,
                 params: Sequence[torch.Tensor], substitute: Substitute) -> None:
        """``params``: every tensor ``core`` reads by address besides ``x_TH`` (parameters and buffers).
        ``substitute(tensors)``: a context in which ``core`` reads ``tensors`` in place of ``params`` (see
        ``module_substitute``), so gradients are taken at leaves of the graph's own (``_traced_core``)."""
        self.key = signature(x_TH, params)
        self.params = tuple(params)
        self.static_x = x_TH.detach().clone().requires_grad_(x_TH.requires_grad)
        self._substitute = substitute
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                outs, inputs = self._traced_core(core)
                diff = [o for o in outs if o.requires_grad]
                torch.autograd.grad(diff, inputs, [torch.zeros_like(o) for o in diff], allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.pool = torch.cuda.graph_pool_handle()
        self.fwd_graph, self.bwd_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with own_cublas_workspaces(), torch.cuda.graph(self.fwd_graph, pool=self.pool):
            self.static_outs, inputs = self._traced_core(core)
        self.differentiable = tuple(o.requires_grad for o in self.static_outs)
        diff = [o for o in self.static_outs if o.requires_grad]
        self.static_grad_outs = tuple(torch.empty_like(o) for o in diff)
        with own_cublas_workspaces(), torch.cuda.graph(self.bwd_graph, pool=self.pool):
            grads = iter(torch.autograd.grad(diff, inputs, self.static_grad_outs, allow_unused=True))
        self.static_grads = tuple(next(grads) if t.requires_grad else None for t in (self.static_x, *self.params))
        self._pending_node: weakref.ref | None = None

    @property
    def pending(self) -> bool:
        """The last replay's autograd node is alive and its backward has not run: the buffers are still needed.
        A weak reference, so a forward whose graph is dropped unbackpropagated does not block replays for good."""
        return self._pending_node is not None and self._pending_node() is not None

    def _traced_core(self, core: Callable[[torch.Tensor], CoreOutputs]
                     ) -> tuple[CoreOutputs, tuple[torch.Tensor, ...]]:
        """``core``'s outputs, and the tensors to differentiate them at, in the order of ``(x, *params)`` that
        require grad: fresh leaves sharing storage with the input buffer and with each parameter (read in
        their place under ``substitute``). So warm-up and capture never touch an autograd node that outlives them or that anyone
        else holds. Differentiating at a parameter or a view of it would reach its AccumulateGrad node: a
        node made earlier on the default stream and kept alive (DeepSpeed's ZeRO-2 keeps them) is a CUDA
        error under capture ("legacy stream depend on a capturing blocking stream"); a node made here is
        tagged with the side stream and, kept alive by the captured outputs, would run every later eager
        accumulation of that parameter, and the hooks in it (ZeRO-1/2's gradient reduction), on that stream."""
        x_leaf = _leaf(self.static_x)
        leaves = tuple(_leaf(t) for t in self.params)
        with self._substitute(leaves):
            outs = tuple(core(x_leaf))
        return outs, tuple(t for t in (x_leaf, *leaves) if t.requires_grad)

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
        graph._pending_node = weakref.ref(ctx)
        ctx.graph = graph
        outs = tuple(o.detach() for o in graph.static_outs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outs, graph.differentiable) if not d))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs: torch.Tensor):  # type: ignore[override]
        graph: LayerGraph = ctx.graph
        if graph._pending_node is None or graph._pending_node() is not ctx:
            raise RuntimeError("backward ran twice through one replay of an MoE layer's CUDA graph (retain_graph=True), "
                               "but the first one overwrote the saved activations; set layer.cuda_graph = False for that")
        grads_of_diff = [g for g, d in zip(grad_outs, graph.differentiable) if d]
        for static, grad in zip(graph.static_grad_outs, grads_of_diff):
            if grad is None:
                static.zero_()
            elif static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        graph.bwd_graph.replay()
        graph._pending_node = None
        return (None, *(g.detach() if g is not None else None for g in graph.static_grads))


@contextmanager
def own_cublas_workspaces() -> Iterator[None]:
    """Around a capture: cuBLAS's cached workspaces dropped before and after it, as torch inductor's CUDA graph
    trees do (``clear_cublass_cache``), so the capture allocates its own workspace in its own pool. cuBLAS
    keeps one workspace per (handle, stream) and a captured GEMM bakes its address in; ``torch.cuda.graph``
    captures every graph on one stream, so without this a capture reuses whatever an earlier capture left
    cached, inside that graph's private pool (inductor's account: the memory ends up in use in two places).
    Seen on an H200 (torch 2.11): in a model with two graphed MoE layers the first layer's router and input
    gradients came out NaN, in plain PyTorch and under DeepSpeed alike; ``CUBLAS_WORKSPACE_CONFIG=:0:0`` (no
    workspace) made them right, and so does this (pytorch/pytorch#193402 is the same family)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None) or (lambda: None)
    clear()
    try:
        yield
    finally:
        clear()


def module_substitute(owner: nn.Module, names: Sequence[str]) -> Substitute:
    """A ``substitute`` for ``LayerGraph``: within it, ``owner``'s parameters or buffers ``names`` (dotted, as
    in ``named_parameters``) read as the given tensors, as ``torch.func.functional_call`` does for a call."""
    slots = []
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = owner.get_submodule(module_name)
        slots.append((module._parameters if leaf in module._parameters else module._buffers, leaf))

    @contextmanager
    def substitute(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        originals = [table[leaf] for table, leaf in slots]
        try:
            for (table, leaf), tensor in zip(slots, tensors):
                table[leaf] = tensor
            yield
        finally:
            for (table, leaf), original in zip(slots, originals):
                table[leaf] = original

    return substitute


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A new autograd leaf on ``t``'s storage, requiring grad as ``t`` does."""
    return t.detach().requires_grad_(t.requires_grad)


def _no_graph() -> None:
    return None


def signature(x_TH: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple:
    """What a capture depends on: the input's shape, dtype, device and grad flag; each parameter's storage
    and grad flag (the graph reads and writes raw addresses)."""
    return (tuple(x_TH.shape), x_TH.dtype, x_TH.device, x_TH.requires_grad,
            tuple((p.data_ptr(), p.requires_grad) for p in params))
