"""Where an export may write: a new or empty directory, or an earlier export (its config.json carries the
``switchyard_export`` mark). Any other directory is refused before anything is written or deleted, even one holding
a model of the very model_type being exported: the model an adopted Mixtral / Qwen3-MoE came from, or any downloaded
one. Oracle: transformers' own classes load the refused directory afterwards, byte for byte as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
from switchyard.cli import main
from switchyard.hf.export import check_export
from tiny_models import build, build_moe, ids


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_an_adopted_model_is_not_exported_over_the_model_it_came_from_or_another_of_its_type(model_type, tmp_path,
                                                                                            capsys):
    source, other, ckpt = tmp_path / "source", tmp_path / "other", tmp_path / "ckpt"
    build_moe(model_type).save_pretrained(source)
    build_moe(model_type, hidden_size=64).save_pretrained(other)  # a downloaded model of the same type
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source).eval()(ids()).logits
    model = sy.patch_model(AutoModelForCausalLM.from_pretrained(source))
    sy.save_pretrained(model, ckpt)
    for out in (source, other):
        before = files(out)
        with pytest.raises(ValueError, match=rf"{out.name} holds a {model_type} model that is no switchyard export"):
            sy.export_hf(model, out)
        assert main(["export", "--model", str(ckpt), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out} holds a {model_type} model that is no switchyard export" in err
        assert "export into a new or empty directory" in err
        assert files(out) == before
    with torch.no_grad():  # the source still loads in transformers as the same model
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(source).eval()(ids()).logits, want)


def test_an_export_is_marked_and_only_a_marked_export_is_replaced(tmp_path):
    """Re-exporting over an earlier export works; one without the mark (an older switchyard's) is refused, naming
    the way on: delete it or choose another directory."""
    out = tmp_path / "hf"
    first = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    sy.export_hf(first, out)
    config = json.loads((out / "config.json").read_text())
    assert config["switchyard_export"] == {"version": 1, "from": "llama"} and config["model_type"] == "mixtral"

    second = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=1))
    sy.export_hf(second, out)  # the earlier export is replaced
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids()).logits,
                                   second(ids()).logits, atol=1e-5, rtol=1e-5)

    del config["switchyard_export"]
    (out / "config.json").write_text(json.dumps(config))
    before = files(out)
    with pytest.raises(ValueError, match=rf"no switchyard export .*: delete {out} first, or choose another directory"):
        sy.export_hf(first, out)
    assert files(out) == before


def test_a_non_empty_directory_without_a_config_is_refused_untouched(tmp_path):
    """Its shard and index were deleted and model.safetensors overwritten."""
    out = tmp_path / "weights"
    out.mkdir()
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text(f"the user's {name}")
    before = files(out)
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"weights is not empty \(model-00001-of-00002.safetensors, model.safetensors, "
                                         r"model.safetensors.index.json\) and holds no earlier export"):
        sy.export_hf(model, out)
    assert files(out) == before


def test_an_empty_path_is_refused_not_taken_for_the_working_directory(tmp_path, monkeypatch, capsys):
    """`--out "$OUT"` with $OUT unset wrote the export into the working directory ("wrote .")."""
    monkeypatch.chdir(tmp_path)
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"the export path is empty \(''; an unset variable\?\)"):
        sy.export_hf(model, "")
    ckpt = tmp_path / "ckpt"
    sy.save_pretrained(model, ckpt)
    with pytest.raises(ValueError, match=r"the export path is empty"):
        check_export(ckpt, "")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(ckpt), "--out", ""])
    assert exit_.value.code == 2
    assert "argument --out: the path is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
