"""`switchyard upcycle` then `switchyard export` as a user runs them, on a tiny llama + tokenizer saved by
transformers; the exported dir loads with transformers alone and matches the switchyard checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from harness import REPO_ROOT

TEXTS = ["the yard switches trains", "experts route the tokens", "a dense model becomes sparse"]


def _tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained offline on three sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _dense_dir(path: Path) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, intermediate_size=48)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "switchyard.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_upcycle_then_export_loads_in_transformers(tmp_path):
    import switchyard as sy

    dense = _dense_dir(tmp_path / "dense")
    moe, hf = tmp_path / "moe", tmp_path / "hf"
    run = _cli("upcycle", "--model", str(dense), "--num-experts", "4", "--top-k", "2", "--init", "drop_upcycle",
               "--seed", "1", "--out", str(moe))
    assert run.returncode == 0, run.stderr
    record = json.loads((moe / "config.json").read_text())["switchyard"]
    assert record["moe"]["num_experts"] == 4 and record["moe"]["init"] == "drop_upcycle" and record["seed"] == 1
    assert (moe / "tokenizer.json").is_file() and (moe / "switchyard.safetensors.index.json").is_file()

    run = _cli("export", "--model", str(moe), "--out", str(hf))
    assert run.returncode == 0, run.stderr
    assert json.loads((hf / "config.json").read_text())["model_type"] == "mixtral"

    tokenizer = AutoTokenizer.from_pretrained(hf)
    x = tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    exported = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(exported).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, sy.from_pretrained(moe)(x).logits, atol=1e-5, rtol=1e-5)


def test_cli_errors_name_the_command_and_exit_2(tmp_path, capsys):
    from switchyard.cli import main

    dense = _dense_dir(tmp_path / "dense")
    assert main(["export", "--model", str(dense), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "switchyard export: error:" in err and "not a switchyard checkpoint" in err
    assert main(["upcycle", "--model", str(dense), "--num-experts", "4", "--top-k", "8", "--out", str(tmp_path / "m")]) == 2
    assert "switchyard upcycle: error: top_k=8 exceeds num_experts=4" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")]) == 2
    assert "switchyard export: error:" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "hf").exists()


def test_writing_over_the_input_directory_is_refused(tmp_path, capsys):
    """`--out` = `--model` must leave the user's model as it was, for upcycle and export alike."""
    from switchyard.cli import main

    dense = _dense_dir(tmp_path / "dense")
    before = {p.name: p.read_bytes() for p in dense.iterdir()}
    assert main(["upcycle", "--model", str(dense), "--num-experts", "4", "--top-k", "2", "--out", str(dense)]) == 2
    assert "switchyard upcycle: error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dense.iterdir()} == before
    moe = tmp_path / "moe"
    assert main(["upcycle", "--model", str(dense), "--num-experts", "4", "--top-k", "2", "--out", str(moe)]) == 0
    saved = {p.name: p.read_bytes() for p in moe.iterdir()}
    assert main(["export", "--model", str(moe), "--out", str(moe)]) == 2
    assert "switchyard export: error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in moe.iterdir()} == saved


def test_upcycling_a_model_without_a_tokenizer_says_so(tmp_path):
    dense = _dense_dir(tmp_path / "dense")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dense / name).unlink(missing_ok=True)
    run = _cli("upcycle", "--model", str(dense), "--num-experts", "4", "--top-k", "2", "--out", str(tmp_path / "moe"))
    assert run.returncode == 0, run.stderr
    assert "has no tokenizer files" in run.stderr and not (tmp_path / "moe" / "tokenizer.json").exists()
