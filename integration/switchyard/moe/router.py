"""Token-choice top-k router: which experts each token goes to, and with what combine weight.

One class covers the routers of Mixtral, Qwen2/3-MoE, OLMoE, Switch (softmax → top-k → optional renorm;
Switch's top-1 keeps the full softmax probability: ``norm_topk_prob=False``), Mistral's reference code
(top-k on logits → softmax over the k: the renormalised weights again, so a top-1 weight is always 1) and
DeepSeek-V3 (sigmoid, expert bias for choice only, group-limited top-k, scaling). Each path computes the
same tensors in the same order as transformers' routers, so logits, indices (including ``torch.topk``
tie-breaking and order) and weights match them bit for bit on fp32 inputs.

Tensor-name suffix legend:
    T  tokens (batch * sequence, flattened)
    E  experts (routed experts of this layer, global — not the local shard)
    K  top-k (experts chosen per token)
    H  hidden size
    G  expert groups (group-limited routing)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from switchyard.config import MoEConfig
from switchyard.moe.kernels import records_graph
from switchyard.moe.kernels.ops import accumulation_dtype
from switchyard.moe.kernels.router_fused import logits_grads_16bit, softmax_topk, softmax_topk_supported
from switchyard.log import get_logger

log = get_logger(__name__)

# Sum of the top-2 scores of a group ranks groups (DeepSeek-V3); fewer if a group is smaller.
_GROUP_SCORE_TOPK = 2


@dataclass
class RouterOutput:
    """What the router decided for T tokens.

    ``logits_TE`` is what HF models return as ``router_logits`` (input to the z-loss and HF's aux
    loss); ``scores_TE`` is the unbiased softmax/sigmoid over all experts (input to balance losses).
    """

    logits_TE: torch.Tensor  # fp32 raw router logits (float64 for a float64 router: see ``accumulation_dtype``)
    scores_TE: torch.Tensor  # fp32 softmax or sigmoid over all experts, before any bias
    topk_idx_TK: torch.Tensor  # int64 chosen experts
    topk_weight_TK: torch.Tensor  # fp32 final combine weights


# torch.mm(a, b, out_dtype=torch.float32): 16-bit inputs, fp32 accumulation and output (CUDA, torch >= 2.8)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _tensor_core_pair(x_TH: torch.Tensor, weight_EH: torch.Tensor) -> bool:
    """A bf16/fp16 pair on CUDA: the router's GEMMs run on tensor cores (see ``_Fp32Logits``)."""
    return (_MM_OUT_DTYPE and x_TH.is_cuda and x_TH.dtype in (torch.bfloat16, torch.float16)
            and weight_EH.dtype == x_TH.dtype)


