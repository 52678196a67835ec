"""A switchyard checkpoint is not loadable by plain transformers, which used to load it silently wrong; checkpoints
written under the old index name still load, and a save over one leaves no stale transformers index behind.

Oracle: transformers' own ``AutoModelForCausalLM.from_pretrained`` — it followed our ``model.safetensors.index.json``
into our shards, built the dense model, reported the experts as UNEXPECTED and the FFNs as MISSING, initialised those
afresh and returned without an error (logits off by ~0.2 on a tiny model).

    python -m pytest -q tests/unit/test_checkpoint_index_name.py
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
from switchyard.hf.checkpoint import INDEX_NAME, LEGACY_INDEX_NAME
from tiny_models import build, ids


def upcycled() -> torch.nn.Module:
    model = build("llama", intermediate_size=48)
    return sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, init="drop_upcycle"))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def test_plain_transformers_refuses_a_switchyard_checkpoint(tmp_path):
    sy.save_pretrained(upcycled(), tmp_path)
    assert (tmp_path / INDEX_NAME).is_file() and not (tmp_path / LEGACY_INDEX_NAME).exists()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_checkpoint_with_the_old_index_name_loads_and_a_save_over_it_drops_that_index(tmp_path):
    model = upcycled()
    want = logits(model)
    sy.save_pretrained(model, tmp_path)
    (tmp_path / INDEX_NAME).rename(tmp_path / LEGACY_INDEX_NAME)  # as saved before the rename
    loaded = sy.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), want, atol=1e-6, rtol=1e-6)
    sy.save_pretrained(loaded, tmp_path)
    assert (tmp_path / INDEX_NAME).is_file() and not (tmp_path / LEGACY_INDEX_NAME).exists()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
