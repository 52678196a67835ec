"""Resuming a fine-tune checkpoint as a DeepSpeed user expects: the gradient-accumulation boundary and the run's
hyperparameters after a resume with other settings, a precision change at ZeRO-0, checkpoints ordered by step
number, and damaged or newer checkpoint files named in the error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datasets")  # switchyard.train.run_config imports the data module

import torch

from harness import REPO_ROOT, run_on_ranks
from switchyard.train import checkpointing

DS = REPO_ROOT / "configs" / "deepspeed"


def _engine(ds_json: str, accum: int = 1, clip: float = 0.0, precision: str = "fp32", momentum: float = 0.9,
            weight_decay: float = 0.0):
    """A real DeepSpeed engine over a tiny upcycled llama (one rank, ep=1), as the loop builds it."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy
    from switchyard.deepspeed import optimizer_param_groups
    from switchyard.deepspeed.config import fill_deepspeed_config
    from switchyard.train.schedule import build_scheduler

    groups = sy.ProcessGroupManager(ep=1)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=32, max_position_embeddings=16,
                                  intermediate_size=24)
    model = sy.patch_model(AutoModelForCausalLM.from_config(config), sy.MoEConfig(num_experts=2, top_k=1), groups)
    optimizer = torch.optim.SGD(optimizer_param_groups(model, weight_decay), lr=0.1, momentum=momentum)
    ds = fill_deepspeed_config(str(DS / ds_json), micro_batch_size=2, grad_accum=accum, dp_size=1, clip=clip,
                               precision=precision, ep_size=1, caller_clips=ds_json.startswith("zero0"))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      lr_scheduler=build_scheduler(optimizer, 10, 1, "cosine", 0.1), config=ds,
                                      mpu=groups.mpu)
    return engine, groups


def _micro_step(engine) -> bool:
    """One micro-batch; whether DeepSpeed took it as the accumulation boundary (stepped the optimizer)."""
    boundary = engine.is_gradient_accumulation_boundary()
    ids = torch.randint(0, 32, (2, 6))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    return boundary


def _save(engine, path: Path, step: int, stage: int) -> checkpointing.ResumePoint:
    checkpointing.save_engine_state(engine, path / "engine", 0)
    meta = {"step": step, "world_size": 1, "ep": 1, "zero_stage": stage,
            "engine_optimizer": type(engine.optimizer).__name__, "config": {}}
    return checkpointing.ResumePoint(path, meta)


def _resumes(out: str) -> dict:
    """(1) ZeRO-2, grad_accum 2 → 3 with other momentum, weight decay and clipping; (2) ZeRO-0 fp32 → bf16."""
    from switchyard.train.loop import _resume_engine

    saved, _ = _engine("zero2.json", accum=2, clip=1.0, momentum=0.9, weight_decay=0.1)
    for _ in range(2 * 2):
        _micro_step(saved)
    point = _save(saved, Path(out) / "zero2", 2, 2)
    engine, groups = _engine("zero2.json", accum=3, clip=0.5, momentum=0.5, weight_decay=0.0)
    _resume_engine(engine, point, 1, groups, 2, type(engine.optimizer).__name__)
    zero2 = {"global_steps": engine.global_steps, "boundaries": [_micro_step(engine) for _ in range(6)],
             "steps_after": engine.global_steps, "clip": engine.optimizer.clip_grad,
             "groups": [(g["momentum"], g["weight_decay"]) for g in engine.optimizer.param_groups]}

    fp32, _ = _engine("zero0.json")
    _micro_step(fp32)
    point = _save(fp32, Path(out) / "zero0", 1, 0)
    bf16, groups = _engine("zero0_bf16.json", precision="bf16")
    _resume_engine(bf16, point, 1, groups, 0, type(bf16.optimizer).__name__)  # KeyError 'dynamic_loss_scale' once
    return {"zero2": zero2, "zero0_bf16": {"global_steps": bf16.global_steps, "micro_steps": bf16.micro_steps,
                                           "first_boundary": _micro_step(bf16)}}


