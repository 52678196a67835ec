"""The fine-tune loop's checkpoints on 2 gloo ranks: saving a step again (after resuming from an earlier one)
keeps the old directory until the new one is complete, and a save or resume failing on one rank fails on
every rank."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed


class _Engine:
    """What save_checkpoint reads from a DeepSpeed engine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.lr_scheduler = None
        self.global_steps = self.global_samples = self.micro_steps = 0


def _model(groups, scale: float):
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, intermediate_size=48)
    model = sy.patch_model(AutoModelForCausalLM.from_config(config), sy.MoEConfig(num_experts=4, top_k=2), groups)
    with torch.no_grad():
        model.model.norm.weight.fill_(scale)  # tells the two saves apart
    return model


def _resave_and_resume_fail_on_rank1(root: str) -> list[str]:
    from pathlib import Path

    import switchyard as sy
    from switchyard.train import checkpointing

    root_path, groups = Path(root), sy.ProcessGroupManager(ep=2)
    first = _model(groups, 1.0)
    checkpointing.save_checkpoint(_Engine(first), first, None, groups, root_path, 5, {"ep": 2}, keep=2)
    real = checkpointing.save_rng

    def full_disk(path, rank):
        if rank == 1:
            raise OSError(28, "No space left on device")
        real(path, rank)

    checkpointing.save_rng = full_disk
    second = _model(groups, 2.0)
    errors = []
    try:
        checkpointing.save_checkpoint(_Engine(second), second, None, groups, root_path, 5, {"ep": 2}, keep=2)
    except Exception as err:  # noqa: BLE001
        errors.append(str(err))
    if dist.get_rank() == 1:
        (root_path / "step_000005" / "engine" / "rank00001.pt").rename(root_path / "elsewhere.pt")
    dist.barrier()
    engine = _Engine(first)
    engine.zero_optimization_stage = lambda: 0
    try:  # only rank 1's file is missing: rank 0 must not go on to train alone
        checkpointing.load_engine_state(engine, root_path / "step_000005" / "engine", dist.get_rank(), 0, 1)
    except Exception as err:  # noqa: BLE001
        errors.append(str(err))
    if dist.get_rank() == 1:
        (root_path / "elsewhere.pt").rename(root_path / "step_000005" / "engine" / "rank00001.pt")
    return errors


def test_a_failed_resave_keeps_the_step_and_failures_reach_every_rank(tmp_path):
    from safetensors import safe_open

    from switchyard.train import checkpointing

    root = tmp_path / "checkpoints"
    errors = run_on_ranks(_resave_and_resume_fail_on_rank1, 2, str(root), timeout_s=90)
    assert all(len(e) == 2 and "No space left on device" in e[0] for e in errors), errors
    assert all("rank00001.pt" in e[1] for e in errors) and "failed on rank 1" in errors[0][1], errors
    point = checkpointing.find_resume(root, "auto")
    assert point is not None and point.path.name == "step_000005" and point.step == 5
    model_dir = point.path / "model"
    index = json.loads((model_dir / "switchyard.safetensors.index.json").read_text())
    with safe_open(str(model_dir / index["weight_map"]["model.norm.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(32))  # the first save's weights
