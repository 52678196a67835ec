"""Dense-FFN adapters against the transformers models they claim to cover.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_architectures.py

For every ``model_type`` in the registry a tiny model is built offline (FFN biases randomized, since
HF zero-inits them and a bias read from the wrong place would otherwise pass), then:

* ``read`` → ``DenseFFN.forward`` equals the model's own FFN module on random input (OPT: the layer's
  ``fc2(activation_fn(fc1(x)))``), and the read tensors are views of the model's parameters;
* copy-upcycling every layer into a 4-expert top-2 ``MoELayer`` and ``install``-ing it leaves the
  model's logits unchanged (fp32, atol 1e-5) — the oracle that proves each install, OPT's inline fc1/fc2
  included, puts the MoE exactly where the FFN computed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from switchyard.config import MoEConfig  # noqa: E402
from switchyard.hf.architectures import (  # noqa: E402
    ADAPTERS, DenseFFN, FFNSite, adapter_for, read_generic, supported_model_types,
)
from switchyard.hf.upcycle import expert_fields, init_experts, init_router  # noqa: E402
from switchyard.moe.layer import MoELayer  # noqa: E402

H, F, LAYERS, VOCAB = 32, 64, 2, 128
TOL = {"atol": 1e-5, "rtol": 1e-5}
_TOKENS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, **_TOKENS}
_GPT = {"n_embd": H, "n_inner": F, "n_layer": LAYERS, "n_head": 4, **_TOKENS}
# model_type -> config kwargs; anything not listed uses the Llama-style _DECODER.
KWARGS: dict[str, dict] = {
    "gpt2": _GPT,
    "gptj": {**_GPT, "rotary_dim": 4},
    "gpt_neox": {"hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                 **_TOKENS},
    "opt": {"hidden_size": H, "ffn_dim": F, "word_embed_proj_dim": H, "num_hidden_layers": LAYERS,
            "num_attention_heads": 4, **_TOKENS},
    "phi": {k: v for k, v in _DECODER.items() if k != "head_dim"},
}
ALL_TYPES = supported_model_types()


def build(model_type: str, **extra) -> nn.Module:
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type!r}")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**KWARGS.get(model_type, _DECODER), **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def ffn_reference(adapter_name: str, site: FFNSite) -> nn.Module | object:
    """What the model computes for its FFN: the module, or OPT's inline fc2(act(fc1(x)))."""
    if adapter_name == "opt":
        layer = site.parent
        return lambda x: layer.fc2(layer.activation_fn(layer.fc1(x)))
    return getattr(site.parent, site.attribute)


def copy_upcycled(dense: DenseFFN, num_experts: int = 4, top_k: int = 2) -> MoELayer:
    config = dataclasses.replace(MoEConfig(num_experts=num_experts, top_k=top_k), **expert_fields(dense))
    layer = MoELayer(config, dense.hidden_size, dense.intermediate_size)
    with torch.no_grad():
        for name, value in init_experts(dense, config, layer.local_expert_ids).items():
            getattr(layer.experts, name).data.copy_(value)
        layer.router.weight.data.copy_(init_router(dense, config))
    return layer.eval()


def _shares_storage(view: torch.Tensor, model: nn.Module) -> bool:
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return view.untyped_storage().data_ptr() in ptrs


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_read_and_copy_upcycle_reproduce_the_dense_model(model_type: str) -> None:
    model = build(model_type)
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    assert len(sites) == LAYERS == len(adapter.layers(model))
    names = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, H, generator=gen)
    for site in sites:
        assert names[site.qualified_name] is adapter.ffn_module(site)
        dense = adapter.read(site, model.config)
        assert (dense.hidden_size, dense.intermediate_size) == (H, F)
        assert all(_shares_storage(t, model) for t in (dense.up, dense.down)), "read must not copy"
        with torch.no_grad():
            torch.testing.assert_close(dense.forward(x), ffn_reference(adapter.name, site)(x), **TOL)

    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        expected = model(ids).logits
        layers = []
        for site in sites:
            layers.append(copy_upcycled(adapter.read(site, model.config)))
            adapter.install(site, layers[-1])
        got = model(ids).logits
    assert sum(isinstance(m, MoELayer) for m in model.modules()) == LAYERS
    assert all(layer.last_stats is not None for layer in layers), "an installed MoE layer never ran"
    torch.testing.assert_close(got, expected, **TOL)


