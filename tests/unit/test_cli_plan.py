"""`switchyard plan`: parameters and model-state memory per rank, from config.json alone (meta device).

Oracles: transformers' own Mixtral-8x7B (its parameter count on the meta device; Mistral's published
46.7B total / 12.9B active per token) and the FFN arithmetic of the config. ``--tp``'s per-rank counts are checked
against real tensor-parallel ranks in tests/distributed/test_plan_tensor_parallel.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from switchyard.cli import main

GIB = 1 << 30


def plan(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mixtral_8x7b_matches_transformers_and_the_published_counts(tmp_path, capsys):
    config = AutoConfig.for_model("mixtral")  # transformers' defaults are Mixtral-8x7B's
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    got = plan(capsys, "--model", str(tmp_path), "--world", "16", "--ep", "8")
    one_expert = 3 * config.hidden_size * config.intermediate_size
    experts = one_expert * config.num_local_experts * config.num_hidden_layers
    assert got["params_total"] == total and round(total / 1e9, 1) == 46.7
    assert round(got["params_active_per_token"] / 1e9, 1) == 12.9
    assert got["params_experts"] == experts and got["params_dense"] == total - experts
    assert (got["dp"], got["edp"], got["experts_per_rank"]) == (16, 2, 1)
    assert got["params_per_rank"] == total - experts + experts // 8
    per_rank_dense, per_rank_experts = total - experts, experts // 8
    # bf16 Adam (ZeRO paper): 2 + 2 + 12 bytes a parameter; ZeRO-1 shards the 12 over dp / edp, ZeRO-2 also the 2
    zero0 = (per_rank_dense + per_rank_experts) * 16 / GIB
    zero2 = (per_rank_dense * (2 + 14 / 16) + per_rank_experts * (2 + 14 / 2)) / GIB
    assert got["model_states_gib_per_rank"]["zero0"] == pytest.approx(zero0, abs=1e-3)
    assert got["model_states_gib_per_rank"]["zero2"] == pytest.approx(zero2, abs=1e-3)


def test_a_dense_model_is_planned_as_upcycled_and_mistakes_are_errors(tmp_path, capsys):
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                  num_attention_heads=4, vocab_size=128)
    config.save_pretrained(tmp_path / "dense")
    got = plan(capsys, "--model", str(tmp_path / "dense"), "--num-experts", "4", "--every-n", "2",
               "--world", "4", "--ep", "2", "--precision", "fp32")
    experts = 3 * 64 * 96 * 4 * 2  # 4 experts in layers 0 and 2
    assert (got["moe_layers"], got["params_experts"], got["experts_per_rank"]) == (2, experts, 2)
    assert got["params_active_per_token"] == got["params_dense"] + experts // 2  # top-2 of 4
    assert got["model_states_gib_per_rank"]["zero0"] == pytest.approx(got["params_per_rank"] * 16 / GIB, abs=1e-3)

    for argv, message in (
        (["--world", "4"], "no MoE blocks to adopt: to plan a dense model upcycled, pass --num-experts"),
        (["--num-experts", "6", "--world", "8", "--ep", "4"], "num_experts=6 is not divisible by ep=4"),
        (["--num-experts", "4", "--world", "4", "--ep", "3"], "ep*etp = 3*1 = 3 does not divide"),
    ):
        assert main(["plan", "--model", str(tmp_path / "dense"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_a_switchyard_checkpoint_is_planned_as_recorded(tmp_path, capsys):
    import switchyard as sy
    from tiny_models import build

    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=1), layers=[1, 3])
    sy.save_pretrained(model, tmp_path / "ckpt")
    got = plan(capsys, "--model", str(tmp_path / "ckpt"), "--world", "2", "--ep", "2")
    assert got["params_total"] == sum(p.numel() for p in model.parameters())
    assert (got["moe_layers"], got["params_experts"]) == (2, 3 * 32 * 48 * 4 * 2)
    assert main(["plan", "--model", str(tmp_path / "ckpt"), "--num-experts", "8", "--world", "2"]) == 2
    assert "already MoE" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "ckpt"), "--world", "2", "--ep", "2"]) == 0
    assert "each rank holds 2 experts per layer" in capsys.readouterr().out


def test_tp_splits_what_tensor_parallelism_shards_and_is_refused_as_the_launcher_refuses_it(tmp_path, capsys):
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                  num_attention_heads=4, vocab_size=128)
    config.save_pretrained(tmp_path / "dense")
    upcycled = ["--model", str(tmp_path / "dense"), "--num-experts", "4"]
    got = plan(capsys, *upcycled, "--world", "8", "--tp", "2", "--ep", "2", "--precision", "fp32")
    assert (got["tp"], got["dp"], got["edp"], got["experts_per_rank"]) == (2, 4, 2, 2)
    # per layer: q/k/v/o split over tp, both norms and the router whole; the 4 experts split over ep, then tp
    dense_rank = 2 * 128 * 64 + 64 + 4 * (4 * 64 * 64 // 2 + 2 * 64 + 4 * 64)
    expert_rank = 4 * 3 * 64 * 96 * 4 // 2 // 2
    assert got["params_per_rank"] == dense_rank + expert_rank
    assert got["params_total"] == plan(capsys, *upcycled, "--world", "8")["params_total"]  # the model is the same
    zero2 = (dense_rank * (4 + 12 / 4) + expert_rank * (4 + 12 / 2)) / GIB  # fp32: 4 + 4 + 8 bytes; dp 4, edp 2
    assert got["model_states_gib_per_rank"]["zero2"] == pytest.approx(zero2, abs=1e-3)
    assert plan(capsys, *upcycled, "--world", "2")["tp"] == 1
    # etp = 1: the experts stay whole on each rank (tokens split instead); the EP group spans the tp ranks
    whole = plan(capsys, *upcycled, "--world", "8", "--tp", "2", "--etp", "1", "--ep", "2", "--precision", "fp32")
    assert (whole["etp"], whole["dp"], whole["edp"]) == (1, 4, 4)
    assert whole["params_per_rank"] == dense_rank + 2 * expert_rank

    assert main(["plan", *upcycled, "--world", "8", "--tp", "2", "--ep", "2"]) == 0
    assert "world 8, tp=2, ep=2: dp=4 for the dense weights, edp=2 for each expert; each rank holds 2 experts per " \
           "layer (1/2 of each one's FFN width)" in capsys.readouterr().out

    AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=96).save_pretrained(tmp_path / "gpt2")
    for model, argv, message in (  # the messages ParallelConfig and apply_tensor_parallel give the launcher
        ("dense", ["--world", "8", "--tp", "3"], "world size 8 is not divisible by tp*pp = 3*1 = 3"),
        ("dense", ["--world", "4", "--tp", "2", "--ep", "4"], "ep*etp = 4*2 = 8 does not divide tp*dp = 2*2 = 4"),
        ("dense", ["--world", "8", "--tp", "8"],
         "tp=8 must divide num_attention_heads=4 and num_key_value_heads=4 (each tp rank holds whole heads); "
         "choose tp in [1, 2, 4]"),
        ("gpt2", ["--world", "2", "--tp", "2"], "GPT2LMHeadModel has no config.base_model_tp_plan: tensor "
                                                "parallelism (tp=2) needs a transformers model class"),
    ):
        assert main(["plan", "--model", str(tmp_path / model), "--num-experts", "4", *argv, "--json"]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and f"switchyard plan: error: {message}" in err, err