def test_a_resume_keeps_this_runs_accumulation_boundary_and_hyperparameters(tmp_path):
    """DeepSpeed steps the optimizer when ``micro_steps + 1`` divides by ``grad_accum``: the saved count (2 steps
    × 2) resumed at grad_accum 3 stepped after the first micro-batch. torch's and ZeRO's ``load_state_dict`` bring
    the checkpoint's momentum, weight decay and ``clip_grad``, which docs/finetune.md lets a resume change."""
    [result] = run_on_ranks(_resumes, 1, str(tmp_path), timeout_s=120)
    zero2 = result["zero2"]
    assert zero2["global_steps"] == 2
    assert zero2["boundaries"] == [False, False, True] * 2 and zero2["steps_after"] == 4
    assert zero2["clip"] == 0.5
    assert zero2["groups"] and all(g == (0.5, 0.0) for g in zero2["groups"])
    # another precision at ZeRO-0 is another optimizer class: weights resharded, the optimizer restarts
    assert result["zero0_bf16"] == {"global_steps": 1, "micro_steps": 1, "first_boundary": True}


def test_layout_changes_name_what_restarts_the_optimizer(tmp_path):
    point = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 2, "zero_stage": 0,
                                                 "engine_optimizer": "SGD"})
    assert point.layout_changes(2, 2, 0, "SGD") == []
    assert point.layout_changes(1, 1, 0, "FP16_UnfusedOptimizer") == [
        "world 2 → 1", "ep 2 → 1", "optimizer SGD → FP16_UnfusedOptimizer"]
    older = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 2})  # before class, stage, tp
    assert older.same_layout(2, 2, 2, "DeepSpeedZeroOptimizer")
    # the engine files hold this rank's tensor-parallel slices: another tp reshards from the whole model checkpoint
    assert point.layout_changes(2, 2, 0, "SGD", tp=2) == ["tp 1 → 2", "etp 1 → 2"]
    tp2 = checkpointing.ResumePoint(tmp_path, {"step": 4, "world_size": 2, "ep": 1, "tp": 2, "zero_stage": 2})
    assert tp2.layout_changes(2, 1, 2, tp=1) == ["tp 2 → 1", "etp 2 → 1"] and tp2.same_layout(2, 1, 2, tp=2)
    # etp = tp → 1 at the same tp: whole experts instead of FFN slices, flat partitions of possibly equal size
    assert tp2.layout_changes(2, 1, 2, tp=2, etp=1) == ["etp 2 → 1"]


def _checkpoint(root: Path, step: int, meta: dict | str | None = None) -> Path:
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    text = meta if isinstance(meta, str) else json.dumps(meta or {"step": step, "config": {}})
    (path / "meta.json").write_text(text)
    (path / checkpointing.MARKER).write_text("")
    return path


def test_checkpoints_are_ordered_by_step_number_past_a_million(tmp_path):
    """``step_1000000`` sorts before ``step_999999`` as text: resume=auto without ``latest`` took step 999999, and
    pruning after step 1000000 kept 999999 as 'newer' and deleted older ones instead."""
    paths = [_checkpoint(tmp_path, s) for s in (999998, 999999, 1000000)]
    assert checkpointing.complete_checkpoints(tmp_path) == paths
    assert checkpointing.find_resume(tmp_path, "auto").step == 1000000  # no `latest`: the newest complete
    assert checkpointing.prunable(paths, paths[2], keep=2) == paths[:1]
    assert checkpointing.prunable(paths, paths[1], keep=1) == paths[:1]  # 1000000 is later, never pruned here


@pytest.mark.parametrize("meta, message", [
    ('{"step": 4, "config"', r"meta.json is not valid JSON"),
    ({"step": 4, "config": {}, "format": checkpointing.FORMAT + 1}, r"meta.json has format 2, .* formats up to 1"),
    ({"config": {}}, r"meta.json has no integer 'step' \(got None\)"),
])
def test_a_damaged_or_newer_meta_json_is_an_error_naming_it(tmp_path, meta, message):
    path = _checkpoint(tmp_path, 4, meta)
    for resume in ("auto", str(path)):
        with pytest.raises(ValueError, match=message) as err:
            checkpointing.find_resume(tmp_path, resume)
        assert str(path / "meta.json") in str(err.value)


def test_a_meta_json_without_the_run_config_is_an_error_naming_it(tmp_path):
    from switchyard.train.run_config import load_run_config

    point = checkpointing.find_resume(tmp_path, str(_checkpoint(tmp_path, 4, {"step": 4})))
    with pytest.raises(ValueError, match=r"step_000004/meta.json records no run config"):  # was KeyError: 'config'
        checkpointing.check_resume_config(point, load_run_config(REPO_ROOT / "configs" / "finetune" / "tiny.yaml"))


