"""What a fine-tune user sees, checked value by value against oracles outside the loop: a 2-rank EP=2 ZeRO-2 run
of ``train()`` on padded rows, replayed in one process with plain torch (the same micro-batches from the same
weights, SGD by hand): loss per loss token, router loss and its part per kind, the lr each step used, the
pre-clip global grad norm (``torch.nn.utils.get_total_norm``), expert load of real tokens; TensorBoard's reader
against metrics.jsonl; the progress bar; a run whose DeepSpeed computes no norm; the heatmap after a resume."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")  # switchyard.train.run_config imports the data module

import torch

from harness import REPO_ROOT, run_on_ranks
from switchyard.train.metrics import MetricsWriter

TINY = REPO_ROOT / "configs" / "finetune" / "tiny.yaml"
WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _overrides(tmp_path: Path, extra: list[str]) -> list[str]:
    """Unpacked rows (padding under attention_mask 0), SGD without momentum or decay: the oracle replays it."""
    data = tmp_path / "data.jsonl"
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))})
                            + "\n" for _ in range(60)))
    return [f"output_dir={tmp_path / 'run'}", f"data.source={data}", "data.seq_len=32", "data.packing=false",
            "data.eval_fraction=0.1", "train.eval_every=1000", "checkpoint.every=1000", "train.warmup_steps=2",
            "train.optimizer=sgd", "train.momentum=0.0", "train.weight_decay=0.0", *extra]


def _recorded_train(overrides: list[str], cache: str) -> dict:
    """``train()`` with its micro-batches, the lr in the optimizer when it steps, and the starting weights (this
    rank's experts, by global id) recorded."""
    os.environ["SWITCHYARD_CACHE"] = cache
    from switchyard.train import loop
    from switchyard.train.run_config import load_run_config

    record: dict = {"steps": [], "init": None}
    next_step, forward_backward = loop.StepBatches.next_step, loop.forward_backward

    def recording_next_step(self):
        micro_batches = next_step(self)
        record["steps"].append({"micro": [{k: v.clone() for k, v in m.items()} for m in micro_batches]})
        return micro_batches

    def recording_forward_backward(engine, micro, lm_divisor):
        if record["init"] is None:
            record["init"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if engine.is_gradient_accumulation_boundary():
            record["steps"][-1]["lrs"] = [group["lr"] for group in engine.optimizer.param_groups]
        return forward_backward(engine, micro, lm_divisor)

    loop.StepBatches.next_step, loop.forward_backward = recording_next_step, recording_forward_backward
    loop.train(load_run_config(TINY, overrides))
    return record


def _oracle(records: list[dict], overrides: list[str], clip: float, log_every: int) -> list[dict]:
    """Per step: the global batch's LM loss per loss token, the router loss (each micro-batch's, averaged) and
    per kind (coefficient × the layers' mean of that loss, averaged the same way), the pre-clip norm of the
    whole gradient and the lr (SGD by hand with it), and at logged steps the share of real tokens' copies per
    expert since the last logged step."""
    from switchyard.moe.layer import MoELayer
    from switchyard.train.model_source import load_model, resolve_source
    from switchyard.train.run_config import load_run_config

    config = load_run_config(TINY, [*overrides, "parallel.ep=1"])
    model, _ = load_model(config, None, resolve_source(config))
    model.load_state_dict({k: v for record in records for k, v in record["init"].items()})
    model.train()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    moe = config.moe_config()
    coefs = {"load_balancing": moe.aux_loss_coef, "sequence_balance": moe.seq_aux_loss_coef, "z_loss": moe.z_loss_coef}
    counts = {name: torch.zeros(m.num_experts) for name, m in layers.items()}
    expected = []
    for step in range(len(records[0]["steps"])):
        micro_batches = [m for record in records for m in record["steps"][step]["micro"]]
        loss_tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro_batches)
        model.zero_grad()
        lm_sum = router_sum = 0.0
        kind_sums = dict.fromkeys(coefs, 0.0)
        for micro in micro_batches:
            out = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"])
            token_losses = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                                             micro["labels"][:, 1:].flatten(), reduction="sum")
            (token_losses / loss_tokens + out.aux_loss / len(micro_batches)).backward()
            lm_sum, router_sum = lm_sum + token_losses.item(), router_sum + out.aux_loss.item()
            for kind, coef in coefs.items():
                kind_sums[kind] += coef * sum(float(m.last_stats.losses[kind]) for m in layers.values()) / len(layers)
            real = micro["attention_mask"].reshape(-1).bool()
            for name, layer in layers.items():
                chosen = layer.last_router_output.topk_idx_TK[real].reshape(-1)
                counts[name] += torch.bincount(chosen, minlength=layer.num_experts)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads))
        lr = records[0]["steps"][step]["lrs"][0]
        row = {"loss": lm_sum / loss_tokens, "router_loss": router_sum / len(micro_batches), "grad_norm": norm,
               "lr": lr, "loss_tokens": loss_tokens,
               **{f"router_loss/{kind}": total / len(micro_batches) for kind, total in kind_sums.items()}}
        if (step + 1) % log_every == 0 or step + 1 == len(records[0]["steps"]):
            row["expert_load"] = {name: (c / c.sum()).tolist() for name, c in counts.items()}
            counts = {name: torch.zeros_like(c) for name, c in counts.items()}
        expected.append(row)
        scale = min(1.0, clip / (norm + 1e-6))
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * scale * p.grad
    return expected


