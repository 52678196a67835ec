"""Expert capacity: which token copies an expert keeps when it may take at most C of them.

capacity C = ceil(capacity_factor * T * K / E) per expert, over this rank's T tokens (as in Switch,
GShard and Megatron-Core). Over-capacity copies are dropped: their expert output is missing from
the token's weighted sum (the residual stream carries the token on). ``"probs"`` keeps the copies
with the highest router weight, ``"position"`` the earliest tokens.

Padding (``real_T`` False) is never kept and takes no capacity, and T counts real tokens only, so a
padded batch drops exactly what the unpadded batch of the same real tokens drops. DeepSpeed's
``top1gating(used_token=...)`` also keeps padding out of the experts but sizes C from every token,
padding included, which lets the amount of padding change the drops; we do not.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int | torch.Tensor, top_k: int, num_experts: int, capacity_factor: float
                    ) -> int | torch.Tensor:
    """C per expert; a tensor ``num_tokens`` gives a tensor C, computed on its device with no host sync
    (a captured serving graph forbids one), rounded as the integer form is (the same float64 operations)."""
    if torch.is_tensor(num_tokens):
        return (capacity_factor * num_tokens.double() * top_k / num_experts).ceil().clamp_min(1).long()
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    policy: str = "probs",
    real_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``keep_TK``: True where the copy fits in its expert's capacity. ``real_T`` (bool, True = a
    real token; None = all real): padding copies are never kept, take no capacity, and C counts real tokens."""
    num_tokens, top_k = topk_idx_TK.shape
    flat_expert = topk_idx_TK.reshape(-1)
    if real_T is None:
        capacity: int | torch.Tensor = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        real_copies = None
    else:
        capacity = expert_capacity(real_T.sum(), top_k, num_experts, capacity_factor)
        real_copies = real_T.view(num_tokens, 1).expand(num_tokens, top_k).reshape(-1)
        flat_expert = torch.where(real_copies, flat_expert, num_experts)  # padding queues at a virtual expert E
    if policy == "probs":
        priority = torch.argsort(topk_weight_TK.reshape(-1), descending=True, stable=True)
    elif policy == "position":
        priority = torch.arange(flat_expert.numel(), device=flat_expert.device)
    else:
        raise ValueError(f"drop policy {policy!r} is unknown; choose 'probs' or 'position'")
    # group copies by expert, best first inside each group; a copy's rank in its group decides
    by_expert = priority[torch.argsort(flat_expert[priority], stable=True)]
    # not bincount: on CUDA it reads the max back to the host, which a captured (serving) graph forbids
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_expert.device).index_add_(
        0, flat_expert, torch.ones_like(flat_expert, dtype=torch.long))
    group_start = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(flat_expert.numel(), device=flat_expert.device) - group_start[flat_expert[by_expert]]
    keep = torch.zeros_like(flat_expert, dtype=torch.bool)
    keep[by_expert] = rank_in_group < capacity
    if real_copies is not None:
        keep &= real_copies
    return keep.view(num_tokens, top_k)
