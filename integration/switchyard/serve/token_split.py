"""Split the (replicated) tokens of each MoE layer across its expert-parallel group while serving.

Every rank runs the dense layers on every token (the inputs are replicated), so without this each
EP rank would also route every token, and each expert would compute every token routed to it ep
times. With it, rank r of the EP group routes only its contiguous share of the tokens; the layer's
all-to-alls carry the shares to the experts and back as usual, and one all-gather puts the full output
together on every rank again. A token still meets each of its experts once, in token order, so the
expert GEMMs see the same rows as with ep=1.

    handles = split_moe_tokens(model, groups)   # forward hooks on every MoELayer; handle.remove() undoes

A rank whose share is empty (fewer tokens than ranks) runs the layer on zero rows: it still joins the
all-to-alls. Tensor suffixes: T tokens, S this rank's share, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


def _bounds(num_tokens: int, size: int, rank: int) -> tuple[int, int]:
    per = -(-num_tokens // size)  # ceil: every share but the last has `per` rows
    return min(rank * per, num_tokens), min((rank + 1) * per, num_tokens)


def split_moe_tokens(model: nn.Module, groups: Any) -> list[Any]:
    """Install the split on every MoE layer of ``model`` (no-op for ep == 1); returns the hook handles."""
    from switchyard.hf.patch import moe_layers

    if groups is None or groups.size("ep") == 1:
        return []
    group, size, rank = groups.group("ep"), groups.size("ep"), groups.rank("ep")
    handles = []
    for layer in moe_layers(model):
        state: dict[str, Any] = {}

        def before(module: nn.Module, args: tuple, state: dict = state) -> tuple:
            x = args[0]
            x_TH = x.reshape(-1, x.shape[-1])
            state["shape"], state["tokens"] = x.shape, x_TH.shape[0]
            lo, hi = _bounds(x_TH.shape[0], size, rank)
            return (x_TH[lo:hi], *args[1:])

        def after(module: nn.Module, args: tuple, out_SH: torch.Tensor, state: dict = state) -> torch.Tensor:
            tokens = state["tokens"]
            per = -(-tokens // size)
            padded_SH = out_SH.new_zeros(per, out_SH.shape[-1])
            padded_SH[: out_SH.shape[0]] = out_SH
            gathered = out_SH.new_empty(per * size, out_SH.shape[-1])
            dist.all_gather_into_tensor(gathered, padded_SH.contiguous(), group=group)
            # share r sits at rows [r * per, r * per + its length): shares are contiguous and in order
            pieces = [gathered[r * per: r * per + (_bounds(tokens, size, r)[1] - _bounds(tokens, size, r)[0])]
                      for r in range(size)]
            return torch.cat(pieces).reshape(state["shape"])

        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.register_forward_hook(after))
    return handles
