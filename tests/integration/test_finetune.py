"""launch/finetune.py on CPU ranks: under the real deepspeed launcher where the launcher is part of the test (the
default run, killed ranks, an error on every rank), elsewhere on ranks forked as it starts them
(harness.run_script_on_ranks: the same rank environment, the imports paid once).

Oracle for parallel correctness: one process stepping over the same global batches. SGD keeps the
comparison tight (Adam's normalized update amplifies float noise in near-zero gradients); the router
balance loss is off because it is nonlinear in the batch (per-rank vs global statistics differ by
design); everything else — expert all-to-all, DeepSpeed's expert-data-parallel reduction, clipping at
1.0 with the global norm — is in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import REPO_ROOT, run_deepspeed_launcher, run_script_on_ranks, script_environ

pytestmark = pytest.mark.distributed

CONFIG = str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml")
EQUIV = ["train.optimizer=sgd", "train.lr=0.5", "moe.aux_loss_coef=0", "moe.z_loss_coef=0", "data.seq_len=64",
         "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=1000", "checkpoint.every=1000"]
GLOBAL_BATCH = 8


def finetune(ranks: int, out: Path, overrides: list[str], env: dict[str, str] | None = None,
             timeout_s: float = 280, launcher: bool = False) -> subprocess.CompletedProcess:
    """The script on ``ranks`` ranks forked as the deepspeed launcher sets them up (harness.run_script_on_ranks: the
    imports paid once), or under the real ``deepspeed`` launcher where the launcher is part of what is tested (the
    default run, a killed rank, an error on every rank)."""
    args = ["--config", CONFIG, f"output_dir={out}", *overrides]
    if launcher:
        return run_deepspeed_launcher(REPO_ROOT / "launch" / "finetune.py", ranks, args, timeout_s=timeout_s, env=env)
    return run_script_on_ranks(REPO_ROOT / "launch" / "finetune.py", ranks, args, timeout_s=timeout_s, env=env)


def output_of(result) -> str:
    return (result.stdout or "") + (result.stderr or "")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    import switchyard as sy

    return sy.from_pretrained(out / "checkpoints" / f"step_{step:06d}" / "model").state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    result = finetune(1, out, EQUIV + ["parallel.ep=1", f"train.micro_batch_size={GLOBAL_BATCH}",
                                       "deepspeed=configs/deepspeed/zero0.json"])
    assert result.returncode == 0, output_of(result)[-4000:]
    return out


# (ranks, layout, ZeRO stage): tensor-parallel ranks share their batch, so dp = ranks / tp. dp2xep2 at ZeRO-0 (the
# loop's own clip over dp and ep) is checked in one process's ranks by tests/distributed/test_moe_deepspeed.py
LAYOUTS = [(2, "ep2", 0), (2, "ep2", 2), (2, "ep2", 3), (4, "dp2xep2", 2), (4, "dp2xep2", 3),
           (2, "tp2", 0), (2, "tp2", 2), (4, "tp2xep2", 2), (2, "tp2-etp1", 2), (2, "ep2+recompute", 2),
           (4, "pp4", 0), (4, "pp2xep2", 1), (4, "tp2xpp2", 1)]
LAYOUT_OVERRIDES = {"ep2": ["parallel.ep=2"], "dp2xep2": ["parallel.ep=2"], "tp2": ["parallel.tp=2", "parallel.ep=1"],
                    "tp2xep2": ["parallel.tp=2", "parallel.ep=2"],
                    "tp2-etp1": ["parallel.tp=2", "parallel.etp=1", "parallel.ep=2"],  # experts whole, tokens split
                    "ep2+recompute": ["parallel.ep=2", "train.gradient_checkpointing=true"],
                    # pipeline stages, as many micro-batches per step as stages: 1F1B's warm-up, steady state and
                    # cool-down all run (pp4: one decoder layer per stage, two middle stages)
                    "pp4": ["parallel.pp=4", "parallel.ep=1", "train.grad_accum=4"],
                    # stages of the sizes asked for (parallel.pp_layers): one decoder layer, then three
                    "pp2xep2": ["parallel.pp=2", "parallel.ep=2", "train.grad_accum=2", "parallel.pp_layers=[1, 3]"],
                    # every axis at once: tp shards in each stage, experts whole over an EP group spanning the tp ranks
                    "tp2xpp2": ["parallel.tp=2", "parallel.pp=2", "parallel.etp=1", "parallel.ep=2",
                                "train.grad_accum=2"]}


@pytest.mark.parametrize("ranks, layout, stage", LAYOUTS, ids=[f"{lay}-zero{st}" for _, lay, st in LAYOUTS])
def test_parameters_match_one_process(reference, tmp_path, ranks, layout, stage):
    pp = int(layout.split("pp")[1][0]) if "pp" in layout else 1
    dp = ranks // (2 if layout.startswith("tp2") else 1) // pp
    result = finetune(ranks, tmp_path, EQUIV + LAYOUT_OVERRIDES[layout] + [
        f"train.micro_batch_size={GLOBAL_BATCH // dp // pp}", f"deepspeed=configs/deepspeed/zero{stage}.json"])
    assert result.returncode == 0, output_of(result)[-4000:]
    if layout.startswith("tp2"):  # the model really is split, not replicated on both tp ranks
        experts = "split their tokens over the tp ranks (etp=1)" if "etp=1" in " ".join(LAYOUT_OVERRIDES[layout]) \
            else "shard their experts"
        modules, moe = (8, 2) if pp > 1 else (16, 4)  # rank 0's stage: half the layers
        assert f"tensor parallel: {modules} modules sharded over tp=2 ({moe} MoE layers {experts})" in output_of(result)
    if pp > 1:  # each stage holds its part of the decoder
        last = {"pp2xep2": "1 of 2: decoder layers 1–3", "tp2xpp2": "1 of 2: decoder layers 2–3",
                "pp4": "3 of 4: decoder layers 3–3"}[layout]
        assert f"pipeline stage {last}, final norm and LM head" in output_of(result)
    # ZeRO-1/2/3 take the global norm with switchyard's fused reduction (grad_norm.py), the loop's own at ZeRO-0
    assert ("gradient norm: one fused fp32 reduction" in output_of(result)) == (stage > 0)
    if layout.endswith("+recompute"):  # the all-to-alls run again inside the backward
        assert "gradient checkpointing: LlamaForCausalLM recomputes each decoder layer" in output_of(result)
    assert [m["loss"] for m in metrics(tmp_path)] == pytest.approx([m["loss"] for m in metrics(reference)], rel=1e-5)
    want, got = final_state(reference, 3), final_state(tmp_path, 3)
    assert want.keys() == got.keys()
    for key in want:  # tolerance: fp32 summation order across ranks, 3 SGD steps at lr 0.5
        torch.testing.assert_close(got[key], want[key], atol=2e-6, rtol=1e-5, msg=key)


def test_pipeline_with_a_tied_head_and_router_losses_matches_one_process_and_resumes_at_pp1_and_pp2(tmp_path):
    """pp = 2 at ZeRO-2 on a model whose LM head is its input embedding (the first stage owns it, the last holds a
    copy), with the router losses on (each stage adds its layers' share): losses, router losses and parameters as
    one process over the same micro-batches. Its step-2 checkpoint (written by both stages into one index) resumes
    in one process at pp = 1, whose step 3 is the pipelined run's (SGD without momentum: no optimizer state), and at
    pp = 2, where each stage reads only its own tensors (the last stage its head's copy of the embedding) and
    step 3 and the final parameters are the uninterrupted run's."""
    tied = [o for o in EQUIV if "loss_coef" not in o] + [
        "model.tiny.tie_word_embeddings=true", "model.tiny.name=tied", "moe.aux_loss_coef=0.01",
        "moe.z_loss_coef=0.001", "checkpoint.every=2", "train.micro_batch_size=4", "train.grad_accum=2"]
    one, piped, resumed = tmp_path / "one", tmp_path / "pp2", tmp_path / "resumed"
    for ranks, out, extra in ((1, one, []), (2, piped, ["parallel.pp=2"])):
        result = finetune(ranks, out, tied + ["parallel.ep=1", "deepspeed=configs/deepspeed/zero2.json", *extra])
        assert result.returncode == 0, output_of(result)[-4000:]
    want, got = metrics(one), metrics(piped)
    for key in ("loss", "router_loss", "router_loss/load_balancing", "router_loss/z_loss", "grad_norm"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-5), key
    assert got[0]["router_loss"] > 0 and set(got[-1]["expert_load"]) == set(want[-1]["expert_load"])
    for key, value in final_state(one, 3).items():
        torch.testing.assert_close(final_state(piped, 3)[key], value, atol=2e-6, rtol=1e-5, msg=key)
    result = finetune(1, resumed, tied + ["parallel.ep=1", "deepspeed=configs/deepspeed/zero2.json",
                                          f"checkpoint.resume={piped / 'checkpoints' / 'step_000002'}"])
    assert result.returncode == 0, output_of(result)[-4000:]
    assert "pp 2 → 1" in output_of(result) and "optimizer state restarts" in output_of(result)
    assert metrics(resumed)[0]["step"] == 3
    assert metrics(resumed)[0]["loss"] == pytest.approx(want[-1]["loss"], rel=1e-5)
    staged = tmp_path / "resumed_pp2"
    result = finetune(2, staged, tied + ["parallel.ep=1", "deepspeed=configs/deepspeed/zero2.json", "parallel.pp=2",
                                         f"checkpoint.resume={piped / 'checkpoints' / 'step_000002'}"])
    assert result.returncode == 0, output_of(result)[-4000:]
    assert [(m["step"], m["loss"]) for m in metrics(staged)] == [(m["step"], m["loss"]) for m in got[2:]]
    for key, value in final_state(piped, 3).items():
        torch.testing.assert_close(final_state(staged, 3)[key], value, atol=0, rtol=0, msg=key)


def test_pipeline_with_adamw_matches_one_process_with_torchs_adamw(tmp_path):
    """pp = 2 at ZeRO-1 with AdamW (the launcher's default optimizer): each stage's ZeRO optimizer takes switchyard's
    one-pass step (zero_step.py) with the global gradient norm over both stages. The oracle is one process at ZeRO-0,
    where the loop steps torch's own AdamW: losses, gradient norms and every parameter after three steps. Adam divides
    each gradient by its own running magnitude, so summation-order noise in a near-zero gradient can move an element
    by up to lr; the parameters are compared at a tolerance far below one such step (lr = 1e-3) for all but a few."""
    adam = [o for o in EQUIV if not o.startswith(("train.optimizer", "train.lr", "checkpoint.every"))] + [
        "train.optimizer=adamw", "train.lr=1e-3", "parallel.ep=1", "checkpoint.every=1", "checkpoint.keep=3"]
    one, piped = tmp_path / "one", tmp_path / "pp2"
    result = finetune(1, one, adam + [f"train.micro_batch_size={GLOBAL_BATCH}", "deepspeed=configs/deepspeed/zero0.json"])
    assert result.returncode == 0, output_of(result)[-4000:]
    assert "optimizer step: the gradient's cast" not in output_of(result)  # the oracle is torch's AdamW
    result = finetune(2, piped, adam + ["parallel.pp=2", "train.grad_accum=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                                        "deepspeed=configs/deepspeed/zero1.json"])
    assert result.returncode == 0, output_of(result)[-4000:]
    assert "optimizer step: the gradient's cast, the clip, Adam and the 16-bit weights' copy" in output_of(result)
    want, got = metrics(one), metrics(piped)
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-5), key
    want_state, got_state = final_state(one, 3), final_state(piped, 3)
    assert want_state.keys() == got_state.keys()
    start = final_state(one, 1)
    moved = far = total = 0
    for key, value in want_state.items():
        diff = (got_state[key] - value).abs()
        far += int((diff > 1e-5).sum())
        total += value.numel()
        moved += int(((value - start[key]).abs() > 1e-4).sum())
    assert moved > total // 2  # steps 2 and 3 moved most parameters by about lr: a comparison that can fail
    assert far <= total // 1000, f"{far} of {total} parameters differ from torch's AdamW by more than 1e-5"


def test_frozen_parameters_keep_their_values_and_the_rest_matches_one_process(tmp_path):
    """train.freeze at ep2 × ZeRO-2: attention, the routers and one layer's experts (expert-parallel tensors that
    DeepSpeed would reduce over the expert-data-parallel group) are frozen. The frozen tensors are transformers'
    dense model's own (``init: copy`` makes every expert its layer's dense MLP) in both runs, and everything, frozen
    or trained, matches one process with the same patterns."""
    freeze = ['train.freeze=["*.self_attn.*", "*.mlp.router.*", "model.layers.1.mlp.experts.*"]']
    one, two = tmp_path / "one", tmp_path / "ep2"
    for ranks, out in ((1, one), (2, two)):
        result = finetune(ranks, out, EQUIV + freeze + [f"parallel.ep={ranks}", "deepspeed=configs/deepspeed/zero2.json",
                                                        f"train.micro_batch_size={GLOBAL_BATCH // ranks}"])
        assert result.returncode == 0, output_of(result)[-4000:]
        assert "22 parameter tensors frozen" in output_of(result)
    assert [m["loss"] for m in metrics(two)] == pytest.approx([m["loss"] for m in metrics(one)], rel=1e-5)
    want, got = final_state(one, 3), final_state(two, 3)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-6, rtol=1e-5, msg=key)
    from transformers import AutoModelForCausalLM

    from switchyard.train.model_source import resolve_source
    from switchyard.train.run_config import load_run_config

    dense = AutoModelForCausalLM.from_pretrained(resolve_source(load_run_config(CONFIG, [f"output_dir={one}"])))
    mlp = dense.model.layers[1].mlp
    dense_state = dense.state_dict()
    frozen = {k: v for k, v in dense_state.items() if ".self_attn." in k}
    frozen |= {f"model.layers.1.mlp.experts.{e}.{name}": value for e in range(4) for name, value in (
        ("gate_up_proj", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), ("down_proj", mlp.down_proj.weight))}
    for state in (want, got):
        for key, value in frozen.items():
            assert torch.equal(state[key], value), key
        trained = [k for k in dense_state if k in state and k not in frozen]  # embedding, norms, head
        assert trained and not [k for k in trained if torch.equal(state[k], dense_state[k])]
    for key in [k for k in want if "router" in k]:  # each run's own upcycled router, the same seed: untouched alike
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(got["model.layers.0.mlp.experts.0.down_proj"], dense.model.layers[0].mlp.down_proj.weight)


SHORT = ["train.max_steps=8", "checkpoint.every=4", "train.eval_every=4", "data.seq_len=64"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = finetune(2, out, SHORT, launcher=True)
    assert result.returncode == 0, output_of(result)[-4000:]
    # ZeRO-2 with AdamW: the resumes below check that the one-pass step (zero_step.py) resumes exactly too
    assert "optimizer step: the gradient's cast, the clip, Adam and the 16-bit weights' copy" in output_of(result)
    # DeepSpeed's CPU all-reduce segments (~66 MiB of RAM each) are unlinked by each rank at the end of the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{result.master_port}_*"))
    return out


def test_default_run_learns_and_writes_everything(uninterrupted):
    rows = metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert {"router_loss", "lr", "grad_norm", "tokens_per_s", "loss_tokens", "eval_loss",
            "eval_perplexity"} <= set(rows[-1])
    # the lr each step used (warmup over 4 steps from lr 1e-3), not the next step's
    assert [r["lr"] for r in rows[:4]] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(abs(sum(f) - 1) < 1e-3 for f in rows[-1]["expert_load"].values())
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert (uninterrupted / "expert_load.png").stat().st_size > 1000
    ckpts = uninterrupted / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000008"
    for step in (4, 8):
        assert (ckpts / f"step_{step:06d}" / "COMPLETE").is_file()
        assert (ckpts / f"step_{step:06d}" / "model" / "switchyard.safetensors.index.json").is_file()


def test_killed_rank_fails_fast_and_a_kill_during_save_resumes_from_the_previous_checkpoint(uninterrupted, tmp_path):
    """Both faults in one run dir, the first resume being the run the second fault kills (a launch fewer than
    a clean resume in between): rank 1 killed after step 6 ends the job fast; the resume from step 4 follows the
    uninterrupted curve until rank 0 is killed while saving step 8, which leaves step 4 the latest; the next
    resume continues from it on the same curve."""
    started = time.monotonic()
    crashed = finetune(2, tmp_path, SHORT, env={"SWITCHYARD_FAULT": "step:1:6"}, launcher=True)
    assert crashed.returncode != 0 and "SWITCHYARD_FAULT=step:1:6: killing rank 1" in output_of(crashed)
    assert time.monotonic() - started < 120
    killed_saving = finetune(2, tmp_path, SHORT + ["checkpoint.resume=auto"], env={"SWITCHYARD_FAULT": "save:0:8"},
                              launcher=True)
    assert killed_saving.returncode != 0
    assert "SWITCHYARD_FAULT=save:0:8: killing rank 0" in output_of(killed_saving), output_of(killed_saving)[-4000:]
    assert "resumed from" in output_of(killed_saving) and "step_000004" in output_of(killed_saving)
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(uninterrupted)]
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000004"
    assert (ckpts / "step_000008.partial").is_dir() and not (ckpts / "step_000008").exists()
    resumed = finetune(2, tmp_path, SHORT + ["checkpoint.resume=auto"])
    assert resumed.returncode == 0, output_of(resumed)[-4000:]
    assert "step_000004 at step 4" in output_of(resumed)
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(uninterrupted)]
    assert (ckpts / "latest").read_text() == "step_000008" and not list(ckpts.glob("*.partial"))


def test_ep2_checkpoint_resumes_at_ep1(uninterrupted, tmp_path):
    resumed = finetune(1, tmp_path, SHORT + ["parallel.ep=1", "train.max_steps=10", "train.micro_batch_size=8",
                                             f"checkpoint.resume={uninterrupted / 'checkpoints' / 'step_000008'}"])
    assert resumed.returncode == 0, output_of(resumed)[-4000:]
    assert "optimizer state restarts" in output_of(resumed)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [9, 10]
    assert abs(rows[0]["loss"] - metrics(uninterrupted)[-1]["loss"]) < 0.5


def test_zero3_checkpoint_resumes_exactly(tmp_path):
    """ZeRO-3 at ep2 with AdamW: a run resumed from its step-2 checkpoint (each rank's partition of the fp32 weights
    and Adam moments, experts partitioned over their expert-data-parallel group) logs the uninterrupted run's steps 3
    and 4 and ends with its parameters. (The weights a ZeRO-3 save gathers are the equivalence tests' oracle input,
    and a stage change on resume is a layout change like any other.)"""
    run = ["train.max_steps=4", "checkpoint.every=2", "train.eval_every=1000", "data.seq_len=64", "train.warmup_steps=1",
           "parallel.ep=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = finetune(2, full, run + ["deepspeed=configs/deepspeed/zero3.json"])
    assert result.returncode == 0, output_of(result)[-4000:]
    step2 = full / "checkpoints" / "step_000002"
    result = finetune(2, resumed, run + ["deepspeed=configs/deepspeed/zero3.json", f"checkpoint.resume={step2}"])
    assert result.returncode == 0, output_of(result)[-4000:]
    assert "resumed from" in output_of(result) and "optimizer state restarts" not in output_of(result)
    assert [(m["step"], m["loss"]) for m in metrics(resumed)] == [(m["step"], m["loss"]) for m in metrics(full)[2:]]
    for key, value in final_state(full, 4).items():
        torch.testing.assert_close(final_state(resumed, 4)[key], value, atol=0, rtol=0, msg=key)


def test_output_dir_of_another_run_is_refused_before_anything_is_written(uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    fresh = finetune(2, uninterrupted, SHORT)
    assert fresh.returncode != 0
    assert output_of(fresh).count("already holds checkpoints of a run") >= 2  # every rank says why
    other = finetune(2, uninterrupted, SHORT + ["checkpoint.resume=auto", "moe.num_experts=8"])
    assert other.returncode != 0
    assert output_of(other).count("moe.num_experts: 4 → 8") >= 2
    assert (uninterrupted / "metrics.jsonl").read_text() == before
    assert (uninterrupted / "checkpoints" / "latest").read_text() == "step_000008"


def test_bad_config_fails_on_every_rank_before_any_step(tmp_path):
    """A layout the world cannot hold (ep=4 on 2 ranks): one config-error line from each rank, no traceback,
    nothing written, and fast (the ranks do not wait on each other for a collective timeout)."""
    started = time.monotonic()
    result = finetune(2, tmp_path, ["parallel.ep=4"], timeout_s=120, launcher=True)
    assert result.returncode != 0
    assert output_of(result).count("finetune: config error: ep*etp = 4*1 = 4 does not divide") == 2, \
        output_of(result)[-3000:]
    assert "Traceback" not in output_of(result)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert time.monotonic() - started < 120


def test_accelerate_launch_with_deepspeed_plugin(tmp_path):
    from switchyard.parallel.ports import free_port

    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(REPO_ROOT / "configs/accelerate/deepspeed_zero2.yaml"),
               "--main_process_port", str(free_port()),
               str(REPO_ROOT / "launch/finetune.py"), "--config", CONFIG, f"output_dir={tmp_path}",
               "train.max_steps=2", "data.seq_len=64", "checkpoint.every=1000", "train.cuda_graph=true"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env=script_environ(None))
    assert result.returncode == 0, output_of(result)[-4000:]
    # train.cuda_graph reaches the MoE layers; they say why they run eagerly (ep=2 on GPUs: no graphs yet)
    why = "ep=2" if torch.cuda.is_available() else "input not on CUDA"
    assert f"MoE layer cuda_graph: running eagerly ({why})" in output_of(result)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "checkpoints" / "step_000002" / "COMPLETE").is_file()
