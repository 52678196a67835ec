"""Router auxiliary losses: pure fp32 functions of one layer's routing (the caller applies coefficients).

Expert counts come from integer indices and carry no gradient; the gradient reaches the router
through the scores (balance losses) or the logits (z-loss). Every function returns a 0-dim fp32
tensor and, for T == 0 tokens, a zero that is still attached to the input's graph (so a rank that
received no tokens still takes part in backward).

Tensor-name suffix legend:
    T  tokens (batch * sequence, flattened, sequence-major within a batch row)
    E  experts
    K  top-k
    B  sequences in the batch, L tokens per sequence
"""

from __future__ import annotations

import torch


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A 0.0 that keeps ``x``'s autograd graph (sum of an empty tensor is 0)."""
    return x.float().sum() * 0.0


def _check_routing(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int) -> None:
    if scores_TE.dim() != 2 or scores_TE.shape[1] != num_experts:
        raise ValueError(f"scores_TE must be [T, {num_experts}], got {tuple(scores_TE.shape)}")
    if topk_idx_TK.dim() != 2 or topk_idx_TK.shape[0] != scores_TE.shape[0]:
        raise ValueError(
            f"topk_idx_TK must be [T={scores_TE.shape[0]}, K], got {tuple(topk_idx_TK.shape)}"
        )


def load_balancing_loss(
    scores_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, arXiv:2101.03961, eqs. 4-6).

    ``E * sum_i f_i * P_i`` with ``f_i`` = top-k assignments to expert i per token (sums to K, as
    in transformers' ``load_balancing_loss_func``, so a perfectly balanced router scores K; DeepSpeed's
    ``topkgating`` l_aux and Megatron-Core's loss are this divided by K) and
    ``P_i`` = mean router probability of expert i. Pass ``scores_TE`` = softmax of the logits: HF's
    function softmaxes the logits it is given, so ours equals HF's fed with ``logits_TE``. For a sigmoid
    router pass the scores divided by their per-token sum (as Megatron-Core does; MoELayer does).
    ``attention_mask`` ([B, S] or [T], 1 = real token) drops padding from both means, as HF does.
    """
    _check_routing(scores_TE, topk_idx_TK, num_experts)
    num_tokens, top_k = topk_idx_TK.shape
    if num_tokens == 0:
        return _zero_like_graph(scores_TE)
    probs_TE = scores_TE.float()
    idx_flat = topk_idx_TK.reshape(-1)
    if attention_mask is None:
        ones = torch.ones(idx_flat.shape, dtype=torch.float32, device=probs_TE.device)
        counts_E = probs_TE.new_zeros(num_experts).scatter_add_(0, idx_flat, ones)
        prob_sum_E = probs_TE.sum(dim=0)
        rows: torch.Tensor | float = float(num_tokens)
    else:
        mask_T = attention_mask.reshape(-1).to(device=probs_TE.device, dtype=torch.float32)
        if mask_T.numel() != num_tokens:
            raise ValueError(f"attention_mask has {mask_T.numel()} elements, routing has T={num_tokens}")
        counts_E = probs_TE.new_zeros(num_experts).scatter_add_(0, idx_flat, mask_T.repeat_interleave(top_k))
        prob_sum_E = (probs_TE * mask_T.unsqueeze(-1)).sum(dim=0)
        mask_sum = mask_T.sum()
        # All padding: counts are 0 so the loss is 0; avoid 0/0 without a host sync.
        rows = torch.where(mask_sum > 0, mask_sum, torch.ones_like(mask_sum))
    tokens_per_expert_E = counts_E / rows
    prob_per_expert_E = prob_sum_E / rows
    return torch.sum(tokens_per_expert_E * prob_per_expert_E) * num_experts


def sequence_balance_loss(
    scores_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    batch_size: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-wise balance loss of DeepSeek-V2/V3 (arXiv:2405.04434 §2.2.3, arXiv:2412.19437 eqs. 17-20).

    Balances within each sequence rather than the whole batch, so a batch of one-topic sequences
    cannot look balanced while each sequence overloads its experts. Per sequence of L tokens:
    ``f_i = E / (K * L) * #tokens choosing i``, ``P_i`` = mean over tokens of the score normalized
    to sum 1 per token (V3 does this for sigmoid scores; for softmax it is a no-op); loss = mean over
    sequences of ``sum_i f_i * P_i`` (1 when balanced). Rows of T are ``[B, L]`` flattened.
    ``attention_mask`` ([B, L] or [T], 1 = real token) leaves padding out: L counts a sequence's real tokens
    and the mean runs over sequences with any, so a padded batch scores what its sequences score unpadded.
    A [B, L] mask must have ``B == batch_size``; a [T] mask takes its split from ``batch_size``.
    """
    _check_routing(scores_TE, topk_idx_TK, num_experts)
    num_tokens, top_k = topk_idx_TK.shape
    if num_tokens == 0:  # an empty batch, also ``[0, S, H]``: no sequences to balance
        return _zero_like_graph(scores_TE)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_tokens % batch_size != 0:
        raise ValueError(f"T={num_tokens} tokens do not split into batch_size={batch_size} equal sequences")
    seq_len = num_tokens // batch_size
    scores_TE = scores_TE.float()
    normed_BLE = (scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)).view(batch_size, seq_len, num_experts)
    idx_BX = topk_idx_TK.reshape(batch_size, seq_len * top_k)
    counts_BE = torch.zeros(batch_size, num_experts, dtype=torch.float32, device=scores_TE.device)
    if attention_mask is None:
        counts_BE.scatter_add_(1, idx_BX, torch.ones(idx_BX.shape, dtype=torch.float32, device=scores_TE.device))
        prob_BE = normed_BLE.mean(dim=1)
        frac_BE = counts_BE * (num_experts / (seq_len * top_k))
        return (frac_BE * prob_BE).sum(dim=1).mean()
    mask_T = attention_mask.reshape(-1).to(device=scores_TE.device, dtype=torch.float32)
    if mask_T.numel() != num_tokens:
        raise ValueError(f"attention_mask has {mask_T.numel()} elements, routing has T={num_tokens}")
    if attention_mask.dim() == 2 and tuple(attention_mask.shape) != (batch_size, seq_len):
        # a [B, L] mask names its sequences: other ones than batch_size's would mix sequences up
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} is not [batch_size={batch_size}, "
                         f"L={seq_len}]; pass batch_size={attention_mask.shape[0]} or a [T] mask")
    mask_BL = mask_T.view(batch_size, seq_len)
    counts_BE.scatter_add_(1, idx_BX, mask_BL.repeat_interleave(top_k, dim=1))
    real_B = mask_BL.sum(dim=1)
    # An all-padding sequence has zero counts and drops out of the mean; clamps avoid 0/0 without a host sync.
    rows_B1 = real_B.clamp_min(1.0).unsqueeze(1)
    prob_BE = (normed_BLE * mask_BL.unsqueeze(-1)).sum(dim=1) / rows_B1
    frac_BE = counts_BE * (num_experts / top_k) / rows_B1
    return (frac_BE * prob_BE).sum(dim=1).sum() / (real_B > 0).sum().clamp_min(1)


