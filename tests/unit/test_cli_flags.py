"""`switchyard` errors name the flag the user typed and its value, not only the Python name the library speaks
(``top_k=8``, ``targets=[...]``), and a mistaken ``--out`` or ``--model`` is refused before the model is read, leaving
nothing behind and nothing of the user's changed. Oracle for the flags: the argv each test passes."""

from __future__ import annotations

import os

import pytest
from transformers import AutoConfig

import switchyard as sy
from switchyard.cli import main
from tiny_models import build

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96)


def config_only(path, model_type: str = "llama") -> str:
    """A model directory with config.json alone: a command that got as far as reading weights fails otherwise."""
    AutoConfig.for_model(model_type, **TINY).save_pretrained(path)
    return str(path)


def error(capsys, argv: list[str]) -> str:
    """The command's one error line (exit 2, from the command or from argparse)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, flags", [
    (["upcycle", "--num-experts", "4", "--top-k", "8"], "top_k is --top-k 8, num_experts is --num-experts 4"),
    (["upcycle", "--num-experts", "4", "--top-k", "2", "--layers", "0,9"], "layers is --layers 0,9"),
    (["upcycle", "--num-experts", "4", "--top-k", "2", "--targets", "re:.*\\.ffn", "--adapter", "llama"],
     "targets is --targets 're:.*\\.ffn'"),
    (["upcycle", "--num-experts", "4", "--top-k", "2", "--layers", "1", "--every-n", "2"],
     "layers is --layers 1, every_n is --every-n 2"),
    (["upcycle", "--num-experts", "4", "--top-k", "2", "--adapter", "gpt2"], "adapter is --adapter gpt2"),
    (["plan", "--num-experts", "6", "--world", "8", "--ep", "4"], "num_experts is --num-experts 6, ep is --ep 4"),
    (["plan", "--num-experts", "4", "--world", "8", "--tp", "8"], "tp is --tp 8"),
    (["plan", "--num-experts", "4", "--world", "8", "--pp", "8"], "parallel.pp is --pp 8"),
    (["plan", "--num-experts", "4", "--world", "2", "--pp", "2", "--pp-layers", "1", "1"],
     "parallel.pp_layers is --pp-layers 1 1"),
])
def test_a_setting_the_library_names_is_named_as_the_flag_typed(tmp_path, capsys, argv, flags):
    model = config_only(tmp_path / "dense")
    out = ["--out", str(tmp_path / "out")] if argv[0] == "upcycle" else []
    line = error(capsys, [*argv, "--model", model, *out])
    assert line.endswith(f"(on the command line: {flags})"), line
    assert not (tmp_path / "out").exists()


def test_layout_names_the_flags_and_leaves_the_models_own_values_alone(tmp_path, capsys):
    line = error(capsys, ["layout", "--world", "4", "--ep", "4", "--num-experts", "6"])
    assert line.endswith("(on the command line: num_experts is --num-experts 6, ep is --ep 4)")
    mixtral = tmp_path / "mixtral"
    AutoConfig.for_model("mixtral", **TINY, num_local_experts=4).save_pretrained(mixtral)
    line = error(capsys, ["plan", "--model", str(mixtral), "--world", "3", "--ep", "3"])
    assert line.endswith("(on the command line: ep is --ep 3)")  # its 4 experts come from config.json, not a flag


@pytest.mark.parametrize("argv, message", [
    (["--targets", "re:("], "argument --targets: 're:(' is not a valid regular expression"),
    (["--exclude", "re:(mlp"], "argument --exclude: 're:(mlp' is not a valid regular expression"),
    (["--adapter", "lama"], "argument --adapter: invalid choice: 'lama' (choose from 'gpt2',"),
])
@pytest.mark.parametrize("command", ["upcycle", "plan"])
def test_selection_flags_are_checked_by_argparse(tmp_path, capsys, command, argv, message):
    """The model does not exist: argparse refuses before anything is read."""
    extra = ["--top-k", "2", "--out", str(tmp_path / "out")] if command == "upcycle" else ["--world", "2"]
    line = error(capsys, [command, "--model", str(tmp_path / "nowhere"), "--num-experts", "4", *argv, *extra])
    assert message in line


def test_upcycle_refuses_a_non_empty_out_that_holds_no_checkpoint(tmp_path, capsys):
    """save_pretrained keeps a directory's files beside the checkpoint: upcycling into a folder of one's own files
    (a mistyped --out) mixed a checkpoint into it, exit 0."""
    dense = config_only(tmp_path / "dense")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    (mine / "sub" / "data.txt").write_text("keep")
    before = tree(mine)
    line = error(capsys, ["upcycle", "--model", dense, "--num-experts", "4", "--top-k", "2", "--out", str(mine)])
    assert f"--out {mine}: {mine} is not empty (notes.txt, sub) and holds no switchyard checkpoint" in line
    assert tree(mine) == before
    # an empty directory and a switchyard checkpoint are still fine (the model has no weights: the load fails next)
    (tmp_path / "empty").mkdir()
    ckpt = tmp_path / "ckpt"
    sy.save_pretrained(sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2)),
                       ckpt)
    for out in (tmp_path / "empty", ckpt):
        line = error(capsys, ["upcycle", "--model", dense, "--num-experts", "4", "--top-k", "2", "--out", str(out)])
        assert f"--model {dense}: cannot load its weights" in line


@pytest.mark.parametrize("command", ["upcycle", "export"])
def test_an_out_that_cannot_be_created_is_refused_before_the_model_is_read(tmp_path, capsys, command):
    """It failed with "[Errno 20] Not a directory" (no flag named) after the whole model was loaded."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    if command == "upcycle":
        argv = ["upcycle", "--model", config_only(tmp_path / "dense"), "--num-experts", "4", "--top-k", "2"]
    else:
        ckpt = tmp_path / "ckpt"
        sy.save_pretrained(sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2)),
                           ckpt)
        for shard in ckpt.glob("*.safetensors"):  # the export must refuse before it reads them
            shard.unlink()
        argv = ["export", "--model", str(ckpt)]
    line = error(capsys, [*argv, "--out", str(afile / "sub")])
    assert f"--out {afile / 'sub'}: {afile} is a file, so no directory can be created under it" in line
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_an_out_in_a_read_only_directory_is_refused_before_the_model_is_read(tmp_path, capsys):
    dense = config_only(tmp_path / "dense")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = error(capsys, ["upcycle", "--model", dense, "--num-experts", "4", "--top-k", "2",
                              "--out", str(locked / "moe")])
    finally:
        locked.chmod(0o755)
    assert f"--out {locked / 'moe'}: cannot create a directory in {locked} (Permission denied)" in line


