"""The ZeRO optimizer step with the gradient cast, the clip, AdamW and the 16-bit copy in one pass per group.

DeepSpeed 0.19's ``DeepSpeedZeroOptimizer.step`` takes each parameter group's flat 16-bit gradient partition through
four passes over memory: a cast to a fresh fp32 copy, the clip's multiply, the inner optimizer's update (which reads
that fp32 copy), and a copy of the updated fp32 master back into the 16-bit partition the model reads. On the
fine-tune benchmark's 2.6B-parameter model those passes around the update are ~20 ms a step on an H200
(docs/performance.md). ``fused_zero_step`` is that method with the group loop's body replaced by ``adamw.py``'s one
pass (the fp32 gradient copy is never made); everything else is DeepSpeed's, in DeepSpeed's order, through its own
methods: the overflow check and the loss scaler, the norm (``scaled_global_norm``, so the expert groups' averaging
and ``grad_norm.py``'s fused norm), freeing the gradients, the all-gather of the updated partitions and the model's
views of them. The optimizer state is the inner torch optimizer's own (``exp_avg``, ``exp_avg_sq``, ``step``, created
as torch creates them; ``step`` kept on the host, as torch's non-fused AdamW keeps it, and moved back to the device
before any step torch's fused AdamW takes; torch's ``load_state_dict`` moves it where a fused group wants it), so
checkpoints save, load and resume as before.

ZeRO-3's step is the same four passes per sub-group, each in a method of its own; there the methods are replaced
(``_stage3_*`` below) and DeepSpeed's ``step`` runs as it is.

It applies when the inner optimizer is torch's Adam or AdamW without amsgrad, maximize, differentiable, tensor
hyper-parameters or step hooks, and the ZeRO optimizer keeps its state on the device in bf16 or fp32 without a loss
scale (no fp16, offload, NVMe swapping, Muon, ZenFlow or torch autocast); anything else runs DeepSpeed's step
unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer

from switchyard.deepspeed.adamw import AdamHyper, adamw_update_
from switchyard.deepspeed.grad_norm import clip_scale

_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)
_NEEDED_METHODS = ("scaled_global_norm", "check_overflow", "_update_scale", "_wait_for_offload_copies",
                   "_get_preflattened_grad_partition", "_release_preflattened_grad_buffers", "free_grad_in_param_list",
                   "flatten_dense_tensors_aligned", "_update_model_bit16_weights",
                   "_lazy_init_hp_params_optimizer_state")
_GLOBAL_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")  # torch.optim.optimizer's


def _set_up_supported(zero_optimizer: Any, needed: tuple[str, ...], offloaded: bool) -> bool:
    """Whether a ZeRO optimizer's set-up is one the one pass handles (fixed at ``initialize``): torch's Adam/AdamW
    inside, the DeepSpeed methods it relies on present, its state on the device, bf16 or fp32, no ZenFlow or autocast."""
    return (type(getattr(zero_optimizer, "optimizer", None)) in _ADAM_TYPES
            and all(hasattr(zero_optimizer, name) for name in needed) and not offloaded
            and not getattr(zero_optimizer, "zenflow", False)
            and getattr(zero_optimizer, "torch_autocast_gradscaler", None) is None
            and zero_optimizer.dtype in (torch.bfloat16, torch.float32))


def _group_hyper(group: dict[str, Any], adamw: bool) -> AdamHyper | None:
    """A group's settings, or None where the step would need torch's own code (amsgrad, maximize, tensors)."""
    if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
        return None
    numbers = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
    if not all(isinstance(value, (int, float)) for value in numbers):
        return None
    decoupled = adamw or group.get("decoupled_weight_decay", False)  # torch < 2.8: AdamW's groups lack the key
    return AdamHyper(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                     weight_decay=group["weight_decay"], decoupled=bool(decoupled), step=0)


def _applies_now(self: Any) -> list[AdamHyper] | None:
    """Each group's settings if this step can be fused (checked every step: lr schedules, hooks, the loss scale)."""
    inner = self.optimizer
    if self.loss_scale != 1.0 or inner._optimizer_step_pre_hooks or inner._optimizer_step_post_hooks:
        return None
    if any(getattr(torch_optimizer, name, None) for name in _GLOBAL_HOOKS):
        return None
    hypers = [_group_hyper(group, isinstance(inner, torch.optim.AdamW)) for group in inner.param_groups]
    return None if any(h is None for h in hypers) else hypers


