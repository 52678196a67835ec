"""Adopting transformers' MoE models, family by family: adopted exactly, or refused naming the block and why.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_adopt_audit.py

Oracle: the unpatched transformers model (fp32 logits, atol 1e-5), in eval and in train mode (no dropout, no
jitter configured). ``test_patch.py`` covers each adopted family's default configuration; here are the variants
that change the routing or the layer layout (renormalized or raw weights, sparse steps, dense-only layers, one
routing group, no or several shared experts, non-SiLU experts, a DeepSeek-V3 model under another model_type),
config fields the HF block ignores, and every other MoE family, which must be refused rather than run with other
routing.
"""

from __future__ import annotations

import copy

import pytest
import torch

import switchyard as sy
from switchyard.hf import layer_from_hf_block, moe_config_from_hf
from switchyard.hf.adopt import refuse_unadoptable
from switchyard.hf.patch import moe_layers
from tiny_models import build_moe, ids

TOL = dict(atol=1e-5, rtol=1e-5)
_MLA = dict(head_dim=None, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

# id -> (model_type, config fields)
VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral_top1_gelu": ("mixtral", dict(num_experts_per_tok=1, hidden_act="gelu")),
    "qwen2_moe_renormalized_every_2nd_layer": ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2,
                                                                 mlp_only_layers=[], shared_expert_intermediate_size=40,
                                                                 hidden_act="gelu_pytorch_tanh")),
    "qwen3_moe_sparse_step_and_mlp_only_layers": ("qwen3_moe", dict(decoder_sparse_step=2, mlp_only_layers=[3],
                                                                    norm_topk_prob=False)),
    "olmoe_renormalized": ("olmoe", dict(norm_topk_prob=True)),
    "deepseek_v3_raw_weights_two_shared": ("deepseek_v3", dict(_MLA, n_routed_experts=8, n_group=4, topk_group=2,
                                                               norm_topk_prob=False, n_shared_experts=2,
                                                               routed_scaling_factor=2.5, first_k_dense_replace=0)),
    "deepseek_v3_one_group_no_shared": ("deepseek_v3", dict(_MLA, n_routed_experts=8, n_group=1, topk_group=1,
                                                            n_shared_experts=0, routed_scaling_factor=1.0,
                                                            first_k_dense_replace=1)),
    # transformers maps model_type sarvam_mla to DeepseekV3ForCausalLM: the same blocks, its own config class
    "sarvam_mla": ("sarvam_mla", dict(_MLA, n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1)),
}


def _blocks(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ in sy.hf.SUPPORTED_BLOCKS for m in model.modules())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # HF builds n_shared_experts=0 as size 0
@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_an_adopted_variant_has_the_same_logits_in_eval_and_train(case):
    model_type, fields = VARIANTS[case]
    hf = build_moe(model_type, **fields)
    ours = sy.patch_model(copy.deepcopy(hf))
    assert len(moe_layers(ours)) == _blocks(hf) > 0
    x = ids()
    for mode in ("eval", "train"):
        with torch.no_grad():
            torch.testing.assert_close(getattr(ours, mode)()(x).logits, getattr(hf, mode)()(x).logits, **TOL)


@pytest.mark.parametrize("model_type, fields", [
    ("qwen2_moe", dict(shared_expert_intermediate_size=40)), ("qwen3_moe", dict(norm_topk_prob=True)),
    ("olmoe", {}), ("deepseek_v3", dict(_MLA, n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1)),
])
def test_router_jitter_noise_in_a_config_whose_block_ignores_it_does_not_jitter(model_type, fields):
    """Only Mixtral's block reads ``router_jitter_noise``; in another family's config.json it is inert in
    transformers, and must be so in the adopted layers (it jittered them in training: other routing, other loss)."""
    hf = build_moe(model_type, router_jitter_noise=0.5, **fields).train()
    ours = sy.patch_model(copy.deepcopy(hf)).train()
    assert {layer.config.router_jitter for layer in moe_layers(ours)} == {0.0}
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, **TOL)


def test_mixtral_still_jitters_router_and_experts_alike():
    config = build_moe("mixtral", router_jitter_noise=0.1).config
    cfg = moe_config_from_hf(config, "MixtralSparseMoeBlock")
    assert (cfg.router_jitter, cfg.jitter_experts_input) == (0.1, True)


def test_expert_size_is_read_from_the_field_the_block_reads():
    """Mixtral and OLMoE size experts by ``intermediate_size``; a ``moe_intermediate_size`` their config happens to
    carry (a merged or converted config.json) is ignored by transformers, and was read first here (refused)."""
    for model_type in ("mixtral", "olmoe"):
        hf = build_moe(model_type, intermediate_size=40, moe_intermediate_size=16)
        ours = sy.patch_model(copy.deepcopy(hf))
        assert {layer.intermediate_size for layer in moe_layers(ours)} == {40}
        with torch.no_grad():
            torch.testing.assert_close(ours(ids()).logits, hf(ids()).logits, **TOL)


