"""The fine-tune loop under DeepSpeed: one step = grad_accum micro-batches per rank, then one optimizer step.

    deepspeed --num_gpus N launch/finetune.py --config configs/finetune/tiny.yaml [key.sub=value …]

Order of work: validate the config against the world → build every group → fill the DeepSpeed JSON → find
the checkpoint to resume (and check its settings) → model (patched, this rank's experts only) → data →
DeepSpeed engine with MoE parameter groups → steps (router losses in the loss, expert-bias updates, metrics, eval, atomic checkpoints).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from switchyard.log import get_logger
from switchyard.train.run_config import RunConfig

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
    prompts included; padding (``attention_mask`` 0) is not a token."""
    mask = micro.get("attention_mask")
    processed = int(mask.sum()) if mask is not None else micro["input_ids"].numel()
    return processed, int((micro["labels"] != -100).sum())


def train(config: RunConfig) -> dict[str, Any]:
    import deepspeed

    from switchyard.deepspeed import fill_deepspeed_config, optimizer_param_groups, zero_stage
    from switchyard.deepspeed.clipping import clip_global_grad_norm_
    from switchyard.moe.layer import MoELayer
    from switchyard.parallel import ProcessGroupManager, init_distributed
    from switchyard.train import checkpointing
    from switchyard.train.data import load_datasets
    from switchyard.train.metrics import ExpertLoad, MetricsWriter
    from switchyard.train.model_source import cache_dir, load_model, rank0_first, resolve_source
    from switchyard.train.schedule import build_scheduler

    init_distributed()
    world = dist.get_world_size()
    config.check_world(world)
    p = config.parallel
    groups = ProcessGroupManager(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp)
    rank, dp_rank, dp_size = dist.get_rank(), groups.rank("dp"), groups.size("dp")
    t = config.train
    # stage 0: DeepSpeed's norm is wrong with sharded experts; clip_global_grad_norm_ does it instead
    stage = zero_stage(config.deepspeed)
    own_clipping = stage == 0
    ds_config = fill_deepspeed_config(config.deepspeed, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                                      dp_size=dp_size, clip=t.clip, precision=t.precision,
                                      ep_size=groups.size("ep"), caller_clips=own_clipping)
    run_dir = Path(config.output_dir)
    ckpt_root = run_dir / "checkpoints"
    resume = checkpointing.find_resume(ckpt_root, config.checkpoint.resume)
    if resume is not None:
        checkpointing.check_resume_config(resume, config)
    reshard = resume is not None and not resume.same_layout(world, groups.size("ep"), stage)
    torch.manual_seed(config.train.seed)

    source = resolve_source(config)
    model, tokenizer = load_model(config, groups, source, from_checkpoint=resume.path / "model" if resume else None)
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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=groups.mpu)
    schedule_at_start = copy.deepcopy(engine.lr_scheduler.state_dict())  # this run's lr and schedule, step 0
    if resume is not None and not reshard:
        checkpointing.load_engine_state(engine, resume.path / "engine", rank, dp_rank, dp_size)
        checkpointing.load_rng(resume.path / "rng", rank)
        log.info("resumed from %s at step %d", resume.path, start_step, ranks=[0])
    elif reshard:
        log.warning("resumed from %s at step %d with a different layout (world %s → %d, ep %s → %d, ZeRO stage "
                    "%s → %d): model weights resharded, optimizer state restarts", resume.path, start_step,
                    resume.meta.get("world_size"), world, resume.meta.get("ep"), groups.size("ep"),
                    resume.meta.get("zero_stage"), stage, ranks=[0])
    if resume is not None:
        _replay_schedule(engine.lr_scheduler, schedule_at_start, start_step)

    metrics = MetricsWriter(run_dir, enabled=rank == 0, total_steps=steps, start_step=start_step)
    load = ExpertLoad()
    device = engine.device
    matmul_params = _matmul_params(model)
    meta = {"world_size": world, "ep": groups.size("ep"), "dp": dp_size, "zero_stage": stage,
            "config": config.to_dict()}
    history: list[float] = []
    last_eval: dict[str, float] = {}

    for step in range(start_step, steps):
        started = time.perf_counter()
        engine.train()
        lm_losses, aux_losses, tokens, loss_tokens = [], [], 0, 0
        grad_norm = None
        lr = engine.lr_scheduler.get_last_lr()[0]  # this step's: engine.step() moves the scheduler on
        for micro in batches.next_step():
            processed, with_loss = batch_tokens(micro)  # on the host batch: no device sync
            tokens, loss_tokens = tokens + processed, loss_tokens + with_loss
            micro = {k: v.to(device) for k, v in micro.items()}
            out = engine(**micro)
            engine.backward(out.loss)
            if own_clipping and engine.is_gradient_accumulation_boundary():
                grad_norm = clip_global_grad_norm_(model, t.clip, groups.group("ep"))
            engine.step()
            aux = out.get("aux_loss")
            lm_losses.append((out.loss - aux).detach() if aux is not None else out.loss.detach())
            aux_losses.append(aux.detach() if aux is not None else torch.zeros((), device=device))
            for name, layer in layers.items():
                stats = layer.last_stats
                load.add(name, stats.tokens_per_expert_E, stats.dropped_copies, stats.routed_copies)
        for layer in layers.values():
            layer.update_expert_bias()
        checkpointing.inject_fault("step", step + 1)
        engine_norm = engine.get_global_grad_norm() if grad_norm is None else None
        norm_t = [engine_norm] if torch.is_tensor(engine_norm) else []
        # token counts as dp means × dp: ranks' counts differ when padding does (unpacked or chat data)
        loss, router_loss, mean_tokens, mean_loss_tokens, *norm_v = _dp_means(
            [torch.stack(lm_losses).mean(), torch.stack(aux_losses).mean(), torch.tensor(float(tokens)),
             torch.tensor(float(loss_tokens))], groups, extra=norm_t)
        if grad_norm is None:
            grad_norm = norm_v[0] if norm_v else float(engine_norm or 0.0)
        history.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower train.lr or check the data")
        global_tokens = round(mean_tokens * dp_size)
        elapsed = time.perf_counter() - started
        values: dict[str, Any] = {
            "loss": loss,
            "router_loss": router_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": global_tokens / elapsed,
            "loss_tokens": round(mean_loss_tokens * dp_size),
        }
        if device.type == "cuda":
            values["mfu"] = 6 * matmul_params * global_tokens / elapsed / (H200_BF16_PEAK_FLOPS * world)
        fractions = None
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            fractions = _expert_fractions(load, groups, values)
        if (step + 1) % t.eval_every == 0 or step + 1 == steps:
            last_eval = evaluate(engine, eval_set, config, dp_rank, dp_size, groups)
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
def evaluate(engine, eval_set, config: RunConfig, dp_rank: int, dp_size: int, groups) -> dict[str, float]:
    """LM loss per loss token over the first ``eval_batches`` global batches of the eval split (all of it if
    smaller, a short last batch included), summed over the data-parallel group."""
    if eval_set is None:
        return {}
    from switchyard.train.data import eval_rank_batches

    engine.eval()
    sums = torch.zeros(2, device=engine.device)  # loss sum, loss tokens
    for batch in eval_rank_batches(eval_set, config.train.micro_batch_size, dp_rank, dp_size,
                                   config.train.eval_batches, config.data.seed):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]  # the model predicts token i + 1 at position i
        logits = engine(**batch).logits[:, :-1]
        sums[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
        sums[1] += (labels != -100).sum()
    engine.train()
    dist.all_reduce(sums, group=groups.group("dp"))
    loss = float(sums[0] / sums[1].clamp_min(1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _replay_schedule(scheduler, state_at_start: dict[str, Any], steps: int) -> None:
    """Put the scheduler at optimizer step ``steps`` of this run's schedule. A checkpoint's scheduler state holds
    its run's base lr and the lr its schedule gave; a resume may change ``train.lr``, the schedule and the step
    count (docs/finetune.md), which that state would silently override."""
    scheduler.load_state_dict(state_at_start)
    for _ in range(steps):
        scheduler.step()


def _expert_fractions(load, groups, values: dict[str, Any]) -> dict[str, list[float]]:
    """Expert shares, max/mean and dropped fraction per layer over the data-parallel group's token copies."""
    fractions = {}
    for name, totals in load.take().items():
        dist.all_reduce(totals, group=groups.group("dp"))
        kept, dropped, routed = totals[:-2], totals[-2], totals[-1]
        share = kept / kept.sum().clamp_min(1)
        fractions[name] = [round(x, 5) for x in share.tolist()]
        values[f"load_max_over_mean/{name}"] = float(share.max() * share.numel())
        values[f"dropped_fraction/{name}"] = float(dropped / routed.clamp_min(1))
    return fractions


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
