"""Fused kernels for the MoE hot path (permute backward, weighted unpermute-combine, SwiGLU, and the
small-batch experts-and-combine on unsorted copies, routed.py).

Each op has a Triton kernel for CUDA and a PyTorch fallback with the same math (fp32 accumulation,
one rounding to the output dtype), used on CPU, without Triton, or with the kernels switched off.

    SWITCHYARD_FUSED_KERNELS=0   use the unfused reference path of the dispatcher/experts everywhere
                                 (what the layer ran before the kernels; handy for A/B profiles)

``set_fused_kernels(False)`` does the same at run time (benchmarks/moe_layer_profile.py uses it).
"""

from switchyard.moe.kernels.ops import (
    fused_kernels_enabled,
    gather_rows,
    records_graph,
    set_fused_kernels,
    silu_mul,
    silu_mul_supported,
    sum_copies,
    triton_available,
    unpermute_combine,
)
from switchyard.moe.kernels.routed import routed_kernels_apply, routed_swiglu_combine, routed_swiglu_combine_torch

__all__ = [
    "fused_kernels_enabled",
    "gather_rows",
    "records_graph",
    "routed_kernels_apply",
    "routed_swiglu_combine",
    "routed_swiglu_combine_torch",
    "set_fused_kernels",
    "silu_mul",
    "silu_mul_supported",
    "sum_copies",
    "triton_available",
    "unpermute_combine",
]
