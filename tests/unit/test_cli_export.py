"""`switchyard export` in process: sharded output with an index, and `--out` naming the dense source refused
with the directory left as it was; bad `--max-shard-size` / upcycle `--out` refused before any model is read."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
from switchyard.cli import main
from switchyard.hf.patch import moe_layers
from tiny_models import build, ids


def test_export_writes_shards_and_refuses_the_dense_source_as_out(tmp_path, capsys):
    dense, moe, hf = tmp_path / "dense", tmp_path / "moe", tmp_path / "hf"
    build("llama", intermediate_size=48).save_pretrained(dense)
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2,
                                                                              init="drop_upcycle"))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(50)
        want = model(ids()).logits
    sy.save_pretrained(model, moe)

    assert main(["export", "--model", str(moe), "--out", str(hf), "--max-shard-size", "40KB"]) == 0
    shards = set(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and not (hf / "model.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(hf).eval()(ids()).logits, want,
                                   atol=1e-5, rtol=1e-5)

    before = {p.name: p.read_bytes() for p in dense.iterdir()}
    capsys.readouterr()
    assert main(["export", "--model", str(moe), "--out", str(dense)]) == 2
    assert "switchyard export: error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dense.iterdir()} == before


def test_a_bad_shard_size_is_refused_naming_it_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: before the checkpoint (not there at all) is read
        main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf"),
              "--max-shard-size", "lots"])
    assert "argument --max-shard-size: max_shard_size='lots' is not a size like '2GB'" in capsys.readouterr().err
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"max_shard_size='lots' is not a size"):
        sy.export_hf(model, tmp_path / "hf", max_shard_size="lots")
    assert not (tmp_path / "hf").exists()


def test_upcycle_refuses_its_out_before_reading_the_model(tmp_path, capsys):
    """A model of many GB was loaded and patched before save_pretrained refused `--out` (here: another model's dir;
    the missing `--model` shows nothing was read)."""
    other = tmp_path / "other"
    build("llama").save_pretrained(other)
    assert main(["upcycle", "--model", str(tmp_path / "nowhere"), "--num-experts", "4", "--top-k", "2",
                 "--out", str(other)]) == 2
    assert f"{other} holds another model" in capsys.readouterr().err
