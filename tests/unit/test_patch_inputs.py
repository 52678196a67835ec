"""patch_model on the inputs users get wrong, and outputs asked for as tuples.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_patch_inputs.py

Oracles: the unpatched transformers model (tuple layout, losses) and the model left exactly as it was
after a refused call.
"""

from __future__ import annotations

import copy

import pytest
import torch

import switchyard as sy
from switchyard.hf.patch import moe_layers

from test_patch import MOE_MODELS, _snapshot, build, ids


def _untouched(model, before) -> None:
    state, types = before
    after, types_after = _snapshot(model)
    assert types == types_after and state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert not getattr(model.config, "switchyard", None)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral"])
def test_return_dict_false_keeps_the_router_loss_and_transformers_tuple_layout(model_type):
    """A tuple output used to skip the hook: the loss silently lost aux_loss_coef's router loss."""
    if model_type == "mixtral":
        hf = build("mixtral", **MOE_MODELS["mixtral"], router_aux_loss_coef=0.5, output_router_logits=True).train()
        model = sy.patch_model(copy.deepcopy(hf)).train()
    else:
        extra = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64) if model_type == "gpt2" else {}
        hf = build(model_type, intermediate_size=48, **extra).train()
        model = sy.patch_model(copy.deepcopy(hf), sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.5)).train()
    x = ids()
    torch.manual_seed(0)
    as_dict = model(x, labels=x)
    torch.manual_seed(0)
    as_tuple = model(x, labels=x, return_dict=False)
    torch.manual_seed(0)
    reference = hf(x, labels=x, return_dict=False)
    assert as_dict.aux_loss is not None and as_dict.aux_loss > 0
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    if model_type == "mixtral":  # transformers' MoE layout: (loss, aux_loss, logits, cache, router_logits)
        assert len(as_tuple) == len(reference) == 5
        torch.testing.assert_close(as_tuple[1], as_dict.aux_loss)
        torch.testing.assert_close(as_tuple[2], reference[2], atol=1e-5, rtol=1e-5)
        assert [t.shape for t in as_tuple[4]] == [t.shape for t in reference[4]]
    else:  # the dense model's (loss, logits, cache), the router loss appended
        assert len(as_tuple) == len(reference) + 1
        torch.testing.assert_close(as_tuple[1], as_dict.logits)
        torch.testing.assert_close(as_tuple[-1], as_dict.aux_loss)
    as_tuple[0].backward()
    assert moe_layers(model)[0].router.weight.grad is not None
    assert all(layer.token_mask is None for layer in moe_layers(model))


def test_an_adapter_without_targets_is_not_silently_ignored():
    model = build("llama", intermediate_size=48)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"adapter='gpt2' reads the modules named by targets.*targets=\[\.\.\.\]"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), adapter="gpt2")
    _untouched(model, before)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), adapter="llama")  # the model type's own: fine
    assert model.config.switchyard["adapter"] == "llama"
    moe = build("mixtral", **MOE_MODELS["mixtral"])
    with pytest.raises(ValueError, match="adapter='llama' says how to read dense FFNs.*drop adapter"):
        sy.patch_model(moe, adapter="llama")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=1), r"layers must be a list of layer indices, got 1; e.g. layers=\[0, 2\]"),
        (dict(layers="13"), r"layers must be a list of layer indices, got '13'"),
        (dict(layers=[0, "1"]), r"layers must be a list of layer indices"),
        (dict(every_n=True), r"every_n must be a positive integer, got True"),
        (dict(targets=[3]), r"targets must be module names \(strings\), got 3"),
        (dict(exclude="re:(mlp"), r"exclude pattern 're:\(mlp' is not a valid regular expression"),
        (dict(moe_config={"num_experts": 4}), r"moe_config must be a MoEConfig, got dict"),
        (dict(seed="1"), r"seed must be a non-negative integer, got '1'"),
    ],
)
def test_malformed_selection_is_a_value_error_naming_the_value(kwargs, message):
    model = build("llama", intermediate_size=48)
    before = _snapshot(model)
    kwargs = {"moe_config": sy.MoEConfig(num_experts=4, top_k=2), **kwargs}
    with pytest.raises(ValueError, match=message):
        sy.patch_model(model, **kwargs)
    _untouched(model, before)


def test_layers_accepts_any_sequence_of_ints():
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2),
                           layers=(i for i in [1, 3]))
    assert model.config.switchyard["layer_indices"] == [1, 3]
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2),
                           layers=torch.tensor([0, 2]))
    assert model.config.switchyard["layer_indices"] == [0, 2]


