"""Global gradient-norm clipping for ZeRO stage 0 with expert parallelism.

DeepSpeed 0.19's stage-0 ``clip_grad_norm_`` averages each rank's local norm over the data-parallel
group. With experts sharded over EP ranks every rank's local norm differs (it sees only its experts),
so the mean is not the model's norm and the update differs from the single-process one
(tests/integration/test_finetune.py catches it). ZeRO-1/2 compute the right norm themselves.

Here: dense gradients are identical on every rank after the data-parallel all-reduce; each expert
exists once per EP group; so ‖g‖² = Σ dense² + all_reduce_sum_over_ep(Σ local expert²).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.utils import is_moe_param


@torch.no_grad()
def clip_global_grad_norm_(model: nn.Module, max_norm: float, ep_group: dist.ProcessGroup | None) -> float:
    """Clip in place (after gradients are reduced); returns the global norm before clipping."""
    grads = [(p.grad, is_moe_param(p)) for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0][0].device
    dense_sq = torch.zeros((), device=device, dtype=torch.float32)
    expert_sq = torch.zeros((), device=device, dtype=torch.float32)
    for grad, expert in grads:
        square = grad.detach().float().pow(2).sum()
        if expert:
            expert_sq += square
        else:
            dense_sq += square
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    norm = (dense_sq + expert_sq).sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad, _ in grads:
            grad.mul_(scale.to(grad.dtype))
    return float(norm)
