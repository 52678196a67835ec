"""`switchyard upcycle --targets / --exclude / --adapter`: the Python API's name-based selection on the command line."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import switchyard as sy
from switchyard.cli import main
from switchyard.moe.layer import MoELayer


def test_upcycle_with_names_patches_what_patch_model_patches(tmp_path, capsys):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    argv = ["upcycle", "--model", str(tmp_path / "dense"), "--num-experts", "4", "--top-k", "2", "--targets",
            "re:.*\\.mlp", "--adapter", "llama", "--exclude", "model.layers.1.mlp"]
    assert main([*argv, "--out", str(tmp_path / "moe")]) == 0
    got = sy.from_pretrained(tmp_path / "moe")
    assert [n for n, m in got.named_modules() if isinstance(m, MoELayer)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    want = sy.patch_model(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), sy.MoEConfig(num_experts=4, top_k=2),
                          targets=["re:.*\\.mlp"], adapter="llama", exclude=["model.layers.1.mlp"])
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, want(x).logits, atol=0, rtol=0)
    # a name that matches no FFN is refused before the weights are read, and nothing is written
    assert main([*argv[:-2], "--exclude", "model.layers.9.mlp", "--targets", "re:.*\\.ffn", "--out",
                 str(tmp_path / "none")]) == 2
    assert "matched targets=" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_upcycle_saves_the_router_loss_coefficients_given(tmp_path, capsys):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    argv = ["upcycle", "--model", str(tmp_path / "dense"), "--num-experts", "4", "--top-k", "2"]
    assert main([*argv, "--aux-loss-coef", "0.02", "--z-loss-coef", "1e-3", "--out", str(tmp_path / "moe")]) == 0
    moe = sy.from_pretrained(tmp_path / "moe")
    layers = [m for m in moe.modules() if isinstance(m, MoELayer)]
    assert layers and all((m.config.aux_loss_coef, m.config.seq_aux_loss_coef, m.config.z_loss_coef) == (0.02, 0.0, 1e-3)
                          for m in layers)
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0  # MoEConfig's defaults when not given
    default = next(m for m in sy.from_pretrained(tmp_path / "default").modules() if isinstance(m, MoELayer))
    assert default.config.aux_loss_coef == sy.MoEConfig(num_experts=4, top_k=2).aux_loss_coef
    capsys.readouterr()
    for bad in ("-0.1", "nan", "inf", "lots"):  # refused by argparse (exit 2) before the model is read
        try:
            main([*argv, "--z-loss-coef", bad, "--out", str(tmp_path / "bad")])
        except SystemExit as exit_:
            assert exit_.code == 2
        else:
            raise AssertionError(f"--z-loss-coef {bad} was accepted")
        assert "--z-loss-coef" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_upcycle_keeps_the_task_class_and_its_head(tmp_path, capsys):
    """The command loaded every model as AutoModelForCausalLM: a sequence classifier lost its ``score`` head and got a
    random ``lm_head`` (exit 0). Oracle: the dense classifier's logits, which a ``copy`` upcycle keeps."""
    from transformers import LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    dense = LlamaForSequenceClassification(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    assert main(["upcycle", "--model", str(tmp_path / "dense"), "--num-experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "moe")]) == 0
    got = sy.from_pretrained(tmp_path / "moe")
    assert type(got).__name__ == "LlamaForSequenceClassification"
    x = torch.randint(1, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, dense(x).logits, atol=1e-6, rtol=1e-5)
    # a file where a directory belongs: named as upcycle and plan name it, not ".../config.json/config.json"
    assert main(["export", "--model", str(tmp_path / "moe" / "config.json"), "--out", str(tmp_path / "hf")]) == 2
    assert "a file; pass the model's directory" in capsys.readouterr().err and not (tmp_path / "hf").exists()
