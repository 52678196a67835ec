"""The fine-tune loop under DeepSpeed: one step = grad_accum micro-batches per rank, then one optimizer step.

    deepspeed --num_gpus N launch/finetune.py --config configs/finetune/tiny.yaml [key.sub=value …]

Order of work: validate the config against the world → build every group → fill the DeepSpeed JSON → find
the checkpoint to resume (and check its settings) → model (patched, this rank's experts only) → data →
DeepSpeed engine with MoE parameter groups → steps (LM loss per loss token of the global batch, router losses in
the loss, expert-bias updates, metrics, eval, atomic checkpoints).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator

import torch
import torch.distributed as dist

from switchyard.log import get_logger
from switchyard.train.run_config import RunConfig

if TYPE_CHECKING:
    from switchyard.train.pipeline import MicroResult

log = get_logger(__name__)

H200_BF16_PEAK_FLOPS = 989e12  # dense bf16 datasheet value, for MFU


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dp_means(values: list[torch.Tensor], groups, extra: list[torch.Tensor] = ()) -> list[float]:
    """Means of scalar tensors over the data-parallel group, then ``extra`` scalars as they are: one
    all-reduce and one host sync for all of them (each ``.item()`` would stall the device queue). float64: token
    counts summed over many ranks pass float32's exact 2**24."""
    sums = torch.stack([v.detach().double().reshape(()).to(values[0].device) for v in values])
    dist.all_reduce(sums, group=groups.group("dp"))
    if extra:
        sums = torch.cat([sums, torch.stack([e.detach().double().reshape(()).to(sums.device) for e in extra])])
    out = sums.tolist()
    return [x / groups.size("dp") for x in out[:len(values)]] + out[len(values):]


class StepBatches:
    """This rank's micro-batches, step by step across epochs; resumable at any data position.

    The position is (epoch, examples of that epoch's order consumed), not a step count, so a resume whose
    global batch changed (another dp size after resharding, another micro-batch × grad_accum) continues at
    the first example not trained on, as Megatron's consumed-samples counter does."""

    def __init__(self, dataset, config: RunConfig, dp_rank: int, dp_size: int, epoch: int = 0,
                 position: int = 0) -> None:
        from switchyard.train.data import rank_batches, steps_per_epoch

        self.dataset, self.config, self.dp_rank, self.dp_size = dataset, config, dp_rank, dp_size
        t = config.train
        self.per_step = t.micro_batch_size * t.grad_accum
        self.global_batch = self.per_step * dp_size
        self.steps_per_epoch = steps_per_epoch(dataset, self.per_step, dp_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set ({len(dataset)} sequences) is smaller than one global batch "
                f"({self.per_step} × dp {dp_size}); lower train.micro_batch_size / grad_accum or add data"
            )
        self._rank_batches = rank_batches
        self.epoch, self.position = epoch, position
        self._iter: Iterator | None = None

    def steps_until_epoch(self, epochs: int) -> int:
        """Steps from the current position until ``epochs`` epochs are done (each drops its short last batch)."""
        if self.epoch >= epochs:
            return 0
        this_epoch = (len(self.dataset) - self.position) // self.global_batch
        return this_epoch + (epochs - self.epoch - 1) * self.steps_per_epoch

    def _open(self) -> None:
        self._iter = self._rank_batches(self.dataset, self.per_step, self.dp_rank, self.dp_size, self.epoch,
                                        self.config.data.seed, start_example=self.position)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._iter is None:
            self._open()
        assert self._iter is not None
        batch = next(self._iter, None)
        if batch is None:  # the epoch's order is used up (its short last batch dropped)
            self.epoch, self.position = self.epoch + 1, 0
            self._open()
            batch = next(self._iter)
        self.position += self.global_batch
        mb = self.config.train.micro_batch_size
        return [{k: v[i * mb:(i + 1) * mb] for k, v in batch.items()} for i in range(self.config.train.grad_accum)]