# model_type -> (config fields, the block, a fragment of what differs); None: no adapter, not known to match
REFUSED: dict[str, tuple[dict, str, str | None]] = {
    "gpt_oss": ({}, "GptOssMLP", "clamped SwiGLU"),
    "phimoe": ({}, "PhimoeSparseMoeBlock", "sparsemixer"),
    "llama4_text": (dict(intermediate_size_mlp=64), "Llama4TextMoe", "scales the expert's input"),
    "deepseek_v2": (dict(_MLA, topk_method="group_limited_greedy", n_group=2, topk_group=1), "DeepseekV2Moe",
                    "best expert"),
    "jetmoe": ({}, "JetMoeMoE", "ungated"),
    "granitemoe": ({}, "GraniteMoeMoE", None),
    "jamba": ({}, "JambaSparseMoeBlock", None),
    "qwen3_next": ({}, "Qwen3NextSparseMoeBlock", None),
    "minimax": ({}, "MiniMaxSparseMoeBlock", None),
    "ernie4_5_moe": ({}, "Ernie4_5_MoeSparseMoeBlock", None),
    "glm4_moe": (dict(head_dim=None), "Glm4MoeMoE", None),
    "hunyuan_v1_moe": ({}, "HunYuanMoEV1Moe", None),
    "flex_olmo": ({}, "FlexOlmoSparseMoeBlock", None),
}


def _snapshot(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_another_moe_family_is_refused_naming_its_block_and_what_differs(model_type):
    fields, block_name, why = REFUSED[model_type]
    model = build_moe(model_type, **fields)
    pattern = (rf"model_type '{model_type}'.* cannot adopt exactly: {block_name} \(.*\): "
               + (".*" + why if why else "switchyard has no adapter for it"))
    with pytest.raises(ValueError, match=pattern):
        refuse_unadoptable(model)
    block = next(m for m in model.modules() if type(m).__name__ == block_name)
    with pytest.raises(ValueError, match=rf"{block_name}' cannot be adopted exactly: .*supported blocks"):
        layer_from_hf_block(block, model.config)
    types, state = _snapshot(model)
    with pytest.raises(ValueError, match=type(model).__name__):
        sy.patch_model(model)
    after_types, after_state = _snapshot(model)
    assert after_types == types and after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert not getattr(model.config, "switchyard", None)


def test_dbrx_is_found_though_its_config_nests_the_expert_count():
    """DBRX keeps ``moe_num_experts`` in ``ffn_config``: a config-field check sees a dense model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("dbrx", d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=64,
                                  attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                  ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2})
    with pytest.raises(ValueError, match=r"model_type 'dbrx'.*DbrxFFN \(transformer.blocks.0.ffn\): .*-norm"):
        refuse_unadoptable(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_dense_and_adoptable_models_are_not_refused(model_type):
    refuse_unadoptable(build_moe(model_type, **(_MLA if model_type == "deepseek_v3" else {})))


def test_a_patched_model_is_not_refused_for_its_own_moe_layers():
    refuse_unadoptable(sy.patch_model(build_moe("mixtral")))
    refuse_unadoptable(sy.patch_model(build_moe("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2)))


@pytest.mark.parametrize("model_type, fields, overrides, message", [
    ("mixtral", {}, {"num_shared_experts": 1},
     r"MixtralSparseMoeBlock has no shared expert, so num_shared_experts cannot be overridden"),
    ("qwen3_moe", {}, {"num_shared_experts": 1},
     r"Qwen3MoeSparseMoeBlock has no shared expert, so num_shared_experts cannot be overridden"),
    ("mixtral", {}, {"shared_expert_gate": True},
     r"MixtralSparseMoeBlock has no shared-expert gate, so shared_expert_gate cannot be overridden"),
    ("deepseek_v3", dict(_MLA, n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1),
     {"shared_expert_gate": True}, r"DeepseekV3MoE has no shared-expert gate, so shared_expert_gate cannot be overridden"),
    ("qwen2_moe", {}, {"num_shared_experts": 0},
     r"num_shared_experts=0 removes Qwen2MoeSparseMoeBlock's shared expert but keeps its gate .*also pass "
     r"shared_expert_gate=False"),
], ids=["mixtral_adds_shared", "qwen3_moe_adds_shared", "mixtral_adds_gate", "deepseek_v3_adds_gate",
        "qwen2_moe_drops_shared_keeps_gate"])
def test_a_shared_expert_override_the_block_cannot_take_is_a_value_error_naming_it(model_type, fields, overrides,
                                                                                 message):
    """They raised a bare AssertionError ("adapter enables shared experts without naming them"; skipped under
    ``python -O``), or named shared_expert_gate, which the user never set; the model must be left as it was."""
    model = build_moe(model_type, **fields)
    types, state = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        sy.patch_model(model, overrides=overrides)
    after_types, after_state = _snapshot(model)
    assert after_types == types and all(torch.equal(after_state[k], v) for k, v in state.items())
    assert not getattr(model.config, "switchyard", None)


def test_qwen2_moe_shared_expert_and_gate_are_dropped_together_when_both_are_overridden():
    """What the num_shared_experts=0 message advises works: the layers have neither, and the model runs."""
    hf = build_moe("qwen2_moe")
    ours = sy.patch_model(copy.deepcopy(hf), overrides={"num_shared_experts": 0, "shared_expert_gate": False})
    assert all(layer.shared_experts is None and layer.shared_expert_gate is None for layer in moe_layers(ours))
    with torch.no_grad():
        assert ours(ids()).logits.isfinite().all()