def z_loss(logits_TE: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss of ST-MoE (Zoph et al. 2022, arXiv:2202.08906 eq. 5): ``mean_t logsumexp(x_t)^2``.

    Keeps router logits small so the fp32/bf16 exponentials in softmax stay well conditioned. Without a mask
    every row counts (transformers' ``router_z_loss_func`` takes no mask). ``attention_mask`` ([B, S] or [T],
    1 = real token) averages over real tokens only, as the balance losses do, so the amount of padding changes
    neither the loss nor its gradient; padding rows' logits (even non-finite ones) reach neither. All padding
    gives a graph-attached 0.
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be [T, E], got {tuple(logits_TE.shape)}")
    num_tokens = logits_TE.shape[0]
    if num_tokens == 0:
        return _zero_like_graph(logits_TE)
    if attention_mask is None:
        return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
    real_T = attention_mask.reshape(-1).to(device=logits_TE.device, dtype=torch.bool)
    if real_T.numel() != num_tokens:
        raise ValueError(f"attention_mask has {real_T.numel()} elements, logits have T={num_tokens}")
    logits_TE = logits_TE.float().masked_fill(~real_T.unsqueeze(-1), 0.0)
    lse_sq_T = torch.logsumexp(logits_TE, dim=-1).square() * real_T
    # All padding: the sum is 0; clamp avoids 0/0 without a host sync.
    return lse_sq_T.sum() / real_T.sum().clamp_min(1)