def data_position(meta: dict[str, Any], dataset_size: int) -> tuple[int, int]:
    """(epoch, examples consumed in it) where a checkpoint stopped. Checkpoints from before the position was
    recorded have only their step; their global batch (micro × accum × dp) gives it back."""
    if "data_epoch" in meta:
        return int(meta["data_epoch"]), int(meta["data_position"])
    train = meta["config"]["train"]
    global_batch = train["micro_batch_size"] * train["grad_accum"] * meta["dp"]
    epoch, within = divmod(int(meta["step"]), dataset_size // global_batch)
    return epoch, within * global_batch


def total_steps(config: RunConfig, batches: StepBatches, start_step: int = 0) -> int:
    """Whichever of ``max_steps`` and ``epochs`` ends first (the config guarantees at least one is set)."""
    candidates = [s for s in (config.train.max_steps,
                              start_step + batches.steps_until_epoch(config.train.epochs) if config.train.epochs
                              else None) if s is not None]
    return min(candidates)


def batch_tokens(micro: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens processed, tokens with a loss) of a host micro-batch: throughput counts every real token,
    prompts included; padding (``attention_mask`` 0) is not a token. A row's first label is never predicted
    (the model shifts labels), so loss tokens are counted from the second, as transformers' Trainer does."""
    mask = micro.get("attention_mask")
    processed = int(mask.sum()) if mask is not None else micro["input_ids"].numel()
    return processed, int((micro["labels"][:, 1:] != -100).sum())


def lm_loss_divisor(micro_batches: list[dict[str, torch.Tensor]], groups, device: torch.device) -> tuple[int, float]:
    """(loss tokens of the global batch, what each micro-batch's summed token losses are divided by).

    Every loss token of the global batch (all micro-batches of all dp ranks) weighs the same, as in transformers'
    Trainer with ``num_items_in_batch`` and ``average_tokens_across_devices``: a micro-batch with few loss tokens
    (or none: 0, not 0/0) counts for its tokens, not as much as a full one. DeepSpeed's engine divides gradients
    by gradient_accumulation_steps (``len(micro_batches)``) and averages them over dp, so the divisor is global
    loss tokens / (accumulation × dp). Counted on the host batches; one all-reduce before the first forward."""
    local = sum(batch_tokens(micro)[1] for micro in micro_batches)
    [mean] = _dp_means([torch.tensor(float(local), device=device)], groups)
    dp_size = groups.size("dp")
    global_loss_tokens = round(mean * dp_size)
    return global_loss_tokens, max(global_loss_tokens, 1) / (len(micro_batches) * dp_size)


def accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether the model's loss honours ``num_items_in_batch``: transformers' Trainer's rule (the class's
    ``accepts_loss_kwargs`` where it says, else a ``**kwargs`` in ``forward``), since a model that drops the
    keyword would return its per-micro-batch mean, silently scaled by the divisor's inverse."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def enable_gradient_checkpointing(model) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (no input needs
    ``requires_grad``; recomputation replays the MoE layers' all-to-alls in the backward, in the same order on
    every rank, and torch's checkpoint restores the RNG, so router jitter draws the same noise again)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support transformers' "
                         "gradient checkpointing; set train.gradient_checkpointing=false")
    # transformers 5.24 renamed the switch (the old name warns, and older releases have only it)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless while training and transformers warns about it
    log.info("gradient checkpointing: %s recomputes each decoder layer in the backward", type(model).__name__,
             ranks=[0])


def forward_backward(engine, micro: dict[str, torch.Tensor], lm_divisor: float | None) -> "MicroResult":
    """One micro-batch's forward and backward; returns its (LM, router) losses and the router loss per kind
    (``router_loss_parts``: they sum to the router loss), detached, on device.

    The model sums its token losses and divides by ``lm_divisor`` (transformers' ``num_items_in_batch``); the
    router losses that the ``patch_model`` hook adds to ``loss`` stay a per-micro-batch mean, so DeepSpeed
    averages them over micro-batches and ranks as before. ``lm_divisor`` None (a model whose loss ignores the
    keyword): the model's own per-micro-batch mean."""
    from switchyard.hf.patch import router_loss_parts
    from switchyard.train.pipeline import MicroResult

    out = engine(**micro) if lm_divisor is None else engine(**micro, num_items_in_batch=lm_divisor)
    # read before backward: gradient checkpointing's recompute overwrites the layers' last losses
    parts = router_loss_parts(engine.module)
    engine.backward(out.loss)
    aux = out.get("aux_loss")
    if aux is None:
        return MicroResult(out.loss.detach(), torch.zeros((), device=out.loss.device), parts)
    return MicroResult((out.loss - aux).detach(), aux.detach(), parts)


