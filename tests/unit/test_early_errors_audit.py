"""Errors that used to come late: `switchyard export` of a layout its target cannot hold was refused only after the
whole checkpoint was loaded (and after the "no tokenizer files" note); launch/finetune.py with a hub id it cannot
fetch ended in an OSError traceback on every rank. Each is now one line naming the value and the fix, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
from harness import REPO_ROOT, run_script
from switchyard.cli import main
from tiny_models import build, ids

NO_SUCH_REPO = "switchyard-audit/no-such-repo-4b1c"  # never fetched: HF_HUB_OFFLINE=1 reads the (empty) cache only


def _error_lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


def test_export_refuses_dense_layers_for_mixtral_from_config_json_alone(tmp_path, capsys):
    """llama upcycled with every_n=2 (layers 1 and 3 dense) has no Mixtral layout: refused naming the layers and the
    families that keep dense layers, with no tokenizer note first; with the weight files gone the refusal is the
    same, so no weight was read to find it."""
    moe, out = tmp_path / "moe", tmp_path / "hf"
    sy.save_pretrained(sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2),
                                      every_n=2), moe)  # no tokenizer beside it
    lines = []
    for weights_left in (True, False):
        if not weights_left:
            for shard in moe.glob("*.safetensors"):
                shard.unlink()
        capsys.readouterr()
        assert main(["export", "--model", str(moe), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "no tokenizer files" not in err, err
        [line] = _error_lines(err, "switchyard export: error:")
        lines.append(line)
    assert lines[0] == lines[1]
    assert "cannot export llama to MixtralForCausalLM: layers [1, 3] of 4 stayed dense" in lines[0]
    assert "Qwen2-MoE and Qwen3-MoE, by mlp_only_layers" in lines[0]
    assert not out.exists()


def test_export_of_a_mixed_layout_its_target_holds_still_works(tmp_path, capsys):
    """qwen2 upcycled with every_n=2 → Qwen2-MoE's mlp_only_layers, same logits; the tokenizer note comes after."""
    model = build("qwen2", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), every_n=2)
    with torch.no_grad():
        want = model(ids()).logits
    moe, out = tmp_path / "moe", tmp_path / "hf"
    sy.save_pretrained(model, moe)
    assert main(["export", "--model", str(moe), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "has no tokenizer files" in captured.err
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [1, 3]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["model.source", "model.tokenizer"])
def test_finetune_hub_id_it_cannot_fetch_is_one_line(key, tmp_path):
    """Before: train() built the groups (and the tiny model), then every rank's tokenizer load raised OSError."""
    result = run_script(REPO_ROOT / "launch" / "finetune.py",
                        ["--config", "configs/finetune/tiny.yaml", "parallel.ep=1", f"output_dir={tmp_path / 'run'}",
                         f"{key}={NO_SUCH_REPO}"],
                        timeout_s=120, env={"HF_HUB_OFFLINE": "1", "SWITCHYARD_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = _error_lines(result.stderr, "finetune: error:")
    assert f"{key}='{NO_SUCH_REPO}' is not a local directory nor in the hub cache" in line
    assert f"point {key} at a local model directory" in line and "HF_HUB_OFFLINE" in line
