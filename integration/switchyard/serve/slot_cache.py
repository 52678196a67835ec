"""Static-shape decoding: a preallocated KV cache whose rows are the running sequences, and CUDA graphs.

    decoder = StaticDecoder(model, max_rows=64, max_len=4096)
    decoder.add(slot, kv, length)               # copy a prefilled sequence's K/V into a free row
    logits_RV = decoder.forward({slot: token})  # one decode step for every row (a graph replay on CUDA)
    decoder.drop(slot)                          # the last row moves into the freed one: rows stay dense

Every tensor a decode step touches lives at a fixed address: per layer ``keys/values [R, H, max_len, D]``,
the next tokens ``[R, 1]``, their positions ``[R, 1]`` and a 4-D attention mask ``[R, 1, 1, max_len]``
(transformers passes a 4-D mask through untouched). A row writes its new K/V at its own position, so
sequences of any lengths decode together without padding or moving caches. On CUDA each step of ``b``
rows replays a graph captured for the smallest bucket ≥ b (1, 2, 4, …, max_rows); rows between b and
the bucket are padding (token 0 at position 0 of a free row, whose mask is reset when a sequence
takes it). The real-row flags ``valid [R]`` go to the MoE layers as their token mask
(``moe_token_mask``), so under an ``eval_capacity_factor`` padding rows take no expert capacity: the
4-D attention mask does not say which rows are real. The MoE layers inside must be graph-safe: in
serving they run ``replicated_tokens`` (no host sync; one all-reduce over the EP group), which NCCL
captures.

Tensor suffixes: R rows (slots decoding together), H KV heads, L cache positions, D head dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from switchyard.hf.patch import takes_moe_token_mask
from switchyard.log import get_logger

log = get_logger(__name__)


def _mask_values(attn_implementation: str, dtype: torch.dtype) -> tuple[torch.dtype, Any, Any] | None:
    """(mask dtype, attend value, blocked value) in the form the attention implementation adds/uses."""
    if attn_implementation == "sdpa":
        return torch.bool, True, False
    if attn_implementation == "eager":
        return dtype, 0.0, torch.finfo(dtype).min
    return None


def static_decode_unsupported(model: nn.Module) -> str | None:
    """Why this model cannot decode through ``StaticDecoder`` (None: it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if _mask_values(impl, torch.float32) is None:
        return f"attention implementation {impl!r} takes no 4-D mask (sdpa and eager do)"
    cache = DynamicCache(config=model.config)
    if not cache.layers:
        return "its cache layers are created lazily, so their kinds are unknown up front"
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return "it has sliding-window or other non-full attention layers"
    try:
        _slot_layer_class()(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, dtype=torch.long))
    except TypeError as err:  # a transformers whose cache-layer interface grew an abstract method
        return f"this transformers' cache-layer interface is not supported ({err})"
    return None


_SLOT_LAYER: type | None = None


def _slot_layer_class() -> type:
    """Built on first use so importing this module does not import transformers."""
    global _SLOT_LAYER
    if _SLOT_LAYER is not None:
        return _SLOT_LAYER
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One attention layer's rows: writes each row's new K/V at that row's position, returns all rows."""

        is_sliding = False

        def __init__(self, keys_RHLD: torch.Tensor, values_RHLD: torch.Tensor, position_R1: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values, self.position_R1 = keys_RHLD, values_RHLD, position_R1
            self.rows_R = torch.arange(keys_RHLD.shape[0], device=keys_RHLD.device)
            self.is_initialized = True

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            pass

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            assert key_states.shape[2] == 1, "static decoding writes one position per row"
            position_R = self.position_R1[:, 0]
            self.keys[self.rows_R, :, position_R] = key_states[:, :, 0]
            self.values[self.rows_R, :, position_R] = value_states[:, :, 0]
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self, *args: Any) -> int:
            return 0  # positions come from position_ids; the mask is 4-D, so no length is needed

        def get_max_length(self) -> int:
            return self.keys.shape[2]

        def get_max_cache_shape(self) -> int:
            return self.keys.shape[2]

    _SLOT_LAYER = SlotLayer
    return SlotLayer


