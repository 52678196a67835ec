"""Pipeline parallelism for fine-tuning: each pipeline stage holds a contiguous block of decoder layers.

The model stays transformers' own class. A stage keeps its decoder layers and puts a parameterless
``SkippedLayer`` where another stage's layers were (the decoder's loop passes the hidden state through it), so
state-dict keys and layer indices stay the model's own and a checkpoint is the union of the stages' tensors. Stage 0
keeps the input embedding; the last stage keeps the final norm and the LM head. A stage that is not first is given
its hidden state as ``inputs_embeds``; one that is not last hands on the decoder's output before the norm (its
norm and head are identities). Every stage calls the whole model, so transformers builds the same causal mask and
rotary embedding on each, and switchyard's router-loss hooks see the stage's MoE layers.

Schedule: 1F1B over the step's micro-batches (Megatron's schedule without interleaving), the hidden states and their
gradients exchanged with the neighbouring stages of one pipeline group in batched point-to-point operations. DeepSpeed's engine drives each
stage as it drives a whole model (ZeRO 0/1/2, the accumulation boundary, the reduction over the stage's
data-parallel and expert-data-parallel groups): the last stage's backward is its loss; an earlier stage's is the
surrogate Σ(output · gradient received) + its router-loss share / grad_accum, run with ``scale_wrt_gas=False``
because the gradient received carries the 1 / grad_accum already.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from switchyard.log import get_logger

if TYPE_CHECKING:
    from switchyard.parallel import ProcessGroupManager

log = get_logger(__name__)

# Model types whose decoder hands ``inputs_embeds`` to the first layer unchanged and whose layers take and return
# the hidden state alone (tests/unit/test_pipeline_split.py checks each against the unsplit model). Granite multiplies
# the embeddings inside the decoder (embedding_multiplier), so a later stage would scale its input again; so did
# Gemma's decoder before transformers moved the scale into the embedding module. ``PipelineStage`` checks the
# installed transformers at run time (``check_inputs_embeds_pass_through``).
PIPELINE_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
    # their embeddings scale inside the embedding module (transformers 5.17 and 5.24 checked), not in the decoder
    "gemma2", "gemma3_text", "phi3", "cohere", "olmo", "olmo2", "olmo3", "stablelm", "starcoder2", "ernie4_5", "helium",
})


def stage_layer_ranges(num_layers: int, stages: int, sizes: Sequence[int] | None = None) -> list[range]:
    """Contiguous decoder layers per stage: ``sizes`` of them (``parallel.pp_layers``), or as even as the count
    allows (the first stages take one more)."""
    if sizes is not None:
        if len(sizes) != stages or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(f"parallel.pp_layers={list(sizes)} must give each of the {stages} pipeline stages at "
                             f"least one decoder layer and sum to the model's {num_layers} (it sums to {sum(sizes)})")
    elif num_layers < stages:
        raise ValueError(f"parallel.pp={stages} but the model has {num_layers} decoder layers; every pipeline stage "
                         f"needs at least one: use parallel.pp ≤ {num_layers}")
    else:
        per, extra = divmod(num_layers, stages)
        sizes = [per + (1 if stage < extra else 0) for stage in range(stages)]
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage holds: the hidden state passes through. Keeps the
    layer's plain attributes (``attention_type``: the decoder picks each layer's mask by it)."""

    def __init__(self, layer: nn.Module, held_by: int) -> None:
        super().__init__()
        for name, value in vars(layer).items():
            if not name.startswith("_") and name != "training" and isinstance(value, (str, int, float, bool)):
                setattr(self, name, value)
        self.held_by_stage = held_by

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"held by pipeline stage {self.held_by_stage}"


class HeldElsewhere(nn.Module):
    """The input embedding on a stage that is not first: its input arrives as ``inputs_embeds``."""

    def __init__(self, what: str, stage: int) -> None:
        super().__init__()
        self.what, self.stage = what, stage

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(f"{self.what} is held by pipeline stage {self.stage}; this stage takes inputs_embeds")


def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList) or not hasattr(base, "norm"):
        raise ValueError(f"parallel.pp > 1: {type(model).__name__} has no decoder with .layers and .norm to split "
                         f"into pipeline stages; use parallel.pp=1")
    return base


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in model.named_modules():
        if module is old and name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            return
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(model).__name__}")


