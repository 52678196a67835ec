"""Global gradient-norm clipping for ZeRO stage 0 with expert and tensor parallelism.

DeepSpeed 0.19's stage-0 ``clip_grad_norm_`` averages each rank's local norm over the data-parallel
group. With experts sharded over EP ranks every rank's local norm differs (it sees only its experts),
so the mean is not the model's norm and the update differs from the single-process one
(tests/integration/test_finetune.py catches it). ZeRO-1/2 compute the right norm themselves.

Here, after the data-parallel reduction: a replicated dense gradient is the same on every rank (counted once);
a tensor-parallel shard (``tp_shard``, ``parallel/tensor_shards.py``) exists once per tp group; each expert once
per EP group, and an expert shard once per EP × etp group. So ‖g‖² = Σ dense² + Σ_tp(Σ dense shard²)
+ Σ_ep(Σ expert² + Σ_etp(Σ expert shard²)), summed over the pipeline stages (each holds other layers).
Each Σ is one fused fp32-accumulating norm over its gradients (``torch._foreach_norm``), as the ZeRO-1/2 norm is
(``grad_norm.py``), and the clip is one fused multiply per dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.utils import is_moe_param

from switchyard.deepspeed.grad_norm import sum_of_squares
from switchyard.parallel.tensor_shards import shard_of

if TYPE_CHECKING:
    from switchyard.parallel import ProcessGroupManager


def _sum_over(value: torch.Tensor, groups: "ProcessGroupManager | None", *kinds: str) -> torch.Tensor:
    for kind in kinds:
        if groups is not None and groups.size(kind) > 1:
            dist.all_reduce(value, group=groups.group(kind))
    return value


@torch.no_grad()
def clip_global_grad_norm_(model: nn.Module, max_norm: float, groups: "ProcessGroupManager | None") -> float:
    """Clip in place (after gradients are reduced); returns the global norm before clipping. Every rank calls it."""
    grads = [p for p in model.parameters() if p.grad is not None]
    if not grads and groups is None:
        return 0.0  # with groups, a rank without gradients still joins the sums the others wait in
    device = grads[0].grad.device if grads else next(model.parameters()).device
    # squares by where the other copies or shards live: (expert?, sharded?) → the groups to sum over
    kinds = ((False, False), (False, True), (True, False), (True, True))
    by_kind: dict[tuple[bool, bool], list[torch.Tensor]] = {kind: [] for kind in kinds}
    for param in grads:
        by_kind[(is_moe_param(param), shard_of(param) is not None)].append(param.grad.detach())
    squares = {kind: sum_of_squares(tensors).float() if tensors else torch.zeros((), device=device)
               for kind, tensors in by_kind.items()}
    total = (squares[(False, False)] + _sum_over(squares[(False, True)], groups, "tp")
             + _sum_over(squares[(True, False)] + _sum_over(squares[(True, True)], groups, "etp"), groups, "ep"))
    total = _sum_over(total, groups, "pp")
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
        for dtype in {param.grad.dtype for param in grads}:
            torch._foreach_mul_([p.grad for p in grads if p.grad.dtype == dtype], scale.to(dtype))
    return float(total.sqrt())
