"""Expert capacity: which token copies an expert keeps when it may take at most C of them.

capacity C = ceil(capacity_factor * T * K / E) per expert, over this rank's T tokens (as in Switch,
GShard, DeepSpeed's ``topkgating`` and Megatron-Core), at least 1 (DeepSpeed's ``min_capacity`` is not
offered). It is computed in integers, the factor read as the decimal it was written as: in floating
point (T * K / E) * f for T * K / E = 100 and f = 1.1 is 110.00000000000001, which a float ceil
(Megatron-Core's ``get_capacity``) makes C = 111; DeepSpeed's fp32 ``_capacity`` adds a slot in other
cases (C = 4 for f = 0.75, T = 4, K = E = 7, where 3 is exact).

Over-capacity copies are dropped: their expert output is missing from the token's weighted sum (the
residual stream carries the token on), and the kept copies' weights are not renormalised
(Megatron-Core; DeepSpeed's gating renormalises them). ``"probs"`` keeps the copies with the highest
final combine weight (Megatron-Core; DeepSpeed's ``topkgating`` ranks by the softmax probability before
renormalisation: the same order only where the weights are not renormalised), ties to the earlier token
(DeepSpeed's ``torch.topk`` over tokens breaks them in no fixed order). Renormalised top-1 weights are all
1, so there ``"probs"`` keeps the earliest tokens, as ``"position"`` does. ``"position"`` keeps the
earliest tokens, all K copies of token t before token t + 1 (DeepSpeed's ``topkgating``; its
``top2gating`` queues every first choice before any second choice).

Padding (``real_T`` False) is never kept and takes no capacity, and T counts real tokens only, so a
padded batch drops exactly what the unpadded batch of the same real tokens drops. DeepSpeed's
``top1gating(used_token=...)`` also keeps padding out of the experts but sizes C from every token,
padding included, which lets the amount of padding change the drops; we do not.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import torch

# A factor's denominator as a fraction: exact for factors written with up to 6 decimals, and small
# enough that the tensor form's int64 product T * K * numerator cannot overflow for any real T.
# (A factor below 5e-7 reads as 0: C = 1.)
_FACTOR_DENOMINATOR_MAX = 10**6


@functools.lru_cache(maxsize=64)
def _factor_ratio(capacity_factor: float) -> tuple[int, int]:
    """``capacity_factor`` as p / q (1.1 → 11 / 10); cached: 5 µs of host time a layer call otherwise."""
    return Fraction(capacity_factor).limit_denominator(_FACTOR_DENOMINATOR_MAX).as_integer_ratio()


def expert_capacity(num_tokens: int | torch.Tensor, top_k: int, num_experts: int, capacity_factor: float
                    ) -> int | torch.Tensor:
    """C = max(1, ceil(f * T * K / E)) in integers, f as the fraction p / q it was written as (1.1 = 11 / 10), so
    no float rounding adds or loses a slot. A tensor ``num_tokens`` gives a tensor C, computed on its device with
    no host sync (a captured serving graph forbids one), the same integers as the integer form."""
    factor_p, factor_q = _factor_ratio(capacity_factor)
    numerator, denominator = factor_p * top_k, factor_q * num_experts
    if torch.is_tensor(num_tokens):
        return ((num_tokens.long() * numerator + (denominator - 1)) // denominator).clamp_min(1)
    return max(1, -(-num_tokens * numerator // denominator))


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
