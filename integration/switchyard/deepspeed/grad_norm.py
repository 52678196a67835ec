"""ZeRO's gradient norm as one fused fp32 reduction per parameter group instead of an fp64 copy per tensor, and
the clip by it without a host sync.

DeepSpeed 0.19's ``get_grad_norm_direct`` (ZeRO-1/2 and ZeRO-3 alike) casts every gradient of a group to fp64 and
takes its norm, one tensor at a time: on the fine-tune benchmark's 2.6B-parameter model that writes and reads
~21 GB of fp64 copies per step (~18 ms of copies and ~5 ms of norms on an H200, docs/performance.md).
``torch._foreach_norm(..., dtype=float32)`` reads each bf16/fp32 gradient once, accumulates in fp32 inside the
kernel (no copy) and handles the whole list in a few launches. The tensors' norms are then combined in fp64 and
everything after is DeepSpeed's own logic, method by method: the same gradients skipped (ZeRO's padding,
pipeline-replicated parameters, model-parallel duplicates), the same sums over the partition, model-parallel and
expert-parallel groups, the same NaN/inf handling; the expert groups' averaging (ZeRO-1/2) stays in DeepSpeed's
``scaled_global_norm``. At ZeRO-1/2 the clip by that norm is replaced too (``clip_grads_without_sync``): DeepSpeed's
reads the norm's validity back to the host once per parameter group. The methods are set on the optimizer instance
by ``install_fused_grad_norm`` (one table entry per ZeRO optimizer class); CPU-offloaded optimizers keep DeepSpeed's
(their norms are taken on the host, by another method).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """fp64 sum of the tensors' squared fp32-accumulated norms (a 0-dim tensor on their device; not empty)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double().pow(2).sum()


def fused_grad_norm_direct(self: Any, gradients: list[torch.Tensor], params: list[torch.Tensor],
                           norm_type: float = 2) -> torch.Tensor:
    """Drop-in for ``DeepSpeedZeroOptimizer.get_grad_norm_direct`` (ZeRO-1/2; bound to the optimizer instance)."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero12

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    selected = []
    counted_gradients = (g for g in gradients if not getattr(g, "_zero_padding", False))
    for grad, param in zip(counted_gradients, params):
        if getattr(param, zero12.PIPE_REPLICATED, False) and param.ds_pipe_replicated:
            continue  # pipeline parallelism may replicate a parameter: counted once
        if zero12.is_model_parallel_parameter(param) or self.model_parallel_rank == 0:
            selected.append(grad.detach())
    if selected:
        total_squares = sum_of_squares(selected).float().to(self.device)
    else:
        total_squares = torch.zeros((), dtype=torch.float32, device=self.device)
    zero12.dist.all_reduce(total_squares, op=zero12.dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_squares, op=zero12.dist.ReduceOp.SUM)
    total_norm = total_squares.sqrt()
    zero12.mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def fused_grad_norm_direct_stage3(self: Any, gradients: list[torch.Tensor], params: list[torch.Tensor],
                                  norm_type: float = 2) -> torch.Tensor:
    """Drop-in for ``DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct`` (bound to the optimizer instance): one
    sub-group's partitions, summed over its partition group, then the model-parallel group unless every rank already
    counts its own partition, then an expert group's expert-parallel group; -1 for a non-finite norm."""
    import deepspeed.runtime.zero.stage3 as zero3

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    self._assert_same_partition_group(params)
    process_group = self._get_param_partition_group(params[0])
    counts_every_rank = self._grad_norm_counts_every_rank(params, process_group)
    device = zero3.get_accelerator().device_name()
    selected = [grad.to(device, non_blocking=True) for grad, param in zip(gradients, params)
                if counts_every_rank or zero3.is_model_parallel_parameter(param) or self.model_parallel_rank == 0]
    total_squares = sum_of_squares(selected) if selected else torch.zeros((), dtype=torch.float64, device=device)
    zero3.dist.all_reduce(total_squares, op=zero3.dist.ReduceOp.SUM, group=process_group)
    if not counts_every_rank:
        self._model_parallel_all_reduce(tensor=total_squares, op=zero3.dist.ReduceOp.SUM)
    expert_parallel_group = self._autoep_expert_parallel_group(params)
    if zero3.pg_utils.is_parallel(expert_parallel_group):
        zero3.dist.all_reduce(total_squares, op=zero3.dist.ReduceOp.SUM, group=expert_parallel_group)
    total_norm = total_squares.sqrt()
    invalid = torch.tensor(-1.0, device=self.device, dtype=torch.float)
    return torch.where(total_norm.isinf().logical_or(total_norm.isnan()), invalid, total_norm)


