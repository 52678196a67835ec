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

    # name-based selection, as moe.targets / moe.exclude / moe.adapter: layers 1 and 3 left
    got = plan(capsys, "--model", str(tmp_path / "dense"), "--num-experts", "4", "--targets", "re:.*\\.mlp",
               "--adapter", "llama", "--exclude", "model.layers.0.mlp", "model.layers.2.mlp", "--world", "1")
    assert (got["moe_layers"], got["params_experts"]) == (2, experts)

    for argv, message in (
        (["--world", "4"], "no MoE blocks to adopt: to plan a dense model upcycled, pass --num-experts"),
        (["--exclude", "model.layers.0.mlp", "--world", "4"], "--exclude choose the layers to upcycle: pass --num-exp"),
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
    out = capsys.readouterr().out
    assert "each rank holds 2 experts per layer" in out
    assert "host_load_gib" not in got and "host memory to load" not in out  # read by share, never whole


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


# --pp: hand counts of the tiny llama below (hidden 64, FFN 96, 4 heads, vocab 128, 4 layers, each upcycled to 4
# experts): a decoder layer's dense part is q/k/v/o, two norms and the router; each expert is gate/up/down
ATTENTION, NORMS, ROUTER, EXPERT = 4 * 64 * 64, 2 * 64, 4 * 64, 3 * 64 * 96
EMBEDDING = HEAD = 128 * 64
FINAL_NORM = 64


def _tiny_llama(path, **fields) -> list[str]:
    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=128, **fields).save_pretrained(path)
    return ["--model", str(path), "--num-experts", "4"]


def test_pp_counts_the_heaviest_stage_embedding_first_head_last(tmp_path, capsys):
    upcycled = _tiny_llama(tmp_path / "dense")
    got = plan(capsys, *upcycled, "--world", "4", "--pp", "2", "--ep", "2", "--precision", "fp32")
    # 4 ranks, 2 stages: dp = 4 / 2 = 2 ranks per stage; edp = 2 / ep 2 = 1
    assert (got["pp"], got["dp"], got["edp"], got["experts_per_rank"]) == (2, 2, 1, 2)
    layer_dense, layer_experts_rank = ATTENTION + NORMS + ROUTER, 4 * EXPERT // 2  # 2 of the 4 experts per rank
    stage0 = EMBEDDING + 2 * (layer_dense + layer_experts_rank)
    stage1 = 2 * (layer_dense + layer_experts_rank) + FINAL_NORM + HEAD
    assert [(s["stage"], s["layers"], s["params_per_rank"]) for s in got["stages"]] == [
        (0, [0, 1], stage0), (1, [2, 3], stage1)]
    assert (got["heaviest_stage"], got["params_per_rank"]) == (1, stage1)  # the final norm tips it
    dense1, experts1 = stage1 - 2 * layer_experts_rank, 2 * layer_experts_rank
    zero2 = (dense1 * (4 + 12 / 2) + experts1 * (4 + 12 / 1)) / GIB  # fp32: 4 + 4 + 8 bytes; dp 2, edp 1
    assert got["model_states_gib_per_rank"] == got["stages"][1]["model_states_gib_per_rank"]
    assert got["model_states_gib_per_rank"]["zero2"] == pytest.approx(zero2, abs=1e-3)
    whole = plan(capsys, *upcycled, "--world", "4", "--ep", "2", "--precision", "fp32")
    assert got["params_total"] == whole["params_total"]  # the model is the same, only split
    assert set(whole) == set(got) - {"pp", "heaviest_stage", "stages"}  # pp=1 prints what it printed before --pp

    # a tied head: the last stage holds a copy as a buffer, not a parameter, which the pipeline fills from the first
    # stage and gives a gradient; it was left out, and the first stage named the heaviest
    vocab = 1 << 16  # a head big enough to show in GiB rounded to 3 places (the model is built on meta: no memory)
    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=vocab, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    tied = plan(capsys, "--model", str(tmp_path / "tied"), "--num-experts", "4", "--world", "2", "--pp", "2",
                "--precision", "fp32")
    layer, head = ATTENTION + NORMS + ROUTER + 4 * EXPERT, vocab * 64
    assert [s["params_per_rank"] for s in tied["stages"]] == [head + 2 * layer, 2 * layer + FINAL_NORM]
    assert [s.get("tied_head_copy_per_rank") for s in tied["stages"]] == [None, head]
    assert (tied["heaviest_stage"], tied["dp"], tied["edp"]) == (1, 1, 1)  # by 64 elements: the final norm
    zero0 = ((2 * layer + FINAL_NORM) * (4 + 4 + 8) + head * (4 + 4)) / GIB  # the copy: a weight and its gradient
    assert head * 8 / GIB > 0.03 and tied["model_states_gib_per_rank"]["zero0"] == pytest.approx(zero0, abs=1e-3)
    assert tied["params_total"] == head + 4 * layer + FINAL_NORM  # the tied weight counted once


