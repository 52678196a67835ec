"""The expert-parallel MoE layer: route → dispatch → experts → combine (+ shared experts).

A drop-in replacement for an FFN block: ``layer(hidden_states)`` takes ``[..., H]`` and returns the
same shape. With ``groups`` (a ProcessGroupManager) whose ep > 1, each rank holds E / ep experts and
token copies travel by all-to-all; without, everything stays local. Expert parameters are tagged for
DeepSpeed (``allreduce=False``, ``group_name``) and the layer subclasses DeepSpeed's MoE marker, so the
engine reduces their gradients over the expert-data-parallel group and partitions their ZeRO state
there; router and shared experts stay dense.

Small batches at inference (``T * K`` up to ``small_batch_rows``, no autograd graph, gated SiLU experts
without bias) skip the permutation: ``routed_swiglu_combine`` runs the experts on the unsorted
(token, k) copies and combines them in two kernels instead of ~25 (docs/moe-layer.md, "Small-batch path").
From two copies per expert up to ``all_experts_tokens`` tokens (which reach nearly every expert anyway),
every local expert runs on every token and the combine picks each token's K outputs (``moe/all_experts.py``).

Tensor parallelism (tp > 1) runs inside the layer as expert tensor parallelism with etp = tp: the layer is
built with full-width experts (so upcycling and adoption copy whole FFNs), then ``shard_experts_tensor_parallel``
keeps 1/etp of every local expert's FFN width on each rank. The ranks of an etp group hold the same tokens and,
after the dispatch, the same rows: each computes its slice's partial output, one all-reduce over the group sums
them (Megatron's column- then row-parallel FFN), and ``down_proj_bias`` is added once to that sum. Router and
dispatch run replicated on the etp ranks, identically.

Tensor parallelism with etp = 1 (``ProcessGroupManager(tp=N, etp=1)``; Megatron-Core's choice for fine-grained
experts, whose FFN slices would be too narrow to shard) keeps the experts whole and splits the tokens instead: each
tp rank routes its 1/tp of the flattened tokens (padded to a multiple of tp with rows marked as padding) through
router, dispatch (the EP group then spans the tp ranks: ``rank = ep_r + ep·edp_r``), experts and combine, and the
rows are all-gathered back (``scatter_to_group`` / ``gather_from_group``). The router weight enters through
``copy_to_group``, so its gradient (each rank's covers its rows) is summed over the tp ranks; router losses are per
slice, averaged over the tp ranks. Shared experts run on every token.

The state dict speaks global expert ids (``experts.{id}.gate_up_proj``): a layer saved at ep=N loads
at ep=M, each rank picking its own experts.

Tensor suffixes: T tokens, K top-k, E global experts, L local experts, M rows for local experts, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from switchyard.activations import get_activation
from switchyard.config import MoEConfig
from switchyard.log import get_logger
from switchyard.moe.all_experts import all_experts_swiglu_combine
from switchyard.moe.capacity import capacity_keep_mask
from switchyard.moe.cuda_graph import LayerGraph, module_substitute
from switchyard.moe.dispatcher import DispatchPlan, TokenDispatcher
from switchyard.moe.experts import GroupedExperts
from switchyard.moe.kernels import fused_kernels_enabled, routed_swiglu_combine
from switchyard.moe.losses import load_balancing_loss, sequence_balance_loss, z_loss
from switchyard.moe.router import Router, RouterOutput
from switchyard.moe.swiglu_ffn import RowWeights
from switchyard.parallel.deepspeed_groups import DeepSpeedMoEModule, tag_expert_parameters
from switchyard.parallel.layout import local_expert_ids
from switchyard.parallel.tensor_shards import (
    as_local_shard,
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    scatter_to_group,
)

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

log = get_logger(__name__)

# The small-batch path runs while T * K <= min(SMALL_BATCH_MAX_ROWS, SMALL_BATCH_ROWS_PER_EXPERT * E).
# Its GEMV kernels read an expert's weights once per copy (a copy sharing an expert reads them again, at
# best from L2, whose bandwidth is not far above HBM's), so its cost grows with copies per expert; the
# sort path reads each expert once but pays ~25 launches. On an H200 (bf16, mixtral / olmoe / qwen3
# shapes) the small path won or tied up to 2 copies per expert and lost from 4 (mixtral: 32 copies); at
# 256 copies it already trailed in a CUDA graph (docs/moe-layer.md, "Small-batch path").
SMALL_BATCH_ROWS_PER_EXPERT = 2
SMALL_BATCH_MAX_ROWS = 128
# The all-experts path runs (CUDA, inference) while T <= ALL_EXPERTS_MAX_TOKENS and T * K >= 2 * E (two copies
# per expert on average: ~86 % of the experts hit), before the small-batch path is considered. Its FLOPs grow
# as L * T while the weight reads stay fixed, so it pays while T stays well below the GPU's FLOP-per-byte
# ratio. On an H200 (bf16, mixtral / olmoe / qwen3, CUDA-graph replay) it beat the sort path up to 128 tokens
# and lost at 256; it beat the small-batch path at 2 copies per expert and lost at 1
# (benchmarks/small_batch_sweep.py, docs/moe-layer.md "All-experts path").
ALL_EXPERTS_MAX_TOKENS = 128
ALL_EXPERTS_MIN_COPIES_PER_EXPERT = 2

# the unsorted inference paths: (x_TH, w1_LOH, w2_LHF, idx_TK, weight_TK, keep_TK, first_expert=, num_experts=)
INFERENCE_PATHS = {"small_batch": routed_swiglu_combine, "all_experts": all_experts_swiglu_combine}

# how to fix each entry of ``MoELayer._ep_signature`` that differs between EP ranks (the rest are how it was built)
_PEER_FIXES = {
    "dtype": "cast the model the same way on every rank",
    "training": "call model.train() or model.eval() on every rank alike",
    "grad_enabled": "run the forward with autograd on (or under torch.no_grad()) on every rank alike",
    "replicated_tokens": "set replicated_tokens on every EP rank alike",
    "fold_routing_weights": "set fold_routing_weights on every EP rank alike",
    "experts_impl": "set experts.impl on every EP rank alike",
    "patched_as": "patch the same layers on every rank (the same moe.targets / exclude / layers / every_n)",
}
_BUILD_FIX = "build the layer from the same MoEConfig and hidden size on every rank"
# MoEConfig fields that shape only how the weights were made, not the forward (a load rewrites init as "copy")
_BUILD_ONLY = ("init", "extra")

EXPERT_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


# each router loss kind of MoEStats.losses → the MoEConfig field that weighs it in ``aux_loss``
LOSS_COEFFICIENTS = {"load_balancing": "aux_loss_coef", "sequence_balance": "seq_aux_loss_coef",
                     "z_loss": "z_loss_coef"}


@dataclass
class MoEStats:
    """Cheap per-forward metrics, detached; read them off the hot path (no host sync here)."""

    # kept copies this rank routed to each global expert; with a token_mask, real tokens' copies only (dropless
    # routes padding rows too, and they are not load)
    tokens_per_expert_E: torch.Tensor
    # T * K before drops; with a token_mask, real tokens' copies only (a scalar tensor: no host sync), as
    # dropped_copies counts real copies only (padding is never kept, and not a drop)
    routed_copies: int | torch.Tensor
    dropped_copies: torch.Tensor  # scalar tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped_copies) / max(1.0, float(self.routed_copies))

    @property
    def imbalance(self) -> float:
        """max / mean tokens per expert (1.0 = perfectly balanced)."""
        counts = self.tokens_per_expert_E.float()
        return float(counts.max() / counts.mean().clamp_min(1e-9)) if counts.numel() else 1.0


class SharedExperts(nn.Module):
    """Always-on dense FFN beside the routed experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``).

    Parameter names follow HF's MLPs (``gate_proj``/``up_proj``/``down_proj``) so weights copy over.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gated = gated
        self.act_fn = get_activation(activation)
        if gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x_TH)) * self.up_proj(x_TH) if self.gated else self.act_fn(self.up_proj(x_TH))
        return self.down_proj(h)


