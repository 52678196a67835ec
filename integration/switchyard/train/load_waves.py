"""Load an HF model on the ranks of a node in waves, so that host memory holds the whole model once per loading
rank, not once per rank.

Every rank of a job started from an HF model (dense, to upcycle; or MoE, to adopt) reads the whole model into host
memory, patches it, and keeps its share: the dense part and its 1/ep of the experts. Eight ranks loading Mixtral-8x7B
at once would hold eight copies of it (~94 GB each in bf16) before any of them drops the other ranks' experts. Here
the ranks of a node take turns, ``at_once`` at a time; a wave starts when the previous one has finished on every node.
``at_once`` is ``model.load_ranks_at_once``, or sized from the smallest free host memory of any node:

    at_once = (available − ranks_per_node · kept) // loaded      (at least 1, at most ranks_per_node)

``loaded`` is the model as transformers loads it and ``kept`` a rank's patched share (of its pipeline stage and
tensor-parallel shard, which the fine-tune cuts inside the wave), both counted on the meta device at the load dtype.
A switchyard checkpoint is not loaded in waves: each rank reads only its own experts and pipeline stage.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from switchyard.hf.checkpoint import agree
from switchyard.log import get_logger

log = get_logger(__name__)
T = TypeVar("T")

# How long ranks wait for each other's loading or rank 0's preparation (tokenizing a large dataset can take hours,
# far beyond the collective timeout); a rank that dies closes its connections, so the others still fail at once.
RANK0_WAIT_S = float(os.environ.get("SWITCHYARD_RANK0_WAIT_S", 7 * 24 * 3600))
GB = 1e9


def patient_group() -> dist.ProcessGroup:
    """A gloo group over every rank whose collectives wait ``RANK0_WAIT_S``. Collective: every rank creates it."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=RANK0_WAIT_S))


@dataclass(frozen=True)
class LoadFootprint:
    """Host bytes of one rank's load: the model as transformers builds it, and the patched share the rank keeps."""

    loaded_bytes: int
    kept_bytes: int


def load_dtype(precision: str) -> torch.dtype:
    """The dtype an HF source is loaded in: the one the engine trains in (``train.precision``; DeepSpeed casts the
    module to it, and keeps its fp32 master weights from those values), so a bf16 run holds half the host bytes."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def footprint_of(hf_config, kept_params: int | None, precision: str) -> LoadFootprint:
    """The model ``hf_config`` describes as transformers loads it (counted on the meta device) and ``kept_params``
    (None: the whole model), in bytes of ``load_dtype(precision)``."""
    from switchyard.hf.checkpoint import empty_model

    itemsize = torch.empty((), dtype=load_dtype(precision)).element_size()
    loaded = sum(p.numel() for p in empty_model(hf_config).parameters())
    return LoadFootprint(loaded_bytes=loaded * itemsize, kept_bytes=(loaded if kept_params is None else kept_params)
                         * itemsize)


def ranks_at_once(footprint: LoadFootprint, ranks_per_node: int, available_bytes: int) -> int:
    """How many ranks of a node can load at the same time: every rank's kept share stays in memory until the
    engine moves it to its device, and each loading rank needs room for the whole model on top."""
    room = available_bytes - ranks_per_node * footprint.kept_bytes
    fit = room // max(footprint.loaded_bytes, 1)
    return int(min(ranks_per_node, max(1, fit)))


@dataclass(frozen=True)
class NodeLayout:
    """Where this rank sits among the ranks of its host (by host name, whatever the launcher set)."""

    index: int  # this rank's place among its node's ranks
    ranks_per_node: int  # the most ranks any node has


def node_layout(group: dist.ProcessGroup) -> NodeLayout:
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    mine = hosts[dist.get_rank()]
    index = sum(1 for host in hosts[: dist.get_rank()] if host == mine)
    return NodeLayout(index, max(hosts.count(host) for host in set(hosts)))


def _min_over_ranks(value: int, group: dist.ProcessGroup) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor.item())


def _available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def load_in_waves(load: Callable[[], T], footprint: Callable[[], LoadFootprint], at_once: int | None = None) -> T:
    """``load()`` on every rank, ``at_once`` ranks of each node at a time (None: sized from the free host memory,
    see the module doc). A failure on any rank raises on every rank at the end of its wave (its own error there, a
    ``CheckpointError`` naming it on the others). Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load()
    group = patient_group()
    layout = node_layout(group)
    if at_once is None:
        size = footprint()
        available = _min_over_ranks(_available_host_bytes(), group)
        at_once = ranks_at_once(size, layout.ranks_per_node, available)
        needed = layout.ranks_per_node * size.kept_bytes + size.loaded_bytes
        if needed > available:
            log.warning("loading the model needs about %.1f GB of host memory per node (the whole model, %.1f GB, "
                        "on one loading rank, and each of %d ranks' share, %.1f GB) but %.1f GB are free: expect the "
                        "out-of-memory killer. Start fewer ranks per node, or load a switchyard checkpoint "
                        "(switchyard upcycle / save_pretrained), of which each rank reads its own share", needed / GB,
                        size.loaded_bytes / GB, layout.ranks_per_node, size.kept_bytes / GB, available / GB,
                        ranks=[0])
        elif at_once < layout.ranks_per_node:
            log.info("loading the model %d rank(s) of each node at a time: %.1f GB as loaded, %.1f GB kept per rank, "
                     "%.1f GB of host memory free (set model.load_ranks_at_once to choose)", at_once,
                     size.loaded_bytes / GB, size.kept_bytes / GB, available / GB, ranks=[0])
    elif at_once < layout.ranks_per_node:
        log.info("loading the model %d rank(s) of each node at a time (model.load_ranks_at_once)", at_once, ranks=[0])
    waves = math.ceil(layout.ranks_per_node / at_once)
    result, error = None, None
    for wave in range(waves):
        if wave == layout.index // at_once:
            try:
                result = load()
            except Exception as err:  # noqa: BLE001 - raised again below, after every rank has heard of it
                error = err
        agree(error, "loading the model", group)
    return result  # type: ignore[return-value]
