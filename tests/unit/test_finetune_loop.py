"""Fine-tune loop pieces called directly: checkpoint pruning and resume checks, metrics history, token counts,
the router loss per kind, the launcher's arguments and accelerate settings, rank 0 preparing while the others
wait."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")  # switchyard.train.run_config imports the data module

import torch

from harness import REPO_ROOT, load_script, run_on_ranks
from switchyard.train import checkpointing
from switchyard.train.loop import batch_tokens
from switchyard.train.metrics import MetricsWriter
from switchyard.train.run_config import load_run_config

TINY = REPO_ROOT / "configs" / "finetune" / "tiny.yaml"


def write_checkpoint(root: Path, step: int, config: dict) -> Path:
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "world_size": 2, "ep": 2, "config": config}))
    (path / checkpointing.MARKER).write_text("")
    return path


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    names = [tmp_path / f"step_{s:06d}" for s in (1, 2, 3, 4)]
    assert checkpointing.prunable(names, names[3], keep=2) == names[:2]
    assert checkpointing.prunable(names, names[1], keep=2) == []  # step 1 is kept; 3 and 4 are newer
    assert checkpointing.prunable(names, names[1], keep=1) == names[:1]


def test_fresh_run_in_a_dir_with_checkpoints_is_refused(tmp_path):
    assert checkpointing.find_resume(tmp_path / "checkpoints", None) is None
    write_checkpoint(tmp_path / "checkpoints", 4, load_run_config(TINY).to_dict())
    with pytest.raises(ValueError, match=r"holds checkpoints .*step_000004.*checkpoint.resume=auto.*output_dir"):
        checkpointing.find_resume(tmp_path / "checkpoints", None)


def test_resume_with_other_structural_settings_is_refused(tmp_path):
    write_checkpoint(tmp_path, 4, load_run_config(TINY).to_dict())
    point = checkpointing.find_resume(tmp_path, "auto")
    checkpointing.check_resume_config(point, load_run_config(TINY, ["parallel.ep=1", "train.max_steps=80"]))
    with pytest.raises(ValueError, match=r"cannot resume .*step_000004.*moe.num_experts: 4 → 8\)"):
        checkpointing.check_resume_config(point, load_run_config(TINY, ["moe.num_experts=8"]))


def test_resumed_metrics_keep_the_earlier_expert_load_for_the_heatmap(tmp_path):
    rows = [{"step": s, "loss": 1.0, "expert_load": {"layer": [0.5, 0.5]}} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=4, start_step=2)
    assert [step for step, _ in writer.load_history] == [1, 2]
    writer.log(3, {"loss": 0.5}, {"layer": [0.25, 0.75]})
    writer.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [step for step, _ in writer.load_history] == [1, 2, 3]


def test_throughput_counts_prompt_tokens_and_not_padding():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    assert batch_tokens({"input_ids": torch.ones(2, 4), "labels": labels}) == (8, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert batch_tokens({"input_ids": torch.ones(2, 4), "labels": labels, "attention_mask": mask}) == (7, 4)


def test_a_rows_first_label_is_no_loss_token():
    """The model shifts labels: position 0 is never predicted, so it has no loss (transformers' Trainer counts
    ``labels[..., 1:]`` for ``num_items_in_batch`` too). Counted, it would shrink every loss token's weight."""
    labels = torch.tensor([[4, -100, -100], [4, 5, -100]])
    assert batch_tokens({"input_ids": torch.ones(2, 3), "labels": labels}) == (6, 1)


def launcher():
    return load_script(REPO_ROOT / "launch" / "finetune.py", "finetune_launcher")


def test_overrides_may_follow_options():
    args = launcher().build_parser().parse_intermixed_args(
        ["--config", "x.yaml", "a=1", "--resume", "auto", "b=2", "--local_rank=1"])
    assert (args.config, args.resume, args.overrides) == ("x.yaml", "auto", ["a=1", "b=2"])


