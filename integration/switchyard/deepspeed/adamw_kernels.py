"""The Triton kernel of ``adamw.py`` (imported only where Triton is installed).

One pass over a ZeRO partition: read the 16-bit gradient, the fp32 master weight and both moments; write the master,
the moments and the 16-bit weight. What DeepSpeed and torch's fused AdamW do in four passes (cast the gradient to a
fresh fp32 copy, scale it by the clip, update, copy the master back to 16 bits) is one here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchyard.moe.kernels.launch import fast_launch


@fast_launch
@triton.jit
def _adamw_kernel(grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, scale_ptr, n,
                  lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
                  DECOUPLED: tl.constexpr, BLOCK: tl.constexpr):
    # torch's fused AdamW math in fp32 (ATen's fused_adam_utils.cuh), the gradient scaled first
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
    param = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    if DECOUPLED:
        param = param - lr * weight_decay * param
    else:
        grad = grad + param * weight_decay
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = tl.sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + eps  # IEEE-rounded, as ATen's std::sqrt
    param = param - step_size * exp_avg / denom
    tl.store(master_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    tl.store(out_ptr + offsets, param.to(out_ptr.dtype.element_ty), mask=mask)


def adamw_update(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor, scale: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled: bool, step: int) -> None:
    """Launch over the flat, contiguous tensors (same length); ``scale`` a one-element fp32 tensor."""
    block = 2048
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    grid = (triton.cdiv(master.numel(), block),)
    _adamw_kernel[grid](grad, master, exp_avg, exp_avg_sq, out, scale, master.numel(),
                        lr, beta1, beta2, eps, weight_decay, lr / bias_correction1, bias_correction2_sqrt,
                        DECOUPLED=decoupled, BLOCK=block, num_warps=8)