def _adam_state(inner: torch.optim.Optimizer, master: torch.Tensor) -> dict[str, Any]:
    """The master partition's Adam state, created as torch's ``_init_group`` creates it on its first step (``step`` on
    the host, as torch's non-fused AdamW keeps it: see ``_step_count``)."""
    state = inner.state[master]
    if len(state) == 0:
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=scalar)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def _step_count(state: dict[str, Any]) -> int:
    """This step's number for the bias corrections, read from the state's own ``step`` and written back as a fresh
    host tensor: reading it costs no device sync, in-place loads of a checkpoint are seen, and a ``step`` tensor that
    DeepSpeed's ZeRO-3 universal-checkpoint load shares between sub-groups is counted once per sub-group. A ``step``
    on the device (torch's fused or capturable AdamW keeps it there; a loaded checkpoint) costs one sync, once."""
    step = state["step"]
    count = int(step.item()) + 1
    state["step"] = torch.tensor(float(count), dtype=step.dtype)
    return count


def _steps_back_to_torchs_devices(self: Any, masters_and_groups: Any) -> None:
    """Before a step DeepSpeed and torch take (one the pass does not apply to): torch's fused or capturable AdamW
    needs each ``step`` on its parameter's device, where ``_step_count`` had moved it to the host."""
    for master, group in masters_and_groups:
        step = self.optimizer.state.get(master, {}).get("step")
        if step is not None and (group.get("fused") or group.get("capturable")) and step.device != master.device:
            self.optimizer.state[master]["step"] = step.to(master.device)


def _flat_gradient_partition(self: Any, i: int, partition_id: int) -> torch.Tensor:
    """Group ``i``'s flat 16-bit gradient partition, as DeepSpeed's step builds it (padded on the last rank)."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero12

    flat = self._get_preflattened_grad_partition(i)
    if flat is None:
        if partition_id == zero12.dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
            flat = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
        else:
            flat = self.flatten(self.averaged_gradients[i])
    if flat.numel() != self.partition_size[i]:
        raise RuntimeError(f"group {i}'s gradient partition has {flat.numel()} elements, its ZeRO partition "
                           f"{self.partition_size[i]}: this DeepSpeed lays out ZeRO-1/2 partitions differently; "
                           "initialize(..., fused_step=False) keeps DeepSpeed's step")
    return flat


def _skip_overflowed_step(self: Any) -> None:
    """DeepSpeed's step on an overflow: no update, the gradients dropped."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero12

    if self.compute_grad_norm:
        self._global_grad_norm = float("inf")
    self.zero_grad(set_to_none=True)
    self._release_preflattened_grad_buffers()
    for k in self.averaged_gradients.keys():
        self.averaged_gradients[k] = None
        self.all_grad_tensors[k] = None
    for timer in zero12.OPTIMIZER_TIMERS:
        self.timers(timer).start()
        self.timers(timer).stop()


