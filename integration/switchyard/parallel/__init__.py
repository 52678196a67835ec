"""Rank layout, process groups, DeepSpeed's mpu and the differentiable all-to-all."""

from switchyard.parallel.all_to_all import all_to_all
from switchyard.parallel.layout import GROUP_KINDS, local_expert_ids, rank_coordinates, rank_layout
from switchyard.parallel.manager import ProcessGroupManager, init_distributed

__all__ = [
    "GROUP_KINDS",
    "ProcessGroupManager",
    "all_to_all",
    "init_distributed",
    "local_expert_ids",
    "rank_coordinates",
    "rank_layout",
]
