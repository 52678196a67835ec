"""The MoE layer and its parts, in data-flow order: router → dispatcher → experts → combine; losses."""

from switchyard.moe.capacity import capacity_keep_mask, expert_capacity
from switchyard.moe.dispatcher import DispatchPlan, TokenDispatcher
from switchyard.moe.experts import EXPERT_IMPLS, GroupedExperts
from switchyard.moe.layer import MoELayer, MoEStats, SharedExperts
from switchyard.moe.losses import load_balancing_loss, sequence_balance_loss, z_loss
from switchyard.moe.router import Router, RouterOutput

__all__ = [
    "EXPERT_IMPLS",
    "DispatchPlan",
    "GroupedExperts",
    "MoELayer",
    "MoEStats",
    "Router",
    "RouterOutput",
    "SharedExperts",
    "TokenDispatcher",
    "capacity_keep_mask",
    "expert_capacity",
    "load_balancing_loss",
    "sequence_balance_loss",
    "z_loss",
]
