"""Rank layout, process groups, DeepSpeed's mpu, the differentiable all-to-all and tensor parallelism."""

from switchyard.parallel.all_to_all import all_to_all
from switchyard.parallel.layout import GROUP_KINDS, local_expert_ids, rank_coordinates, rank_layout
from switchyard.parallel.manager import ProcessGroupManager, init_distributed
from switchyard.parallel.tensor_parallel import apply_tensor_parallel, full_state_dict

__all__ = [
    "GROUP_KINDS",
    "ProcessGroupManager",
    "all_to_all",
    "apply_tensor_parallel",
    "full_state_dict",
    "init_distributed",
    "local_expert_ids",
    "rank_coordinates",
    "rank_layout",
]
