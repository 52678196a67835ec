"""patch_model on whole transformers models, against the unpatched model as the oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import switchyard as sy
from switchyard.hf.patch import moe_layers
from switchyard.moe.layer import MoELayer

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            max_position_embeddings=64)

MOE_MODELS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=8),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8),
}


def build(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF zero-inits some routers/biases: make routing non-trivial
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.abs().sum() == 0:
                param.normal_(0, 0.5)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:  # a buffer in transformers 5
            if "e_score_correction_bias" in name:
                tensor.normal_(0, 0.5)
    return model


def ids(batch=2, length=7, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model_type", sorted(MOE_MODELS))
def test_adopted_moe_model_has_the_same_logits(model_type):
    model = build(model_type, **MOE_MODELS[model_type])
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    n_blocks = sum(type(m).__name__ in sy.hf.SUPPORTED_BLOCKS for m in model.modules())
    sy.patch_model(model)
    assert len(moe_layers(model)) == n_blocks > 0
    assert not any(type(m).__name__ in sy.hf.SUPPORTED_BLOCKS for m in model.modules())
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.config.switchyard["mode"] == "adopt"


@pytest.mark.parametrize("every_n", [None, 2])
def test_copy_upcycled_llama_equals_dense(every_n):
    dense = build("llama", intermediate_size=48)
    model = copy.deepcopy(dense)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), every_n=every_n)
    assert len(moe_layers(model)) == (4 if every_n is None else 2)
    if every_n == 2:
        assert isinstance(model.model.layers[0].mlp, MoELayer) and not isinstance(model.model.layers[1].mlp, MoELayer)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
    record = model.config.switchyard
    assert record["mode"] == "upcycle" and record["moe"]["num_experts"] == 4
    assert record["modules"][0] == "model.layers.0.mlp"


def test_loss_adds_weighted_router_losses_and_router_logits_are_returned():
    dense = build("llama", intermediate_size=48)
    model = copy.deepcopy(dense).train()
    dense.train()
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01))
    x = ids()
    out = model(x, labels=x, output_router_logits=True)
    lm_loss = dense(x, labels=x).loss
    layers = moe_layers(model)
    aux = sum(layer.aux_loss for layer in layers) / len(layers)  # mean over layers, like HF's pooled loss
    torch.testing.assert_close(out.loss, lm_loss + aux)
    torch.testing.assert_close(out.aux_loss, aux)
    assert len(out.router_logits) == len(layers) and out.router_logits[0].shape == (14, 4)
    out.loss.backward()
    assert layers[0].router.weight.grad is not None and layers[0].router.weight.grad.abs().sum() > 0


def test_adopted_model_balance_loss_leaves_padding_out_as_transformers_does():
    """transformers' own Mixtral (one MoE layer, where its pooled loss is the layer's) is the oracle."""
    hf = build("mixtral", **MOE_MODELS["mixtral"], num_hidden_layers=1, router_aux_loss_coef=0.1).train()
    model = sy.patch_model(copy.deepcopy(hf))
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    ref = hf(x, attention_mask=mask, labels=x, output_router_logits=True)
    out = model(x, attention_mask=mask, labels=x, output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, 0.1 * ref.aux_loss)
    unmasked = model(x, labels=x, output_router_logits=True).aux_loss
    assert not torch.allclose(unmasked, out.aux_loss)  # the padding did count before
    assert all(layer.token_mask is None for layer in moe_layers(model))  # not left behind for a later call


def test_generate_matches_dense_greedy_and_gradient_checkpointing_trains():
    dense = build("llama", intermediate_size=48)
    model = copy.deepcopy(dense)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    x = ids(batch=1, length=5)
    want = dense.generate(x, max_new_tokens=6, do_sample=False)
    got = model.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    model.train()
    model.gradient_checkpointing_enable()
    out = model(x, labels=x)
    out.loss.backward()
    assert all(p.grad is not None for p in moe_layers(model)[0].experts.parameters())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(moe_config=sy.MoEConfig(num_experts=4, top_k=2), layers=[7]), "layer indices \\[7\\] are out of range"),
        (dict(moe_config=sy.MoEConfig(num_experts=4, top_k=2), targets="re:.*attn.*", layers=None),
         "no FFN matched"),
        (dict(moe_config=sy.MoEConfig(num_experts=4, top_k=2), adapter="nope", targets="mlp"), "adapter 'nope' is unknown"),
        (dict(moe_config=None), "a dense model needs a MoEConfig"),
    ],
)
def test_errors_leave_the_model_untouched(kwargs, message):
    model = build("llama", intermediate_size=48)
    before, types = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        sy.patch_model(model, **kwargs)
    after, types_after = _snapshot(model)
    assert types == types_after and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not getattr(model.config, "switchyard", None)


def test_unsupported_architecture_lists_supported_and_how_to_target():
    config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, vocab_size=96)
    from transformers import AutoModel

    model = AutoModel.from_config(config)
    with pytest.raises(ValueError, match="(?s)bert.*llama.*targets"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))


def test_patching_twice_and_moe_config_on_moe_model_are_errors():
    model = build("mixtral", **MOE_MODELS["mixtral"])
    with pytest.raises(ValueError, match="already has MoE blocks"):
        sy.patch_model(model, sy.MoEConfig())
    sy.patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        sy.patch_model(model)


@pytest.mark.parametrize(
    "model_type, moe",
    [
        ("llama", dict(num_experts=8, top_k=2, init="granular")),
        ("qwen2", dict(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True)),
        ("gpt2", dict(num_experts=4, top_k=1)),
        ("opt", dict(num_experts=4, top_k=2)),
        ("gpt_neox", dict(num_experts=4, top_k=2)),
        ("phi3", dict(num_experts=4, top_k=2)),
    ],
)
@pytest.mark.parametrize("every_n", [None, 2])
def test_output_preserving_upcycling_through_patch_model(model_type, moe, every_n):
    extra = {"gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
             "opt": dict(ffn_dim=48, word_embed_proj_dim=32),
             "phi3": dict(intermediate_size=48, pad_token_id=0),
             }.get(model_type, dict(intermediate_size=48))
    dense = build(model_type, **extra)
    model = copy.deepcopy(dense)
    sy.patch_model(model, sy.MoEConfig(**moe), every_n=every_n)
    layers = model.config.num_hidden_layers
    assert len(moe_layers(model)) == (layers if every_n is None else -(-layers // every_n))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)


def test_hf_trainer_trains_a_patched_model(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.01))
    rows = ids(batch=16, length=12).tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    before = moe_layers(model)[0].experts.gate_up_proj.detach().clone()
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 4 and result.training_loss > 0
    assert not torch.equal(moe_layers(model)[0].experts.gate_up_proj.detach(), before)


def test_a_deep_copy_after_a_training_forward():
    """An EMA / best-model copy made mid-training: the layers' last outputs hang on the autograd graph."""
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2)).train()
    x = ids()
    loss = model(x, labels=x).loss
    clone = copy.deepcopy(model)
    loss.backward()  # the original's graph is intact
    assert all(layer.aux_loss is None for layer in moe_layers(clone))
    assert moe_layers(model)[0].aux_loss is not None
    torch.testing.assert_close(clone(x, labels=x).loss, model(x, labels=x).loss)