def test_llama_mlp_bias_and_gpt2_conv1d_layouts() -> None:
    """Gated biases (Llama ``mlp_bias``) land on the right projections; Conv1D weights are transposed."""
    llama = build("llama", mlp_bias=True)
    dense = ADAPTERS["llama"].read(ADAPTERS["llama"].sites(llama)[0], llama.config)
    assert dense.gated and dense.up_bias is not None and dense.gate_bias is not None and dense.down_bias is not None
    gpt2 = build("gpt2")
    site = ADAPTERS["gpt2"].sites(gpt2)[1]
    dense = ADAPTERS["gpt2"].read(site, gpt2.config)
    assert not dense.gated and dense.activation == "gelu_new"
    assert torch.equal(dense.up, site.parent.mlp.c_fc.weight.t())
    assert site.qualified_name == "transformer.h.1.mlp"


def test_phi3_gate_rows_come_first() -> None:
    model = build("phi3")
    mlp = model.model.layers[0].mlp
    dense = ADAPTERS["phi3"].read(ADAPTERS["phi3"].sites(model)[0], model.config)
    assert torch.equal(dense.gate, mlp.gate_up_proj.weight[:F]) and torch.equal(dense.up, mlp.gate_up_proj.weight[F:])


def test_opt_site_names_the_layer_and_moe_lands_on_fc1() -> None:
    model = build("opt")
    site = ADAPTERS["opt"].sites(model)[0]
    assert (site.qualified_name, site.attribute) == ("model.decoder.layers.0", "fc1")
    layer = copy_upcycled(ADAPTERS["opt"].read(site, model.config))
    ADAPTERS["opt"].install(site, layer)
    assert site.parent.fc1 is layer
    assert isinstance(site.parent.fc2, nn.Identity) and isinstance(site.parent.activation_fn, nn.Identity)


def test_opt_install_through_a_name_matched_site() -> None:
    """patch_model(targets=[...], adapter='opt') may hand over (decoder.layers, "1"): same result."""
    model = build("opt")
    layers = model.model.decoder.layers
    site = FFNSite(1, "model.decoder.layers.1", layers, "1")
    dense = read_generic(layers[1], "opt", model.config.activation_function)
    ADAPTERS["opt"].install(site, copy_upcycled(dense))
    assert isinstance(layers[1].fc1, MoELayer)


def test_read_generic_reads_user_named_modules() -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = AutoConfig.for_model("llama", hidden_size=H, intermediate_size=F, hidden_act="silu")
    mlp = LlamaMLP(config)
    dense = read_generic(mlp, "llama", "silu")
    x = torch.randn(4, H)
    with torch.no_grad():
        torch.testing.assert_close(dense.forward(x), mlp(x), **TOL)
    with pytest.raises(ValueError, match="adapter 'nope' is unknown"):
        read_generic(mlp, "nope", "silu")
    with pytest.raises(ValueError, match="gate_up_proj"):
        read_generic(mlp, "phi3", "silu")
    with pytest.raises(ValueError, match="activation 'swiglu' is unknown"):
        read_generic(mlp, "llama", "swiglu")


def test_adapter_for_unsupported_model_says_how_to_target_by_name() -> None:
    model = nn.Module()
    model.config = AutoConfig.for_model("bert", hidden_size=H, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"'bert'.*supported model types.*'llama'.*targets=\[\.\.\.\], adapter='llama'"):
        adapter_for(model)
    with pytest.raises(ValueError, match="none of the decoder-layer lists"):
        ADAPTERS["llama"].sites(nn.Linear(2, 2))


def test_dense_ffn_checks_shapes() -> None:
    up, down = torch.zeros(F, H), torch.zeros(H, F)
    assert DenseFFN(up, down, activation="relu").intermediate_size == F
    with pytest.raises(ValueError, match="down must have shape"):
        DenseFFN(up, down.t())
    with pytest.raises(ValueError, match="gate must have shape"):
        DenseFFN(up, down, gate=torch.zeros(F + 1, H))
    with pytest.raises(ValueError, match="down_bias must have shape"):
        DenseFFN(up, down, down_bias=torch.zeros(F))


def test_registry_is_consistent() -> None:
    assert set(ADAPTERS) >= {"llama", "phi3", "gpt2", "gpt_neox", "opt"}
    assert all(name == adapter.name for name, adapter in ADAPTERS.items())
    assert len(ALL_TYPES) == sum(len(a.model_types) for a in ADAPTERS.values())