def clip_scale(self: Any, total_norm: Any, device: torch.device) -> torch.Tensor | float | None:
    """What DeepSpeed's ZeRO-1/2 ``unscale_and_clip_grads`` multiplies the gradients by: ``1 / (max(1, (norm /
    loss_scale + 1e-6) / clip) · loss_scale)``, an invalid norm (non-finite, or DeepSpeed's -1 sentinel) clipping as an
    infinite one, i.e. a factor of 0, as DeepSpeed's does (finite gradients become 0, a NaN or inf one NaN); a 0-dim
    tensor on ``device`` in the norm's dtype (a float without clipping; None when there is nothing to scale).
    DeepSpeed decides that invalidity with ``bool(tensor)``, a host sync that drains the device's queue; here the
    choice stays on the device (``torch.where``)."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return None
    if self.clip_grad <= 0.0:
        return 1.0 / self.loss_scale
    norm = total_norm if torch.is_tensor(total_norm) else torch.tensor(float(total_norm), device=device)
    invalid = ~torch.isfinite(norm) | (norm < 0)
    norm = torch.where(invalid, torch.full_like(norm, float("inf")), norm)
    clip = torch.clamp(((norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
    return (1.0 / (clip * self.loss_scale)).to(device)


def clip_grads_without_sync(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    """Drop-in for ``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` (ZeRO-1/2): ``clip_scale``'s factor, once per
    parameter group without a host sync, then one ``torch._foreach_mul_`` per dtype (the same fp32 products)."""
    tensors = [g for grad in grad_groups_flat for g in (grad if isinstance(grad, list) else [grad])]
    if not tensors:
        return
    scale = clip_scale(self, total_norm, tensors[0].device)
    if scale is None:
        return
    for dtype in {t.dtype for t in tensors}:  # each dtype's products cast the scale once
        same = [t.data for t in tensors if t.dtype == dtype]
        torch._foreach_mul_(same, scale.to(dtype) if torch.is_tensor(scale) else scale)


def _fused_methods() -> dict[type, tuple[dict[str, Callable[..., Any]], str]]:
    """ZeRO optimizer class → its fused methods, and the attribute that says its optimizer is offloaded (an offloaded
    optimizer keeps DeepSpeed's methods: its norms and gradients live on the host)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {DeepSpeedZeroOptimizer: ({"get_grad_norm_direct": fused_grad_norm_direct,
                                      "unscale_and_clip_grads": clip_grads_without_sync}, "cpu_offload"),
            DeepSpeedZeroOptimizer_Stage3: ({"get_grad_norm_direct": fused_grad_norm_direct_stage3}, "offload_optimizer")}


def install_fused_grad_norm(engine: Any) -> list[str]:
    """Give a ZeRO engine's optimizer the fused norm (and, at ZeRO-1/2, the sync-free clip); returns the names of
    the methods replaced (none: stage 0, an offloaded optimizer, or a ZeRO optimizer class not in the table)."""
    optimizer = getattr(engine, "optimizer", None)
    entry = _fused_methods().get(type(optimizer))
    if entry is None or getattr(optimizer, entry[1]):
        return []
    for name, function in entry[0].items():
        setattr(optimizer, name, types.MethodType(function, optimizer))
    return list(entry[0])
