"""Hand our expert groups to DeepSpeed under its own names, and mark modules DeepSpeed must treat as MoE.

DeepSpeed keeps expert groups in ``deepspeed.utils.groups._EXPERT_PARALLEL_GROUP`` /
``_EXPERT_DATA_PARALLEL_GROUP`` keyed ``"ep_size_{N}"``; its engine and ZeRO-1/2 look expert
parameters' ``group_name`` up there to reduce gradients and partition optimizer state. Registering
ours first means DeepSpeed uses *our* layout (its own creator skips names that exist).

DeepSpeed's engine turns its MoE handling on only when ``isinstance(module, deepspeed.moe.layer.MoE)``
(or AutoEP's layer); :class:`DeepSpeedMoEModule` is that hook without DeepSpeed's gate and experts. The engine
calls its ``set_deepspeed_parallelism`` once its own groups are set, the one moment to check they are ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.utils import groups as ds_groups

from switchyard.log import get_logger
from switchyard.parallel.tensor_shards import deepcopy_keeping_parameter_tags

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

log = get_logger(__name__)


# Names the last manager put into DeepSpeed's registry. A new manager drops them: DeepSpeed picks the largest
# registered ep group for its overflow check and its checkpoint writers, so a stale one must not linger.
_REGISTERED: set[str] = set()
# That manager's dense data-parallel ranks (this rank's group): DeepSpeed's must be the same.
_DENSE_DP_RANKS: list[int] = []

USE_DATA_BEFORE_EXPERT_MESSAGE = (
    "the DeepSpeed config sets use_data_before_expert_parallelism=true, which switchyard cannot honour: its "
    "ProcessGroupManager lays expert groups out in Megatron-Core's order (docs/parallelism.md) and registers them "
    "before DeepSpeed builds any, so DeepSpeed's data-before-expert layout would be silently ignored. Remove the key "
    "or set it to false"
)


def register_expert_groups(manager: "ProcessGroupManager") -> str:
    """Put our ep/edp groups into DeepSpeed's registry (replacing a previous manager's); returns the name used."""
    name = manager.ep_group_name
    for stale in _REGISTERED - {name}:
        for registry in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                         ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            registry.pop(stale, None)
    _REGISTERED.clear()
    _REGISTERED.add(name)
    _DENSE_DP_RANKS[:] = manager.ranks("dp")
    for registry, ranks_registry, kind in (
        (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS, "ep"),
        (ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, "edp"),
    ):
        previous = ranks_registry.get(name)
        if previous is not None and list(previous) != manager.ranks(kind):
            log.warning(
                "replacing DeepSpeed's %s group %s (ranks %s) with switchyard's (ranks %s)",
                kind, name, list(previous), manager.ranks(kind), ranks=None,
            )
        registry[name] = manager.group(kind)
        ranks_registry[name] = manager.ranks(kind)
    ds_groups.expert_tensor_parallel_world_size = manager.size("etp")
    return name


def check_deepspeed_uses_our_groups(use_data_before_expert_parallel_: bool = False) -> None:
    """``ValueError`` unless DeepSpeed reduces dense gradients over the registered manager's data-parallel group
    and holds no expert group beside the manager's (a mismatch reduces gradients over the wrong ranks).

    Decided by the config and the world, so the same on every rank: all raise, none is left in a collective.
    """
    if use_data_before_expert_parallel_:
        raise ValueError(USE_DATA_BEFORE_EXPERT_MESSAGE)
    foreign = sorted(set(ds_groups._EXPERT_PARALLEL_GROUP) - _REGISTERED)
    if foreign:
        raise ValueError(
            f"DeepSpeed holds expert groups {foreign} beside switchyard's {sorted(_REGISTERED)} (AutoEP's "
            "expert_parallel section in the DeepSpeed config, or a DeepSpeed MoE layer, builds its own); DeepSpeed "
            "would pick the largest for its overflow check and checkpoint writers. Remove expert_parallel from the "
            "DeepSpeed config and build every MoE layer with the one ProcessGroupManager"
        )
    group = ds_groups._get_data_parallel_group()
    ranks = None if group is None else dist.get_process_group_ranks(group)
    if ranks != _DENSE_DP_RANKS:
        raise ValueError(
            f"DeepSpeed reduces dense gradients of rank {dist.get_rank()} over ranks {ranks}, but switchyard's "
            f"data-parallel group is {_DENSE_DP_RANKS}: pass mpu=manager.mpu to deepspeed.initialize, and leave "
            "tensor_parallel.autotp_size out of the DeepSpeed config (AutoTP replaces the mpu with its own groups)"
        )


def tag_expert_parameters(module: nn.Module, group_name: str) -> int:
    """Mark every parameter of ``module`` as an expert parameter of ``group_name``; returns the count.

    ``allreduce=False`` keeps them out of the dense data-parallel all-reduce; ``group_name`` routes
    their reduction and ZeRO partitioning to the expert-data-parallel group of that name.
    """
    count = 0
    for param in module.parameters():
        param.allreduce = False
        param.group_name = group_name
        count += 1
    return count


class DeepSpeedMoEModule(_DeepSpeedMoE):
    """Base for modules holding expert parameters, recognized by DeepSpeed's engine as MoE layers.

    Deliberately skips ``deepspeed.moe.layer.MoE.__init__`` (which builds DeepSpeed's own gate and
    experts): subclasses call :meth:`_init_expert_module` from their own ``__init__``.
    """

    def __init__(self, *args, **kwargs) -> None:  # pragma: no cover - subclasses define their own
        raise TypeError("subclass DeepSpeedMoEModule and call _init_expert_module from your __init__")

    def _init_expert_module(self, num_experts: int, ep_size: int, expert_group_name: str) -> None:
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.expert_group_name = expert_group_name
        self.num_local_experts = num_experts // ep_size

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        return deepcopy_keeping_parameter_tags(self, memo)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine; our groups were registered by the ProcessGroupManager."""
        if self.expert_group_name in ds_groups._EXPERT_PARALLEL_GROUP:
            if self.expert_group_name in _REGISTERED:
                check_deepspeed_uses_our_groups(use_data_before_expert_parallel_)
            return
        if self.ep_size == 1:
            # No expert parallelism: experts are plain data-parallel; let DeepSpeed build ep=1 groups.
            ds_groups._create_expert_and_data_parallel(
                1, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )
        else:
            raise RuntimeError(
                f"expert group {self.expert_group_name!r} is not registered with DeepSpeed; build a "
                "switchyard.ProcessGroupManager before deepspeed.initialize"
            )

    def forward(self, *args, **kwargs) -> torch.Tensor:  # pragma: no cover - subclasses override
        raise NotImplementedError