def fused_zero_step(self: Any, closure: Any = None) -> None:
    """Drop-in for ``DeepSpeedZeroOptimizer.step`` (ZeRO-1/2; bound to the optimizer instance)."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero12

    hypers = _applies_now(self)
    if hypers is None:
        _steps_back_to_torchs_devices(self, zip(self.single_partition_of_fp32_groups, self.optimizer.param_groups))
        return type(self).step(self, closure)
    self.micro_step_id = zero12.INITIAL_MICRO_STEP_ID
    self._wait_for_offload_copies()
    if not self.compute_grad_norm:
        self._global_grad_norm = None
    self.overflow = False
    if self.check_grad_overflow:
        self.check_overflow(partition_gradients=self.partition_gradients)
    norm = None
    if self.compute_grad_norm and not self.overflow:
        norm = self.scaled_global_norm()
        if self.dtype != torch.bfloat16 or self.check_grad_overflow:
            self.overflow = zero12.is_invalid_grad_norm(norm)
    prev_scale = self.loss_scale
    self._update_scale(self.overflow)
    if self.overflow:
        return _skip_overflowed_step(self)
    if norm is not None:
        self._global_grad_norm = norm / prev_scale

    inner = self.optimizer
    scale = clip_scale(self, norm, self.single_partition_of_fp32_groups[0].device)  # one norm: one factor for all
    for i, hyper in enumerate(hypers):
        self.timers(zero12.OPTIMIZER_GRADIENTS_TIMER).start()
        partition_id = zero12.dist.get_rank(group=self.real_dp_process_group[i])
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        flat_grad = _flat_gradient_partition(self, i, partition_id)
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
        master = self.single_partition_of_fp32_groups[i]
        self.timers(zero12.OPTIMIZER_GRADIENTS_TIMER).stop()

        self.timers(zero12.OPTIMIZER_STEP_TIMER).start()
        state = _adam_state(inner, master)
        hyper = AdamHyper(**{**hyper.__dict__, "step": _step_count(state)})
        adamw_update_(flat_grad, master, state["exp_avg"], state["exp_avg_sq"],
                      self.parallel_partitioned_bit16_groups[i][partition_id], scale, hyper)
        del flat_grad
        self.timers(zero12.OPTIMIZER_STEP_TIMER).stop()
    inner._opt_called = True  # what torch's step wrapper marks for the LR scheduler's order check
    self._lazy_init_hp_params_optimizer_state()

    self.timers(zero12.OPTIMIZER_ALLGATHER_TIMER).start()
    zero12.all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                                partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                                dp_process_group=self.real_dp_process_group,
                                start_alignment_factor=self.nccl_start_alignment_factor,
                                allgather_bucket_size=self.allgather_bucket_size)
    self.timers(zero12.OPTIMIZER_ALLGATHER_TIMER).stop()
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)
    self.timers.log(zero12.OPTIMIZER_TIMERS)
    return None


# -- ZeRO-3 -----------------------------------------------------------------------------------------------------------
# DeepSpeed's ZeRO-3 step goes sub-group by sub-group through methods of its own (prepare: the fp32 gradient copy;
# clip; the inner optimizer; reassign: the bf16 copy and the parameters' views), so it is fused by replacing those
# methods on the instance: ``step`` decides once per step whether the one pass applies, DeepSpeed's ``step`` runs, and
# each replaced method does its part or, when the pass does not apply, DeepSpeed's.
_STAGE3_METHODS = ("_prepare_sub_group", "unscale_and_clip_grads", "_optimizer_step",
                   "_reassign_or_swap_out_partitioned_parameters", "_unflatten_partitioned_parameters", "flatten",
                   "fp16_partitioned_groups_flat")


def _stage3_step(self: Any, closure: Any = None) -> Any:
    """Drop-in for ``DeepSpeedZeroOptimizer_Stage3.step``: DeepSpeed's, with the one pass where it applies."""
    self._switchyard_hypers = _applies_now(self)
    if self._switchyard_hypers is None:
        groups = self.optimizer.param_groups
        _steps_back_to_torchs_devices(self, ((master, groups[self.sub_group_to_group_id[sub]])
                                             for sub, master in enumerate(self.fp32_partitioned_groups_flat)))
    try:
        return type(self).step(self, closure)
    finally:
        self._switchyard_hypers = self._switchyard_scale = None
        self._switchyard_pending.clear()