class MoELayer(DeepSpeedMoEModule):
    # most T * K copies for the small-batch path; None: min(SMALL_BATCH_MAX_ROWS, 2 * E); 0: never
    small_batch_rows: int | None = None
    # most tokens for the all-experts path; None: ALL_EXPERTS_MAX_TOKENS on CUDA, 0 (never) elsewhere; 0: never
    all_experts_tokens: int | None = None
    # training steps' routed path as CUDA graph replays where it can be (moe/cuda_graph.py: rules, memory)
    cuda_graph: bool = False
    # shared experts computed while the dispatch all-to-all is in flight (ep > 1; their backward likewise)
    overlap_shared_experts: bool = True
    # the routing weights multiplied into the SwiGLU experts' rows before GEMM 2 (the SwiGLU Function; at ep > 1
    # they travel with the rows, at etp > 1 each FFN slice weights its partial output): the combine is then a plain
    # sum that keeps no [T*K, H] for its backward (moe/swiglu_ffn.py); False weights the experts' outputs in the
    # combine, as every other path does
    fold_routing_weights: bool = True
    # [B, S] or [T], 1 = real token: padding left out of the balance loss and of expert capacity; set per
    # forward by a patched HF model's hook (hf/patch.py). [B, S] also splits a [T, H] input into B sequences
    # for the sequence balance loss; a step with a KV cache's [B, S_cache + S] is ignored (``_token_split``)
    token_mask: torch.Tensor | None = None

    def __init__(
        self,
        config: MoEConfig,
        hidden_size: int,
        intermediate_size: int | None = None,
        groups: "ProcessGroupManager | None" = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if None not in (config.intermediate_size, intermediate_size) and config.intermediate_size != intermediate_size:
            raise ValueError(f"MoEConfig.intermediate_size={config.intermediate_size} but intermediate_size="
                             f"{intermediate_size} was passed to MoELayer; give one of them, or make them agree")
        ffn = config.intermediate_size or intermediate_size
        if ffn is None:
            raise ValueError("MoELayer needs intermediate_size (argument or MoEConfig.intermediate_size)")
        ep_size = groups.size("ep") if groups is not None else 1
        if config.num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={config.num_experts} is not divisible by ep={ep_size}; "
                f"choose ep dividing {config.num_experts}"
            )
        tp_size = groups.size("tp") if groups is not None else 1
        etp_size = groups.size("etp") if groups is not None else 1
        # tokens split over the tp ranks (etp = 1); else 1 (ParallelConfig allows only etp = 1 or tp)
        token_slices = tp_size if tp_size > 1 and etp_size == 1 else 1
        if token_slices > 1:
            _check_token_slices(config, tp_size)
        group_name = groups.ep_group_name if groups is not None else "ep_size_1"
        self._init_expert_module(config.num_experts, ep_size, group_name)
        self.config = config
        self.hidden_size, self.intermediate_size = hidden_size, ffn
        self.groups = groups
        self.tp_token_slices = token_slices
        self.ep_rank = groups.rank("ep") if groups is not None else 0
        self.local_expert_ids = local_expert_ids(config.num_experts, ep_size, self.ep_rank)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.router = Router(hidden_size, config).to(**kw)
        self.experts = GroupedExperts(
            self.num_local_experts, hidden_size, ffn, config.activation, config.gated, config.bias, **kw
        )
        tag_expert_parameters(self.experts, group_name)
        self.dispatcher = TokenDispatcher(config.num_experts, groups.group("ep") if ep_size > 1 else None)
        self.shared_experts: SharedExperts | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.num_shared_experts > 0:
            shared_ffn = config.shared_expert_intermediate_size or ffn * config.num_shared_experts
            self.shared_experts = SharedExperts(hidden_size, shared_ffn, config.activation, config.gated, config.bias).to(**kw)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **kw)
        self.replicated_tokens = False  # serving: every EP rank holds the same tokens (see dispatcher.py)
        self.aux_loss: torch.Tensor | None = None
        self.last_router_output: RouterOutput | None = None
        self._unsliced_tokens = 0  # the last token-sliced forward's rows before the tp ranks split them
        self.last_stats: MoEStats | None = None
        self._bias_counts_E: torch.Tensor | None = None
        self._graph: LayerGraph | None = None
        self._graph_skip_reason: str | None = None  # last reason logged for running eagerly
        self._ep_peers_checked = False  # the EP ranks compared their ``_ep_signature`` (first forward at ep > 1)
        # (its module name, the MoE layers patched into the model), set by patch_model: ranks that patched different
        # layers pair one layer's collectives with another's
        self.patched_as: tuple[str, int] | None = None
        self._register_state_dict_hook(_experts_to_global_ids)
        self._register_load_state_dict_pre_hook(_experts_from_global_ids, with_module=True)

    def shard_experts_tensor_parallel(self) -> None:
        """Keep this rank's 1/etp of every local expert's FFN width (``GroupedExperts.shard_ffn``); from then on
        the forward sums the slices' partial outputs over the "etp" group. Called once the full-width experts
        hold their weights (``patch_model``'s upcycling or adoption, a checkpoint): ``apply_tensor_parallel``
        does. A no-op at etp = 1 and on a layer already sharded. Router jitter is refused: each rank draws its own
        noise, so the etp ranks could route their (same) tokens differently and sum slices of different rows.

        With tokens split over the tp ranks (etp = 1) the experts stay whole, and are marked
        ``tensor_model_parallel`` for DeepSpeed's gradient norm, which counts unmarked parameters on tp rank 0 only:
        the tp ranks hold other experts (their EP group spans them) or other ZeRO partitions of the same ones (their
        expert-data-parallel group does), so each rank's share counts once."""
        if self.tp_token_slices > 1:
            for param in self.experts.parameters():
                param.tensor_model_parallel = True  # type: ignore[attr-defined]
            return
        etp_size = self.groups.size("etp") if self.groups is not None else 1
        if etp_size == 1 or self.experts.etp_size == etp_size:
            return
        assert self.groups is not None
        if self.config.router_jitter > 0:
            raise ValueError(
                f"router_jitter={self.config.router_jitter} with expert tensor parallelism (etp={etp_size}): the etp "
                "ranks must route their tokens identically, and each draws its own jitter noise; set router_jitter=0 "
                "for tp > 1"
            )
        self.experts.shard_ffn(self.groups.rank("etp"), etp_size)
        self._graph = None  # captured on the full-width parameters

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if not shape or shape[-1] != self.hidden_size or not hidden_states.is_floating_point():
            raise ValueError(f"MoELayer expects [..., {self.hidden_size}] floating-point hidden states, got "
                             f"{tuple(shape)} {hidden_states.dtype}")
        if self.ep_size > 1 and not self._ep_peers_checked:
            self._check_ep_peers(hidden_states.dtype)
        real_T, num_sequences = self._token_split(shape, hidden_states.device)
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        if self.tp_token_slices > 1:
            return self._token_sliced_forward(x_TH, real_T).reshape(shape)
        if self.config.jitter_experts_input:  # transformers' Mixtral: router and experts see one jittered input
            x_TH = self.router.jitter(x_TH)
        if self.cuda_graph:  # the last forward's outputs would keep a dropped replay pending (cuda_graph.py)
            self.aux_loss = self.last_router_output = None
        graph = self._replayable_graph(x_TH) if self.cuda_graph else None
        shared_TH = None
        if graph is not None:
            out_TH, *router_outputs, tokens_per_expert_E = graph.run(x_TH)
            routed, keep_TK = RouterOutput(*router_outputs), None
            if self.shared_experts is None:  # a graph buffer the next replay overwrites: the caller gets a copy
                out_TH = out_TH.clone()
        else:
            routed = self.router(x_TH)
            keep_TK = self._capacity_mask(routed, real_T)
            out_TH, tokens_per_expert_E, shared_TH = self._routed_forward(x_TH, routed, keep_TK, x_TH)
        if self.shared_experts is not None:
            out_TH = out_TH + (shared_TH if shared_TH is not None else self._shared_forward(x_TH))
        self._record(routed, tokens_per_expert_E, keep_TK, real_T, num_sequences)
        return out_TH.reshape(shape)

    def _ep_signature(self, dtype: torch.dtype) -> dict[str, Any]:
        """What every EP rank's layer must share: its config and shapes, the dtype its rows cross in, and the modes
        that choose its collectives (grad mode: the backward's all-to-alls and the routing weights' own; replicated
        tokens: an all-reduce instead of all-to-alls)."""
        config = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name not in _BUILD_ONLY}
        return {**config, "intermediate_size": self.intermediate_size, "hidden_size": self.hidden_size,
                "dtype": dtype, "training": self.training, "grad_enabled": torch.is_grad_enabled(),
                "replicated_tokens": self.replicated_tokens, "fold_routing_weights": self.fold_routing_weights,
                "experts_impl": self.experts.impl, "patched_as": self.patched_as}

    @torch.compiler.disable  # dynamo cannot trace all_gather_object's process group: run it outside the graph
    def _check_ep_peers(self, dtype: torch.dtype) -> None:
        """Once, at the first forward at ep > 1: every rank raises, naming each EP rank's value, where the EP ranks'
        signatures differ. Ranks that disagree on the expert count exchange count matrices of different sizes (gloo
        aborts a rank, NCCL reads garbage); on the grad mode or replicated tokens they enter different collectives
        (a hang); on top_k, a capacity or a width they run silently different models. At the forward, not at
        construction: a layer may be built on one rank alone, but its forward at ep > 1 is a collective anyway."""
        group = self.dispatcher.ep_group
        mine = self._ep_signature(dtype)
        gathered: list[Any] = [None] * self.ep_size
        dist.all_gather_object(gathered, mine, group=group)
        keys = dict.fromkeys(key for signature in gathered for key in signature)  # mine, unless the code differs
        differ = [key for key in keys if len({repr(signature.get(key)) for signature in gathered}) > 1]
        if differ:
            per_key = "; ".join(f"different {key} (" + ", ".join(
                f"EP rank {r}: {signature.get(key)}" for r, signature in enumerate(gathered)) + ")" for key in differ)
            fixes = dict.fromkeys(_PEER_FIXES.get(key, _BUILD_FIX) for key in differ)
            name = f" {self.patched_as[0]}" if self.patched_as else ""
            raise ValueError(f"the EP ranks of the MoE layer{name} (global ranks {dist.get_process_group_ranks(group)}) "
                             f"run it with {per_key}: {'; '.join(fixes)}")
        self._ep_peers_checked = True

    def _routed_forward(self, x_NH: torch.Tensor, routed: RouterOutput, keep_NK: torch.Tensor | None,
                        shared_input_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The routed experts on ``x_NH``'s rows: an unsorted inference path where one applies, else the sort path,
        whose dispatch the shared experts overlap (on ``shared_input_TH``: every token, also when ``x_NH`` is this
        tp rank's slice). Returns (output, tokens per expert, the shared experts' output or None)."""
        path = self.inference_path(x_NH, routed.topk_idx_TK)
        if path is not None:
            return (*self._inference_forward(path, x_NH, routed, keep_NK), None)
        overlap = None
        if self.shared_experts is not None and self.overlap_shared_experts:
            overlap = lambda: self._shared_forward(shared_input_TH)  # noqa: E731
        return self._sorted_forward(x_NH, routed, keep_NK, overlap)

    def _shared_forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        assert self.shared_experts is not None
        shared_TH = self.shared_experts(x_TH)
        if self.shared_expert_gate is not None:
            shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
        return shared_TH

    def _token_sliced_forward(self, x_TH: torch.Tensor, real_T: torch.Tensor | None) -> torch.Tensor:
        """tp > 1 with etp = 1: this tp rank's 1/tp of the rows (t of them, padding rows appended to make T a
        multiple of tp, marked as padding) through router, dispatch, experts and combine; the rows' outputs are
        all-gathered back. ``last_router_output`` and ``last_stats`` are this rank's slice's (``router_logits()``
        gathers the logits of every slice)."""
        assert self.groups is not None
        if self.replicated_tokens:
            raise RuntimeError("replicated_tokens (serving: every EP rank holds the same tokens) does not hold when "
                               "the tp ranks split the tokens (etp = 1); set replicated_tokens=False")
        if self.cuda_graph:
            self._run_eagerly(f"tp={self.tp_token_slices} with etp=1: tokens split over the tp ranks")
        group, size = self.groups.group("tp"), self.tp_token_slices
        num_tokens = self._unsliced_tokens = x_TH.shape[0]
        pad = -num_tokens % size
        if pad:
            x_TH_padded = torch.cat([x_TH, x_TH.new_zeros(pad, self.hidden_size)])
            real_T = torch.ones(num_tokens, dtype=torch.bool, device=x_TH.device) if real_T is None else real_T
            real_T = torch.cat([real_T, real_T.new_zeros(pad)])
        else:
            x_TH_padded = x_TH
        x_tH = scatter_to_group(x_TH_padded, group)
        real_t = None if real_T is None else scatter_to_group(real_T, group)  # the same rows' mask
        routed = self._sliced_router(x_tH, group)
        keep_tK = self._capacity_mask(routed, real_t)
        out_tH, tokens_per_expert_E, shared_TH = self._routed_forward(x_tH, routed, keep_tK, x_TH)
        out_TH = gather_from_group(out_tH, group)[:num_tokens]
        if self.shared_experts is not None:
            out_TH = out_TH + (shared_TH if shared_TH is not None else self._shared_forward(x_TH))
        self._record(routed, tokens_per_expert_E, keep_tK, real_t, 1)
        self._average_losses_over_tp(group, size)
        return out_TH

    def router_logits(self) -> torch.Tensor | None:
        """The last forward's router logits ``[T, E]`` over all its tokens (transformers' ``router_logits``). With the
        tokens split over the tp ranks (etp = 1) each rank routed a slice: the slices are all-gathered (a collective
        of the tp group; the gradient goes back to each rank's slice)."""
        routed = self.last_router_output
        if routed is None or self.tp_token_slices == 1:
            return None if routed is None else routed.logits_TE
        assert self.groups is not None
        return gather_from_group(routed.logits_TE, self.groups.group("tp"))[: self._unsliced_tokens]

    def _sliced_router(self, x_tH: torch.Tensor, group: dist.ProcessGroup | None) -> RouterOutput:
        """The router on this rank's rows, its weight read through ``copy_to_group``: each rank's weight gradient
        covers its rows only, so they are summed over the tp ranks before they reach ``.grad`` (then DeepSpeed's dp
        reduction sees the whole batch's gradient on every tp rank, as for any replicated parameter)."""
        weight = self.router.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return self.router(x_tH)
        return torch.func.functional_call(self.router, {"weight": copy_to_group(weight, group)}, (x_tH,))

    def _average_losses_over_tp(self, group: dist.ProcessGroup | None, size: int) -> None:
        """The slices' router losses → their mean over the tp ranks, as data parallelism's gradient mean treats the
        dp ranks' (the losses are nonlinear in the batch: not one process's on all T tokens). One all-reduce; the
        backward gives each rank 1/tp of its own slice's loss gradient, and the value is the same on every tp rank."""
        stats = self.last_stats
        if self.aux_loss is None or stats is None:
            return
        kinds = list(stats.losses)
        mean = reduce_from_group(torch.stack([self.aux_loss, *(stats.losses[k] for k in kinds)]), group) / size
        self.aux_loss = mean[0]
        stats.losses = {kind: mean[i + 1].detach() for i, kind in enumerate(kinds)}

    def _sorted_forward(self, x_TH: torch.Tensor, routed: RouterOutput, keep_TK: torch.Tensor | None,
                        overlap: Callable[[], torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """dispatch (sort by expert, all-to-all) → grouped experts → combine: (out_TH, tokens_per_expert_E,
        what ``overlap`` returned, run while the dispatch's all-to-all is in flight)."""
        if self.replicated_tokens and self.ep_size > 1:
            if torch.is_grad_enabled():
                raise RuntimeError("replicated_tokens is an inference mode (its all-reduce has no backward); "
                                   "run under torch.no_grad() / inference_mode(), or set replicated_tokens=False")
            x_MH, plan = self.dispatcher.dispatch_replicated(x_TH, routed.topk_idx_TK, keep_TK)
            plan.overlap_out = overlap() if overlap is not None else None
        else:
            # decided from what every EP rank shares (config, impl, dtype, grad mode; never its row count): at
            # ep > 1 carrying the weights is an all-to-all of its own, which every rank must enter
            fold = self.fold_routing_weights and self.experts.folds_row_weight(x_TH)
            x_MH, plan = self.dispatcher.dispatch(x_TH, routed.topk_idx_TK, keep_TK, overlap,
                                                  routed.topk_weight_TK if fold else None)
        y_MH = self._run_experts(x_MH, plan)
        # folded: the experts weighted their rows (inside the SwiGLU, before GEMM 2), the combine keeps nothing
        weight_TK = None if plan.row_weights is not None else routed.topk_weight_TK
        return self.dispatcher.combine(y_MH, plan, weight_TK), plan.tokens_per_expert_E, plan.overlap_out

    def _run_experts(self, x_MH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The local experts on the dispatched rows (weighting them where ``plan.row_weights`` is set). Sharded
        (etp > 1), every etp rank holds the same rows: each computes its FFN slice's partial output, the all-reduce
        over the group sums them and the down bias is added once (the folding SwiGLU experts have none: the sum of
        the weighted slices is the weighted output). Backward: every slice takes the whole output gradient, and
        ``copy_to_group`` sums the slices' input gradients and, folded, their partial routing-weight gradients
        (each slice's ``<da, silu(gate) * up>`` over its own columns)."""
        counts_L, cu_offsets_L1 = plan.tokens_per_local_expert_L, plan.local_cu_offsets_L1
        row_weights = plan.row_weights
        if self.experts.etp_size == 1:
            return self.experts(x_MH, counts_L, cu_offsets_L1, row_weights)
        assert self.groups is not None
        group = self.groups.group("etp")
        if row_weights is not None:
            row_weights = RowWeights(copy_to_group(row_weights.source_S, group), row_weights.index_N)
        y_MH = reduce_from_group(self.experts(copy_to_group(x_MH, group), counts_L, cu_offsets_L1, row_weights), group)
        return self.experts.add_down_bias(y_MH, counts_L)

    def _routed_core(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What ``cuda_graph`` captures: the dropless routed path, outputs as tensors only."""
        routed = self.router(x_TH)
        out_TH, tokens_per_expert_E, _ = self._sorted_forward(x_TH, routed, None)
        return (out_TH, routed.logits_TE, routed.scores_TE, routed.topk_idx_TK, routed.topk_weight_TK,
                tokens_per_expert_E)

    def _graph_rules_broken(self, x_TH: torch.Tensor) -> str | None:
        """Why this call cannot replay a graph (None: it can); see moe/cuda_graph.py."""
        cfg = self.config
        checks = (
            (x_TH.is_cuda, "input not on CUDA"),
            (self.training and torch.is_grad_enabled(), "not a training step with grad enabled"),
            (x_TH.requires_grad or any(p.requires_grad for m in (self.router, self.experts) for p in m.parameters()),
             "neither the input nor the router and expert parameters require grad (no backward to capture)"),
            (not torch.is_autocast_enabled("cuda"), "under torch.autocast"),
            (not hasattr(self.experts.down_proj, "ds_id"), "ZeRO-3 partitions the parameters"),
            (self.ep_size == 1 and not self.replicated_tokens, f"ep={self.ep_size}"),
            (self.experts.etp_size == 1, f"etp={self.experts.etp_size} (the expert tensor-parallel all-reduces)"),
            (cfg.capacity_factor is None, f"capacity_factor={cfg.capacity_factor} (drops need a host sync)"),
            (cfg.router_jitter == 0, f"router_jitter={cfg.router_jitter}"),
            (fused_kernels_enabled(), "fused kernels off (the unfused dispatch syncs)"),
            (self.experts.impl in ("auto", "swiglu_grouped", "grouped_mm", "gathered_mm"),
             f"experts impl {self.experts.impl!r} syncs on the host"),
            (self._graph is None or not self._graph.pending,
             "the last replayed forward's backward has not run yet"),
        )
        return next((why for ok, why in checks if not ok), None)

    def _replayable_graph(self, x_TH: torch.Tensor) -> LayerGraph | None:
        """The captured graph for this call (capturing it first if needed), or None: run eagerly."""
        why = self._graph_rules_broken(x_TH)
        if why is not None:
            self._run_eagerly(why)
            return None
        named = [*self.router.named_parameters("router"), *self.router.named_buffers("router"),
                 *self.experts.named_parameters("experts")]
        tensors = [t for _, t in named]
        if self._graph is None or not self._graph.matches(x_TH, tensors):
            self._graph = None  # its pool goes back before the new capture
            self._graph = LayerGraph(self._routed_core, x_TH, tensors,
                                     module_substitute(self, [name for name, _ in named]))
        return self._graph

    def _run_eagerly(self, why: str) -> None:
        """Log why ``cuda_graph`` runs this call eagerly, once per change of reason."""
        if why != self._graph_skip_reason:
            log.info(f"MoE layer cuda_graph: running eagerly ({why})")
            self._graph_skip_reason = why

    def inference_path(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor) -> str | None:
        """Which unsorted inference path (a key of ``INFERENCE_PATHS``) this forward takes; None: the sort
        path. Both need inference (nothing recorded for a backward), gated SiLU experts without bias on the
        default impl, fused kernels on, and every token either local (ep=1) or replicated on every EP
        rank (serving). ``all_experts``: at most ``all_experts_tokens`` tokens with T * K >= 2E;
        else ``small_batch``: T * K up to ``small_batch_rows``."""
        ex = self.experts
        if (torch.is_grad_enabled() or not ex.swiglu or ex.impl != "auto" or not fused_kernels_enabled()
                or not (self.ep_size == 1 or self.replicated_tokens)):
            return None
        num_tokens, top_k = topk_idx_TK.shape
        limit = self.all_experts_tokens
        if limit is None:
            limit = ALL_EXPERTS_MAX_TOKENS if x_TH.is_cuda else 0
        if num_tokens <= limit and num_tokens * top_k >= ALL_EXPERTS_MIN_COPIES_PER_EXPERT * self.num_experts:
            return "all_experts"
        rows = self.small_batch_rows
        if rows is None:
            rows = min(SMALL_BATCH_MAX_ROWS, SMALL_BATCH_ROWS_PER_EXPERT * self.num_experts)
        if num_tokens * top_k <= rows:
            return "small_batch"
        return None

    def _inference_forward(self, path: str, x_TH: torch.Tensor, routed: RouterOutput,
                           keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``path`` function on this rank's experts, combined in fp32; at ep > 1 (replicated tokens)
        each rank adds its experts' share and the EP all-reduce sums them, as ``combine`` does. Sharded experts
        (etp > 1) give their FFN slice's share, summed over the etp group (these paths take no bias)."""
        w1_LOH, _, w2_LHF, _ = self.experts.weights()
        out_TH, tokens_per_expert_E = INFERENCE_PATHS[path](
            x_TH, w1_LOH, w2_LHF, routed.topk_idx_TK, routed.topk_weight_TK, keep_TK,
            first_expert=self.local_expert_ids[0], num_experts=self.num_experts)
        out_TH = self.dispatcher.reduce_replicated(out_TH)
        if self.experts.etp_size > 1:
            assert self.groups is not None
            out_TH = reduce_from_group(out_TH, self.groups.group("etp"))
        return out_TH, tokens_per_expert_E

    def _token_split(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor | None, int]:
        """(real_T, sequences) of a call on hidden states of ``shape``: ``token_mask`` as bool ``real_T`` (None
        without one), and how many equal sequences its T rows hold for the sequence balance loss: a [B, S, H]
        input's B, else a [B, S] mask's B (OPT's FFN sees [B*S, H]), else 1. A [B, S_cache + S] mask of a step
        with a KV cache (S new tokens per sequence; a 2-D input has T = B * S) is not this call's: ignored. Any
        other mask that does not fit is an error, not a guess: flattened, it would mark other tokens or split
        other sequences. Shapes only: no host sync."""
        num_tokens, dims = shape[:-1].numel(), len(shape)
        sequences = shape[0] if dims == 3 else 1
        mask = self.token_mask
        if mask is None:
            return None, sequences
        mask_shape = tuple(mask.shape)
        fits = mask.dim() in (1, 2) and mask.numel() == num_tokens
        if mask.dim() == 2 and dims == 3:
            if mask_shape[0] == shape[0] and mask_shape[1] > shape[1]:
                return None, sequences  # a step with a KV cache
            fits = mask_shape == tuple(shape[:-1])
        elif mask.dim() == 2 and dims == 2:
            rows = mask_shape[0]
            if fits:
                sequences = rows
            elif rows > 0 and num_tokens % rows == 0 and num_tokens // rows < mask_shape[1]:
                return None, rows  # a step with a KV cache, flattened: B sequences of T / B new tokens
        if not fits:
            raise ValueError(
                f"MoELayer.token_mask of shape {mask_shape} does not fit hidden states of shape {tuple(shape)}: "
                f"pass [B, S] with B * S = {num_tokens} tokens (a [B, S, H] input's own B and S) or "
                f"[{num_tokens}], 1 = real token")
        return mask.reshape(-1).to(device=device, dtype=torch.bool), sequences

    def _capacity_mask(self, routed: RouterOutput, real_T: torch.Tensor | None = None) -> torch.Tensor | None:
        """``keep_TK`` under this mode's capacity factor (None: dropless). Padding copies (``real_T`` False) are
        never kept and C counts real tokens, so padding neither crowds out real copies nor changes C
        (moe/capacity.py)."""
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        if factor is None:
            return None
        return capacity_keep_mask(routed.topk_idx_TK, routed.topk_weight_TK, self.num_experts, factor,
                                  self.config.drop_policy, real_T=real_T)

    def _record(self, routed: RouterOutput, tokens_per_expert_E: torch.Tensor, keep_TK: torch.Tensor | None,
                real_T: torch.Tensor | None, num_sequences: int) -> None:
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if torch.is_grad_enabled() and (cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0):
            # the balance losses count each token's top-k of the unbiased scores over all experts (DeepSeek-V3
            # eq. 18, Megatron-Core's scores for the aux loss): the expert bias and the group limit choose the
            # experts, not what is balanced
            balance_idx_TK = (routed.scores_TE.topk(routed.topk_idx_TK.shape[1], dim=-1).indices
                              if cfg.expert_bias or cfg.n_group is not None else routed.topk_idx_TK)
            if cfg.aux_loss_coef > 0:
                losses["load_balancing"] = load_balancing_loss(_balance_probs(routed.scores_TE, cfg.score_func),
                                                               balance_idx_TK, self.num_experts, real_T)
            if cfg.seq_aux_loss_coef > 0:
                losses["sequence_balance"] = sequence_balance_loss(
                    routed.scores_TE, balance_idx_TK, self.num_experts, num_sequences, real_T
                )
        if torch.is_grad_enabled() and cfg.z_loss_coef > 0:
            losses["z_loss"] = z_loss(routed.logits_TE, real_T)
        coefs = {kind: getattr(cfg, field) for kind, field in LOSS_COEFFICIENTS.items()}
        self.aux_loss = sum((coefs[k] * v for k, v in losses.items()), torch.zeros((), device=routed.logits_TE.device)) if losses else None
        self.last_router_output = routed
        counts = tokens_per_expert_E.detach()
        top_k = routed.topk_idx_TK.shape[1]
        routed_copies: int | torch.Tensor = routed.topk_idx_TK.numel()
        if real_T is not None:  # real tokens' copies only: padding is neither load nor a drop
            routed_copies = real_T.sum() * top_k
            if keep_TK is None:  # dropless routed and counted the padding copies too: count the real ones
                real_copies = real_T.to(counts.dtype).repeat_interleave(top_k)
                counts = torch.zeros_like(counts).scatter_add_(0, routed.topk_idx_TK.reshape(-1), real_copies)
        if keep_TK is None:
            dropped = torch.zeros((), dtype=torch.long, device=counts.device)
        elif real_T is None:
            dropped = (~keep_TK).sum()
        else:  # padding copies are never kept (so ``counts`` holds real copies); not drops of real tokens
            dropped = (~keep_TK & real_T[:, None]).sum()
        self.last_stats = MoEStats(counts, routed_copies, dropped, {k: v.detach() for k, v in losses.items()})
        # not again when activation checkpointing recomputes this forward inside the backward (the test FSDP uses)
        if self.training and cfg.expert_bias and torch._C._current_graph_task_id() == -1:
            # a copy: under cuda_graph ``counts`` may be a graph buffer that the next replay overwrites
            self._bias_counts_E = counts.clone() if self._bias_counts_E is None else self._bias_counts_E + counts

    def __getstate__(self) -> dict[str, Any]:
        """What a deep copy or pickle takes (an EMA, reference or best-model copy made mid-training): not the
        last forward's outputs, which hang on its autograd graph (``copy.deepcopy`` refuses non-leaf tensors),
        nor a captured CUDA graph; the copy makes its own on its next forward."""
        state = super().__getstate__()
        state.update(aux_loss=None, last_router_output=None, token_mask=None, _graph=None)
        return state

    # -- training hooks -----------------------------------------------------------------------------
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): call once per optimizer step.

        Counts since the last call are summed over the data-parallel group (every rank routing
        tokens of the same global batch) before the bias moves; with tokens split over the tp ranks (etp = 1),
        over the tp group first (each tp rank counted its slice).
        """
        if not self.config.expert_bias or self._bias_counts_E is None:
            return
        if self.tp_token_slices > 1:
            assert self.groups is not None
            dist.all_reduce(self._bias_counts_E, group=self.groups.group("tp"))
        group = self.groups.group("dp") if self.groups is not None else None
        self.router.update_expert_bias(self._bias_counts_E, group=group)
        self._bias_counts_E = None

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.config.top_k}, ep_size={self.ep_size}, "
                f"local_experts={self.local_expert_ids[0]}..{self.local_expert_ids[-1]}"
                + (f", etp_size={self.experts.etp_size}" if self.experts.etp_size > 1 else ""))


def _check_token_slices(config: MoEConfig, tp: int) -> None:
    """What a layer whose tp ranks each route a slice of the flattened tokens (etp = 1) cannot honour."""
    if config.seq_aux_loss_coef > 0:
        raise ValueError(
            f"seq_aux_loss_coef={config.seq_aux_loss_coef} with tp={tp} and etp=1: each tp rank routes a slice of the "
            "flattened tokens, which cuts sequences apart, so the sequence balance loss has no whole sequence to "
            f"balance; set seq_aux_loss_coef=0 (aux_loss_coef balances per slice) or use etp={tp}"
        )
    if config.router_jitter > 0:
        raise ValueError(
            f"router_jitter={config.router_jitter} with tp={tp} and etp=1: each tp rank draws its own jitter noise, "
            "and with jitter_experts_input the shared experts and the gathered rows would see different inputs on "
            "the tp ranks; set router_jitter=0 for tp > 1"
        )


def _balance_probs(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The Switch loss's router probabilities: softmax scores as they are, sigmoid scores divided by their
    per-token sum (Megatron-Core's ``compute_routing_scores_for_aux_loss``). Raw sigmoids would make the
    loss fall to 0 when every logit moves down, routing unchanged, instead of rewarding balance."""
    if score_func == "sigmoid":
        return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return scores_TE


# -- state dict in global expert ids ----------------------------------------------------------------
def _experts_to_global_ids(module: MoELayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in EXPERT_PARAM_NAMES:
        key = f"{prefix}experts.{name}"
        if key not in state_dict:
            continue
        stacked = state_dict.pop(key)
        for local, global_id in enumerate(module.local_expert_ids):
            state_dict[f"{prefix}experts.{global_id}.{name}"] = stacked[local]


def _experts_from_global_ids(module: MoELayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """Stack this rank's experts from per-id keys; drop other ranks' experts (not ours to load). A sharded
    layer (etp > 1) takes full-width tensors too (a full state dict), keeping its own slice."""
    per_id_prefix = f"{prefix}experts."
    experts = module.experts
    shards = experts.ffn_shards() if experts.etp_size > 1 else {}
    for name in EXPERT_PARAM_NAMES:
        wanted = [f"{per_id_prefix}{gid}.{name}" for gid in module.local_expert_ids]
        if all(key in state_dict for key in wanted):
            stacked = torch.stack([state_dict.pop(key) for key in wanted])
            shard = shards.get(name)
            if shard is not None:
                assert module.groups is not None
                stacked = as_local_shard(stacked, getattr(experts, name), shard, module.groups.rank("etp"),
                                         experts.etp_size)
            state_dict[f"{per_id_prefix}{name}"] = stacked
    for key in [k for k in state_dict if k.startswith(per_id_prefix)]:
        rest = key[len(per_id_prefix):].split(".", 1)
        if len(rest) == 2 and rest[0].isdigit() and rest[1] in EXPERT_PARAM_NAMES:
            global_id = int(rest[0])
            if global_id >= module.num_experts:
                raise ValueError(
                    f"state dict has expert {global_id} but this layer has {module.num_experts} experts ({key})"
                )
            del state_dict[key]
