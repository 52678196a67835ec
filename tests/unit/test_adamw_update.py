"""``adamw_update_`` (the one-pass ZeRO step's math) against torch's own Adam / AdamW on the gradient DeepSpeed would
hand them (the 16-bit gradient cast to fp32, times the clip's scale): bit for bit on CPU (the PyTorch path), and on a
GPU the Triton kernel against torch's fused AdamW within fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from switchyard.deepspeed.adamw import AdamHyper, adamw_update_, uses_kernel

SETTINGS = {"adamw": (torch.optim.AdamW, True, 0.1), "adam_l2": (torch.optim.Adam, False, 0.05),
            "adamw_no_decay": (torch.optim.AdamW, True, 0.0)}


def _run(kind: str, device: str, size: int, steps: int, scales: list[float | None], torch_kwargs: dict,
         scale_dtype: torch.dtype | type = torch.float32):
    optimizer_type, decoupled, weight_decay = SETTINGS[kind]
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(size, generator=gen).to(device)
    grads = [torch.randn(size, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(steps)]
    reference = start.clone().requires_grad_(True)
    torch_optimizer = optimizer_type([reference], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay,
                                     **torch_kwargs)
    master, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    out = torch.empty(size, dtype=torch.bfloat16, device=device)
    for step, (grad, scale) in enumerate(zip(grads, scales), start=1):
        scale_tensor = None if scale is None else torch.tensor(scale, dtype=torch.float32, device=device)
        reference.grad = grad.float() if scale is None else grad.float().mul_(scale_tensor)
        torch_optimizer.step()
        given = None if scale is None else scale if scale_dtype is float else scale_tensor.to(scale_dtype)
        adamw_update_(grad, master, exp_avg, exp_avg_sq, out, given,
                      AdamHyper(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=weight_decay,
                                decoupled=decoupled, step=step))
        assert torch.equal(out, master.to(torch.bfloat16)), f"step {step}: the 16-bit copy is not the master's"
    state = torch_optimizer.state[reference]
    return (master, exp_avg, exp_avg_sq), (reference.detach(), state["exp_avg"], state["exp_avg_sq"])


@pytest.mark.parametrize("kind", sorted(SETTINGS))
@pytest.mark.parametrize("scale_dtype", [torch.float64, float], ids=["fp64-scale", "number-scale"])
def test_cpu_path_is_torchs_single_tensor_adam_bit_for_bit(kind, scale_dtype):
    # ZeRO-3's clip scale comes as fp64 (its norm is): used in fp32, as DeepSpeed's multiply of the fp32 gradient does
    got, want = _run(kind, "cpu", 1000, 4, [0.5, None, 0.0, 0.3], {"foreach": False}, scale_dtype=scale_dtype)
    for name, g, w in zip(("weight", "exp_avg", "exp_avg_sq"), got, want):
        assert torch.equal(g, w), f"{kind}: {name} differs by {(g - w).abs().max()}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", sorted(SETTINGS))
@pytest.mark.parametrize("size", [1, 2047, 2048 * 3 + 5, 1 << 20])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64], ids=["fp32-scale", "fp64-scale"])
def test_gpu_kernel_matches_torchs_fused_adamw(kind, size, scale_dtype):
    assert uses_kernel(torch.empty(1, device="cuda")), "Triton is missing: the kernel is not what ran"
    got, want = _run(kind, "cuda", size, 4, [0.5, None, 0.0, 0.3], {"fused": True}, scale_dtype=scale_dtype)
    for name, g, w in zip(("weight", "exp_avg", "exp_avg_sq"), got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-7, msg=lambda m, n=name: f"{kind} {size}: {n}: {m}")


def test_tensors_of_other_lengths_or_strides_are_refused():
    flat = [torch.zeros(8) for _ in range(4)]
    hyper = AdamHyper(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True, step=1)
    for bad in (torch.zeros(7, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.bfloat16)[::2]):
        with pytest.raises(ValueError, match="flat contiguous tensors of one length"):
            adamw_update_(bad, *flat, None, hyper)