def test_pp_is_refused_as_the_launcher_refuses_it(tmp_path, capsys):
    upcycled = _tiny_llama(tmp_path / "dense")
    AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=96).save_pretrained(tmp_path / "gpt2")
    for model, argv, message in (
        (upcycled, ["--world", "5", "--pp", "5"], "parallel.pp=5 but the model has 4 decoder layers; every pipeline "
                                                  "stage needs at least one: use parallel.pp ≤ 4"),
        (upcycled, ["--world", "8", "--pp", "3"], "world size 8 is not divisible by tp*pp = 1*3 = 3"),
        (["--model", str(tmp_path / "gpt2"), "--num-experts", "4"], ["--world", "2", "--pp", "2"],
         "parallel.pp=2: pipeline stages are implemented for model types"),
    ):
        assert main(["plan", *model, *argv, "--json"]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and f"switchyard plan: error: {message}" in err, err


def test_pp_with_tp_and_ep_takes_dp_and_edp_from_rank_layout(tmp_path, capsys):
    from switchyard.parallel import rank_layout

    upcycled = _tiny_llama(tmp_path / "dense")
    degrees = ["--world", "16", "--tp", "2", "--pp", "2", "--ep", "2"]
    got = plan(capsys, *upcycled, *degrees)
    layout = rank_layout(16, tp=2, pp=2, ep=2)
    assert (got["dp"], got["edp"]) == (len(layout["dp"][0]), len(layout["edp"][0])) == (4, 2)  # 16/(2·2), 16/(2·2·2)
    # per rank: q/k/v/o split over tp, norms, router, embedding and head whole; 2 experts per rank, each split over tp
    layer = ATTENTION // 2 + NORMS + ROUTER + 4 * EXPERT // 2 // 2
    assert [s["params_per_rank"] for s in got["stages"]] == [EMBEDDING + 2 * layer, 2 * layer + FINAL_NORM + HEAD]
    whole_experts = plan(capsys, *upcycled, *degrees, "--etp", "1")
    layout = rank_layout(16, tp=2, pp=2, ep=2, etp=1)
    assert (whole_experts["dp"], whole_experts["edp"]) == (len(layout["dp"][0]), len(layout["edp"][0])) == (4, 4)

    assert main(["plan", *upcycled, *degrees]) == 0
    out = capsys.readouterr().out
    assert ("world 16, tp=2, pp=2, ep=2: dp=4 for the dense weights, edp=2 for each expert; each rank holds 2 "
            f"experts per layer (1/2 of each one's FFN width) and {(2 * layer + FINAL_NORM + HEAD) / 1e6:.2f}M "
            "parameters in the heaviest pipeline stage, stage 1") in out
    assert "stage 0 (decoder layers 0–1, input embedding)" in out
    assert "stage 1 (decoder layers 2–3, final norm and LM head)" in out
    assert "model states per rank of stage 1 (bf16" in out


def test_pp_layers_chooses_each_stages_layers(tmp_path, capsys):
    """--pp-layers (parallel.pp_layers): one layer on the first stage, with the embedding; three with the head."""
    upcycled = _tiny_llama(tmp_path / "dense")
    got = plan(capsys, *upcycled, "--world", "2", "--pp", "2", "--pp-layers", "1", "3")
    layer = ATTENTION + NORMS + ROUTER + 4 * EXPERT
    assert [(s["layers"], s["params_per_rank"]) for s in got["stages"]] == [
        ([0], EMBEDDING + layer), ([1, 2, 3], 3 * layer + FINAL_NORM + HEAD)]
    for argv, message in ((["--pp-layers", "2", "1"], "parallel.pp_layers=[2, 1] must give each of the 2 pipeline "
                                                       "stages at least one decoder layer and sum to the model's 4"),
                          (["--pp-layers", "4"], "--pp-layers 4 gives 1 stages' layer counts for --pp 2")):
        assert main(["plan", *upcycled, "--world", "2", "--pp", "2", *argv, "--json"]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and f"switchyard plan: error: {message}" in err, err


def test_an_hf_source_shows_the_host_memory_of_its_load(tmp_path, capsys):
    """Each loading rank holds the dense model whole at the training precision, then keeps its share."""
    upcycled = _tiny_llama(tmp_path / "dense")
    dense = EMBEDDING + HEAD + 4 * (ATTENTION + 2 * 64 + 3 * 64 * 96) + FINAL_NORM
    for precision, itemsize in (("fp32", 4), ("bf16", 2)):
        got = plan(capsys, *upcycled, "--world", "4", "--pp", "2", "--ep", "2", "--precision", precision)
        assert got["host_load_gib"] == {"loaded": round(dense * itemsize / GIB, 3),
                                        "kept_per_rank": round(got["params_per_rank"] * itemsize / GIB, 3)}
    assert main(["plan", *upcycled, "--world", "4", "--pp", "2", "--ep", "2"]) == 0
    assert "host memory to load this HF model (bf16): " in capsys.readouterr().out
