"""The local experts of one expert-parallel rank, stored as 3-D weight tensors.

Parameters use transformers 5's fused layout (``MixtralExperts``: ``gate_up_proj`` [E, 2F, H] with the
gate rows first, ``down_proj`` [E, H, F]), so HF expert weights load by a plain copy and export back the
same way. The math is single-device; dispatch/combine live elsewhere.

Expert tensor parallelism (``shard_ffn``) keeps a slice of every expert's FFN width on each rank: GEMM 1's
rows (of gate and of up) and GEMM 2's columns, so each rank's output is a partial sum that the layer
all-reduces (moe/layer.py). Every compute path runs unchanged on the slice; only ``down_proj_bias`` is left
out of them (``weights``), for the layer to add once after that sum (``add_down_bias``).

Tensor suffixes:
    N  permuted token rows (sorted by local expert)    E  local experts
    H  hidden size                                     F  expert intermediate (ffn) size
    O  output features of the first projection (2F when gated, else F)
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchyard.activations import get_activation
from switchyard.moe.grouped_gemm import TORCH_GROUPED_MM as _GROUPED_MM
from switchyard.moe.kernels import fused_kernels_enabled, silu_mul
from switchyard.moe.swiglu_ffn import RowWeights, swiglu_ffn
from switchyard.parallel.tensor_shards import TensorShard, shard_parameter_

TokenCounts = Tensor | list[int]
# (module, x_NH, tokens_per_expert, cu_offsets_E1[, row_weights: the SwiGLU impls only])
ExpertsImpl = Callable[["GroupedExperts", Tensor, TokenCounts, "Tensor | None"], Tensor]


@lru_cache(maxsize=None)
def _cuda_supports_grouped_mm(device_index: int) -> bool:
    # F.grouped_mm (torch >= 2.10) runs on SM80+; a bare torch._grouped_mm is trusted on Hopper only.
    major, minor = torch.cuda.get_device_capability(device_index)
    if hasattr(F, "grouped_mm"):
        return (major, minor) >= (8, 0)
    return major == 9


def grouped_mm_available(device: torch.device) -> bool:
    """Whether the fused grouped GEMM can run on ``device`` (CUDA only: CPU backward is broken)."""
    if _GROUPED_MM is None or device.type != "cuda":
        return False
    return _cuda_supports_grouped_mm(device.index if device.index is not None else torch.cuda.current_device())


_SILU_NAMES = ("silu", "swish")


def _apply_act(module: "GroupedExperts", h_NO: Tensor) -> Tensor:
    if module.gated and module.activation in _SILU_NAMES and fused_kernels_enabled():
        # SwiGLU in one pass (Triton on CUDA): stores only h_NO for the backward, not silu(gate) too
        return silu_mul(h_NO)
    if module.gated:
        gate_NF, up_NF = h_NO.chunk(2, dim=-1)
        return module.act_fn(gate_NF) * up_NF
    return module.act_fn(h_NO)


def _loop_forward(module: "GroupedExperts", x_NH: Tensor, tokens_per_expert: TokenCounts,
                  cu_offsets_E1: Tensor | None = None) -> Tensor:
    """One ``F.linear`` pair per expert over its row slice.

    The CPU path and the fallback: CPU ``grouped_mm`` wants 16-byte-aligned strides and its backward
    failed on torch 2.13 (ARCHITECTURE.md), while this needs only the counts on the host (free on CPU,
    one sync on CUDA). Empty experts still run on their 0-row slice so every weight gets a (zero)
    gradient, also when N == 0.
    """
    counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, Tensor) else list(tokens_per_expert)
    assert len(counts) == module.num_experts, f"{len(counts)} counts for {module.num_experts} experts"
    w1_EOH, b1_EO, w2_EHF, b2_EH = module.weights()
    w1s, w2s = w1_EOH.unbind(0), w2_EHF.unbind(0)  # unbind: one stacked grad, not E full-size zeros
    b1s = b1_EO.unbind(0) if b1_EO is not None else [None] * module.num_experts
    b2s = b2_EH.unbind(0) if b2_EH is not None else [None] * module.num_experts
    x_NH = x_NH.to(w1_EOH.dtype)
    outs = []
    for e, x_nH in enumerate(x_NH.split(counts, dim=0)):
        h_nO = F.linear(x_nH, w1s[e], b1s[e])
        outs.append(F.linear(_apply_act(module, h_nO), w2s[e], b2s[e]))
    return torch.cat(outs, dim=0)


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward densifies the incoming grad: grouped_mm's backward rejects expanded
    (stride-0) grads such as the one ``y.sum().backward()`` sends ("Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


class _ExpertBias(torch.autograd.Function):
    """``y_NO + bias_EO[eid_N]`` (grouped_mm's own bias is one vector for all groups).

    The backward sums each expert's grad rows with one ``[E, N] @ [N, O]`` one-hot GEMM: deterministic
    and fp32-accumulated like ``F.linear``'s bias grad. Autograd's own gather backward (a sort-based
    bf16 scatter-add) was ~3x slower end to end on an H200 and less accurate."""

    @staticmethod
    def forward(ctx, y_NO: Tensor, bias_EO: Tensor, eid_N: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(eid_N)
        ctx.num_experts = bias_EO.shape[0]
        return y_NO + bias_EO[eid_N]

    @staticmethod
    def backward(ctx, grad_NO: Tensor) -> tuple[Tensor, Tensor | None, None]:  # type: ignore[override]
        (eid_N,) = ctx.saved_tensors
        grad_bias_EO = None
        if ctx.needs_input_grad[1]:
            experts_E = torch.arange(ctx.num_experts, device=eid_N.device)
            onehot_EN = (experts_E[:, None] == eid_N[None, :]).to(grad_NO.dtype)
            grad_bias_EO = onehot_EN @ grad_NO
        return grad_NO, grad_bias_EO, None


def _grouped_linear(x_NI: Tensor, w_EOI: Tensor, offs_E: Tensor, bias_EO: Tensor | None,
                    eid_N: Tensor | None) -> Tensor:
    # grouped_mm wants mat_b as [E, in, out]; the transposed view is the column-major layout it prefers.
    y_NO = _GROUPED_MM(x_NI, w_EOI.transpose(-2, -1), offs=offs_E)  # type: ignore[misc]
    if torch.is_grad_enabled():  # the Function's host cost is wasted where nothing is recorded (decode)
        y_NO = _DenseGrad.apply(y_NO)
    if bias_EO is None:
        return y_NO
    assert eid_N is not None
    return _ExpertBias.apply(y_NO, bias_EO, eid_N)


def _grouped_mm_forward(module: "GroupedExperts", x_NH: Tensor, tokens_per_expert: TokenCounts,
                        cu_offsets_E1: Tensor | None = None) -> Tensor:
    """One fused grouped GEMM per projection (CUDA): no host sync, no per-expert launches."""
    if _GROUPED_MM is None:
        raise RuntimeError(f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm")
    n_rows, device = x_NH.shape[0], x_NH.device
    if n_rows == 0:  # all counts are 0 by contract; the loop gives zero grads without a sync
        return _loop_forward(module, x_NH, [0] * module.num_experts)
    counts_E = torch.as_tensor(tokens_per_expert, device=device)
    assert counts_E.shape == (module.num_experts,), f"tokens_per_expert shape {tuple(counts_E.shape)}"
    offs_E = cu_offsets_E1[1:] if cu_offsets_E1 is not None else torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    eid_N = None
    if module.has_bias:
        experts_E = torch.arange(module.num_experts, device=device)
        eid_N = torch.repeat_interleave(experts_E, counts_E, output_size=n_rows)  # output_size: no sync
    w1_EOH, b1_EO, w2_EHF, b2_EH = module.weights()
    # Like transformers: grouped_mm is not autocast-aware, so compute in the weights' dtype.
    x_NH = x_NH.to(w1_EOH.dtype).contiguous()
    h_NO = _grouped_linear(x_NH, w1_EOH, offs_E, b1_EO, eid_N)
    a_NF = _apply_act(module, h_NO).contiguous()
    return _grouped_linear(a_NF, w2_EHF, offs_E, b2_EH, eid_N)


def _gathered_forward(module: "GroupedExperts", x_NH: Tensor, tokens_per_expert: TokenCounts,
                      cu_offsets_E1: Tensor | None = None) -> Tensor:
    """Each row multiplies its own expert's gathered weights (``bmm``): no host sync, any dtype.

    What CUDA-graph capture uses where grouped_mm is not capturable (its non-bf16 path reads the
    offsets on the host). Memory is ``N`` copies of an expert's weights, so it is meant for decode-sized
    ``N``. Rows past ``sum(tokens_per_expert)`` (serving's replicated mode keeps them) get the last
    expert and are never combined.
    """
    device = x_NH.device
    counts_E = torch.as_tensor(tokens_per_expert, device=device)
    offs_E = torch.cumsum(counts_E, dim=0)
    rows_N = torch.arange(x_NH.shape[0], device=device)
    eid_N = torch.searchsorted(offs_E, rows_N, right=True).clamp_max(module.num_experts - 1)
    w1_EOH, b1_EO, w2_EHF, b2_EH = module.weights()
    x_N1H = x_NH.to(w1_EOH.dtype).unsqueeze(1)
    h_NO = torch.bmm(x_N1H, w1_EOH[eid_N].transpose(1, 2)).squeeze(1)
    if b1_EO is not None:
        h_NO = h_NO + b1_EO[eid_N]
    a_N1F = _apply_act(module, h_NO).unsqueeze(1)
    y_NH = torch.bmm(a_N1F, w2_EHF[eid_N].transpose(1, 2)).squeeze(1)
    return y_NH + b2_EH[eid_N] if b2_EH is not None else y_NH


def _swiglu_impl(backend: str) -> ExpertsImpl:
    def forward(module: "GroupedExperts", x_NH: Tensor, tokens_per_expert: TokenCounts,
                cu_offsets_E1: Tensor | None = None, row_weights: RowWeights | None = None) -> Tensor:
        if x_NH.shape[0] == 0:  # all counts are 0 by contract; the loop gives zero grads without a sync
            y_NH = _loop_forward(module, x_NH, [0] * module.num_experts)
            if row_weights is not None:  # no rows to weight: the weights stay in the graph (a zero gradient; at
                # ep > 1 their exchange's backward, which every EP rank enters, runs here too)
                y_NH = y_NH * row_weights.source_S.index_select(0, row_weights.index_N).unsqueeze(-1).to(y_NH.dtype)
            return y_NH
        w1_EOH, _, w2_EHF, _ = module.weights()
        counts_E = torch.as_tensor(tokens_per_expert, device=x_NH.device)
        return swiglu_ffn(x_NH.to(w1_EOH.dtype).contiguous(), w1_EOH, w2_EHF, counts_E, backend, cu_offsets_E1,
                          row_weights)
    forward.__doc__ = f"SwiGLU experts as one autograd Function, {backend} GEMMs (see swiglu_ffn.py)."
    return forward


EXPERT_IMPLS: dict[str, ExpertsImpl] = {
    "grouped_mm": _grouped_mm_forward,
    "loop": _loop_forward,
    "gathered_mm": _gathered_forward,
    "swiglu_grouped": _swiglu_impl("grouped"),
    "swiglu_per_expert": _swiglu_impl("per_expert"),
}
_SWIGLU_IMPLS = ("swiglu_grouped", "swiglu_per_expert")
# "auto" takes one cuBLAS GEMM per expert over the grouped GEMM at <= this many local experts whose average
# GEMM 1 half (rows x H x F multiply-adds) is at least this big. On an H200 (benchmarks/results/
# moe_layer.json) mixtral's 8 x (2048 x 4096 x 14336) layer ran 4 % faster that way than autograd's grouped
# composition; per-expert GEMMs made olmoe / qwen3 (64 / 128 small groups) 4-6x and the fine-tune model's
# layer (8 x 2048 x 1536 x 4096, under the bound) 1.26x slower.
PER_EXPERT_MAX_EXPERTS = 8
PER_EXPERT_MIN_GEMM_MACS = 2**35


class GroupedExperts(nn.Module):
    """E expert FFNs (gated: ``down(act(gate(x)) * up(x))``; plain: ``down(act(up(x)))``).

    ``impl`` picks the compute path: ``"auto"`` (on capable CUDA: the SwiGLU Function over grouped GEMMs
    when training gated-SiLU experts, grouped_mm otherwise; the loop elsewhere) or any key of
    ``EXPERT_IMPLS``, so benchmarks can compare paths on the same weights.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        gated: bool = True,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.etp_size = 1  # ranks sharing each expert's FFN width (``shard_ffn``): intermediate_size is one slice
        self.activation, self.gated, self.has_bias = activation, gated, bias
        self.act_fn = get_activation(activation)
        self.impl = impl
        kw = {"dtype": dtype, "device": device}
        out1 = 2 * intermediate_size if gated else intermediate_size
        up_name = self.up_name
        self.register_parameter(up_name, nn.Parameter(torch.empty(num_experts, out1, hidden_size, **kw)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        if bias:
            self.register_parameter(f"{up_name}_bias", nn.Parameter(torch.empty(num_experts, out1, **kw)))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.reset_parameters()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value != "auto" and value not in EXPERT_IMPLS:
            raise ValueError(f"impl={value!r} is unknown; choose 'auto' or one of {sorted(EXPERT_IMPLS)}")
        if value in _SWIGLU_IMPLS and not self.swiglu:
            raise ValueError(f"impl={value!r} needs gated silu experts without bias; these are gated={self.gated}, "
                             f"activation={self.activation!r}, bias={self.has_bias}: use 'grouped_mm' or 'loop'")
        self._impl = value

    @property
    def swiglu(self) -> bool:
        """Gated SiLU without bias: the FFN the SwiGLU Function (and the fused kernels) cover."""
        return self.gated and self.activation in _SILU_NAMES and not self.has_bias

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    def weights(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(w1_EOH, b1_EO, w2_EHF, b2_EH) whatever the gated/plain parameter names. ``b2`` is None once the FFN
        is sharded (``etp_size > 1``): the output is then a partial sum, and the bias belongs to the total."""
        up = self.up_name
        b1 = getattr(self, f"{up}_bias") if self.has_bias else None
        b2 = self.down_proj_bias if self.has_bias and self.etp_size == 1 else None
        return getattr(self, up), b1, self.down_proj, b2

    def ffn_shards(self) -> dict[str, TensorShard]:
        """How ``shard_ffn`` splits each parameter over the "etp" group (Megatron's column-parallel GEMM 1,
        row-parallel GEMM 2): the rows of gate and of up (packed in ``gate_up_proj``, gate first) and their
        bias, the columns of ``down_proj``. ``down_proj_bias`` is not split."""
        packed = 2 if self.gated else 1
        shards = {self.up_name: TensorShard(1, "etp", packed), "down_proj": TensorShard(2, "etp")}
        if self.has_bias:
            shards[f"{self.up_name}_bias"] = TensorShard(1, "etp", packed)
        return shards

    def shard_ffn(self, rank: int, size: int) -> None:
        """Keep FFN slice ``rank`` of ``size`` of every expert, in place (the same Parameter objects, so their
        DeepSpeed tags, hooks and ``requires_grad`` stay; tagged with ``mark_sharded``). The forward then returns
        the partial output of this slice, without ``down_proj_bias``: sum it over the ``size`` ranks, then
        ``add_down_bias``."""
        if self.etp_size != 1:
            raise RuntimeError(f"these experts are already sharded over {self.etp_size} ranks")
        if size == 1:
            return
        if self.intermediate_size % size != 0:
            raise ValueError(f"expert intermediate size {self.intermediate_size} does not split over etp={size} "
                             f"ranks; choose tp (= etp) dividing {self.intermediate_size}")
        with torch.no_grad():
            for name, shard in self.ffn_shards().items():
                param = getattr(self, name)
                shard_parameter_(param, shard, rank, size)
                param.grad = None
        self.intermediate_size //= size
        self.etp_size = size

    def add_down_bias(self, y_NH: Tensor, tokens_per_expert: TokenCounts) -> Tensor:
        """``y_NH`` plus each row's expert's ``down_proj_bias`` (rows sorted by expert, as ``forward`` takes
        them; rows past the counts, kept by serving's capture, get the last expert's): what a sharded forward
        leaves out. No host sync. Unchanged without bias or when not sharded (the forward added it)."""
        if not self.has_bias or self.etp_size == 1:
            return y_NH
        offs_E = torch.cumsum(torch.as_tensor(tokens_per_expert, device=y_NH.device), dim=0)
        rows_N = torch.arange(y_NH.shape[0], device=y_NH.device)
        eid_N = torch.searchsorted(offs_E, rows_N, right=True).clamp_max(self.num_experts - 1)
        return _ExpertBias.apply(y_NH, self.down_proj_bias.to(y_NH.dtype), eid_N)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

        (kaiming_uniform_ with a=sqrt(5) reduces to that bound; it cannot be called on the 3-D tensor
        directly because it would take E as fan_out and F*H as fan_in.)
        """
        w1, b1, w2, _ = self.weights()
        b2 = self.down_proj_bias if self.has_bias else None
        for w, b, fan_in in ((w1, b1, self.hidden_size), (w2, b2, self.intermediate_size * self.etp_size)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound)
            if b is not None:
                b.uniform_(-bound, bound)

    def resolve_impl(self, x_NH: Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        bf16 = self.down_proj.dtype == torch.bfloat16
        if x_NH.is_cuda and not bf16 and torch.cuda.is_current_stream_capturing():
            return "gathered_mm"  # grouped_mm's non-bf16 path reads its offsets on the host
        # torch < 2.10 (only torch._grouped_mm) took bf16 alone; newer torch runs any float dtype.
        dtype_ok = hasattr(F, "grouped_mm") or bf16
        if not (dtype_ok and grouped_mm_available(x_NH.device)):
            return "loop"
        if self.swiglu and fused_kernels_enabled() and torch.is_grad_enabled():
            # training: a_NF is recomputed in the backward instead of kept. Few experts with big GEMMs
            # (mixtral-shaped) run faster as one cuBLAS GEMM each, worth the host sync for the counts
            # (not while a CUDA graph is captured: there a sync is an error).
            rows_per_expert = x_NH.shape[0] / self.num_experts
            big = rows_per_expert * self.hidden_size * self.intermediate_size >= PER_EXPERT_MIN_GEMM_MACS
            per_expert = self.num_experts <= PER_EXPERT_MAX_EXPERTS and big
            if per_expert and not (x_NH.is_cuda and torch.cuda.is_current_stream_capturing()):
                return "swiglu_per_expert"
            return "swiglu_grouped"
        return "grouped_mm"

    def forward(self, x_NH: Tensor, tokens_per_expert: TokenCounts, offsets: Tensor | None = None,
                row_weights: RowWeights | None = None) -> Tensor:
        """Rows of ``x_NH`` are sorted by local expert; ``tokens_per_expert[e]`` rows go to expert e.

        ``offsets`` (optional): 0 then ``cumsum(tokens_per_expert)``, int32 on the device (``E + 1`` entries), when
        the caller has them already (the dispatcher's sort does), saving the grouped GEMMs' scan and pad.
        ``row_weights`` (optional, swiglu_ffn.RowWeights): each row's routing weight, applied inside the experts
        (``y = w · FFN(x)``; ``folds_row_weight`` says for which inputs that is possible).
        """
        assert x_NH.dim() == 2 and x_NH.shape[-1] == self.hidden_size, f"x_NH shape {tuple(x_NH.shape)}"
        impl = self.resolve_impl(x_NH)
        if row_weights is None:
            y_NH = EXPERT_IMPLS[impl](self, x_NH, tokens_per_expert, offsets)
        elif impl in _SWIGLU_IMPLS:
            y_NH = EXPERT_IMPLS[impl](self, x_NH, tokens_per_expert, offsets, row_weights)
        else:
            raise ValueError(f"experts impl {impl!r} takes no row weights (only {_SWIGLU_IMPLS} fold them in); "
                             "weight the rows in the combine instead")
        return y_NH.to(x_NH.dtype)

    def folds_row_weight(self, x_NH: Tensor) -> bool:
        """Whether ``forward`` can take ``row_weights`` for inputs like these: the SwiGLU Function multiplies each
        row's SwiGLU output by its weight before GEMM 2 (same math as weighting the output; see swiglu_ffn.py).
        Independent of the row count (it picks between the SwiGLU impls only), so EP ranks agree on it."""
        return self.resolve_impl(x_NH) in _SWIGLU_IMPLS

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, "
                f"gated={self.gated}, bias={self.has_bias}, impl={self.impl!r}"
                + (f", etp_size={self.etp_size}" if self.etp_size > 1 else ""))