def check_pipeline_model(model: nn.Module, stages: int, sizes: Sequence[int] | None = None) -> None:
    """Refuse a model the stages cannot split, before anything is changed. The same on every rank (it reads the
    config only), so every rank raises it."""
    if stages == 1:
        return
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PIPELINE_MODEL_TYPES:
        raise ValueError(f"parallel.pp={stages}: pipeline stages are implemented for model types "
                         f"{sorted(PIPELINE_MODEL_TYPES)}, not {model_type!r}; use parallel.pp=1")
    stage_layer_ranges(len(_decoder(model).layers), stages, sizes)


SPLIT_ATTR = "_switchyard_pipeline_stage"  # (stage, stages, its layers, tied) on a model split_model has cut


def split_model(model: nn.Module, stage: int, stages: int, sizes: Sequence[int] | None = None) -> tuple[range, bool]:
    """Keep stage ``stage`` of ``stages`` in ``model`` (in place); returns its decoder layers' indices and whether
    the LM head is tied to the input embedding. Tied: the first stage owns the weight (a parameter, stepped by
    its optimizer); the last stage's head holds a copy as a buffer, which ``PipelineStage`` refreshes after every
    step and whose gradient it sends to the first stage. A model cut already answers for its cut (and refuses
    another)."""
    from switchyard.hf.patch import keep_moe_layers_of_stage, moe_layers

    if isinstance(stage, bool) or isinstance(stages, bool) or not (isinstance(stage, int) and isinstance(stages, int)
                                                                    and 0 <= stage < stages):
        raise ValueError(f"pipeline stage {stage!r} of {stages!r}: the stage is an index 0 … stages - 1 into stages "
                         "≥ 1 (stage=(0, 2) is the first of two)")
    done = getattr(model, SPLIT_ATTR, None)
    if done is not None:  # already cut (from_pretrained reads a stage only): the same cut again is that one
        wanted = stage_layer_ranges(len(_decoder(model).layers), stages, sizes)[stage]
        if done[:3] != (stage, stages, wanted):
            raise ValueError(f"the model is pipeline stage {done[0]} of {done[1]} (decoder layers {done[2].start}–"
                             f"{done[2].stop - 1}) already; it cannot become stage {stage} of {stages} (layers "
                             f"{wanted.start}–{wanted.stop - 1}): load the whole model for that")
        return done[2], done[3]
    check_pipeline_model(model, stages, sizes)
    decoder = _decoder(model)
    if stages == 1:  # the whole model: nothing to split (a tied head stays tied)
        return range(len(decoder.layers)), False
    ranges = stage_layer_ranges(len(decoder.layers), stages, sizes)
    holder = {i: s for s, r in enumerate(ranges) for i in r}
    all_moe = len(moe_layers(model))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    for i, layer in enumerate(decoder.layers):
        if i not in ranges[stage]:
            decoder.layers[i] = SkippedLayer(layer, holder[i])
    if stage > 0:
        _replace(model, embedding, HeldElsewhere("the input embedding", 0))
    if stage < stages - 1:
        decoder.norm = nn.Identity()
        if head is not None:
            _replace(model, head, nn.Identity())
    elif tied:  # a copy in the state dict (saved as the head's weight), not a parameter of this stage
        weight = head.weight.detach()
        del head._parameters["weight"]
        head.register_buffer("weight", weight)
    keep_moe_layers_of_stage(model, all_moe)
    setattr(model, SPLIT_ATTR, (stage, stages, ranges[stage], tied))
    return ranges[stage], tied


def check_inputs_embeds_pass_through(model: nn.Module) -> None:
    """A later stage takes its input as ``inputs_embeds``: the decoder must hand them to its first layer unchanged.
    Checked on the installed transformers by running the decoder on a probe with every layer passed through and
    the norm off (a decoder that scales its embeddings would apply that again on every stage). Restores the model;
    a model on the meta device is not probed."""
    decoder = _decoder(model)
    param = next(decoder.parameters(), None)
    if param is None or param.is_meta:
        return
    layers, norm = decoder.layers, decoder.norm
    probe = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(param)
    modes = {module: module.training for module in decoder.modules()}
    decoder.layers = nn.ModuleList(SkippedLayer(layer, 0) for layer in layers)
    decoder.norm = nn.Identity()
    try:
        with torch.no_grad():
            out = decoder.eval()(inputs_embeds=probe, use_cache=False)  # eval: no embedding dropout in the probe
    finally:
        decoder.layers, decoder.norm = layers, norm
        for module, training in modes.items():
            module.training = training
    got = out[0] if isinstance(out, tuple) else out.last_hidden_state
    if not torch.equal(got, probe):
        import transformers

        raise ValueError(f"parallel.pp > 1: {type(model).__name__}'s decoder changes inputs_embeds before its first "
                         f"layer (transformers {transformers.__version__}), so every later pipeline stage would change "
                         "its input again; use parallel.pp=1 for this model")