def test_accelerate_inline_deepspeed_settings_are_refused():
    overrides = launcher().accelerate_overrides
    plugin_file = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no",
                   "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}
    assert overrides(plugin_file) == ["deepspeed=ds.json"]
    assert overrides({}) == []
    inline = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "bf16",
              "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0", "ACCELERATE_GRADIENT_CLIPPING": "0.5"}
    with pytest.raises(ValueError, match=r"zero_stage: 0.*gradient_clipping: 0.5.*mixed_precision: bf16.*run config"):
        overrides(inline)


def _rank0_first_cases(init_file: str) -> tuple[int, str]:
    import torch.distributed as dist

    from switchyard.train.model_source import rank0_first

    rank = dist.get_rank()
    dist.destroy_process_group()  # again with a 2 s collective timeout, shorter than rank 0's work below
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))

    def slow() -> int:
        time.sleep(4 if rank == 0 else 0)
        return rank

    def failing() -> None:
        raise ValueError("data.source='x.jsonl' has no rows")

    result = rank0_first(slow)
    try:
        rank0_first(failing)
    except ValueError as err:
        return result, str(err)
    return result, "no error"


def test_ranks_wait_for_rank0_beyond_the_collective_timeout_and_share_its_error(tmp_path):
    results = run_on_ranks(_rank0_first_cases, 2, str(tmp_path / "init"), timeout_s=60)
    assert results == [(0, "data.source='x.jsonl' has no rows"), (1, "data.source='x.jsonl' has no rows")]


def test_a_resume_at_another_zero_stage_restarts_the_optimizer_state(tmp_path):
    """ZeRO partitions the optimizer state per stage: a ZeRO-2 state does not load into a ZeRO-0 engine
    (KeyError 'param_groups'), so another stage reshards the weights and restarts it, as another layout does."""
    point = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 2, "zero_stage": 2})
    assert point.same_layout(2, 2, 2)
    assert not point.same_layout(2, 2, 0)
    assert not point.same_layout(2, 1, 2) and not point.same_layout(1, 2, 2)
    older = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 2})  # before the stage was kept
    assert older.same_layout(2, 2, 0) and older.same_layout(2, 2, 2)


def test_a_resume_with_other_stage_sizes_restarts_the_optimizer_state(tmp_path):
    """Each pipeline stage's optimizer partition holds its own layers: other parallel.pp_layers is another layout."""
    point = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 1, "zero_stage": 1, "pp": 2,
                                                 "pp_layers": [2, 2]})
    assert point.same_layout(2, 1, 1, pp=2, pp_layers=[2, 2])
    assert point.layout_changes(2, 1, 1, pp=2, pp_layers=[1, 3]) == ["pp layers [2, 2] → [1, 3]"]
    assert point.layout_changes(2, 1, 1, pp=1) == ["pp 2 → 1"]
    older = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 1, "zero_stage": 1, "pp": 2})
    assert older.same_layout(2, 1, 1, pp=2, pp_layers=[2, 2])  # saved before the sizes were kept


def _examples(batches, dp_size: int, steps: int) -> list[int]:
    """The example ids (first token) the data-parallel group trains on, step by step, rank 0's rows first."""
    seen = []
    for _ in range(steps):
        per_rank = [b.next_step() for b in batches]
        seen += [int(row) for rank in per_rank for micro in rank for row in micro["input_ids"][:, 0]]
    return seen


