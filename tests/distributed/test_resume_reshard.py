"""A fine-tune checkpoint saved by 2 ep ranks, resumed at ep=1: every expert's weights land at their global
expert index (checked against the saved safetensors and the values each rank held), and a corrupt RNG file on
one rank fails the resume on every rank instead of leaving the other to hang in the first step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

EXPERTS = 4


def _marked(groups):
    """A tiny upcycled llama whose expert tensors hold ``100·layer + global expert id`` (and the id's sign flipped
    in ``down_proj``), so any permutation or cross-layer mix-up shows in the values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy
    from switchyard.hf.patch import moe_layers

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=32, max_position_embeddings=16,
                                  intermediate_size=24)
    model = sy.patch_model(AutoModelForCausalLM.from_config(config), sy.MoEConfig(num_experts=EXPERTS, top_k=2), groups)
    with torch.no_grad():
        for index, layer in enumerate(moe_layers(model)):
            for local, global_id in enumerate(layer.local_expert_ids):
                layer.experts.gate_up_proj[local].fill_(100 * index + global_id)
                layer.experts.down_proj[local].fill_(-(100 * index + global_id))
    return model


class _Engine:
    """What save_checkpoint reads from a DeepSpeed engine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.lr_scheduler = None
        self.global_steps = self.global_samples = self.micro_steps = 0


def _save_at_ep2_then_load_a_corrupt_rng(root: str) -> tuple[list[int], str]:
    import switchyard as sy
    from switchyard.hf.patch import moe_layers
    from switchyard.train import checkpointing

    groups = sy.ProcessGroupManager(ep=2)
    model = _marked(groups)
    final = checkpointing.save_checkpoint(_Engine(model), model, None, groups, Path(root), 3,
                                          {"world_size": 2, "ep": 2, "config": {}}, keep=2)
    if dist.get_rank() == 1:
        (final / "rng" / "rank00001.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    dist.barrier()
    ids = moe_layers(model)[0].local_expert_ids
    try:
        checkpointing.load_rng(final / "rng", dist.get_rank())
    except ValueError as err:
        return ids, str(err)
    return ids, "no error"


def test_an_ep2_checkpoint_resumed_at_ep1_puts_every_expert_at_its_index(tmp_path):
    from safetensors import safe_open

    import switchyard as sy
    from switchyard.hf.checkpoint import moe_prefixes

    results = run_on_ranks(_save_at_ep2_then_load_a_corrupt_rng, 2, str(tmp_path), timeout_s=90)
    assert [ids for ids, _ in results] == [[0, 1], [2, 3]]
    assert all("rank00001.safetensors" in err for _, err in results), results  # rank 0 too: no hang
    assert "failed on rank 1" in results[0][1]

    model_dir = tmp_path / "step_000003" / "model"
    index = json.loads((model_dir / "switchyard.safetensors.index.json").read_text())["weight_map"]
    loaded = sy.from_pretrained(model_dir)  # ep=1, as load_model reads a checkpoint at another layout
    prefixes = moe_prefixes(loaded)
    assert len(prefixes) == 2
    for index_of_layer, prefix in enumerate(prefixes):
        layer = loaded.get_submodule(prefix)
        assert layer.local_expert_ids == list(range(EXPERTS))
        for global_id in range(EXPERTS):
            for name, sign in (("gate_up_proj", 1), ("down_proj", -1)):
                key = f"{prefix}.experts.{global_id}.{name}"
                with safe_open(str(model_dir / index[key]), "pt") as f:
                    saved = f.get_tensor(key)
                held = getattr(layer.experts, name)[global_id]
                torch.testing.assert_close(held, saved, rtol=0, atol=0, msg=key)
                assert torch.all(held == sign * (100 * index_of_layer + global_id)), key