class MicroResult(NamedTuple):
    """One micro-batch's losses on this rank (detached, on device): LM loss (0 on a stage before the last), router
    loss (a pipeline stage's share), and the router loss per kind (``router_loss_parts``)."""

    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    parts: dict[str, torch.Tensor]


class PipelineStage:
    """This rank's stage: its layers, its neighbours in the pipeline group, the 1F1B schedule."""

    def __init__(self, model: nn.Module, groups: "ProcessGroupManager", sizes: Sequence[int] | None = None) -> None:
        self.index, self.count = groups.rank("pp"), groups.size("pp")
        ranks = groups.ranks("pp")
        self.prev_rank = ranks[self.index - 1] if self.index > 0 else None
        self.next_rank = ranks[self.index + 1] if self.index < self.count - 1 else None
        self.layers, self.tied = split_model(model, self.index, self.count, sizes)
        check_inputs_embeds_pass_through(model)
        # every stage's layer count (recorded with checkpoints: another split is another optimizer partition)
        self.sizes = [len(r) for r in stage_layer_ranges(len(_decoder(model).layers), self.count, sizes)]
        self.hidden_size = model.config.hidden_size
        # tied LM head: the first stage's embedding weight and the last stage's copy of it, and each one's peer
        self._embedding = model.get_input_embeddings() if self.tied and self.first else None
        self._head = model.get_output_embeddings() if self.tied and self.last else None
        self._tied_peer = ranks[-1] if self.first else ranks[0]
        self._hidden: torch.Tensor | None = None
        if not self.last:  # the decoder's output (its norm is an identity here) is what the next stage takes
            _decoder(model).register_forward_hook(self._capture)
        if groups.rank("dp") == 0 and groups.rank("tp") == 0:  # one line per stage
            log.info("pipeline stage %d of %d: decoder layers %d–%d%s%s", self.index, self.count, self.layers.start,
                     self.layers.stop - 1, ", input embedding" if self.first else "",
                     ", final norm and LM head" if self.last else "", ranks=None)

    @property
    def first(self) -> bool:
        return self.prev_rank is None

    @property
    def last(self) -> bool:
        return self.next_rank is None

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def share_tied_weight(self) -> None:
        """The first stage's embedding weight → the last stage's head (a fresh leaf that collects this step's
        gradient). After every optimizer step, and once before the first (the weights may come from a resume)."""
        if self._embedding is not None:
            dist.send(self._embedding.weight.detach().contiguous(), self._tied_peer)
        elif self._head is not None:
            copy = torch.empty_like(self._head.weight)
            dist.recv(copy, self._tied_peer)
            self._head._buffers["weight"] = copy.requires_grad_()

    def _take_hidden(self) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        assert hidden is not None, "the decoder's forward hook did not run"
        return hidden

    def _inputs(self, micro: dict[str, torch.Tensor], hidden_in: torch.Tensor | None, lm_divisor: float | None,
                with_labels: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {k: v for k, v in micro.items() if k != "labels" or (self.last and with_labels)}
        if hidden_in is not None:
            kwargs.pop("input_ids")
            kwargs["inputs_embeds"] = hidden_in
        if self.last and with_labels and lm_divisor is not None:
            kwargs["num_items_in_batch"] = lm_divisor
        kwargs["use_cache"] = False
        return kwargs

    def _hidden_shape(self, micro: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return (*micro["input_ids"].shape, self.hidden_size)

    def _exchange(self, engine, send_prev: torch.Tensor | None = None, send_next: torch.Tensor | None = None,
                  recv_prev: dict[str, torch.Tensor] | None = None, recv_next: dict[str, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One batch of point-to-point operations with the neighbouring stages (Megatron's send_forward_recv_backward
        and kin): a step's sends and receives go out together, so two stages that each send to the other cannot both
        wait in a send. ``recv_prev`` / ``recv_next``: the micro-batch whose hidden state (or its gradient, of the
        same shape) arrives. Returns (from the previous stage, from the next); None where there is no such stage."""
        dtype = next(p.dtype for p in engine.module.parameters() if p.is_floating_point())
        ops, got = [], []
        for tensor, peer in ((send_prev, self.prev_rank), (send_next, self.next_rank)):
            if tensor is not None and peer is not None:
                ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), peer))
        for micro, peer in ((recv_prev, self.prev_rank), (recv_next, self.next_rank)):
            buffer = None
            if micro is not None and peer is not None:
                buffer = torch.empty(self._hidden_shape(micro), dtype=dtype, device=engine.device)
                ops.append(dist.P2POp(dist.irecv, buffer, peer))
            got.append(buffer)
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return got[0], got[1]

    def train_step(self, engine, micro_batches: list[dict[str, torch.Tensor]], lm_divisor: float | None,
                   after_forward: Callable[[], None], after_backward: Callable[[], None]) -> list[MicroResult]:
        """Forward and backward of the step's micro-batches on this stage, 1F1B: stage s runs pp − s − 1 forwards
        ahead, then alternates one forward and one backward, then finishes the backwards, so it holds the
        activations of at most pp − s micro-batches. Backwards run in micro-batch order on every stage.
        ``after_forward`` (expert load) runs after each forward, ``after_backward`` (clipping at the boundary,
        ``engine.step()``) after each backward, as in the loop without stages."""
        from switchyard.hf.patch import router_loss_parts

        count = len(micro_batches)
        warmup = min(self.count - self.index - 1, count)
        in_flight: deque[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, dict]] = deque()
        results: list[MicroResult] = []

        def forward(i: int, hidden_in: torch.Tensor | None) -> torch.Tensor | None:
            if hidden_in is not None:
                hidden_in.requires_grad_()
            out = engine(**self._inputs(micro_batches[i], hidden_in, lm_divisor, with_labels=True))
            parts = router_loss_parts(engine.module)  # before backward (a recompute overwrites the layers' losses)
            after_forward()
            aux = out.get("aux_loss")
            aux = aux if aux is not None else torch.zeros((), device=engine.device)
            produced = out.loss if self.last else self._take_hidden()
            in_flight.append((hidden_in, produced, aux, parts))
            return None if self.last else produced

        def backward(grad: torch.Tensor | None) -> torch.Tensor | None:
            hidden_in, produced, aux, parts = in_flight.popleft()  # the oldest: backwards in micro-batch order
            if self.last:
                engine.backward(produced)
                lm_loss = (produced - aux).detach()
            else:
                surrogate = (produced * grad).sum() + aux / count
                if self._embedding is not None and len(results) == count - 1:
                    surrogate = surrogate + self._tied_head_grad_term()
                engine.backward(surrogate, scale_wrt_gas=False)
                lm_loss = torch.zeros((), device=engine.device)
            results.append(MicroResult(lm_loss, aux.detach(), parts))
            return None if hidden_in is None else hidden_in.grad

        def after(input_grad: torch.Tensor | None, next_micro: dict | None = None) -> torch.Tensor | None:
            """Send a backward's input gradient back (receiving the next forward's input with it), then step."""
            hidden_in, _ = self._exchange(engine, send_prev=input_grad, recv_prev=next_micro)
            if self._head is not None and len(results) == count:
                # the head's gradient of the whole step (1 / grad_accum in it) → the first stage, before the
                # optimizer step: its gradient norm is a collective over every stage
                dist.send(self._head.weight.grad.contiguous(), self._tied_peer)
            after_backward()
            return hidden_in

        for i in range(warmup):
            hidden_in, _ = self._exchange(engine, recv_prev=micro_batches[i])
            self._exchange(engine, send_next=forward(i, hidden_in))
        hidden_in = self._exchange(engine, recv_prev=micro_batches[warmup])[0] if warmup < count else None
        for i in range(warmup, count):
            output = forward(i, hidden_in)
            _, grad = self._exchange(engine, send_next=output, recv_next=micro_batches[i - warmup])
            hidden_in = after(backward(grad), micro_batches[i + 1] if i + 1 < count else None)
        for i in range(count - warmup, count):
            _, grad = self._exchange(engine, recv_next=micro_batches[i])
            after(backward(grad))
        if self.tied:
            self.share_tied_weight()
        return results

    def _tied_head_grad_term(self) -> torch.Tensor:
        """Σ(weight · the last stage's head gradient): its gradient adds that gradient to the embedding weight's
        inside the step's last backward, where DeepSpeed's hooks and reduction see it."""
        weight = self._embedding.weight
        head_grad = torch.empty_like(weight)
        dist.recv(head_grad, self._tied_peer)
        return (weight * head_grad).sum()

    @torch.no_grad()
    def logits(self, engine, micro: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Forward only (eval): the logits on the last stage, None on the others (they hand on their output)."""
        hidden_in, _ = self._exchange(engine, recv_prev=micro)
        out = engine(**self._inputs(micro, hidden_in, None, with_labels=False))
        if self.last:
            return out.logits
        self._exchange(engine, send_next=self._take_hidden())
        return None
