"""The commands of README.md and docs/ as a new user runs them: a wrong value is one line naming it and the fix,
exit 2, before any weights are read. The models here are config.json alone (no weights): a command that got as
far as loading them would fail with another message."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from harness import REPO_ROOT, load_script, run_script
from switchyard.cli import main

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96)


def config_only(path, model_type: str = "llama", **extra):
    AutoConfig.for_model(model_type, **TINY, **extra).save_pretrained(path)
    return str(path)


def one_error(capsys, prefix: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if prefix in line]
    assert len(err) == 1, err
    return err[0]


def test_upcycle_checks_the_layers_and_the_model_kind_before_reading_weights(tmp_path, capsys):
    dense = config_only(tmp_path / "dense")
    out = str(tmp_path / "out")
    base = ["upcycle", "--num-experts", "4", "--top-k", "2", "--out", out]
    assert main(base + ["--model", dense, "--layers", "0,9"]) == 2
    assert "layer indices [9] are out of range for a model with 4 layers" in one_error(capsys, "upcycle: error")
    mixtral = config_only(tmp_path / "mixtral", "mixtral", num_local_experts=4)
    assert main(base + ["--model", mixtral]) == 2
    assert "is an HF MoE model (MixtralSparseMoeBlock), and upcycle takes a dense one" in one_error(capsys, "error")
    assert main(base + ["--model", dense, "--seed", "-1"]) == 2
    assert "seed must be a non-negative integer, got -1" in one_error(capsys, "upcycle: error")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["upcycle", "plan"])
def test_a_missing_local_model_dir_is_named_not_sent_to_the_hub(tmp_path, capsys, command):
    extra = ["--num-experts", "4", "--top-k", "2"] + (["--out", str(tmp_path / "o")] if command == "upcycle"
                                                     else ["--world", "2"])
    assert main([command, "--model", "./nowhere", *extra]) == 2
    line = one_error(capsys, f"switchyard {command}: error:")
    assert "--model ./nowhere: no such directory; pass a model directory or a hub id" in line  # not "Repo id must"


def test_export_checks_its_out_before_loading_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    config_only(ckpt)
    record = json.loads((ckpt / "config.json").read_text()) | {"switchyard": {"version": 1}}
    (ckpt / "config.json").write_text(json.dumps(record))
    assert main(["export", "--model", str(ckpt), "--out", str(ckpt)]) == 2
    assert "holds a switchyard checkpoint; exporting there would overwrite" in one_error(capsys, "export: error")
    other = config_only(tmp_path / "other", "qwen2")
    assert main(["export", "--model", str(ckpt), "--out", other]) == 2
    assert "holds a qwen2 model that is no switchyard export" in one_error(capsys, "export: error")


def test_counts_name_their_flag_and_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["layout", "--world", "0"])
    assert exit_.value.code == 2
    assert "argument --world: expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["upcycle", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "turn a dense transformers model into a switchyard MoE checkpoint" in text
    assert "(default: copy)" in text and "the router (default: 0)" in text


@pytest.fixture()
def finetune(monkeypatch):
    """launch/finetune.py with the world check and training replaced: nothing here may build groups or models."""
    import switchyard.train.loop as loop

    script = load_script(REPO_ROOT / "launch" / "finetune.py", "finetune_audit")
    monkeypatch.setattr(script, "check_world", lambda config: None)

    def no_training(config):
        raise AssertionError("train() was reached")

    monkeypatch.setattr(loop, "train", no_training)
    return script


def test_finetune_names_unknown_options_and_split_overrides(finetune, capsys):
    tiny = str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml")
    for argv, message in (
        (["--config", tiny, "--lr", "1e-3"], "unknown option --lr: the launcher takes --config and --resume; "
                                             "settings are overrides: train.lr=1e-3"),
        (["--config", tiny, "--deepspeed", "ds.json"], "settings are overrides: deepspeed=ds.json"),
        (["--config", tiny, "moe.layers=[0,", "2]"], "the shell split moe.layers=[0, 2] at a space: quote the whole "
                                                    "override, 'moe.layers=[0, 2]'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            finetune.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert finetune.main(["--conf", tiny, "model.source=./nowhere"]) == 2  # argparse's prefix still works
    assert "model.source='./nowhere': no such directory" in one_error(capsys, "finetune: config error")


def test_finetune_user_mistakes_found_while_building_are_one_line(finetune, monkeypatch, capsys):
    import switchyard.train.loop as loop

    def resume_missing(config):
        raise ValueError("checkpoint.resume='nowhere' is not a complete switchyard checkpoint: no such directory")

    monkeypatch.setattr(loop, "train", resume_missing)
    tiny = str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml")
    assert finetune.main(["--config", tiny, "--resume", "nowhere"]) == 2
    assert "checkpoint.resume='nowhere' is not a complete" in one_error(capsys, "finetune: error:")


def test_serve_config_that_is_not_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 80\n  host: x\n")
    serve = load_script(REPO_ROOT / "launch" / "serve.py", "serve_audit")
    assert serve.main(["--model", "tiny", "--config", str(bad)]) == 2
    line = one_error(capsys, "serve: config error:")
    assert f"--config {bad} is not valid YAML: mapping values are not allowed here at line 2" in line


def test_finetune_unknown_option_from_the_shell_exits_2_with_the_override():
    result = run_script(REPO_ROOT / "launch" / "finetune.py", ["--config", "configs/finetune/tiny.yaml",
                                                                "--max-steps", "10"], timeout_s=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "settings are overrides: train.max_steps=10" in result.stderr


def test_upcycle_says_up_front_when_export_will_refuse_the_result(tmp_path, capsys):
    # llama with dense layers left (every_n=2) fine-tunes and serves, but Mixtral cannot hold dense layers;
    # qwen2's export (Qwen2-MoE, mlp_only_layers) can. The note comes from the meta-device dry run, before weights
    base = ["upcycle", "--num-experts", "4", "--top-k", "2", "--out", str(tmp_path / "out")]
    note = "upcycle: note: `switchyard export` will refuse this model"
    for model_type, every_n, refused in (("llama", ["--every-n", "2"], True), ("llama", [], False),
                                         ("qwen2", ["--every-n", "2"], False)):
        model = config_only(tmp_path / f"{model_type}{len(every_n)}", model_type)
        main(base + ["--model", model, *every_n])  # then fails reading weights: these models are config.json alone
        err = capsys.readouterr().err
        assert (note in err) == refused, err
        if refused:
            assert "dense" in err.split(note, 1)[1].splitlines()[0]