def test_a_resume_with_another_global_batch_continues_at_the_examples_consumed():
    """Resharding changes dp (and so the global batch): the resumed run trains on exactly the examples the
    uninterrupted one would have next, across the epoch boundary, none skipped or repeated."""
    import datasets

    from switchyard.train.loop import StepBatches, data_position, total_steps

    rows = [[i] * 4 for i in range(30)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    config = load_run_config(TINY, ["train.micro_batch_size=2", "train.grad_accum=2", "train.epochs=2",
                                    "train.max_steps=null"])
    before = [StepBatches(dataset, config, r, 2) for r in range(2)]  # global batch 8: 3 steps an epoch
    assert total_steps(config, before[0]) == 6
    seen = _examples(before, 2, 2)
    meta = {"step": 2, "data_epoch": before[0].epoch, "data_position": before[0].position}
    assert data_position(meta, len(dataset)) == (0, 16)
    after = [StepBatches(dataset, config, 0, 1, *data_position(meta, len(dataset)))]  # dp 1: global batch 4
    assert total_steps(config, after[0], start_step=2) == 2 + 3 + 7  # 14 left of epoch 0, then 7 steps
    seen += _examples(after, 1, 10)
    epoch0 = [int(row[0]) for row in dataset.select(np.random.default_rng([0, 0]).permutation(30))["input_ids"]]
    epoch1 = [int(row[0]) for row in dataset.select(np.random.default_rng([0, 1]).permutation(30))["input_ids"]]
    assert seen == epoch0[:28] + epoch1[:28]  # epoch 0's short last batch (2 examples) dropped
    # a checkpoint written before the position was recorded: its step and global batch give it back
    legacy = {"step": 4, "dp": 2, "config": {"train": {"micro_batch_size": 2, "grad_accum": 2}}}
    assert data_position(legacy, len(dataset)) == (1, 8)


def test_moe_settings_a_source_with_its_own_moe_layers_would_ignore_are_refused():
    """A switchyard checkpoint or an HF MoE model brings its MoE layers: a run config moe setting that would
    not take effect is an error, one that agrees with the checkpoint (or is left out) is fine."""
    from switchyard.train.model_source import _refuse_unused_moe_settings

    record = {"moe": {**sy_moe_dict(num_experts=4, top_k=2, init="copy", aux_loss_coef=0.01, z_loss_coef=0.001)}}
    _refuse_unused_moe_settings(load_run_config(TINY), "ckpt", record)  # tiny.yaml's settings agree
    _refuse_unused_moe_settings(load_run_config(None, ["train.max_steps=1"]), "ckpt", record)  # none set
    with pytest.raises(ValueError, match=r"moe.num_experts=8 \(checkpoint: 4\)"):
        _refuse_unused_moe_settings(load_run_config(TINY, ["moe.num_experts=8"]), "ckpt", record)
    with pytest.raises(ValueError, match=r"moe.every_n=2"):
        _refuse_unused_moe_settings(load_run_config(TINY, ["moe.every_n=2"]), "ckpt", record)
    _refuse_unused_moe_settings(load_run_config(None, ["train.max_steps=1", "moe.overrides.top_k=1"]), "m", None)
    with pytest.raises(ValueError, match=r"HF MoE model.*moe.overrides"):
        _refuse_unused_moe_settings(load_run_config(None, ["train.max_steps=1", "moe.top_k=1"]), "mixtral", None)
    # router-loss coefficients weigh the losses, not the weights: a run may change a checkpoint's
    _refuse_unused_moe_settings(load_run_config(TINY, ["moe.z_loss_coef=0.01", "moe.aux_loss_coef=0"]), "ckpt", record)


def test_a_switchyard_checkpoint_takes_the_run_configs_router_loss_coefficients(tmp_path):
    """What `switchyard upcycle` saved (aux 0.01, z 0) is trained with the run config's coefficients: each layer's
    router loss is the run config's coefficient times the loss, and a later save records them."""
    import torch

    import switchyard as sy
    from switchyard.train.model_source import _set_loss_coefficients
    from tiny_models import build, ids

    model = sy.patch_model(build("llama"), sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.0))
    _set_loss_coefficients(model, load_run_config(TINY, ["moe.z_loss_coef=0.5", "moe.aux_loss_coef=0"]))
    layers = [m for m in model.modules() if isinstance(m, sy.MoELayer)]
    assert all(l.config.z_loss_coef == 0.5 and l.config.aux_loss_coef == 0 for l in layers)
    model.train()(ids())
    for layer in layers:  # the loss is the z-loss alone, weighted by the new coefficient
        from switchyard.moe.losses import z_loss

        want = 0.5 * z_loss(layer.last_router_output.logits_TE, None)
        torch.testing.assert_close(layer.aux_loss, want)
    sy.save_pretrained(model, tmp_path / "saved")
    assert sy.from_pretrained(tmp_path / "saved").config.switchyard["moe"]["z_loss_coef"] == 0.5


