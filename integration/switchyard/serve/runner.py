"""The model runner: executes step plans on this rank's model shard — the same forwards on every rank.

A ``StepPlan`` lists the slots freed since the last step, then one item per running sequence: a new
sequence's whole prompt (prefill into a fresh ``DynamicCache``) or a running one's last token (decode).

    decode="static"      the step's new prompts are prefilled together (left-padded, up to
                         PREFILL_TOKENS per forward); then ONE forward decodes every other running
                         sequence as a row of a preallocated KV cache, with static shapes and, on
                         CUDA, a captured graph per batch-size bucket (slot_cache.py)
    decode="batched"     batch-1 prefills; the decode rows live in one left-padded ``DynamicCache``: it works with
                         any attention implementation (2-D padding mask), at the price of copies as
                         rows join and leave and one eager forward per step
                         (what ``generate`` does for a padded batch)
    decode="sequential"  one batch-1 forward per item: bitwise the math of ``generate(do_sample=False)``
                         on that prompt alone, at one forward per sequence per step.
    decode="auto"        static where the model allows it (sdpa/eager attention, full-attention layers),
                         else batched (and sequential for sliding-window caches)

Every rank derives the same forwards from the same plan, in the same order, so the MoE layers'
all-to-alls always pair up.

Tensor suffixes: B rows of the decode batch, L cached positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from switchyard.log import get_logger


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works there until
    5.40); 5.17, on the GPU image, knows only ``past_key_values`` and silently ignores ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

log = get_logger(__name__)

DECODE_MODES = ("auto", "static", "batched", "sequential")
PREFILL_TOKENS = 8192  # padded prompt tokens per batched-prefill forward (static mode)


@dataclass
class StepPlan:
    """One scheduler step, identical on every rank: slots to free, then forwards to run in order."""

    items: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (slot, input ids, fresh cache)
    release: list[int] = field(default_factory=list)
    stop: bool = False

    def to_wire(self) -> tuple:
        items = tuple((s, tuple(ids), fresh) for s, ids, fresh in self.items)
        return (self.stop, tuple(self.release), items)

    @classmethod
    def from_wire(cls, wire: tuple) -> "StepPlan":
        stop, release, items = wire
        return cls([(s, list(ids), fresh) for s, ids, fresh in items], list(release), stop)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., l, d]`` K/V (or ``[B, l]`` mask) left-padded with zeros to ``length`` positions."""
    pad = length - t.shape[-2 if t.dim() == 4 else -1]
    if pad == 0:
        return t
    return F.pad(t, (0, 0, pad, 0)) if t.dim() == 4 else F.pad(t, (pad, 0))


