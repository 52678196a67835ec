"""export_hf against transformers itself: the exported dir loads with transformers' own MoE classes (no
switchyard objects) and gives the switchyard model's logits and greedy tokens; what a target cannot
compute is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
from switchyard.hf.patch import moe_layers
from switchyard.moe.layer import MoELayer
from tiny_models import build, ids


def upcycled(model_type: str, every_n: int | None = None, extra: dict | None = None, **moe) -> torch.nn.Module:
    model = build(model_type, intermediate_size=48, **(extra or {}))
    config = sy.MoEConfig(**{"num_experts": 4, "top_k": 2, "init": "drop_upcycle", **moe})
    sy.patch_model(model, config, every_n=every_n)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(50)  # decisive routing: no near-ties between implementations
            if layer.shared_experts is not None:  # upcycling starts them at zero output: make them count
                gate = [layer.shared_expert_gate.weight] if layer.shared_expert_gate is not None else []
                for p in [*layer.shared_experts.parameters(), *gate]:
                    p.normal_(0, 0.2)
    return model


def adopted(model_type: str, **extra) -> torch.nn.Module:
    model = build(model_type, **extra)
    with torch.no_grad():  # HF zero-inits some routers and biases: make routing non-trivial
        for name, param in model.named_parameters():
            if "e_score_correction_bias" in name or (name.endswith("gate.weight") and param.abs().sum() == 0):
                param.normal_(0, 0.5)
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.normal_(0, 0.5)
    return sy.patch_model(model)


CASES = {
    "llama_to_mixtral": (lambda: upcycled("llama"), "MixtralForCausalLM", {}),
    "qwen2_every_2_to_qwen2_moe": (lambda: upcycled("qwen2", every_n=2), "Qwen2MoeForCausalLM",
                                   {"mlp_only_layers": [1, 3], "num_experts": 4}),
    "qwen2_shared_to_qwen2_moe": (lambda: upcycled("qwen2", num_shared_experts=1, shared_expert_gate=True),
                                  "Qwen2MoeForCausalLM", {"shared_expert_intermediate_size": 48}),
    "qwen3_to_qwen3_moe": (lambda: upcycled("qwen3", extra={"head_dim": 8}, norm_topk_prob=False),
                           "Qwen3MoeForCausalLM", {"norm_topk_prob": False, "moe_intermediate_size": 48}),
    "adopted_qwen2_moe_back": (lambda: adopted(
        "qwen2_moe", intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[1]), "Qwen2MoeForCausalLM", {"mlp_only_layers": [1]}),
    "adopted_deepseek_v3_back": (lambda: adopted(
        "deepseek_v3", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
        "DeepseekV3ForCausalLM", {"n_routed_experts": 8}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(case, tmp_path):
    make, class_name, config_fields = CASES[case]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    sy.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "switchyard" not in config and all(config[k] == v for k, v in config_fields.items())

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == class_name
    assert not any(isinstance(m, MoELayer) for m in hf.modules())
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=1e-5)
    prompt = x[:1, :4]
    assert torch.equal(hf.generate(prompt, max_new_tokens=8, do_sample=False),
                       model.generate(prompt, max_new_tokens=8, do_sample=False))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # export only reads the model


def _fake_ep2(model):
    for layer in moe_layers(model):
        layer.ep_size = 2


ERRORS = {
    "gpt2": (lambda: upcycled("gpt2", extra={"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
             None, r"no standard transformers MoE class fits gpt2 \(supported exports: llama→mixtral.*keep it as a "
                   r"switchyard checkpoint.*launch/serve\.py --model <dir> serves"),
    "mixtral_no_renormalize": (lambda: upcycled("llama", norm_topk_prob=False), None,
                               r"norm_topk_prob=False but MixtralForCausalLM computes norm_topk_prob=True \(Mixtral "
                               r"always renormalizes.*qwen2_moe/qwen3_moe.*switchyard\.save_pretrained"),
    "mixtral_dense_layers": (lambda: upcycled("llama", every_n=2), None,
                             r"cannot export llama to MixtralForCausalLM: layers \[1, 3\] of 4 stayed dense; Mixtral has no dense layers"),
    "eval_capacity": (lambda: upcycled("qwen3", extra={"head_dim": 8}, eval_capacity_factor=1.0), None,
                      r"eval_capacity_factor=1\.0 but Qwen3MoeForCausalLM computes eval_capacity_factor=None"),
    "sigmoid": (lambda: upcycled("qwen3", extra={"head_dim": 8}, score_func="sigmoid"), None,
                r"score_func='sigmoid' but Qwen3MoeForCausalLM computes score_func='softmax'"),
    "mixtral_shared": (lambda: upcycled("llama", num_shared_experts=1), None, r"Mixtral has no shared expert"),
    # Qwen3-MoE has no layer_types: it windows every layer (the source's layer_types used to pass through unused)
    "qwen3_windows_on_some_layers": (
        lambda: upcycled("qwen3", extra={"head_dim": 8, "use_sliding_window": True, "sliding_window": 4,
                                         "max_window_layers": 2}), None,
        r"sliding windows per layer \[None, None, 4, 4\] become \[4, 4, 4, 4\] in Qwen3MoeForCausalLM"),
    "expert_parallel": (lambda: upcycled("llama"), _fake_ep2,
                        r"expert-parallel \(ep=2\).*save_pretrained.*switchyard export"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_what_the_target_cannot_compute_is_refused_before_writing(case, tmp_path):
    make, tweak, message = ERRORS[case]
    model = make()
    if tweak is not None:
        tweak(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        sy.export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_exporting_over_a_switchyard_checkpoint_or_a_file_is_refused(tmp_path):
    """export_hf into the switchyard dir it came from would replace config.json and lose the checkpoint; a file
    path made transformers log an error, write nothing, and the export still claimed success."""
    model = upcycled("llama")
    saved = tmp_path / "saved"
    sy.save_pretrained(model, saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ValueError, match=r"holds a switchyard checkpoint; exporting there would overwrite"):
        sy.export_hf(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"a_file is a file; give a directory"):
        sy.export_hf(model, tmp_path / "a_file")


def test_exporting_over_another_models_directory_is_refused(tmp_path):
    """`--out` naming the dense source (or any other model's directory) used to replace its config.json and
    model.safetensors with the export's."""
    dense = tmp_path / "dense"
    build("llama", intermediate_size=48).save_pretrained(dense)
    before = {p.name: p.read_bytes() for p in dense.iterdir()}
    with pytest.raises(ValueError, match=r"dense holds a llama model that is no switchyard export .* would overwrite"):
        sy.export_hf(upcycled("llama"), dense)
    assert {p.name: p.read_bytes() for p in dense.iterdir()} == before


def test_exporting_again_replaces_the_earlier_export_whole(tmp_path):
    """An export over an earlier one reads back as the new model whichever of them is sharded: save_pretrained
    left the earlier unsharded model.safetensors (which from_pretrained reads before the new shards) or the
    earlier index. A failing export leaves the earlier one as it was."""
    models = [upcycled("llama") for _ in range(3)]
    for seed, model in enumerate(models):
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in moe_layers(model):
                layer.router.weight.normal_(0, 10)

    def exported_logits() -> torch.Tensor:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids()).logits

    for model, shard in zip(models, (None, "40KB", None)):
        sy.export_hf(model, tmp_path, max_shard_size=shard)
        with torch.no_grad():
            torch.testing.assert_close(exported_logits(), model(ids()).logits, atol=1e-5, rtol=1e-5)
        names = {p.name for p in tmp_path.iterdir()}
        assert ("model.safetensors" in names) == (shard is None)
        assert ("model.safetensors.index.json" in names) == (shard is not None)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        sy.export_hf(models[0], tmp_path, tokenizer=BrokenTokenizer(), max_shard_size="40KB")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForSequenceClassification"])