def test_export_of_a_model_that_is_no_checkpoint_says_to_upcycle_it(tmp_path, capsys):
    dense = config_only(tmp_path / "dense")
    line = error(capsys, ["export", "--model", dense, "--out", str(tmp_path / "hf")])
    assert f"--model {dense} is not a switchyard checkpoint" in line
    assert f"switchyard upcycle --model {dense} --num-experts N --top-k K --out DIR" in line
    assert "patch it with switchyard.patch_model" not in line and not (tmp_path / "hf").exists()


def test_model_config_errors_name_the_flag(tmp_path, capsys):
    """transformers' ValueErrors (a model_type it does not know, none at all) came without the flag."""
    for name, text in (("unknown", '{"model_type": "nosuchmodel"}'), ("untyped", '{"hidden_size": 4}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        line = error(capsys, ["plan", "--model", str(tmp_path / name), "--world", "2"])
        assert f"--model {tmp_path / name}: cannot read its config.json: " in line


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a long load printed Python's traceback; the fine-tune launcher says one line and exits 130."""
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("switchyard.hf.checkpoint.architecture_class", interrupted)
    argv = ["upcycle", "--model", config_only(tmp_path / "dense"), "--num-experts", "4", "--top-k", "2",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "switchyard upcycle: interrupted"
    assert not (tmp_path / "out").exists()


def test_a_default_the_user_did_not_type_is_not_credited_to_them(tmp_path, capsys):
    """`plan --ep 3` names --ep and --num-experts as typed, not "tp is --tp 1" (argparse's default)."""
    line = error(capsys, ["plan", "--model", config_only(tmp_path / "dense"), "--num-experts", "4", "--world", "8",
                          "--ep", "3"])
    assert "ep is --ep 3" in line and "--tp" not in line and "--pp" not in line, line