def test_targets_matching_nothing_list_the_first_layers_modules():
    model = build("llama", intermediate_size=48)
    with pytest.raises(ValueError, match=r"matched targets=\['ffn'\]; the first layer's modules are: "
                                         r"model.layers.0.self_attn, model.layers.0.mlp"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), targets=["ffn"], adapter="llama")


def test_targets_matching_an_ffns_projections_name_the_module():
    model = build("llama", intermediate_size=48)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"targets matched 'model.layers.0.mlp.gate_proj'.*name only the FFN"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), targets=["re:.*mlp.*"], adapter="llama")
    _untouched(model, before)


def test_an_unreplaceable_layer_is_found_before_any_layer_is_replaced():
    """OPT's install used to check ``activation_fn`` only when installing: layer 0 was already swapped."""
    model = build("opt", ffn_dim=48, word_embed_proj_dim=32)
    del model.model.decoder.layers[2].activation_fn
    before = _snapshot(model)
    with pytest.raises(ValueError, match="has no 'activation_fn'"):
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), targets=["re:.*layers\\.\\d+"], adapter="opt")
    _untouched(model, before)


@pytest.mark.parametrize("model_type", sorted(MOE_MODELS))
def test_output_router_logits_set_in_the_config_is_kept_and_honoured(model_type):
    """Patching used to overwrite the user's ``config.output_router_logits=True`` with False: router logits
    were no longer returned by default, and the saved/exported config said False."""
    hf = build(model_type, **MOE_MODELS[model_type], output_router_logits=True)
    model = sy.patch_model(copy.deepcopy(hf))
    assert model.config.output_router_logits is True
    x = ids()
    ref, out = hf(x), model(x)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert len(out.router_logits) == len(ref.router_logits) == len(moe_layers(model))
    for ours, theirs in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    assert model(x, output_router_logits=False).get("router_logits") is None
    assert torch.equal(model.generate(x, max_new_tokens=3, do_sample=False),
                       hf.generate(x, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_compiled_model_is_patched_inside(model_type):
    """compile, then patch: the wrapped transformers model (what is saved and unwrapped) gets the layers and the
    router-loss hooks, under its own module names (adoption used to record ``_orig_mod.model.layers.0.mlp``)."""
    hf = build("mixtral", **MOE_MODELS["mixtral"]) if model_type == "mixtral" else build("llama", intermediate_size=48)
    moe = None if model_type == "mixtral" else sy.MoEConfig(num_experts=4, top_k=2)
    plain = sy.patch_model(copy.deepcopy(hf), moe)
    compiled = torch.compile(copy.deepcopy(hf), backend="eager")
    assert sy.patch_model(compiled, moe) is compiled
    inner = compiled._orig_mod
    assert inner.config.switchyard["modules"] == plain.config.switchyard["modules"] == [
        f"model.layers.{i}.mlp" for i in range(4)]
    x = ids()
    inner.train(), plain.train(), compiled.train()
    want = plain(x, labels=x)
    for model in (inner, compiled):
        got = model(x, labels=x)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.aux_loss, want.aux_loss)


def test_lora_on_a_patched_model():
    """peft after patching: linear targets (attention, shared experts) train with the router loss in the loss;
    the router and the grouped experts are not nn.Linear, and peft refuses them by name."""
    peft = pytest.importorskip("peft")
    model = sy.patch_model(build("llama", intermediate_size=48),
                           sy.MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, aux_loss_coef=0.1))
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "shared_experts.up_proj"], r=4))
    x = ids()
    out = lora.train()(x, labels=x)
    assert out.aux_loss is not None
    out.loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    for target in ("router", "experts"):
        fresh = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
        with pytest.raises(ValueError, match="is not supported"):
            peft.get_peft_model(fresh, peft.LoraConfig(target_modules=[target], r=4))


@pytest.mark.parametrize("model_type", ["mixtral", "gpt2"])
def test_a_positional_attention_mask_keeps_padding_out_of_the_balance_loss(model_type):
    """``model(input_ids, attention_mask)``: the mask used to be looked for in the keywords only."""
    if model_type == "mixtral":
        model = sy.patch_model(build("mixtral", **MOE_MODELS["mixtral"], router_aux_loss_coef=0.1))
    else:
        model = sy.patch_model(build("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),
                               sy.MoEConfig(num_experts=4, top_k=2))  # eval: no dropout; grad on: losses
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    keyword = model(x, attention_mask=mask).aux_loss
    position = 1 if model_type == "mixtral" else 2  # GPT-2: forward(input_ids, past_key_values, attention_mask)
    args = (x, None, mask) if position == 2 else (x, mask)
    torch.testing.assert_close(model(*args).aux_loss, keyword)
    assert not torch.allclose(model(x).aux_loss, keyword)