def sy_moe_dict(**values) -> dict:
    from switchyard import MoEConfig

    return MoEConfig(**values).to_dict()


def test_mfu_counts_the_parameters_a_tokens_matmuls_read():
    """Dense weights, the LM head and top_k / E of the experts; not the input embedding (a lookup) unless tied."""
    import switchyard as sy
    from switchyard.hf.patch import moe_layers
    from switchyard.train.loop import _matmul_params
    from tiny_models import build

    for tied in (False, True):
        model = sy.patch_model(build("llama", intermediate_size=48, tie_word_embeddings=tied),
                               sy.MoEConfig(num_experts=4, top_k=1))
        experts = sum(p.numel() for layer in moe_layers(model) for p in layer.experts.parameters())
        embedding = 0 if tied else model.get_input_embeddings().weight.numel()
        total = sum(p.numel() for p in model.parameters())
        assert _matmul_params(model) == total - embedding - experts + experts // 4


class _WorldGroups:
    """The slice of ProcessGroupManager that ``_expert_fractions`` reads: dp = the whole world."""

    def group(self, kind: str):
        return None

    def size(self, kind: str) -> int:
        return torch.distributed.get_world_size()


def _fractions_on_rank() -> dict:
    from switchyard.train.loop import _expert_fractions
    from switchyard.train.metrics import ExpertLoad

    rank = torch.distributed.get_rank()
    load = ExpertLoad()  # two micro-batches of 2 routed copies: rank 0 keeps all 4, rank 1 drops 2
    micro_batches = [([2, 0], 0), ([1, 1], 0)] if rank == 0 else [([0, 1], 1), ([0, 1], 1)]
    for kept, dropped in micro_batches:
        load.add("layer", torch.tensor(kept), torch.tensor(dropped), 2)
    fractions, layer_metrics = _expert_fractions(load, _WorldGroups())
    return {"fractions": fractions, **layer_metrics}