def test_base_and_task_head_models_export_as_the_targets_same_task_class(auto_class, tmp_path):
    """A patched LlamaModel / LlamaForSequenceClassification (save_pretrained round-trips them) exports as
    MixtralModel / MixtralForSequenceClassification, not a CausalLM that lacks their head (or their layers)."""
    import transformers
    from transformers import AutoConfig

    from tiny_models import TINY

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TINY, "intermediate_size": 48, "pad_token_id": 0, "num_labels": 3})
    model = sy.patch_model(getattr(transformers, auto_class).from_config(config).eval(),
                           sy.MoEConfig(num_experts=4, top_k=2, init="drop_upcycle"))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(50)
        want = model(ids())
    sy.export_hf(model, tmp_path)
    hf = getattr(transformers, auto_class).from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == type(model).__name__.replace("Llama", "Mixtral")
    key = "logits" if "logits" in want else "last_hidden_state"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids())[key], want[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,extra", [
    ("mixtral", {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}),
    ("qwen3_moe", {"intermediate_size": 48, "moe_intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2,
                   "head_dim": 8, "norm_topk_prob": True}),
])
def test_an_adopted_model_exports_its_routing_overrides(model_type, extra, tmp_path):
    """patch_model(overrides={"top_k": 1, ...}) changes what the adopted model computes; the export writes it
    (num_experts_per_tok, norm_topk_prob) instead of refusing the model's own family."""
    overrides = {"top_k": 1} if model_type == "mixtral" else {"top_k": 1, "norm_topk_prob": False}
    model = sy.patch_model(build(model_type, **extra), overrides=overrides)
    with torch.no_grad():
        want = model(ids()).logits
    sy.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_experts_per_tok"] == 1 and config.get("norm_topk_prob") in (None, False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, want, atol=1e-5, rtol=1e-5)
