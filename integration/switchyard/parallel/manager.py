"""ProcessGroupManager: one validated object that builds every process group once.

Every rank builds every group in the same order (torch.distributed requires all ranks to take part
in each ``new_group``). Before anything is built, the ranks compare a fingerprint of their settings,
so a rank started with different degrees makes *every* rank raise instead of deadlocking inside
``new_group`` or the first collective.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from switchyard.config import ParallelConfig
from switchyard.log import get_logger
from switchyard.parallel.layout import GROUP_KINDS, local_expert_ids, rank_layout
from switchyard.parallel.ports import free_port

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("SWITCHYARD_DIST_TIMEOUT_S", "600"))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the world from the launcher's environment (deepspeed, torchrun) unless already joined."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            # A plain `python script.py`: a world of one.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        else:
            raise RuntimeError(
                f"torch.distributed is not initialized and the launcher environment lacks {missing}; "
                "start with `deepspeed`, `torchrun`, or call torch.distributed.init_process_group first"
            )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistNetworkError as err:  # rank 0 hosts the rendezvous store on MASTER_PORT
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err).lower():
            raise
        raise ValueError(
            f"MASTER_PORT={os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is in use (another deepspeed or "
            "torchrun job on this host, e.g. a server beside a fine-tune?): start this job on a free port, "
            "`deepspeed --master_port <port> …` (torchrun: --master-port)"
        ) from None


def release_shm_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce (gloo runs: ~66 MiB of RAM each), which
    DeepSpeed never unlinks, so every CPU run left world-size segments behind until reboot. The other ranks opened
    theirs when the world formed, and a mapping outlives its name: unlinking at the end of a run is safe."""
    env = os.environ
    if not all(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK")) or not hasattr(os, "getuid"):
        return
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"
    Path("/dev/shm", name).unlink(missing_ok=True)


@dataclass(frozen=True)
class GroupInfo:
    """One rank's view of one kind of group."""

    kind: str
    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        return self.ranks.index(dist.get_rank())


class ProcessGroupManager:
    """Builds tp / pp / dp / ep / edp / etp groups from one world and hands them to DeepSpeed.

    ``ProcessGroupManager(tp=2, ep=2)`` on 8 ranks gives dp=4, edp=2. Use ``.group("ep")``,
    ``.rank("dp")``, ``.size("tp")`` for any kind, ``.mpu`` for ``deepspeed.initialize(mpu=...)``.
    """

    def __init__(
        self,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        etp: int | None = None,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        register_with_deepspeed: bool = True,
    ) -> None:
        init_distributed(backend, timeout_s)
        self.world_size = dist.get_world_size()
        self.global_rank = dist.get_rank()
        # etp=None means etp=tp: compared resolved, so ranks saying it differently are not told they disagree
        requested = (tp, pp, ep, tp if etp is None else etp)
        _check_same_settings_on_every_rank(requested, self.world_size)
        self.config = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp)
        self.sizes = self.config.derived(self.world_size)
        self.layout = rank_layout(self.world_size, tp=tp, pp=pp, ep=ep, etp=etp)
        self._groups: dict[str, GroupInfo] = {}
        for kind in GROUP_KINDS:
            for ranks in self.layout[kind]:
                group = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self._groups[kind] = GroupInfo(kind, tuple(ranks), group)
        for ranks in _model_parallel_groups(self.layout):  # tp × pp: what DeepSpeed sums a norm over
            group = dist.new_group(ranks) if len(ranks) > len(self.layout["tp"][0]) else None
            if self.global_rank in ranks:
                self._groups["mp"] = GroupInfo("mp", tuple(ranks), group or self._groups["tp"].group)
        self._groups["world"] = GroupInfo("world", tuple(range(self.world_size)), dist.group.WORLD)
        self.mpu = _make_mpu(self)
        if register_with_deepspeed:
            from switchyard.parallel.deepspeed_groups import register_expert_groups

            register_expert_groups(self)
        log.info(
            "process groups built: world=%d %s",
            self.world_size,
            " ".join(f"{k}={v}" for k, v in self.sizes.items()),
            ranks=[0],
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> "ProcessGroupManager":
        """Itself: the groups are this job's communicators (they do not pickle), and a deep-copied model (an EMA, a
        reference model) runs in the same job over the same ones."""
        memo[id(self)] = self
        return self

    # -- lookup -------------------------------------------------------------------------------
    def info(self, kind: str) -> GroupInfo:
        if kind not in self._groups:
            raise KeyError(f"no group of kind {kind!r}; kinds are {sorted(self._groups)}")
        return self._groups[kind]

    def group(self, kind: str) -> dist.ProcessGroup | None:
        return self.info(kind).group

    def ranks(self, kind: str) -> list[int]:
        return list(self.info(kind).ranks)

    def rank(self, kind: str) -> int:
        return self.info(kind).rank

    def size(self, kind: str) -> int:
        return self.info(kind).size

    @property
    def ep_group_name(self) -> str:
        """DeepSpeed's key for our expert groups in ``deepspeed.utils.groups``."""
        return f"ep_size_{self.size('ep')}"

    def local_expert_ids(self, num_experts: int) -> list[int]:
        return local_expert_ids(num_experts, self.size("ep"), self.rank("ep"))

    def __repr__(self) -> str:
        degrees = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"ProcessGroupManager(rank={self.global_rank}/{self.world_size}, {degrees})"


def _model_parallel_groups(layout: dict[str, list[list[int]]]) -> list[list[int]]:
    """The ranks of one data-parallel replica of the model: the tp groups of one rank per pipeline stage."""
    replicas = {tuple(sorted(r for g in layout["tp"] if set(g) & set(stages) for r in g)) for stages in layout["pp"]}
    return sorted(map(list, replicas))


def _fingerprint(settings: tuple) -> int:
    digest = hashlib.sha256(repr(settings).encode()).digest()
    return int.from_bytes(digest[:7], "little")


_NONE, _NOT_AN_INT = -1, -2  # how a setting that is not a non-negative int64 travels in the check below
_SHOWN = {_NONE: "None", _NOT_AN_INT: "<not an integer>"}


def _as_int64(setting: object) -> int:
    """A setting as one int64 of the check's tensor, whatever it is: a str, float or huge int on one rank must
    still reach the all-gather, or that rank raises alone and the others wait in it."""
    if setting is None:
        return _NONE
    if isinstance(setting, int) and not isinstance(setting, bool) and 0 <= setting < 2**63:
        return setting
    return _NOT_AN_INT


def _check_same_settings_on_every_rank(settings: tuple, world_size: int) -> None:
    """All-gather a hash of the settings; every rank raises if any rank disagrees.

    This runs before validation, so even a rank whose settings are invalid takes part and the
    others learn about it, instead of waiting on a collective it never joins.
    """
    if world_size == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([_fingerprint(settings), *map(_as_int64, settings)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    rows = [g.tolist() for g in gathered]
    if any(row[0] != rows[0][0] for row in rows):
        names = ("tp", "pp", "ep", "etp")
        table = "; ".join(
            f"rank {r}: " + ", ".join(f"{n}={_SHOWN.get(v, v)}" for n, v in zip(names, row[1:]))
            for r, row in enumerate(rows)
        )
        raise ValueError(
            f"ranks were started with different parallel settings ({table}); "
            "start every rank with the same tp/pp/ep/etp"
        )


def _make_mpu(manager: ProcessGroupManager):
    from switchyard.parallel.mpu import DeepSpeedMPU

    return DeepSpeedMPU(manager)