def test_expert_load_and_dropped_fraction_count_every_data_parallel_rank(tmp_path):
    """Counted by hand over both ranks: kept copies [3, 3] of 8 routed, 2 dropped (all on rank 1). The dropped
    fraction was rank 0's alone (0.0)."""
    results = run_on_ranks(_fractions_on_rank, 2, timeout_s=60)
    for result in results:
        assert result == {"fractions": {"layer": [0.5, 0.5]}, "load_max_over_mean/layer": 1.0,
                          "dropped_fraction/layer": 0.25}


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """TensorBoard's own reader: the killed run logged steps 1–4, the resume from step 2 logs 3–4 again. Without
    a purge step the event files held both and TensorBoard showed 1, 2, 3, 4, 3, 4."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = MetricsWriter(tmp_path, enabled=True, total_steps=4)
    for step in range(1, 5):
        killed.log(step, {"loss": float(step)})
    killed._tb.flush()
    killed._jsonl.flush()
    time.sleep(1.1)  # event file names carry the second they were opened
    resumed = MetricsWriter(tmp_path, enabled=True, total_steps=4, start_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_a_metrics_line_torn_by_a_kill_does_not_stop_the_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=4, start_step=1)
    writer.log(2, {"loss": 1.5})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]


def test_heatmap_cells_span_the_steps_each_logged_row_counts(tmp_path):
    """Read back with PIL: row 1 counts step 1, row 9 steps 2–9, so expert 0's bright cell is 1/9 of the width.
    The image had one equal-width column per logged row (half the width each)."""
    from PIL import Image

    from switchyard.train.metrics import write_expert_load_heatmap

    path = write_expert_load_heatmap([(1, {"l": [1.0, 0.0]}), (9, {"l": [0.0, 1.0]})], tmp_path / "load.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    bright = np.abs(pixels - [253, 231, 37]).sum(-1) < 30  # viridis at 1 and at 0
    dark = np.abs(pixels - [68, 1, 84]).sum(-1) < 30
    rows = [(b.sum(), d.sum()) for b, d in zip(bright, dark) if b.sum() + d.sum() > 100]
    assert len(rows) > 50
    assert all(min(b, d) / (b + d) < 0.2 for b, d in rows), rows[len(rows) // 2]


def test_token_weighting_follows_transformers_rule_for_loss_kwargs() -> None:
    """The loop passes num_items_in_batch only to models whose loss honours it (transformers' Trainer's rule)."""
    import torch.nn as nn

    from switchyard.train.loop import accepts_loss_kwargs
    from tiny_models import build

    assert accepts_loss_kwargs(build("llama"))
    assert accepts_loss_kwargs(build("mixtral"))

    class NoKwargs(nn.Module):
        def forward(self, input_ids, labels=None):
            return input_ids

    class SaysNo(NoKwargs):
        accepts_loss_kwargs = False

        def forward(self, input_ids, **kwargs):
            return input_ids

    assert not accepts_loss_kwargs(NoKwargs())
    assert not accepts_loss_kwargs(SaysNo())


def test_the_router_loss_per_kind_is_each_kinds_loss_alone_and_they_sum_to_it() -> None:
    """An adopted Mixtral with all three router losses: each kind's part is the aux_loss of the same model with
    only that kind's coefficient on, and the parts sum to the aux_loss the hook added; every kind stays in the
    dict (0) without grad, so ranks and micro-batches all-reduce the same keys; an unpatched model has none."""
    import copy

    import switchyard as sy
    from switchyard.hf.patch import router_loss_parts
    from tiny_models import build_moe, ids

    hf = build_moe("mixtral", router_aux_loss_coef=0.02)
    coefs = {"aux_loss_coef": 0.02, "seq_aux_loss_coef": 0.03, "z_loss_coef": 0.004}
    kinds = {"aux_loss_coef": "load_balancing", "seq_aux_loss_coef": "sequence_balance", "z_loss_coef": "z_loss"}
    x = ids()
    assert router_loss_parts(hf) == {}

    def forward(overrides: dict[str, float]):
        model = sy.patch_model(copy.deepcopy(hf), overrides=overrides).train()
        out = model(input_ids=x, labels=x)
        return model, float(out.aux_loss.detach())

    model, aux_loss = forward(coefs)
    parts = {k: float(v) for k, v in router_loss_parts(model).items()}
    assert set(parts) == set(kinds.values()) and all(v > 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(aux_loss, rel=1e-6)
    for field, kind in kinds.items():
        _, alone = forward({f: (v if f == field else 0.0) for f, v in coefs.items()})
        assert parts[kind] == pytest.approx(alone, rel=1e-6), kind
    with torch.no_grad():
        model(input_ids=x, labels=x)
    assert {k: float(v) for k, v in router_loss_parts(model).items()} == dict.fromkeys(kinds.values(), 0.0)


@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "whole_layer"])
def test_gradient_checkpointing_recomputes_each_layer_with_the_same_gradients(early_stop):
    """train.gradient_checkpointing: the MoE layers run again in the backward (entered twice per step: torch stops
    a recomputation once the saved tensors are back, so a forward hook would not fire), and every gradient equals
    the run that keeps its activations, router losses included; expert-bias counts are counted once."""
    import copy

    import switchyard as sy
    from switchyard.hf.patch import moe_layers
    from switchyard.train.loop import enable_gradient_checkpointing
    from tiny_models import build, ids

    kept = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(
        num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001, expert_bias=True))
    recomputed = copy.deepcopy(kept)
    enable_gradient_checkpointing(recomputed)
    assert recomputed.config.use_cache is False
    calls = {"kept": 0, "recomputed": 0}
    for name, model in (("kept", kept), ("recomputed", recomputed)):
        for layer in moe_layers(model):
            layer.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        model.train()
        batch = ids(2, 9)
        # torch stops a recomputation once the saved tensors are back (early stop); without it the whole layer
        # runs again, its statistics included
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            model(input_ids=batch, labels=batch).loss.backward()
    assert calls == {"kept": 4, "recomputed": 8}
    # the expert-bias counts are the step's tokens once, not again for the recomputation
    for a, b in zip(moe_layers(kept), moe_layers(recomputed), strict=True):
        assert a._bias_counts_E.sum() == 2 * 9 * 2 and torch.equal(b._bias_counts_E, a._bias_counts_E)
    for (name, a), (_, b) in zip(kept.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_is_refused_where_it_cannot_work():
    from switchyard.train.loop import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="train.cuda_graph and train.gradient_checkpointing are both true"):
        load_run_config(REPO_ROOT / "configs" / "finetune" / "tiny.yaml",
                        ["train.cuda_graph=true", "train.gradient_checkpointing=true"])
    with pytest.raises(ValueError, match="train.gradient_checkpointing must be true or false, got 'maybe'"):
        load_run_config(REPO_ROOT / "configs" / "finetune" / "tiny.yaml", ["train.gradient_checkpointing=maybe"])
    with pytest.raises(ValueError, match="Linear does not support transformers' gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


class _Engine:
    """What ``evaluate`` uses of DeepSpeed's engine: the module's forward, its device, eval/train."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, **batch):
        return self.model(**batch)

    def eval(self) -> None:
        self.model.eval()

    def train(self) -> None:
        self.model.train()