def test_every_logged_value_matches_a_single_process_replay(tmp_path, monkeypatch):
    """EP=2 over 2 ranks, ZeRO-2, 2 micro-batches each, padded rows, clipping active (norms ≈ 3 > 1), a window
    of 2 steps for the expert load, all three router losses on (each kind logged, the kinds summing to
    router_loss). The later steps' losses match only if the update used the logged lr (warmup: 0.025 then
    0.05) and the clipped pre-clip norm. The expert load counted padding copies (dropless routes them), off by
    up to 0.03 of the copies per expert here."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cache = str(tmp_path / "cache")
    monkeypatch.setenv("SWITCHYARD_CACHE", cache)
    overrides = _overrides(tmp_path, ["parallel.ep=2", "train.max_steps=3", "train.micro_batch_size=2",
                                      "train.grad_accum=2", "train.lr=0.05", "train.clip=1.0", "train.log_every=2",
                                      "moe.seq_aux_loss_coef=0.005", "deepspeed=configs/deepspeed/zero2.json"])
    records = run_on_ranks(_recorded_train, 2, overrides, cache, timeout_s=240)
    expected = _oracle(records, overrides, clip=1.0, log_every=2)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert any(m["attention_mask"].min() == 0 for r in records for s in r["steps"] for m in s["micro"])
    for row, want in zip(rows, expected):
        assert row["loss_tokens"] == want["loss_tokens"]
        assert row["lr"] == want["lr"]
        kinds = [k for k in want if k.startswith("router_loss/")]
        assert len(kinds) == 3 and all(want[k] > 0 for k in kinds)
        for key in ("loss", "router_loss", "grad_norm", *kinds):
            assert row[key] == pytest.approx(want[key], rel=2e-5), (row["step"], key)
        assert sum(row[k] for k in kinds) == pytest.approx(row["router_loss"], rel=1e-6)
        assert ("expert_load" in row) == ("expert_load" in want)
        for name, shares in want.get("expert_load", {}).items():
            assert sum(row["expert_load"][name]) == pytest.approx(1.0, abs=5e-5)
            assert row["expert_load"][name] == pytest.approx(shares, abs=2e-5), (row["step"], name)
            assert row[f"load_max_over_mean/{name}"] == pytest.approx(max(shares) * len(shares), rel=1e-5)
            assert row[f"dropped_fraction/{name}"] == 0.0
    assert rows[1]["lr"] == 2 * rows[0]["lr"] > 0

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    numeric = {k for row in rows for k, v in row.items() if isinstance(v, (int, float))} - {"step", "time_s",
                                                                                            "expert_load_from"}
    assert set(events.Tags()["scalars"]) == numeric
    for key in numeric:
        logged = [(row["step"], row[key]) for row in rows if key in row]
        shown = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in shown] == [s for s, _ in logged], key
        assert [v for _, v in shown] == pytest.approx([v for _, v in logged], rel=1e-6), key
    assert (tmp_path / "run" / "expert_load.png").is_file()


def test_the_progress_bar_shows_router_loss_and_mfu(tmp_path):
    """docs/finetune.md: loss, router loss, lr, grad norm, tokens/s and MFU on GPU (the bar had neither the
    router loss nor MFU)."""
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=2)
    writer.log(1, {"loss": 2.5, "router_loss": 0.0123, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 1000.0,
                   "mfu": 0.4125, "loss_tokens": 10})
    postfix = writer._bar.postfix
    writer.close()
    for shown in ("loss=2.5", "router_loss=0.0123", "lr=0.001", "grad_norm=0.7", "tokens_per_s=1000", "mfu=0.4125"):
        assert shown in postfix, postfix


def test_no_grad_norm_is_logged_when_deepspeed_computes_none(tmp_path, monkeypatch):
    """ZeRO-2 with ``compute_grad_norm: false`` (allowed with clip 0): the loop logged grad_norm 0.0, a norm
    nobody computed; now the key is left out (and so is the TensorBoard scalar)."""
    config = json.loads((REPO_ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    config["zero_optimization"]["compute_grad_norm"] = False
    (tmp_path / "ds.json").write_text(json.dumps(config))
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("SWITCHYARD_CACHE", cache)
    overrides = _overrides(tmp_path, ["parallel.ep=1", "train.max_steps=1", "train.clip=0.0",
                                      f"deepspeed={tmp_path / 'ds.json'}"])
    run_on_ranks(_recorded_train, 1, overrides, cache, timeout_s=240)
    [row] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "grad_norm" not in row and row["loss"] > 0


def _cell_widths_4_to_5(path: Path) -> None:
    """Each expert's pixel line holds a bright and a dark cell whose widths are 5 and 4 steps (PIL, viridis)."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    bright = np.abs(pixels - [253, 231, 37]).sum(-1) < 30  # viridis at 1 and at 0
    dark = np.abs(pixels - [68, 1, 84]).sum(-1) < 30
    lines = [(b.sum(), d.sum()) for b, d in zip(bright, dark) if b.sum() > 50 and d.sum() > 50]
    assert len(lines) > 50
    assert all(abs(min(b, d) / max(b, d) - 4 / 5) < 0.05 for b, d in lines), lines[len(lines) // 2]


def test_a_resume_leaves_the_steps_no_row_counted_blank_in_the_heatmap(tmp_path):
    """log_every=5, a checkpoint at step 6: the killed run's row at step 5 counts steps 1–5, the resumed run's
    first row (step 10) counts 7–10; step 6's counts died with the killed run. The heatmap drew the step-10 row
    over 6–10 (5 steps, as wide as the step-5 row); now 7–10, with 6 blank, also after a second resume."""
    killed = MetricsWriter(tmp_path, enabled=True, total_steps=10)
    killed.log(5, {"loss": 1.0}, {"l": [1.0, 0.0]})
    killed.close()
    resumed = MetricsWriter(tmp_path, enabled=True, total_steps=10, start_step=6)
    resumed.log(10, {"loss": 1.0}, {"l": [0.0, 1.0]})
    _cell_widths_4_to_5(resumed.close())

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["expert_load_from"]) for row in rows] == [(5, 1), (10, 7)]
    again = MetricsWriter(tmp_path, enabled=True, total_steps=12, start_step=10)
    assert again.load_first == [1, 7] and [step for step, _ in again.load_history] == [5, 10]
    _cell_widths_4_to_5(again.close())