def test_an_incomplete_resume_dir_names_what_is_missing(tmp_path):
    path = _checkpoint(tmp_path / "checkpoints", 4)
    (path / checkpointing.MARKER).unlink()
    with pytest.raises(ValueError, match=rf"no {path / checkpointing.MARKER}"):
        checkpointing.find_resume(tmp_path, str(path))
    _checkpoint(tmp_path / "checkpoints", 6)
    with pytest.raises(ValueError, match=r"holds checkpoints: name one of them, or use checkpoint.resume=auto"):
        checkpointing.find_resume(tmp_path, str(tmp_path))  # the output_dir, not a step


def test_resuming_another_dirs_checkpoint_into_a_run_dir_with_checkpoints_is_refused(tmp_path):
    """Like a fresh run there, it would prune that run's checkpoints and rewrite its metrics; a checkpoint of the
    same directory (a branch from an earlier step) is fine."""
    mine = [_checkpoint(tmp_path / "run" / "checkpoints", s) for s in (2, 4)]
    elsewhere = _checkpoint(tmp_path / "other" / "checkpoints", 10)
    with pytest.raises(ValueError, match=r"holds checkpoints of another run \(step_000002 … step_000004\)"):
        checkpointing.find_resume(tmp_path / "run" / "checkpoints", str(elsewhere))
    assert checkpointing.find_resume(tmp_path / "run" / "checkpoints", str(mine[0])).step == 2
    assert checkpointing.find_resume(tmp_path / "empty" / "checkpoints", str(elsewhere)).step == 10


def test_corrupt_engine_and_rng_files_are_errors_naming_them(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "rank00000.pt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(ValueError, match=r"cannot read .*engine/rank00000.pt"):
        checkpointing._read_engine_state(tmp_path / "engine" / "rank00000.pt")
    torch.save({"optimizer": {}}, tmp_path / "engine" / "rank00001.pt")
    with pytest.raises(ValueError, match=r"rank00001.pt lacks \['lr_scheduler', 'global_steps', 'global_samples'\]"):
        checkpointing._read_engine_state(tmp_path / "engine" / "rank00001.pt")
    (tmp_path / "rng").mkdir()
    (tmp_path / "rng" / "rank00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"cannot read .*rng/rank00000.safetensors"):
        checkpointing.load_rng(tmp_path / "rng", 0)


def test_a_model_record_of_a_newer_version_is_an_error_naming_config_json(tmp_path):
    from switchyard.hf.checkpoint import CheckpointError, read_record

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "switchyard": {"version": 2}}))
    with pytest.raises(CheckpointError, match=r"config.json: its 'switchyard' record has version 2, .* up to 1"):
        read_record(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "switchyard": {"mode": "upcycle"}}))
    assert read_record(tmp_path) == {"mode": "upcycle"}  # records from before the version was written: version 1


def test_checkpoints_that_lost_their_marker_are_not_taken_for_an_empty_directory(tmp_path):
    """A clean-up of empty files takes the empty COMPLETE marker: resume=auto logged "starting fresh" at INFO, cut
    metrics.jsonl to the new run's rows and saved over the old checkpoints; a fresh run did the same."""
    import logging

    paths = [_checkpoint(tmp_path, s) for s in (4, 8)]
    (tmp_path / "latest").write_text(paths[1].name)
    for path in paths:
        (path / checkpointing.MARKER).unlink()
    for resume in (None, "auto"):
        with pytest.raises(ValueError, match=rf"{tmp_path} holds checkpoints of a run, none complete: step_000004 "
                                             rf"\(no {paths[0] / checkpointing.MARKER}\), step_000008 .*touch"):
            checkpointing.find_resume(tmp_path, resume)
    # latest names a damaged one, an older one is whole: resumed from it, with a warning (it was silent)
    (paths[0] / checkpointing.MARKER).write_text("")
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("switchyard").addHandler(handler)
    try:
        assert checkpointing.find_resume(tmp_path, "auto").step == 4
    finally:
        logging.getLogger("switchyard").removeHandler(handler)
    assert len(warnings) == 1 and "step_000008, which latest names, is not complete" in warnings[0], warnings
    assert "resuming from step_000004 instead, and this run's save at step 8 will replace it" in warnings[0]


def test_a_resume_moves_the_later_metrics_rows_aside(tmp_path):
    """Resuming from step 4 while metrics.jsonl held steps 1-8 deleted the rows of 5-8 at start-up, even where they
    belong to the kept checkpoint of a branch (step 8)."""
    from switchyard.train.metrics import MetricsWriter, replaced_rows_name

    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=8, start_step=4)
    writer.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aside = [json.loads(line) for line in (tmp_path / replaced_rows_name(4)).read_text().splitlines()]
    assert (kept, aside) == (rows[:4], rows[4:])
