"""One AdamW step over a ZeRO partition, straight from the 16-bit gradient to the 16-bit weight.

``adamw_update_`` is the single-device math of ``zero_step.py``: given a rank's flat 16-bit gradient partition, its
fp32 master partition, the optimizer's two moments and the 16-bit partition the model reads, it applies the clip's
scale and one step of torch's Adam/AdamW and writes both copies of the weight. On CUDA with Triton that is one kernel
(``adamw_kernels.py``); elsewhere the same steps in PyTorch, op for op those of torch's single-tensor AdamW after
DeepSpeed's cast and clip, so on CPU the result is DeepSpeed's bit for bit (``tests/distributed/test_zero_step.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA torch; CPU-only installs (CI) go without it
    from switchyard.deepspeed import adamw_kernels as _kernels
except Exception:  # noqa: BLE001 - ImportError, or a Triton that cannot initialise here
    _kernels = None


@dataclass(frozen=True)
class AdamHyper:
    """One parameter group's Adam settings for one step (``step`` counts this step, from 1)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW's weight decay (on the weight) rather than Adam's L2 term (on the gradient)
    step: int


def uses_kernel(master: torch.Tensor) -> bool:
    return _kernels is not None and master.is_cuda


@torch.no_grad()
def adamw_update_(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  out: torch.Tensor, scale: torch.Tensor | float | None, hyper: AdamHyper) -> None:
    """Update ``master``, ``exp_avg``, ``exp_avg_sq`` (fp32) in place and write the result into ``out``; the gradient
    is multiplied by ``scale`` (the clip: a number or a one-element tensor, used in fp32; None: 1) first. All flat,
    contiguous, of one length."""
    tensors = (grad, master, exp_avg, exp_avg_sq, out)
    if not all(t.is_contiguous() and t.numel() == master.numel() for t in tensors):
        shapes = [(tuple(t.shape), t.is_contiguous()) for t in tensors]
        raise ValueError(f"adamw_update_ takes flat contiguous tensors of one length; got (shape, contiguous) {shapes}")
    if isinstance(scale, (int, float)):
        scale = torch.full((), scale, dtype=torch.float32, device=master.device)  # a fill: no copy from the host
    elif scale is not None:
        scale = scale.to(torch.float32)  # ZeRO-3's norm is fp64: DeepSpeed multiplies the fp32 gradient in fp32
    if uses_kernel(master):
        if scale is None:
            scale = torch.ones((), dtype=torch.float32, device=master.device)
        _kernels.adamw_update(grad, master, exp_avg, exp_avg_sq, out, scale, lr=float(hyper.lr),
                              beta1=float(hyper.beta1), beta2=float(hyper.beta2), eps=float(hyper.eps),
                              weight_decay=float(hyper.weight_decay), decoupled=hyper.decoupled, step=hyper.step)
        return
    grad = grad.to(master.dtype)  # DeepSpeed's fp32 copy of the flat gradient
    if scale is not None:
        grad.mul_(scale)
    lr, beta1, beta2 = hyper.lr, hyper.beta1, hyper.beta2
    if hyper.weight_decay != 0:
        if hyper.decoupled:
            master.mul_(1 - lr * hyper.weight_decay)
        else:
            grad = grad.add(master, alpha=hyper.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = float(hyper.step)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(hyper.eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)
    out.copy_(master)
