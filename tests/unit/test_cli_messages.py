"""What `switchyard plan / upcycle / layout` say when a flag cannot take effect or a path is wrong: one line naming
the value and the fix, before any weights are read. Oracles: transformers' configs (the models' MoE blocks and
top-k) and rank_layout's ep groups (which experts a rank holds)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

import switchyard as sy
from switchyard.cli import main
from switchyard.parallel import rank_layout
from tiny_models import build

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, head_dim=8)


def config_only(path, model_type: str, **extra) -> str:
    AutoConfig.for_model(model_type, **TINY, **extra).save_pretrained(path)
    return str(path)


def error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def plan(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_moe_model_switchyard_cannot_adopt_is_not_called_dense(tmp_path, capsys):
    gpt_oss = config_only(tmp_path / "gpt_oss", "gpt_oss", num_local_experts=4)
    err = error(capsys, ["plan", "--model", gpt_oss, "--world", "2"])
    assert f"{gpt_oss} has MoE blocks that switchyard cannot adopt" in err and "GptOssMLP" in err
    assert "no MoE blocks" not in err and "pass --num-experts" not in err


def test_an_hf_moe_model_keeps_its_experts_and_top_k(tmp_path, capsys):
    mixtral = config_only(tmp_path / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    err = error(capsys, ["plan", "--model", mixtral, "--num-experts", "4", "--world", "2"])
    assert "is an HF MoE model (MixtralSparseMoeBlock), which keeps its own experts and routing" in err
    assert err.rstrip().endswith("drop --num-experts")
    assert "moe_config=None" not in err and "overrides=" not in err
    assert "drop --layers" in error(capsys, ["plan", "--model", mixtral, "--layers", "1", "--world", "2"])
    err = error(capsys, ["plan", "--model", mixtral, "--top-k", "1", "--world", "2"])
    assert "--top-k 1:" in err and "keeps their routing (top-2 from its config.json); drop --top-k" in err
    assert plan(capsys, "--model", mixtral, "--world", "2")["params_total"] > 0  # without --top-k: planned

    ckpt = tmp_path / "ckpt"
    sy.save_pretrained(sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=1)),
                       ckpt)
    err = error(capsys, ["plan", "--model", str(ckpt), "--top-k", "2", "--world", "2"])
    assert "keeps their routing (top-1 from its config.json); drop --top-k" in err


def test_top_k_defaults_to_two_when_upcycling_and_an_explicit_one_counts(tmp_path, capsys):
    dense = config_only(tmp_path / "dense", "llama")
    experts = 3 * 32 * 48 * 4 * 2  # 4 experts in each of 2 layers
    for argv, k in (([], 2), (["--top-k", "1"], 1), (["--top-k", "2"], 2)):
        got = plan(capsys, "--model", dense, "--num-experts", "4", "--world", "2", *argv)
        assert got["params_active_per_token"] == got["params_dense"] + experts * k // 4


def test_layers_with_an_empty_item_are_refused(tmp_path, capsys):
    dense = config_only(tmp_path / "dense", "llama")
    for layers in ("1,,0", "0,1,"):
        with pytest.raises(SystemExit) as exit_:
            main(["plan", "--model", dense, "--num-experts", "4", "--layers", layers, "--world", "2"])
        assert exit_.value.code == 2
        assert f"argument --layers: expected comma-separated layer indices like 0,2,4, got {layers!r} (an empty item)" \
            in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan", "upcycle"])
def test_a_directory_without_config_json_is_named(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    extra = ["--world", "2"] if command == "plan" else ["--top-k", "2", "--out", str(tmp_path / "out")]
    err = error(capsys, [command, "--model", str(tmp_path / "empty"), "--num-experts", "4", *extra])
    assert f"{tmp_path / 'empty'} has no config.json" in err and "Unrecognized model" not in err


def test_layout_json_lists_each_ranks_experts(capsys):
    for world, degrees in ((4, dict(ep=2)), (8, dict(tp=2, ep=2)), (8, dict(ep=4))):
        assert main(["layout", "--world", str(world), *sum(([f"--{k}", str(v)] for k, v in degrees.items()), []),
                     "--num-experts", "8", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        layout = rank_layout(world, **degrees)
        assert {k: v for k, v in got.items() if k != "local_experts"} == layout
        for group in layout["ep"]:  # the i-th rank of an ep group holds the i-th slice of the experts
            per = 8 // len(group)
            for i, rank in enumerate(group):
                assert got["local_experts"][rank] == list(range(i * per, (i + 1) * per))
    assert main(["layout", "--world", "4", "--ep", "2", "--json"]) == 0
    assert "local_experts" not in json.loads(capsys.readouterr().out)


def test_upcycle_refuses_an_empty_out_saying_it_is_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dense = config_only(tmp_path / "dense", "llama")
    with pytest.raises(SystemExit) as exit_:
        main(["upcycle", "--model", dense, "--num-experts", "4", "--top-k", "2", "--out", ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: the path is empty" in err and "working directory" not in err


def test_upcycle_says_which_checkpoint_it_replaces_before_loading(tmp_path, capsys):
    """The notice comes before the load: here the model has no weights, so the load itself fails after it."""
    dense = config_only(tmp_path / "dense", "llama")
    out = tmp_path / "moe"
    sy.save_pretrained(sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2)), out)
    assert main(["upcycle", "--model", dense, "--num-experts", "4", "--top-k", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    notice = f"replacing the switchyard checkpoint at {out}"
    assert notice in err and err.index(notice) < err.index("switchyard upcycle: error:")
    assert main(["upcycle", "--model", dense, "--num-experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "new")]) == 2
    assert "replacing" not in capsys.readouterr().err
