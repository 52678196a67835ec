"""What a fine-tune run reports, checked with oracles nobody here wrote: the lr of every step against
transformers' / torch's schedulers (also after a resume that changes train.lr and max_steps), TensorBoard's own
event reader after a resume, the heatmap PNG read back with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import REPO_ROOT, run_script_on_ranks

pytestmark = pytest.mark.distributed

CONFIG = str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml")
SMALL = ["parallel.ep=1", "data.seq_len=64", "train.warmup_steps=4", "train.eval_every=1000",
         "checkpoint.every=2", "checkpoint.keep=5", "deepspeed=configs/deepspeed/zero0.json"]


def finetune(out: Path, overrides: list[str]) -> None:
    result = run_script_on_ranks(REPO_ROOT / "launch" / "finetune.py", 1, ["--config", CONFIG, f"output_dir={out}",
                                                                          *SMALL, *overrides], timeout_s=280)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def oracle_lrs(lr: float, total: int, warmup: int, min_ratio: float) -> list[float]:
    """Linear warmup reaching the peak at the last warmup step (torch's LinearLR from 1/warmup), then
    transformers' cosine with a floor (the same multiplier as switchyard's after the warmup)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    def run(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler, values = make(optimizer), []
        for _ in range(total):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    warm = run(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / warmup, 1.0, total_iters=warmup - 1))
    decay = run(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=min_ratio))
    return warm[:warmup] + decay[warmup:]


def test_a_resume_mid_warmup_with_another_lr_and_length_follows_the_new_schedule_and_rewrites_the_history(tmp_path):
    """Killed at step 4 after a checkpoint at 2 (mid-warmup); resumed from step 2 with train.lr and max_steps
    changed (docs/finetune.md: they may change). Every step's lr is the new schedule's (the checkpoint's
    scheduler state carried the old lr: step 3 ran at 7.5e-4); TensorBoard shows each step once (the killed run's
    steps 3–4 were shown twice); the heatmap covers every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    finetune(out, ["train.max_steps=4", "train.lr=1e-3"])
    finetune(out, ["train.max_steps=6", "train.lr=5e-4", f"checkpoint.resume={out / 'checkpoints' / 'step_000002'}"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["lr"] for row in rows[:2]] == pytest.approx(oracle_lrs(1e-3, 4, 4, 0.1)[:2], rel=1e-12)
    assert [row["lr"] for row in rows[2:]] == pytest.approx(oracle_lrs(5e-4, 6, 4, 0.1)[2:], rel=1e-12)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6], key
        assert [e.value for e in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6), key

    from PIL import Image

    with Image.open(out / "expert_load.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert all("expert_load" in row for row in rows)  # log_every=1: six columns, pre-resume ones read back