def train(config: RunConfig) -> dict[str, Any]:
    from switchyard.deepspeed import initialize, optimizer_param_groups, zero_stage
    from switchyard.deepspeed.clipping import clip_global_grad_norm_
    from switchyard.moe.layer import MoELayer
    from switchyard.parallel import ProcessGroupManager, apply_tensor_parallel, init_distributed
    from switchyard.train import checkpointing
    from switchyard.train.data import load_datasets
    from switchyard.train.freezing import check_freeze
    from switchyard.train.metrics import ExpertLoad, MetricsWriter
    from switchyard.train.model_source import (cache_dir, check_model_split, load_model, planned_run_model, rank0_first,
                                               resolve_source)
    from switchyard.train.pipeline import SPLIT_ATTR, PipelineStage
    from switchyard.train.schedule import build_scheduler

    init_distributed()
    world = dist.get_world_size()
    ds_config = config.deepspeed_config(world)  # checks the world first
    p = config.parallel
    groups = ProcessGroupManager(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp)
    rank, dp_rank, dp_size = dist.get_rank(), groups.rank("dp"), groups.size("dp")
    t = config.train
    # stage 0: DeepSpeed's norm is wrong with sharded experts; clip_global_grad_norm_ does it instead
    stage = zero_stage(config.deepspeed)
    own_clipping = stage == 0
    run_dir = Path(config.output_dir)
    ckpt_root = run_dir / "checkpoints"
    resume = checkpointing.find_resume(ckpt_root, config.checkpoint.resume)
    if resume is not None:
        checkpointing.check_resume_config(resume, config)
        _warn_of_later_checkpoints(ckpt_root, resume.step)
    torch.manual_seed(config.train.seed)

    source = resolve_source(config)
    # the checks before any weight is read, on one meta-device model (built only when a check needs it)
    planned = planned_run_model(config, source) if t.freeze or groups.size("tp") > 1 or groups.size("pp") > 1 \
        else None
    check_model_split(config, source, groups.size("tp"), groups.size("etp"), groups.size("pp"), planned)
    freeze_plan = check_freeze(planned, t.freeze) if t.freeze else None
    pipeline: PipelineStage | None = None
    matmul_params = 0

    def cut_rank_share(model) -> None:
        """Right after loading (in the rank's load wave): keep this rank's pipeline stage and tensor-parallel shard."""
        nonlocal pipeline, matmul_params
        # the whole model's, before the stage and the shards are cut; a checkpoint read as one stage: on meta
        whole = model if getattr(model, SPLIT_ATTR, None) is None else planned_run_model(config, str(
            resume.path / "model" if resume else source))
        matmul_params = _matmul_params(whole)
        pipeline = PipelineStage(model, groups, config.parallel.pp_layers) if groups.size("pp") > 1 else None
        apply_tensor_parallel(model, groups)

    model, tokenizer = load_model(config, groups, source, from_checkpoint=resume.path / "model" if resume else None,
                                  after_load=cut_rank_share)
    if pipeline is not None and t.grad_accum < pipeline.count:
        log.warning("train.grad_accum=%d micro-batches for %d pipeline stages: each stage idles %.0f%% of a step; "
                    "raise train.grad_accum (≥ 2·pp keeps the idle share at or below a third)", t.grad_accum,
                    pipeline.count, 100 * (pipeline.count - 1) / (t.grad_accum + pipeline.count - 1), ranks=[0])
    if freeze_plan is not None:
        _freeze(model, t.freeze, freeze_plan)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    for layer in layers.values():
        layer.cuda_graph = config.train.cuda_graph
    train_set, eval_set = rank0_first(load_datasets, config.data, tokenizer, cache_dir() / "datasets")

    start_step = resume.step if resume is not None else 0
    epoch, position = data_position(resume.meta, len(train_set)) if resume is not None else (0, 0)
    batches = StepBatches(train_set, config, dp_rank, dp_size, epoch, position)
    steps = total_steps(config, batches, start_step)
    param_groups = optimizer_param_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum)
    else:
        # fused: one kernel per param group on CUDA (what benchmarks/finetune.py measures); foreach on CPU
        optimizer = torch.optim.AdamW(param_groups, lr=t.lr, fused=torch.cuda.is_available() or None)
    scheduler = build_scheduler(optimizer, steps, t.warmup_steps, t.schedule, t.min_lr_ratio)
    # deepspeed.initialize, with the MoE layers' experts placed in their expert-data-parallel groups at ZeRO-3
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                       mpu=groups.mpu)
    schedule_at_start = copy.deepcopy(engine.lr_scheduler.state_dict())  # this run's lr and schedule, step 0
    engine_optimizer = type(engine.optimizer).__name__  # its state dict's format
    if resume is not None:
        _resume_engine(engine, resume, world, groups, stage, engine_optimizer, pipeline)
        _replay_schedule(engine.lr_scheduler, schedule_at_start, start_step)
        _log_data_position(resume, batches, steps)

    metrics = MetricsWriter(run_dir, enabled=rank == 0, total_steps=steps, start_step=start_step)
    load = ExpertLoad()
    device = engine.device
    zero = torch.zeros((), device=device)
    token_weighted = accepts_loss_kwargs(model)
    if not token_weighted:
        log.warning("%s's loss ignores num_items_in_batch: each micro-batch's LM loss is its own per-token mean, "
                    "weighted equally (a micro-batch without loss tokens gives NaN)", type(model).__name__, ranks=[0])
    meta = {"world_size": world, "ep": groups.size("ep"), "tp": groups.size("tp"), "etp": groups.size("etp"),
            "pp": groups.size("pp"), "pp_layers": pipeline.sizes if pipeline else None, "dp": dp_size,
            "zero_stage": stage,
            "engine_optimizer": engine_optimizer, "config": config.to_dict()}
    history: list[float] = []
    last_eval: dict[str, float] = {}
    kinds = _router_loss_kinds(model, groups)  # the same on every rank: every stage logs every kind
    if pipeline is not None and pipeline.tied:
        pipeline.share_tied_weight()  # the engine cast the weight, a resume may have loaded another

    for step in range(start_step, steps):
        started = time.perf_counter()
        engine.train()
        lm_losses, aux_losses = [], []
        router_parts: dict[str, list[torch.Tensor]] = {}  # per kind, one per micro-batch (the same kinds each)
        grad_norm = None
        lr = engine.lr_scheduler.get_last_lr()[0]  # this step's: engine.step() moves the scheduler on
        micro_batches = batches.next_step()
        loss_tokens, lm_divisor = lm_loss_divisor(micro_batches, groups, device)
        if not token_weighted:
            lm_divisor = None
        if loss_tokens == 0:
            log.warning("step %d: no label of the global batch is predicted (all -100 after the shift); only the "
                        "router losses train this step. Check data.seq_len against the prompts' length",
                        step + 1, ranks=[0])
        tokens = sum(batch_tokens(micro)[0] for micro in micro_batches)  # on the host batches: no device sync
        device_batches = [{k: v.to(device) for k, v in micro.items()} for micro in micro_batches]

        def after_forward() -> None:  # the MoE layers' stats describe the last forward
            for name, layer in layers.items():
                load.add_forward(name, layer)

        def after_backward() -> None:
            nonlocal grad_norm
            if own_clipping and engine.is_gradient_accumulation_boundary():
                grad_norm = clip_global_grad_norm_(model, t.clip, groups)
            engine.step()

        if pipeline is not None:
            results = pipeline.train_step(engine, device_batches, lm_divisor, after_forward, after_backward)
        else:
            results = []
            for micro in device_batches:
                results.append(forward_backward(engine, micro, lm_divisor))
                after_forward()
                after_backward()
        for result in results:
            lm_losses.append(result.lm_loss)
            aux_losses.append(result.aux_loss)
            for kind in kinds:
                router_parts.setdefault(kind, []).append(result.parts.get(kind, zero))
        for layer in layers.values():
            layer.update_expert_bias()
        checkpointing.inject_fault("step", step + 1)
        engine_norm = engine.get_global_grad_norm() if grad_norm is None else None
        norm_t = [engine_norm] if torch.is_tensor(engine_norm) else []
        # the LM losses' mean over micro-batches and ranks is the global batch's mean per loss token (each was
        # divided by lm_divisor); token counts as dp means × dp: ranks' counts differ when padding does; the
        # router loss per kind averaged as the router loss, in the same all-reduce. Pipeline stages: the LM loss
        # is the last stage's and each stage's router loss its share of the mean over all layers, so both are
        # summed over the stages first (the token count is each stage's own)
        losses = _sum_over_stages([torch.stack(lm_losses).mean(), torch.stack(aux_losses).mean(),
                                   *(torch.stack(router_parts[kind]).mean() for kind in kinds)], groups)
        loss, router_loss, mean_tokens, *rest = _dp_means([*losses[:2], torch.tensor(float(tokens)), *losses[2:]],
                                                          groups, extra=norm_t)
        router_by_kind, norm_v = rest[:len(kinds)], rest[len(kinds):]
        if grad_norm is None and engine_norm is not None:  # None: DeepSpeed computed none (compute_grad_norm off)
            grad_norm = norm_v[0] if norm_v else float(engine_norm)
        history.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower train.lr or check the data")
        global_tokens = round(mean_tokens * dp_size)
        elapsed = time.perf_counter() - started
        values: dict[str, Any] = {
            "loss": loss,
            "router_loss": router_loss,
            **{f"router_loss/{kind}": value for kind, value in zip(kinds, router_by_kind)},
            "lr": lr,
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            "tokens_per_s": global_tokens / elapsed,
            "loss_tokens": loss_tokens,
        }
        if device.type == "cuda":
            values["mfu"] = 6 * matmul_params * global_tokens / elapsed / (H200_BF16_PEAK_FLOPS * world)
        fractions = None
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            sliced = {name for name, layer in layers.items() if layer.tp_token_slices > 1}
            fractions, layer_metrics = _expert_fractions(load, groups, sliced)
            if pipeline is not None:  # each stage counted its own layers; rank 0 logs them all
                fractions, layer_metrics = _gather_stage_loads(fractions, layer_metrics, groups)
            values.update(layer_metrics)
        if (step + 1) % t.eval_every == 0 or step + 1 == steps:
            last_eval = evaluate(engine, eval_set, config, dp_rank, dp_size, groups, pipeline)
            values.update(last_eval)
        metrics.log(step + 1, values, fractions)
        metrics.advance()
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == steps:
            position = {"data_epoch": batches.epoch, "data_position": batches.position}
            checkpointing.save_checkpoint(engine, model, tokenizer, groups, ckpt_root, step + 1, {**meta, **position},
                                          config.checkpoint.keep)
    heatmap = metrics.close()
    return {"steps": steps, "start_step": start_step, "losses": history, **last_eval,
            "heatmap": str(heatmap) if heatmap else None, "run_dir": str(run_dir)}


