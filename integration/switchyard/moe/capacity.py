"""Expert capacity: which token copies an expert keeps when it may take at most C of them.

capacity C = ceil(capacity_factor * T * K / E) per expert, over this rank's T tokens (as in Switch,
GShard and Megatron-Core). Over-capacity copies are dropped: their expert output is missing from
the token's weighted sum (the residual stream carries the token on). ``"probs"`` keeps the copies
with the highest router weight, ``"position"`` the earliest tokens.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    policy: str = "probs",
) -> torch.Tensor:
    """Boolean ``keep_TK``: True where the copy fits in its expert's capacity."""
    num_tokens, top_k = topk_idx_TK.shape
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    flat_expert = topk_idx_TK.reshape(-1)
    if policy == "probs":
        priority = torch.argsort(topk_weight_TK.reshape(-1), descending=True, stable=True)
    elif policy == "position":
        priority = torch.arange(flat_expert.numel(), device=flat_expert.device)
    else:
        raise ValueError(f"drop policy {policy!r} is unknown; choose 'probs' or 'position'")
    # group copies by expert, best first inside each group; a copy's rank in its group decides
    by_expert = priority[torch.argsort(flat_expert[priority], stable=True)]
    # not bincount: on CUDA it reads the max back to the host, which a captured (serving) graph forbids
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_expert.device).index_add_(
        0, flat_expert, torch.ones_like(flat_expert, dtype=torch.long))
    group_start = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(flat_expert.numel(), device=flat_expert.device) - group_start[flat_expert[by_expert]]
    keep = torch.zeros_like(flat_expert, dtype=torch.bool)
    keep[by_expert] = rank_in_group < capacity
    return keep.view(num_tokens, top_k)