class DecodeBatch:
    """The running sequences' KV caches as rows of one left-padded ``DynamicCache``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.slots: list[int] = []
        self.cache: Any = None
        self.mask_BL: torch.Tensor | None = None  # 1 = a real position, 0 = left padding
        self.length_B: list[int] = []  # real tokens per row = the position of its next token

    def add(self, slot: int, cache: Any, length: int) -> None:
        mask_1L = torch.ones(1, length, dtype=torch.long, device=cache.layers[0].keys.device)
        if self.cache is None:
            self.slots, self.cache, self.mask_BL, self.length_B = [slot], cache, mask_1L, [length]
            return
        assert self.mask_BL is not None
        total = max(self.mask_BL.shape[1], length)
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, total), _pad_left(new.keys, total)])
            mine.values = torch.cat([_pad_left(mine.values, total), _pad_left(new.values, total)])
        self.mask_BL = torch.cat([_pad_left(self.mask_BL, total), _pad_left(mask_1L, total)])
        self.slots.append(slot)
        self.length_B.append(length)

    def drop(self, slot: int) -> None:
        if slot not in self.slots:
            return
        row = self.slots.index(slot)
        keep = [r for r in range(len(self.slots)) if r != row]
        self.slots.pop(row)
        self.length_B.pop(row)
        if not keep:
            self.cache, self.mask_BL = None, None
            return
        assert self.mask_BL is not None
        mask_BL = self.mask_BL[keep]
        first = int(mask_BL.any(0).nonzero()[0])  # columns before it are padding in every remaining row
        index = torch.tensor(keep, device=mask_BL.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask_BL = mask_BL[:, first:]

    def __len__(self) -> int:
        return len(self.slots)

    def forward(self, next_token: dict[int, int]) -> torch.Tensor:
        """One decode forward for every row; returns the logits ``[B, V]`` in row order."""
        model, device = self.model, self.device
        assert self.mask_BL is not None and set(next_token) == set(self.slots), (sorted(next_token), self.slots)
        input_ids = torch.tensor([[next_token[s]] for s in self.slots], dtype=torch.long, device=device)
        self.mask_BL = torch.cat([self.mask_BL, self.mask_BL.new_ones(len(self.slots), 1)], dim=1)
        positions = torch.tensor([[n] for n in self.length_B], dtype=torch.long, device=device)
        out = model(input_ids=input_ids, attention_mask=self.mask_BL, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_kwarg(model): self.cache})
        self.length_B = [n + 1 for n in self.length_B]
        return out.logits[:, -1]


class ModelRunner:
    """Runs step plans on this rank's model shard (see the module docstring for the decode modes)."""

    def __init__(self, model: nn.Module, count_experts: bool = False, decode: str = "auto", max_batch: int = 16,
                 max_model_len: int | None = None) -> None:
        """``count_experts``: keep per-expert token counts (rank 0: in serving every EP rank routes every
        token, so one rank's counts are the totals). ``max_batch`` / ``max_model_len`` size the static
        cache; every rank of a server must pass the same values (the captured graphs must pair up)."""
        from switchyard.hf.patch import moe_layers
        from switchyard.serve.slot_cache import static_decode_unsupported

        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r} is not one of {DECODE_MODES}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        if decode in ("auto", "static"):
            reason = static_decode_unsupported(model)
            if reason is not None and decode == "static":
                raise ValueError(f"decode='static' is not possible for this model: {reason}; use decode='batched'")
            if reason is not None:
                log.info("decode=auto: batched, not static (%s)", reason, ranks=[0])
            decode = "batched" if reason is not None else "static"
        self.decode = decode
        self.caches: dict[int, Any] = {}  # per-slot caches: sequential mode, or prefilled and not yet batched
        self.forwards = 0
        self._layers = moe_layers(model) if count_experts else []
        # tokens routed to each global expert, per MoE layer: host totals, and the device part not yet added
        self.expert_counts_LE: torch.Tensor | None = None
        self._unsynced_LE: torch.Tensor | None = None
        if self._layers:
            shape = (len(self._layers), self._layers[0].num_experts)
            self.expert_counts_LE = torch.zeros(shape, dtype=torch.long)
            self._unsynced_LE = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.batch: Any = self._new_batch()

    def _new_batch(self) -> Any:
        from switchyard.serve.slot_cache import StaticDecoder

        if self.decode == "static":
            return StaticDecoder(self.model, self.max_batch, self.max_model_len, on_step=self._count_routed)
        return DecodeBatch(self.model)

    def _forward_one(self, slot: int, ids: list[int], fresh: bool) -> torch.Tensor:
        from transformers import DynamicCache

        if fresh:
            self.caches[slot] = DynamicCache(config=self.model.config)
            if self.decode == "batched" and not self._batchable(self.caches[slot]):
                log.warning("this model's cache has sliding-window layers: decoding one sequence per forward",
                            ranks=[0])
                self.decode = "sequential"
        assert slot in self.caches, f"slot {slot} decodes without a cache (plans out of order?)"
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                         **{cache_kwarg(self.model): self.caches[slot]})
        self._count_routed(None)
        self.forwards += 1
        return out.logits[0, -1]

    def _prefill_together(self, prompts: list[tuple[int, list[int]]]) -> dict[int, torch.Tensor]:
        """Prefill several prompts per forward, left-padded as ``generate`` pads a batch; each slot keeps
        its rows of K/V (``self.caches[slot] = (kv, length)``) until it joins the decode rows."""
        from transformers import DynamicCache

        logits: dict[int, torch.Tensor] = {}
        for group in _prefill_groups(prompts, PREFILL_TOKENS):
            width = max(len(ids) for _, ids in group)
            ids_BP = torch.zeros(len(group), width, dtype=torch.long)
            mask_BP = torch.zeros(len(group), width, dtype=torch.long)
            for row, (_, ids) in enumerate(group):
                ids_BP[row, width - len(ids):] = torch.tensor(ids)
                mask_BP[row, width - len(ids):] = 1
            ids_BP, mask_BP = ids_BP.to(self.device), mask_BP.to(self.device)
            positions_BP = (mask_BP.cumsum(-1) - 1).clamp_min(0)
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=positions_BP, use_cache=True,
                             logits_to_keep=1, **{cache_kwarg(self.model): cache})
            self._count_routed(mask_BP.reshape(-1))
            self.forwards += 1
            for row, (slot, ids) in enumerate(group):
                n = len(ids)
                kv = [(layer.keys[row, :, width - n:], layer.values[row, :, width - n:]) for layer in cache.layers]
                self.caches[slot] = (kv, n)
                logits[slot] = out.logits[row, -1]
        return logits

    @staticmethod
    def _batchable(cache: Any) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _count_routed(self, valid_T: torch.Tensor | None) -> None:
        """Add the last forward's routed copies per expert (rows with ``valid_T == 0`` are padding).

        Device ops only, no host sync: the static decoder captures this inside its graphs."""
        if self._unsynced_LE is None:
            return
        for counts_E, layer in zip(self._unsynced_LE, self._layers):
            routed = layer.last_router_output
            if routed is None:
                continue
            experts_TK = routed.topk_idx_TK
            weight_TK = (valid_T.view(-1, 1).expand_as(experts_TK) if valid_T is not None
                         else torch.ones_like(experts_TK))
            counts_E.index_add_(0, experts_TK.reshape(-1), weight_TK.reshape(-1).to(counts_E.dtype))

    def expert_counts(self) -> list[list[int]] | None:
        """Tokens routed to each expert of each MoE layer, up to the last ``sync_stats`` (any thread)."""
        return self.expert_counts_LE.tolist() if self.expert_counts_LE is not None else None

    def sync_stats(self) -> None:
        """Move the device-side counts into the host totals (the engine's thread; one small copy)."""
        if self._unsynced_LE is None or self.expert_counts_LE is None:
            return
        self.expert_counts_LE += self._unsynced_LE.cpu()
        self._unsynced_LE.zero_()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture every decode graph before the first request (static mode on CUDA; a no-op otherwise).

        Without it the first steps at each new batch size capture a graph (and compile kernels) while
        clients wait. First one dummy prompt longer than the MoE layers' all-experts limit is prefilled
        and dropped: it takes their sort path, whose Triton kernels would otherwise first compile during
        a client's prefill (the decode buckets reach only the small-batch and all-experts paths; a fresh
        server's first load test stalled ~3 s on an H200 without it). Then dummy one-token sequences fill
        every slot, decode once at each bucket size, largest first (the graphs share one memory pool), and
        leave. Every rank runs the same steps, so the EP all-reduces pair up; the per-expert counts are
        reset afterwards."""
        from switchyard.moe.layer import ALL_EXPERTS_MAX_TOKENS
        from switchyard.serve.slot_cache import buckets_for

        if self.decode != "static" or not self.batch.use_graphs:
            return
        slots = list(range(self.max_batch))
        long_prompt = [0] * min(2 * ALL_EXPERTS_MAX_TOKENS, self.max_model_len - 1)
        self.execute(StepPlan([(slots[0], long_prompt, True)]))
        self.execute(StepPlan([], release=[slots[0]]))
        self.execute(StepPlan([(slot, [0], True) for slot in slots]))
        live = len(slots)
        for bucket in reversed(buckets_for(self.max_batch)):
            self.execute(StepPlan([(slot, [0], False) for slot in slots[:bucket]], release=slots[bucket:live]))
            live = bucket
        self.execute(StepPlan([], release=slots[:live]))
        if self._unsynced_LE is not None:
            self._unsynced_LE.zero_()
        log.info("decode graphs captured for batch sizes %s", buckets_for(self.max_batch), ranks=[0])

    def close(self) -> None:
        """Free the KV caches and any captured graphs (before the process groups are destroyed)."""
        if hasattr(self.batch, "close"):
            self.batch.close()
        self.caches.clear()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Last-position logits ``[items, V]``, one row per item in plan order."""
        for slot in plan.release:
            self.caches.pop(slot, None)
            self.batch.drop(slot)
        logits: dict[int, torch.Tensor] = {}
        decode: dict[int, int] = {}
        if self.decode == "static":
            prompts = [(slot, ids) for slot, ids, fresh in plan.items if fresh]
            for slot, _ in prompts:
                self.batch.drop(slot)
            logits.update(self._prefill_together(prompts))
        for slot, ids, fresh in plan.items:
            if slot in logits:
                continue
            if fresh or self.decode == "sequential":
                if fresh:
                    self.batch.drop(slot)  # a reused slot whose release this rank has not seen: impossible
                logits[slot] = self._forward_one(slot, ids, fresh)
            else:
                decode[slot] = ids[-1]
        if not decode:
            return torch.stack([logits[slot] for slot, _, _ in plan.items]) if plan.items else torch.empty(0)
        for slot in decode:
            if slot not in self.batch.slots:  # prefilled last step: joins the batch now
                if self.decode == "static":
                    self.batch.add(slot, *self.caches.pop(slot))
                else:
                    cache = self.caches.pop(slot)
                    self.batch.add(slot, cache, cache.get_seq_length())
        logits_BV = self.batch.forward(decode)
        if self.decode == "batched":
            self._count_routed(None)
        self.forwards += 1
        if len(decode) == len(plan.items) and list(decode) == self.batch.slots:
            return logits_BV  # a pure decode step in row order: no gather
        row_of = {slot: row for row, slot in enumerate(self.batch.slots)}
        logits.update({slot: logits_BV[row_of[slot]] for slot in decode})
        return torch.stack([logits[slot] for slot, _, _ in plan.items])


def _prefill_groups(prompts: list[tuple[int, list[int]]], max_tokens: int) -> list[list[tuple[int, list[int]]]]:
    """Consecutive prompts per forward while rows x longest prompt stays within ``max_tokens``
    (a longer prompt goes alone). The same plan gives the same groups on every rank."""
    groups: list[list[tuple[int, list[int]]]] = []
    width = 0
    for item in prompts:
        n = len(item[1])
        if groups and (len(groups[-1]) + 1) * max(width, n) <= max_tokens:
            groups[-1].append(item)
            width = max(width, n)
        else:
            groups.append([item])
            width = n
    return groups