def test_a_deep_copy_reports_its_own_router_losses_and_logits():
    """TRL's reference model, EMA and teacher copies are deep copies: their hooks must read their own layers."""
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.1))
    clone = copy.deepcopy(model).train()
    with torch.no_grad():
        for layer in moe_layers(clone):
            layer.router.weight.normal_(0, 1.0)  # the copy routes differently from the original
    model.train()
    x = ids()
    model(ids(length=5), labels=ids(length=5))  # the original runs first, on other input…
    out = clone(x, labels=x, output_router_logits=True)  # …then the copy
    layers = moe_layers(clone)
    own = sum(layer.aux_loss for layer in layers) / len(layers)
    torch.testing.assert_close(out.aux_loss, own)
    original = sum(layer.aux_loss for layer in moe_layers(model)) / len(layers)
    assert not torch.allclose(out.aux_loss, original)
    assert [t.shape for t in out.router_logits] == [(14, 4)] * len(layers)
    assert all(t is layer.last_router_output.logits_TE for t, layer in zip(out.router_logits, layers))


def _falcon():
    return build("falcon", intermediate_size=48, new_decoder_architecture=False, multi_query=True)


def test_targets_with_an_adapter_read_falcons_activation():
    dense = _falcon()
    assert dense.config.activation == "gelu" and not hasattr(dense.config, "hidden_act")
    model = copy.deepcopy(dense)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), targets=["re:.*\\.mlp"], adapter="gpt_neox")
    assert moe_layers(model)[0].config.activation == "gelu"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)