@torch.no_grad()
def evaluate(engine, eval_set, config: RunConfig, dp_rank: int, dp_size: int, groups, pipeline=None
             ) -> dict[str, float]:
    """LM loss per loss token over the first ``eval_batches`` global batches of the eval split (all of it if
    smaller, a short last batch included), summed over the data-parallel group (and from the last pipeline
    stage, where the logits are)."""
    if eval_set is None:
        return {}
    from switchyard.train.data import eval_rank_batches

    engine.eval()
    sums = torch.zeros(2, device=engine.device)  # loss sum, loss tokens
    # a global batch is grad_accum micro-batches per data-parallel rank: eval_batches of them are the same rows in
    # every layout of one global batch size (micro 8 × 1, micro 4 × accumulation 2, dp 2 × micro 4 …)
    for batch in eval_rank_batches(eval_set, config.train.micro_batch_size, dp_rank, dp_size,
                                   config.train.eval_batches * config.train.grad_accum, config.data.seed):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]  # the model predicts token i + 1 at position i
        logits = engine(**batch).logits if pipeline is None else pipeline.logits(engine, batch)
        if logits is None:  # an earlier pipeline stage: it handed its output on
            continue
        logits = logits[:, :-1]
        sums[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
        sums[1] += (labels != -100).sum()
    engine.train()
    dist.all_reduce(sums, group=groups.group("dp"))
    if pipeline is not None:
        dist.all_reduce(sums, group=groups.group("pp"))
    loss = float(sums[0] / sums[1].clamp_min(1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _warn_of_later_checkpoints(root: Path, step: int) -> None:
    """Resuming an earlier checkpoint starts a new branch of the run: its saves replace the later checkpoints of the
    old branch step by step (never pruned before), and the old branch's later metrics rows go aside
    (``metrics.replaced_rows_name``). Say so at the start."""
    from switchyard.train import checkpointing
    from switchyard.train.metrics import replaced_rows_name

    later = [p.name for p in checkpointing.complete_checkpoints(root) if checkpointing.step_of(p) > step]
    if later:
        log.warning("resuming from step %d while %s holds later checkpoints %s: this run saves over each one as it "
                    "reaches its step (resume from the latest, or give this run another output_dir, to keep them); "
                    "metrics.jsonl's rows after step %d are kept in %s", step, root, later, step,
                    replaced_rows_name(step), ranks=[0])


def _freeze(model, patterns: list[str], plan) -> None:
    """``train.freeze`` on this rank's share; every rank must keep something to train (an optimizer without
    parameters fails on its own rank), so an empty share fails every rank."""
    from switchyard.hf.checkpoint import agree
    from switchyard.train.freezing import freeze_parameters

    freeze_parameters(model, patterns)
    error = None
    if not any(p.requires_grad for p in model.parameters()):
        error = ValueError(f"train.freeze {patterns} leaves rank {dist.get_rank()} nothing to train (its pipeline "
                           "stage's or tensor-parallel shard's parameters all match): freeze less, or use fewer "
                           "pipeline stages")
    agree(error, "train.freeze")
    log.info("train.freeze %s: %d parameter tensors frozen, %.2fM of %.2fM parameters (%.1f%%) left untrained",
             patterns, plan.frozen_tensors, plan.frozen_params / 1e6, plan.total_params / 1e6,
             100 * plan.frozen_params / plan.total_params, ranks=[0])


def _resume_engine(engine, resume, world: int, groups, stage: int, engine_optimizer: str, pipeline=None) -> None:
    """Load the checkpoint's optimizer state, counters and RNG where its layout is this run's; else say what
    restarts. The weights came from the checkpoint's safetensors either way (any layout reads them)."""
    from switchyard.train import checkpointing

    changes = resume.layout_changes(world, groups.size("ep"), stage, engine_optimizer, groups.size("tp"),
                                    groups.size("etp"), groups.size("pp"), pipeline.sizes if pipeline else None)
    if not changes:
        checkpointing.load_engine_state(engine, resume.path / "engine", dist.get_rank(), groups.rank("dp"),
                                        groups.size("dp"))
        checkpointing.load_rng(resume.path / "rng", dist.get_rank())
        log.info("resumed from %s at step %d", resume.path, resume.step, ranks=[0])
        return
    checkpointing.set_step(engine, resume.step)
    engine.global_samples = resume.step * engine.train_batch_size()  # DeepSpeed's estimate where none was saved
    log.warning("resumed from %s at step %d with a different layout (%s): model weights resharded, optimizer state "
                "restarts (moments reset), RNG states not restored (seeded from train.seed)", resume.path, resume.step,
                ", ".join(changes), ranks=[0])


def _log_data_position(resume, batches: StepBatches, steps: int) -> None:
    """Say where the data resumes when the global batch changed (the step count then maps to other examples),
    and when the checkpoint is already at or past this run's end."""
    train = resume.meta["config"].get("train", {})
    saved = train.get("micro_batch_size", 0) * train.get("grad_accum", 0) * resume.meta.get("dp", batches.dp_size)
    if saved and saved != batches.global_batch:
        log.info("global batch %d → %d (micro_batch_size × grad_accum × dp): continuing at example %d of epoch %d's "
                 "order, the first not trained on", saved, batches.global_batch, batches.position, batches.epoch,
                 ranks=[0])
    if resume.step >= steps:
        log.warning("the checkpoint is at step %d and this run ends at step %d (train.max_steps / epochs): nothing to "
                    "train", resume.step, steps, ranks=[0])


def _replay_schedule(scheduler, state_at_start: dict[str, Any], steps: int) -> None:
    """Put the scheduler at optimizer step ``steps`` of this run's schedule. A checkpoint's scheduler state holds
    its run's base lr and the lr its schedule gave; a resume may change ``train.lr``, the schedule and the step
    count (docs/finetune.md), which that state would silently override. The replay runs before this run's first
    optimizer step, which torch warns about (on every rank) as if a step of the schedule were skipped; none is."""
    scheduler.load_state_dict(state_at_start)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(steps):
            scheduler.step()


def _router_loss_kinds(model, groups) -> list[str]:
    """The router-loss kinds any pipeline stage's layers compute, in ``LOSS_COEFFICIENTS`` order: a stage
    without MoE layers (or without one kind) logs zeros, so every rank reduces the same list."""
    from switchyard.hf.patch import router_loss_kinds
    from switchyard.moe.layer import LOSS_COEFFICIENTS

    mine = set(router_loss_kinds(getattr(model, "_switchyard_moe_layers", ())))
    if groups.size("pp") > 1:
        stages: list[Any] = [None] * groups.size("pp")
        dist.all_gather_object(stages, mine, group=groups.group("pp"))
        mine = set().union(*stages)
    return [k for k in LOSS_COEFFICIENTS if k in mine]


def _sum_over_stages(values: list[torch.Tensor], groups) -> list[torch.Tensor]:
    if groups.size("pp") == 1:
        return values
    summed = torch.stack([v.detach().float().reshape(()) for v in values])
    dist.all_reduce(summed, group=groups.group("pp"))
    return list(summed.unbind())


def _gather_stage_loads(fractions: dict[str, list[float]], layer_metrics: dict[str, float], groups
                        ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every stage's expert shares and per-layer load metrics, merged (rank 0 of the pipeline group logs them)."""
    stages: list[Any] = [None] * groups.size("pp")
    dist.all_gather_object(stages, (fractions, layer_metrics), group=groups.group("pp"))
    merged_fractions: dict[str, list[float]] = {}
    merged_metrics: dict[str, float] = {}
    for stage_fractions, stage_metrics in stages:
        merged_fractions.update(stage_fractions)
        merged_metrics.update(stage_metrics)
    return merged_fractions, merged_metrics


def _expert_fractions(load, groups, tp_sliced: Collection[str] = ()
                       ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Expert shares per layer, and each layer's max/mean and dropped fraction (metric name → value), over the
    data-parallel group's token copies; the ``tp_sliced`` layers' (tokens split over the tp ranks, etp = 1: each tp
    rank counted its slice) over the tp group's first."""
    fractions, layer_metrics = {}, {}
    for name, totals in load.take().items():
        if name in tp_sliced:
            dist.all_reduce(totals, group=groups.group("tp"))
        dist.all_reduce(totals, group=groups.group("dp"))
        kept, dropped, routed = totals[:-2], totals[-2], totals[-1]
        share = kept / kept.sum().clamp_min(1)
        fractions[name] = [round(x, 5) for x in share.tolist()]
        layer_metrics[f"load_max_over_mean/{name}"] = float(share.max() * share.numel())
        layer_metrics[f"dropped_fraction/{name}"] = float(dropped / routed.clamp_min(1))
    return fractions, layer_metrics


def _matmul_params(model) -> int:
    """Parameters a token's matmuls read, for MFU's 6 FLOPs each: dense ones plus top_k / E of the routed experts
    (global), without the input embedding (a row lookup) unless the LM head shares it."""
    from switchyard.hf.patch import moe_layers

    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        total -= embedding.weight.numel()
    for layer in moe_layers(model):
        local = sum(p.numel() for p in layer.experts.parameters())
        total += -local + local * layer.ep_size * layer.config.top_k // layer.num_experts
    return total