def _stage3_prepare_sub_group(self: Any, sub_group_id: int, timer_names: set) -> None:
    """The sub-group's flat 16-bit gradient, kept for the update (DeepSpeed's makes an fp32 copy of it here)."""
    if self._switchyard_hypers is None:
        return type(self)._prepare_sub_group(self, sub_group_id, timer_names)
    import deepspeed.runtime.zero.stage3 as zero3

    gradients = self.averaged_gradients[sub_group_id]
    flat = self.flatten(gradients)
    master = self.fp32_partitioned_groups_flat[sub_group_id]
    if flat.numel() != master.numel():
        raise RuntimeError(f"sub-group {sub_group_id}'s gradients have {flat.numel()} elements, its fp32 partition "
                           f"{master.numel()}: this DeepSpeed lays out ZeRO-3 partitions differently; "
                           "initialize(..., fused_step=False) keeps DeepSpeed's step")
    accelerator = zero3.get_accelerator()
    if not accelerator.is_synchronized_device():  # as DeepSpeed's: the gradients came from another stream
        for grad in filter(accelerator.on_accelerator, gradients):
            grad.record_stream(accelerator.current_stream())
    self.averaged_gradients[sub_group_id] = None
    self._switchyard_pending[sub_group_id] = {"grad": flat}
    return None


def _stage3_unscale_and_clip_grads(self: Any, sub_group_id: int, total_norm: Any) -> None:
    if self._switchyard_hypers is None:
        return type(self).unscale_and_clip_grads(self, sub_group_id, total_norm)
    # every sub-group is clipped by the step's one norm: its factor computed once, kept as a 1-tuple (None is a factor)
    if self._switchyard_scale is None:
        self._switchyard_scale = (clip_scale(self, total_norm, self.fp32_partitioned_groups_flat[sub_group_id].device),)
    return None


def _stage3_optimizer_step(self: Any, sub_group_id: int) -> None:
    if self._switchyard_hypers is None:
        return type(self)._optimizer_step(self, sub_group_id)
    pending = self._switchyard_pending[sub_group_id]
    group_id = self.sub_group_to_group_id[sub_group_id]
    inner, master = self.optimizer, self.fp32_partitioned_groups_flat[sub_group_id]
    state = _adam_state(inner, master)
    hyper = AdamHyper(**{**self._switchyard_hypers[group_id].__dict__, "step": _step_count(state)})
    adamw_update_(pending.pop("grad"), master, state["exp_avg"], state["exp_avg_sq"],
                  self.fp16_partitioned_groups_flat[sub_group_id], self._switchyard_scale[0], hyper)
    pending["written"] = True
    inner._opt_called = True  # what torch's step wrapper marks for the LR scheduler's order check
    return None


def _stage3_reassign(self: Any, sub_group_id: int) -> None:
    """The 16-bit partition was written by the update: only the parameters' views of it are left to point."""
    if not self._switchyard_pending.get(sub_group_id, {}).get("written"):
        return type(self)._reassign_or_swap_out_partitioned_parameters(self, sub_group_id)
    self._unflatten_partitioned_parameters(sub_group_id)
    return None


def install_fused_step(engine: Any) -> bool:
    """Give a ZeRO-1/2 engine's optimizer ``fused_zero_step`` (a ZeRO-3 one the fused sub-group methods); False
    where its set-up is not one they handle."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = getattr(engine, "optimizer", None)
    if type(optimizer) is DeepSpeedZeroOptimizer and _set_up_supported(optimizer, _NEEDED_METHODS,
                                                                      optimizer.cpu_offload):
        methods = {"step": fused_zero_step}
    elif type(optimizer) is DeepSpeedZeroOptimizer_Stage3 and _set_up_supported(
            optimizer, _STAGE3_METHODS, optimizer.offload_optimizer or optimizer.offload_param
            or optimizer.swap_optimizer or getattr(optimizer, "use_muon", False)):
        methods = {"step": _stage3_step, "_prepare_sub_group": _stage3_prepare_sub_group,
                   "unscale_and_clip_grads": _stage3_unscale_and_clip_grads,
                   "_optimizer_step": _stage3_optimizer_step,
                   "_reassign_or_swap_out_partitioned_parameters": _stage3_reassign}
    else:
        return False
    if _applies_now(optimizer) is None:  # settings no step would fuse (amsgrad, step hooks, fp16's loss scale)
        return False
    optimizer._switchyard_hypers, optimizer._switchyard_scale, optimizer._switchyard_pending = None, None, {}
    for name, function in methods.items():
        setattr(optimizer, name, types.MethodType(function, optimizer))
    return True
