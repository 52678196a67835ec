"""The model runner: executes step plans on this rank's model shard — the same forwards on every rank.

A ``StepPlan`` lists the slots freed since the last step, then one item per running sequence: a new
sequence's whole prompt (prefill into a fresh ``DynamicCache``) or a running one's last token (decode).

    decode="batched"     every prefill is its own batch-1 forward; then ONE forward decodes every
                         other running sequence: their caches live as rows of one left-padded
                         ``DynamicCache`` with a 2-D padding mask and per-row positions (what
                         ``generate`` does for a padded batch); a sequence joins by padding the shorter
                         side, leaves by dropping its row (and all-padding columns).
    decode="sequential"  one batch-1 forward per item: bitwise the math of ``generate(do_sample=False)``
                         on that prompt alone, at one forward per sequence per step.

Every rank derives the same forwards from the same plan, in the same order, so the MoE layers'
all-to-alls always pair up.

Tensor suffixes: B rows of the decode batch, L cached positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from switchyard.log import get_logger


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works there until
    5.40); 5.17, on the GPU image, knows only ``past_key_values`` and silently ignores ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

log = get_logger(__name__)

DECODE_MODES = ("batched", "sequential")


@dataclass
class StepPlan:
    """One scheduler step, identical on every rank: slots to free, then forwards to run in order."""

    items: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (slot, input ids, fresh cache)
    release: list[int] = field(default_factory=list)
    stop: bool = False
    sync_stats: bool = False  # every rank adds its per-expert token counts into rank 0's (one all-reduce)

    def to_wire(self) -> tuple:
        items = tuple((s, tuple(ids), fresh) for s, ids, fresh in self.items)
        return (self.stop, tuple(self.release), items, self.sync_stats)

    @classmethod
    def from_wire(cls, wire: tuple) -> "StepPlan":
        stop, release, items, sync_stats = wire
        return cls([(s, list(ids), fresh) for s, ids, fresh in items], list(release), stop, sync_stats)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., l, d]`` K/V (or ``[B, l]`` mask) left-padded with zeros to ``length`` positions."""
    pad = length - t.shape[-2 if t.dim() == 4 else -1]
    if pad == 0:
        return t
    return F.pad(t, (0, 0, pad, 0)) if t.dim() == 4 else F.pad(t, (pad, 0))


class DecodeBatch:
    """The running sequences' KV caches as rows of one left-padded ``DynamicCache``."""

    def __init__(self) -> None:
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

    def forward(self, model: nn.Module, next_token: dict[int, int], device: torch.device) -> torch.Tensor:
        """One decode forward for every row; returns the logits ``[B, V]`` in row order."""
        assert self.mask_BL is not None and set(next_token) == set(self.slots), (sorted(next_token), self.slots)
        input_ids = torch.tensor([[next_token[s]] for s in self.slots], dtype=torch.long, device=device)
        self.mask_BL = torch.cat([self.mask_BL, self.mask_BL.new_ones(len(self.slots), 1)], dim=1)
        positions = torch.tensor([[n] for n in self.length_B], dtype=torch.long, device=device)
        out = model(input_ids=input_ids, attention_mask=self.mask_BL, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_kwarg(model): self.cache})
        self.length_B = [n + 1 for n in self.length_B]
        return out.logits[:, -1]


class ModelRunner:
    """Runs step plans on this rank's model shard (see the module docstring for the two decode modes)."""

    def __init__(self, model: nn.Module, count_experts: bool = False, decode: str = "batched",
                 stats_group: Any = None) -> None:
        """``count_experts``: keep per-expert token counts. With ``stats_group`` (the ranks that each route
        a share of the tokens, see token_split.py) every rank counts and a plan's ``sync_stats`` sums the
        counts into rank 0's ``expert_counts_LE``; without, this rank's counts are the totals."""
        from switchyard.hf.patch import moe_layers

        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r} is not one of {DECODE_MODES}")
        self.model = model.eval()
        self.decode = decode
        self.device = next(model.parameters()).device
        self.caches: dict[int, Any] = {}  # per-slot caches: sequential mode, or prefilled and not yet batched
        self.batch = DecodeBatch()
        self.forwards = 0
        self.stats_group = stats_group
        self._layers = moe_layers(model) if count_experts else []
        # tokens routed to each global expert, per MoE layer: the totals (rank 0), and this rank's unsynced part
        self.expert_counts_LE: torch.Tensor | None = None
        self._unsynced_LE: torch.Tensor | None = None
        if self._layers:
            shape = (len(self._layers), self._layers[0].num_experts)
            self.expert_counts_LE = torch.zeros(shape, dtype=torch.long)
            self._unsynced_LE = torch.zeros(shape, dtype=torch.long, device=self.device)

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
        self._count()
        return out.logits[0, -1]

    @staticmethod
    def _batchable(cache: Any) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _count(self) -> None:
        self.forwards += 1
        if self._unsynced_LE is not None:
            for i, layer in enumerate(self._layers):
                if layer.last_stats is not None:
                    self._unsynced_LE[i] += layer.last_stats.tokens_per_expert_E

    def expert_counts(self) -> list[list[int]] | None:
        """Tokens routed to each expert of each MoE layer so far (rank 0; safe from the metrics thread)."""
        if self.expert_counts_LE is None or self._unsynced_LE is None:
            return None
        total_LE = self.expert_counts_LE.clone()
        if self.stats_group is None:  # nothing to meet: this rank's own counts are the totals
            total_LE += self._unsynced_LE.cpu()
        return total_LE.tolist()

    def sync_stats(self) -> None:
        """Add every rank's counts since the last sync to the totals (a collective when ``stats_group``)."""
        if self._unsynced_LE is None or self.expert_counts_LE is None:
            return
        counts_LE = self._unsynced_LE.cpu()
        if self.stats_group is not None:
            dist.all_reduce(counts_LE, group=self.stats_group)
        self.expert_counts_LE += counts_LE
        self._unsynced_LE.zero_()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[torch.Tensor]:
        """Last-position logits ``[V]`` of each item, in plan order."""
        for slot in plan.release:
            self.caches.pop(slot, None)
            self.batch.drop(slot)
        logits: dict[int, torch.Tensor] = {}
        decode: dict[int, int] = {}
        for slot, ids, fresh in plan.items:
            if fresh or self.decode == "sequential":
                if fresh:
                    self.batch.drop(slot)  # a reused slot whose release this rank has not seen: impossible
                logits[slot] = self._forward_one(slot, ids, fresh)
            else:
                decode[slot] = ids[-1]
        if decode:
            for slot in decode:
                if slot not in self.batch.slots:  # prefilled last step: joins the batch now
                    cache = self.caches.pop(slot)
                    self.batch.add(slot, cache, cache.get_seq_length())
            logits_BV = self.batch.forward(self.model, decode, self.device)
            self._count()
            logits.update({slot: logits_BV[row] for row, slot in enumerate(self.batch.slots)})
        if plan.sync_stats and self.stats_group is not None:
            self.sync_stats()
        return [logits[slot] for slot, _, _ in plan.items]