def buckets_for(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: powers of two below ``max_rows``, and ``max_rows``."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return sizes + [max_rows]


class StaticDecoder:
    """The decode batch of ``ModelRunner``'s static mode (see the module docstring)."""

    def __init__(self, model: nn.Module, max_rows: int, max_len: int, use_graphs: bool | None = None,
                 on_step: Callable[[torch.Tensor], None] | None = None, initial_len: int = 1024) -> None:
        """``on_step(valid_R)`` runs inside every step (captured with it): per-step device bookkeeping.

        The cache starts at ``initial_len`` positions and doubles (up to ``max_len``) when a sequence
        needs more, dropping the graphs captured for the old size: attention reads every cached
        position, so a cache sized to the context actually in use is also a faster one."""
        from transformers import DynamicCache

        reason = static_decode_unsupported(model)
        if reason is not None:
            raise ValueError(f"static decoding is not possible for this model: {reason}")
        if max_rows < 1 or max_len < 2:
            raise ValueError(f"max_rows must be >= 1 and max_len >= 2, got {max_rows} and {max_len}")
        self.model, self.max_rows, self.max_len = model, max_rows, max_len
        self.cache_len = min(max_len, initial_len)
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.on_step = on_step
        self.takes_moe_token_mask = takes_moe_token_mask(model)
        self.num_layers = len(DynamicCache(config=model.config).layers)
        dtype = next(model.parameters()).dtype
        mask = _mask_values(model.config._attn_implementation or "eager", dtype)
        assert mask is not None
        self.mask_dtype, self.attend, self.blocked = mask
        self.slots: list[int] = []  # slot held by each row
        self.length_R: list[int] = []  # real tokens per row = the position of its next token
        self.keys: list[torch.Tensor] = []  # per layer [R, H, L, D], allocated at the first add
        self.values: list[torch.Tensor] = []
        kw = dict(device=self.device)
        self.tokens_R1 = torch.zeros(max_rows, 1, dtype=torch.long, **kw)
        self.position_R1 = torch.zeros(max_rows, 1, dtype=torch.long, **kw)
        self.valid_R = torch.zeros(max_rows, dtype=torch.long, **kw)  # 1 = a real row, 0 = padding
        self.mask_R11L = torch.full((max_rows, 1, 1, self.cache_len), self.blocked, dtype=self.mask_dtype, **kw)
        self.logits_RV: torch.Tensor | None = None
        self._caches: dict[int, Any] = {}  # bucket -> cache over rows [:bucket]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None

    # -- rows -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slots)

    def add(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Copy one prefilled sequence — per layer ``(keys [H, length, D], values [H, length, D])`` — into
        the next free row."""
        if slot in self.slots:
            raise ValueError(f"slot {slot} is already decoding")
        if len(self.slots) >= self.max_rows:
            raise ValueError(f"all {self.max_rows} rows are taken; raise max_batch")
        if length >= self.max_len:
            raise ValueError(f"a sequence of {length} tokens does not fit the cache of {self.max_len} positions")
        if len(kv) != self.num_layers:
            raise ValueError(f"{len(kv)} layers of K/V for a model of {self.num_layers}")
        if not self.keys:
            self._allocate(*kv[0])
        if length >= self.cache_len:
            self._grow(length + 1)
        row = len(self.slots)
        for i, (keys_HLD, values_HLD) in enumerate(kv):
            self.keys[i][row, :, :length] = keys_HLD
            self.values[i][row, :, :length] = values_HLD
        self.mask_R11L[row].fill_(self.blocked)
        self.mask_R11L[row, ..., :length] = self.attend
        self.slots.append(slot)
        self.length_R.append(length)

    def drop(self, slot: int) -> None:
        """Free ``slot``'s row; the last row moves into it (its positions up to its length)."""
        if slot not in self.slots:
            return
        row, last = self.slots.index(slot), len(self.slots) - 1
        if row != last:
            n = self.length_R[last]
            for keys, values in zip(self.keys, self.values):
                keys[row, :, :n] = keys[last, :, :n]
                values[row, :, :n] = values[last, :, :n]
            self.mask_R11L[row] = self.mask_R11L[last]
            self.slots[row], self.length_R[row] = self.slots[last], self.length_R[last]
        self.slots.pop()
        self.length_R.pop()

    def close(self) -> None:
        """Release the graphs, then the buffers. Graphs that captured NCCL collectives must go before the
        communicator, else ``destroy_process_group`` hangs in ``ncclCommDestroy`` (pytorch#115388)."""
        self._drop_graphs()
        self._caches.clear()
        self.keys, self.values, self.slots, self.length_R = [], [], [], []

    @contextlib.contextmanager
    def _explained_oom(self) -> Iterator[None]:
        try:
            yield
        except torch.OutOfMemoryError as err:
            raise ValueError(f"out of device memory for the static KV cache ({self.max_rows} rows x {self.cache_len} "
                             f"positions x {self.num_layers} layers); lower max_batch or max_model_len, or use "
                             f"decode: batched") from err

    def _drop_graphs(self) -> None:
        """Reset every graph and forget their memory pool: the allocator frees a pool once no graph uses it, so
        capturing into the old handle after a cache growth fails (an internal assert in CUDACachingAllocator)."""
        if self._graphs:
            torch.cuda.synchronize(self.device)
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._pool = None

    def _allocate(self, keys_HLD: torch.Tensor, values_HLD: torch.Tensor) -> None:
        def zeros(like: torch.Tensor) -> torch.Tensor:
            shape = (self.max_rows, like.shape[0], self.cache_len, like.shape[2])
            return torch.zeros(shape, dtype=like.dtype, device=self.device)

        with self._explained_oom():
            self.keys = [zeros(keys_HLD) for _ in range(self.num_layers)]
            self.values = [zeros(values_HLD) for _ in range(self.num_layers)]
        gib = sum(t.numel() * t.element_size() for t in self.keys + self.values) / 2**30
        log.info("static KV cache: %d rows x %d positions x %d layers (%.2f GiB; grows to %d positions)%s",
                 self.max_rows, self.cache_len, self.num_layers, gib, self.max_len,
                 ", CUDA graphs on" if self.use_graphs else "", ranks=[0])

    def _grow(self, needed: int) -> None:
        """Re-allocate every buffer with room for ``needed`` positions (at least double); graphs recapture."""
        if needed > self.max_len:
            raise ValueError(f"{needed} positions exceed the cache's maximum of {self.max_len}")
        self._drop_graphs()  # they point at the buffers about to be replaced
        old = self.cache_len
        self.cache_len = min(self.max_len, max(needed, 2 * old))

        def widen(t: torch.Tensor, dim: int, fill: Any = 0) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = self.cache_len
            new = torch.full(shape, fill, dtype=t.dtype, device=self.device)
            new.narrow(dim, 0, old).copy_(t)
            return new

        with self._explained_oom():
            self.keys = [widen(t, 2) for t in self.keys]
            self.values = [widen(t, 2) for t in self.values]
            self.mask_R11L = widen(self.mask_R11L, 3, self.blocked)
        self._caches.clear()
        log.info("static KV cache grew from %d to %d positions", old, self.cache_len, ranks=[0])

    # -- one step -----------------------------------------------------------------------------------------------
    def forward(self, next_token: dict[int, int]) -> torch.Tensor:
        """Logits ``[rows, V]`` of one decode step, in row order (``self.slots``)."""
        rows = len(self.slots)
        assert rows and set(next_token) == set(self.slots), (sorted(next_token), self.slots)
        bucket = next(b for b in buckets_for(self.max_rows) if b >= rows)
        if max(self.length_R) >= self.cache_len:
            self._grow(max(self.length_R) + 1)
        pad = [0] * (self.max_rows - rows)
        staged = torch.tensor([[next_token[s] for s in self.slots] + pad, self.length_R + pad, [1] * rows + pad],
                              dtype=torch.long, device=self.device)  # one small copy, no pinned buffer to race on
        self.tokens_R1[:, 0].copy_(staged[0])
        self.position_R1[:, 0].copy_(staged[1])
        self.valid_R.copy_(staged[2])
        if self.use_graphs:
            if bucket not in self._graphs:
                self._capture(bucket)
            self._graphs[bucket].replay()
        else:
            self._step(bucket)
        self.length_R = [n + 1 for n in self.length_R]
        assert self.logits_RV is not None
        return self.logits_RV[:rows]

    def _cache(self, bucket: int) -> Any:
        if bucket not in self._caches:
            from transformers import Cache

            layer_class = _slot_layer_class()
            layers = [layer_class(k[:bucket], v[:bucket], self.position_R1[:bucket]) for k, v in zip(self.keys, self.values)]
            self._caches[bucket] = Cache(layers=layers)
        return self._caches[bucket]

    def _step(self, bucket: int, bookkeeping: bool = True) -> None:
        """The captured body: mark each row's new position, run the model, keep the last logits."""
        from switchyard.serve.runner import cache_kwarg

        position_R1, mask_R11L = self.position_R1[:bucket], self.mask_R11L[:bucket]
        mask_R11L.scatter_(-1, position_R1.view(bucket, 1, 1, 1),
                           torch.full((bucket, 1, 1, 1), self.attend, dtype=self.mask_dtype, device=self.device))
        # padding rows out of expert capacity; valid_R sits at a fixed address, so a replay reads this step's rows
        moe = {"moe_token_mask": self.valid_R[:bucket]} if self.takes_moe_token_mask else {}
        out = self.model(input_ids=self.tokens_R1[:bucket], attention_mask=mask_R11L, position_ids=position_R1,
                         use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): self._cache(bucket)}, **moe)
        logits_RV = out.logits[:, -1]
        if self.logits_RV is None:
            self.logits_RV = torch.empty(self.max_rows, logits_RV.shape[-1], dtype=logits_RV.dtype, device=self.device)
        self.logits_RV[:bucket].copy_(logits_RV)
        if self.on_step is not None and bookkeeping:
            self.on_step(self.valid_R[:bucket])

    def _capture(self, bucket: int) -> None:
        """Warm up on a side stream (Triton/cuBLAS pick their kernels there), then capture one step.

        Warm-up and capture run the real step on the staged inputs; the replay that follows recomputes
        it, writing the same K/V at the same positions, so nothing is applied twice.
        """
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(bucket, bookkeeping=False)  # the replay right after does the step's bookkeeping
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(bucket)
        self._graphs[bucket] = graph
        log.info("captured a decode graph for %d rows", bucket, ranks=[0])