def test_an_activation_the_config_does_not_name_must_be_given_and_may_not_contradict_the_ffn():
    targets = dict(targets=["re:.*\\.mlp"], adapter="gpt_neox")
    model = _falcon()
    model.config.activation = None  # a config naming its activation nowhere we look
    types = _snapshot(model)[1]
    with pytest.raises(ValueError, match="names no activation .*MoEConfig\\(activation=...\\)"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), **targets)
    assert _snapshot(model)[1] == types and not getattr(model.config, "switchyard", None)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, activation="gelu"), **targets)
    assert moe_layers(model)[0].config.activation == "gelu"
    with pytest.raises(ValueError, match="activation='relu' but the FFN has activation='gelu'"):
        sy.patch_model(_falcon(), sy.MoEConfig(num_experts=4, top_k=2, activation="relu"), **targets)
    with pytest.raises(ValueError, match="gated=False but the FFN has gated=True"):
        sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2, gated=False))


def _with_mlp(model, index, **changes):
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(index)
    model.model.layers[index].mlp = LlamaMLP(config)
    return model


def test_ffns_of_different_sizes_are_patched_together():
    """Each layer's experts take their own FFN's size (intermediate_size=None), so one call patches them all."""
    dense = _with_mlp(build("llama", intermediate_size=48), 1, intermediate_size=96)
    model = sy.patch_model(copy.deepcopy(dense), sy.MoEConfig(num_experts=4, top_k=2))
    assert [layer.intermediate_size for layer in moe_layers(model)] == [48, 96, 48, 48]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
    model.train()
    model(x, labels=x).loss.backward()
    assert moe_layers(model)[1].experts.gate_up_proj.grad is not None


def test_ffns_of_another_form_are_refused_with_advice_that_works():
    model = _with_mlp(build("llama", intermediate_size=48), 1, mlp_bias=True)
    types = _snapshot(model)[1]
    with pytest.raises(ValueError, match=r"\['model.layers.1.mlp'\] differ .*exclude=\['model.layers.1.mlp'\]"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    assert _snapshot(model)[1] == types
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), exclude=["model.layers.1.mlp"])
    assert model.config.switchyard["layer_indices"] == [0, 2, 3]


UNSUPPORTED_MOE = {
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=1, head_dim=8),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=1),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, head_dim=8, intermediate_size_mlp=64),
}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED_MOE))
def test_an_unsupported_moe_model_is_not_called_dense(model_type):
    model = build(model_type, intermediate_size=48, **UNSUPPORTED_MOE[model_type])
    refusal = rf"model_type '{model_type}'\) is an MoE model whose blocks switchyard cannot adopt exactly: .*MixtralSparseMoeBlock"
    with pytest.raises(ValueError, match=refusal):
        sy.patch_model(model)
    with pytest.raises(ValueError, match=refusal):  # upcycling it again is no way around it
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    assert not moe_layers(model) and not getattr(model.config, "switchyard", None)


def test_drop_upcycle_on_the_meta_device_is_refused_before_anything_changes():
    from accelerate import init_empty_weights

    config = AutoConfig.for_model("llama", **{**TINY, "intermediate_size": 48})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    types = _snapshot(model)[1]
    with pytest.raises(ValueError, match="init='drop_upcycle' .* meta device"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, init="drop_upcycle"))
    assert _snapshot(model)[1] == types and not getattr(model.config, "switchyard", None)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, init="copy"))  # shapes suffice for copy
    assert all(p.is_meta for p in moe_layers(model)[0].parameters())


def test_models_built_from_one_config_object_are_patched_and_saved_apart(tmp_path):
    """``from_config(cfg)`` does not copy ``cfg``: the record was written into the config all three share, so the
    second model was "already patched" and the unpatched third saved (by transformers) a switchyard record."""
    import json

    from transformers import PretrainedConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TINY, "intermediate_size": 48})
    first, second, plain = (AutoModelForCausalLM.from_config(config) for _ in range(3))
    sy.patch_model(first, sy.MoEConfig(num_experts=4, top_k=2))
    assert first.config.switchyard and not getattr(config, "switchyard", None)
    assert not getattr(plain.config, "switchyard", None)
    plain.save_pretrained(tmp_path / "plain")
    assert "switchyard" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    sy.patch_model(second, sy.MoEConfig(num_experts=4, top_k=2))  # raised "already patched"
    assert second.config.switchyard and second.config is not first.config
    # every module holding the config (inner model, attention, rotary) holds the patched model's own one
    for model in (first, second):
        held = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
        assert len(held) > 2 and all(c is model.config for c in held)
    first.set_attn_implementation("eager")
    assert {m.config._attn_implementation for m in first.modules()
            if isinstance(getattr(m, "config", None), PretrainedConfig)} == {"eager"}
    assert plain.config._attn_implementation == config._attn_implementation
    with torch.no_grad():
        assert first(ids()).logits.isfinite().all()
