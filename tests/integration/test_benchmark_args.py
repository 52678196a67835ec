"""Every benchmark script refuses counts out of range (``--iters 0`` used to run the default, 20 or 100 steps,
as ``args.iters or default``; ``--warmup 0`` in finetune.py silently became 1) with a parser error naming the
value and the range, while an omitted option still gets its default. In process: only the parsers run."""

from __future__ import annotations

from types import ModuleType

import pytest

from harness import REPO_ROOT, load_script


def _script(name: str) -> ModuleType:
    return load_script(REPO_ROOT / "benchmarks" / f"{name}.py", f"bench_args_{name}")


# (script, its entry that parses argv, argv, the option refused, the allowed range's lower bound)
REFUSED = [
    ("moe_decode", "parse_args", ["--tiny", "--iters", "0"], "--iters", "0", 1),
    ("moe_decode", "parse_args", ["--tiny", "--tokens", "1", "0"], "--tokens", "0", 1),
    ("moe_decode", "parse_args", ["--tiny", "--warmup", "-1"], "--warmup", "-1", 0),
    ("moe_decode", "parse_args", ["--tiny", "--rounds", "0"], "--rounds", "0", 1),
    ("moe_layer", "parse_args", ["--tiny", "--iters", "0"], "--iters", "0", 1),
    ("moe_layer", "parse_args", ["--tiny", "--tokens", "0"], "--tokens", "0", 1),
    ("moe_layer", "parse_args", ["--tiny", "--rounds", "0"], "--rounds", "0", 1),
    ("moe_layer_host", "main", ["--iters", "0"], "--iters", "0", 1),
    ("moe_layer_profile", "main", ["--tiny", "--iters", "0"], "--iters", "0", 1),
    ("moe_layer_profile", "main", ["--tiny", "--profile-steps", "0"], "--profile-steps", "0", 1),
    ("ep_scaling", "parse_args", ["--tiny", "--iters", "0"], "--iters", "0", 1),
    ("ep_scaling", "parse_args", ["--tiny", "--experts", "0"], "--experts", "0", 1),
    ("finetune", "parse_args", ["--tiny", "--steps", "0"], "--steps", "0", 1),
    ("finetune", "parse_args", ["--tiny", "--warmup", "0"], "--warmup", "0", 1),
    ("finetune", "parse_args", ["--tiny", "--seq-len", "1"], "--seq-len", "1", 2),
    ("serve", "main", ["--tiny", "--clients", "0"], "--clients", "0", 1),
    ("serve", "main", ["--tiny", "--batches", "1,0"], "--batches", "0", 1),
]


@pytest.mark.parametrize("script,entry,argv,option,value,minimum", REFUSED,
                         ids=[f"{r[0]}{r[3]}={r[4]}" for r in REFUSED])
def test_a_count_out_of_range_is_a_parser_error_naming_it(script, entry, argv, option, value, minimum, capsys):
    with pytest.raises(SystemExit) as exit_info:
        getattr(_script(script), entry)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value} is out of range; pass an integer >= {minimum}" in err, err


def test_a_non_integer_count_names_the_text(capsys):
    with pytest.raises(SystemExit):
        _script("moe_decode").parse_args(["--tiny", "--iters", "many"])
    assert "argument --iters: 'many' is not an integer; pass an integer >= 1" in capsys.readouterr().err


def test_omitted_counts_get_their_defaults_and_the_lowest_allowed_values_pass(tmp_path):
    out = ["--out", str(tmp_path / "out.json")]
    decode = _script("moe_decode").parse_args(["--tiny", *out])
    assert (decode.iters, decode.warmup, decode.rounds, decode.tokens) == (3, 1, 2, [1, 8, 64])
    decode = _script("moe_decode").parse_args(["--tiny", "--iters", "1", "--warmup", "0", "--rounds", "1", *out])
    assert (decode.iters, decode.warmup, decode.rounds) == (1, 0, 1)
    layer = _script("moe_layer").parse_args(["--tiny", *out])
    assert (layer.iters, layer.warmup, layer.tokens, layer.rounds) == (2, 1, 128, 1)
    scaling = _script("ep_scaling").parse_args(["--tiny", "--shared-ffn", "0", "--no-autoep", *out])
    assert (scaling.iters, scaling.warmup, scaling.tokens, scaling.shared_ffn) == (2, 1, 64, 0)
    finetune = _script("finetune").parse_args(["--tiny", "--device", "cpu", *out])
    assert (finetune.steps, finetune.warmup, finetune.batch, finetune.seq_len) == (2, 1, 2, 32)


def test_finetune_refuses_the_checkpointing_variant_on_checkpointed_rounds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script("finetune").parse_args(["--tiny", "--gradient-checkpointing", "--variant-gradient-checkpointing"])
    assert exit_info.value.code == 2
    assert "pass one of them" in capsys.readouterr().err