def _autocast_off(x_TH: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast would run the router's fp32 GEMMs in its 16-bit dtype (bf16 logits, bf16 sigmoid weights);
    routing stays fp32 under it, as without it. A no-op context where autocast is off (the common case)."""
    device = x_TH.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _linear_fp32(x_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in fp32 (``accumulation_dtype``). A 16-bit pair on CUDA runs one GEMM with fp32 output instead
    of two casts and an fp32 GEMM: a product of two 16-bit floats is exact in fp32 and the sums are fp32 either
    way, so only the summation order differs (2.6e-6 relative on an H200, olmoe router); one launch, not three."""
    if _tensor_core_pair(x_TH, weight_EH):
        return torch.mm(x_TH, weight_EH.t(), out_dtype=torch.float32)
    acc = accumulation_dtype(x_TH.dtype, weight_EH.dtype)
    with _autocast_off(x_TH):
        return F.linear(x_TH.to(acc), weight_EH.to(acc))


class _Fp32Logits(torch.autograd.Function):
    """``F.linear(x.float(), w.float())`` that saves ``x`` and ``w`` in their own dtype, not as fp32 copies.

    Autograd's version keeps the fp32 copy of ``x`` (``[T, H]``, 4 bytes an element: 128 MiB for 8192
    tokens of hidden 4096) alive until the router's backward, which runs last, so it sits on top of the
    layer's peak (the experts' backward). Here nothing fp32 of that size is kept.

    fp32 inputs, and anything off CUDA: forward and backward are ``F.linear``'s fp32 matmuls, bitwise
    (CPU-tested). A 16-bit pair on CUDA: the forward is ``_linear_fp32``'s one GEMM; the backward rounds the
    logits' gradient to the input dtype (as the backward of any bf16 ``nn.Linear`` receives it) and runs two
    tensor-core GEMMs with fp32 accumulation, where the fp32 route cast ``x`` to fp32 and ran two SIMT fp32
    GEMMs. Routing decisions and combine weights stay fp32.
    """

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_TH, weight_EH)
        return _linear_fp32(x_TH, weight_EH)

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):  # type: ignore[override]
        x_TH, weight_EH = ctx.saved_tensors
        grad_x = grad_w = None
        if _tensor_core_pair(x_TH, weight_EH):
            return logits_grads_16bit(grad_TE, x_TH, weight_EH, *ctx.needs_input_grad)
        acc = accumulation_dtype(grad_TE.dtype, x_TH.dtype, weight_EH.dtype)
        grad_TE = grad_TE.to(acc)
        with _autocast_off(x_TH):
            if ctx.needs_input_grad[0]:
                grad_x = grad_TE.mm(weight_EH.to(acc)).to(x_TH.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = grad_TE.t().mm(x_TH.to(acc)).to(weight_EH.dtype)
        return grad_x, grad_w


def router_logits_fp32(x_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:
    """fp32 router logits ``x @ w.T`` of a ``[T, H]`` input (any float dtype)."""
    if records_graph(x_TH, weight_EH):
        return _Fp32Logits.apply(x_TH, weight_EH)
    # no graph to record (inference): skip the Function, whose host overhead shows in a decode step
    return _linear_fp32(x_TH, weight_EH)


def _softmax_fp32(logits_TE: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits_TE, dim=-1, dtype=accumulation_dtype(logits_TE.dtype))


_SCORE_FUNCS = {"softmax": _softmax_fp32, "sigmoid": torch.sigmoid}


class Router(nn.Module):
    """Linear gate ``[E, H]`` (HF layout, so HF router weights load by copy) plus the routing rule."""

    fused = True  # the one-launch softmax top-k path where it applies (False: the unfused ops, for A/B runs)

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.expert_bias: torch.Tensor | None
        if config.expert_bias:
            # DeepSeek-V3's e_score_correction_bias: persistent (checkpointed), never trained by autograd.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        # Softmax → top-k order is sorted (Mixtral/Qwen/OLMoE); DeepSeek-V3's sigmoid router uses
        # sorted=False, whose order differs on CPU. Matching it keeps indices identical to HF.
        self._topk_sorted = config.score_func == "softmax"
        self._warn_ignored(config)
        self.reset_parameters()

    @staticmethod
    def _warn_ignored(config: MoEConfig) -> None:
        if config.score_func == "sigmoid" and not config.softmax_before_topk:
            log.warning("softmax_before_topk=False is ignored with score_func='sigmoid'", ranks=[0])
        if config.score_func == "softmax" and not config.softmax_before_topk and config.norm_topk_prob:
            log.debug("norm_topk_prob is a no-op with softmax_before_topk=False (weights already sum to 1)")

    def reset_parameters(self) -> None:
        """Small normal init (std 0.02, as HF's initializer_range) so fresh routers start near uniform."""
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        """Keep ``expert_bias`` fp32 through ``.half()``/``.to(bf16)``: its ±1e-3 steps vanish in bf16."""
        super()._apply(fn, *args, **kwargs)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        """Route ``x_TH`` (any leading shape is flattened to T); all routing math is fp32."""
        x_TH = x_TH.reshape(-1, self.hidden_size)
        cfg = self.config
        if self._fused_softmax_topk(x_TH):
            return RouterOutput(*softmax_topk(x_TH, self.weight, self.top_k, cfg.norm_topk_prob,
                                              cfg.routed_scaling_factor))
        if not cfg.jitter_experts_input:  # Switch semantics: only the router's copy of x is perturbed
            x_TH = self.jitter(x_TH)
        logits_TE = router_logits_fp32(x_TH, self.weight)
        scores_TE = _SCORE_FUNCS[cfg.score_func](logits_TE)

        topk_on_logits = cfg.score_func == "softmax" and not cfg.softmax_before_topk
        choice_TE = logits_TE if topk_on_logits else scores_TE
        if self.expert_bias is not None:
            choice_TE = choice_TE + self.expert_bias  # bias steers the choice only, never the weights
        if cfg.n_group is not None:
            choice_TE = self._mask_groups(choice_TE)
        topk_val_TK, topk_idx_TK = torch.topk(choice_TE, k=self.top_k, dim=-1, sorted=self._topk_sorted)

        if topk_on_logits:
            topk_weight_TK = _softmax_fp32(logits_TE.gather(1, topk_idx_TK))
        else:
            # top-k ran on the scores themselves: its values are the gather, bit for bit (one launch less)
            topk_weight_TK = topk_val_TK if choice_TE is scores_TE else scores_TE.gather(1, topk_idx_TK)
            if cfg.norm_topk_prob:
                topk_weight_TK = self._renormalize(topk_weight_TK)
        if cfg.routed_scaling_factor != 1.0:
            topk_weight_TK = topk_weight_TK * cfg.routed_scaling_factor
        return RouterOutput(logits_TE, scores_TE, topk_idx_TK, topk_weight_TK)

    def jitter(self, x_TH: torch.Tensor) -> torch.Tensor:
        """``x_TH`` times uniform noise in ``[1 - router_jitter, 1 + router_jitter]`` in training (Switch, Mixtral);
        else ``x_TH`` itself. With ``jitter_experts_input`` the MoE layer calls it on its input, for the router and the
        experts alike (transformers' Mixtral block), and ``forward`` does not jitter again."""
        jitter = self.config.router_jitter
        if not (self.training and jitter > 0):
            return x_TH
        return x_TH * torch.empty_like(x_TH).uniform_(1.0 - jitter, 1.0 + jitter)

    def _fused_softmax_topk(self, x_TH: torch.Tensor) -> bool:
        """The plain softmax → top-k router (Mixtral, Qwen, OLMoE) on CUDA runs as one Triton launch
        (``moe/kernels/router_fused.py``): no bias, no groups, no jitter being applied here (the layer's
        ``jitter_experts_input`` jitters before the router)."""
        cfg = self.config
        return (self.fused and cfg.score_func == "softmax" and cfg.softmax_before_topk
                and self.expert_bias is None and cfg.n_group is None
                and (cfg.jitter_experts_input or not (self.training and cfg.router_jitter > 0))
                and softmax_topk_supported(x_TH, self.weight, self.top_k))

    def _renormalize(self, w_TK: torch.Tensor) -> torch.Tensor:
        # Softmax probabilities of the top-k are > 0 (Mixtral/Qwen divide plainly); sigmoid scores can
        # underflow to 0 for all k, hence DeepSeek-V3's +1e-20.
        if self.config.score_func == "sigmoid":
            return w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return w_TK / w_TK.sum(dim=-1, keepdim=True)

    def _mask_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 group-limited routing: keep the ``topk_group`` best groups, -inf the rest.

        Bounds all-to-all fan-out: with one group per node, a token reaches at most topk_group nodes.
        """
        n_group, topk_group = self.config.n_group, self.config.topk_group
        assert n_group is not None and topk_group is not None
        num_tokens = choice_TE.shape[0]
        per_group = self.num_experts // n_group
        choice_TGX = choice_TE.view(num_tokens, n_group, per_group)
        group_score_TG = choice_TGX.topk(min(_GROUP_SCORE_TOPK, per_group), dim=-1)[0].sum(dim=-1)
        group_idx_TG = torch.topk(group_score_TG, k=topk_group, dim=-1, sorted=False)[1]
        group_mask_TG = torch.zeros_like(group_score_TG)
        group_mask_TG.scatter_(1, group_idx_TG, 1)
        keep_TGX = group_mask_TG.unsqueeze(-1).expand(num_tokens, n_group, per_group)
        keep_TE = keep_TGX.reshape(num_tokens, self.num_experts)  # explicit E: T may be 0
        return choice_TE.masked_fill(~keep_TE.bool(), float("-inf"))

    @torch.no_grad()
    def update_expert_bias(
        self, tokens_per_expert_E: torch.Tensor, group: dist.ProcessGroup | None = None
    ) -> None:
        """Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2): nudge under-loaded experts up.

        ``tokens_per_expert_E`` are this rank's counts for the step; with ``group`` they are summed
        over it first so every rank applies the same update and biases stay identical.
        """
        if self.expert_bias is None:
            raise ValueError("update_expert_bias needs MoEConfig(expert_bias=True)")
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert_E must have shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert_E.shape)}"
            )
        counts_E = tokens_per_expert_E.detach().to(self.expert_bias.device, torch.float32, copy=True)
        if group is not None:
            dist.all_reduce(counts_E, op=dist.ReduceOp.SUM, group=group)
        error_E = counts_E.mean() - counts_E
        self.expert_bias.add_(torch.sign(error_E), alpha=self.config.expert_bias_update_rate)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score_func={c.score_func}, expert_bias={c.expert_bias}, n_group={c.n_group}"
        )