def _eval_losses() -> list[float]:
    import datasets

    from switchyard.train.loop import evaluate
    from tiny_models import build

    torch.manual_seed(0)
    engine = _Engine(build("llama", intermediate_size=48))
    rows = torch.randint(0, 64, (40, 9)).tolist()
    eval_set = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    losses = []
    for micro, accum in ((8, 1), (4, 2), (2, 4)):  # one global batch of 8 rows, three ways
        config = load_run_config(REPO_ROOT / "configs/finetune/tiny.yaml", [
            "output_dir=/unused", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", "train.eval_batches=3"])
        losses.append(evaluate(engine, eval_set, config, 0, 1, _WorldGroups())["eval_loss"])
    return losses


def test_eval_covers_eval_batches_global_batches_whatever_the_accumulation():
    """``eval_batches`` counts global batches (micro-batch × grad_accum × dp rows), as docs/finetune.md says: runs
    with one global batch size evaluate the same rows (with grad_accum > 1 they used to evaluate 1/grad_accum of
    them): the three ways of one global batch give one eval loss."""
    losses = run_on_ranks(_eval_losses, 1, timeout_s=120)[0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_resuming_an_earlier_checkpoint_warns_that_later_ones_will_be_saved_over(tmp_path, caplog):
    import logging

    from switchyard.train.loop import _warn_of_later_checkpoints

    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step, {})
    with caplog.at_level(logging.WARNING, logger="switchyard"):
        _warn_of_later_checkpoints(tmp_path, 4)
        _warn_of_later_checkpoints(tmp_path, 6)  # the latest: nothing to say
    warned = [r.getMessage() for r in caplog.records if "later checkpoints" in r.getMessage()]
    assert warned == [f"resuming from step 4 while {tmp_path} holds later checkpoints ['step_000006']: this run saves "
                      "over each one as it reaches its step (resume from the latest, or give this run another "
                      "output_dir, to keep them); metrics.jsonl's rows after step 4 are kept in "
                      "metrics.after_step_000004.replaced.jsonl"]


def test_seq_len_beyond_the_models_positions_is_warned(caplog):
    import logging
    from types import SimpleNamespace

    from switchyard.train.model_source import warn_beyond_positions

    with caplog.at_level(logging.WARNING):
        warn_beyond_positions(SimpleNamespace(max_position_embeddings=512), 512, "m")
        assert "exceeds" not in caplog.text
        warn_beyond_positions(SimpleNamespace(n_positions=64), 128, "gpt2-dir")  # GPT-2 names it n_positions
    assert "data.seq_len=128 exceeds gpt2-dir's max_position_embeddings=64" in caplog.text
