"""Parity with transformers' own MoE blocks: adopted layers must compute what the HF blocks compute.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_hf_parity.py

External oracles: each HF block is built offline from a tiny config (hidden 32, expert ffn 24 — not
H/2, so a transposed copy cannot pass by accident), filled with seeded randn * 0.1 (HF leaves the 3-D
expert tensors as torch.empty and Qwen/OLMoE routers as zeros, which would make every routing a tie),
and run in eval mode next to ``layer_from_hf_block(block, config)``, on each of the layer's inference
paths (sort, small-batch, all-experts).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
from transformers import AutoConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from switchyard.config import MoEConfig  # noqa: E402
from switchyard.hf import SUPPORTED_BLOCKS, layer_from_hf_block, moe_config_from_hf  # noqa: E402
from switchyard.hf.adopt import ADAPTERS, _collect  # noqa: E402
from switchyard.moe.kernels import sum_copies  # noqa: E402
from switchyard.moe.layer import MoELayer  # noqa: E402

H, FFN, E, K = 32, 24, 8, 2
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _block_cls(model_type: str, name: str) -> type[nn.Module]:
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=[name])
    return getattr(module, name)


# case id -> (model_type, block class, config kwargs)
CASES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock",
                {"intermediate_size": FFN, "num_local_experts": E}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock",
                  {"moe_intermediate_size": FFN, "num_experts": E, "shared_expert_intermediate_size": 40,
                   "norm_topk_prob": False}),
    "qwen3_moe_norm": ("qwen3_moe", "Qwen3MoeSparseMoeBlock",
                       {"moe_intermediate_size": FFN, "num_experts": E, "norm_topk_prob": True}),
    "qwen3_moe_raw": ("qwen3_moe", "Qwen3MoeSparseMoeBlock",
                      {"moe_intermediate_size": FFN, "num_experts": E, "norm_topk_prob": False}),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock", {"intermediate_size": FFN, "num_experts": E}),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE",
                    {"moe_intermediate_size": FFN, "n_routed_experts": E, "n_group": 4, "topk_group": 2,
                     "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                     "first_k_dense_replace": 0}),
}


def build_hf(case: str, seed: int = 0) -> tuple[nn.Module, object]:
    model_type, cls_name, kwargs = CASES[case]
    config = AutoConfig.for_model(model_type, hidden_size=H, num_experts_per_tok=K, hidden_act="silu", **kwargs)
    config._experts_implementation = "eager"  # standalone blocks otherwise warn; eager is the reference loop
    block = _block_cls(model_type, cls_name)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if hasattr(block.gate, "e_score_correction_bias"):  # non-zero, so it really steers the choice
            block.gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
    return block.eval(), config


def make_input(seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 5, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hf_gate(block: nn.Module, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits, weights, indices) from HF's own gate; weights/indices None where this version hides them."""
    out = block.gate(x_TH)
    out = out if isinstance(out, tuple) else (out,)
    logits = next(t for t in out if t.is_floating_point() and t.shape == (x_TH.shape[0], E))
    if len(out) == 3 and out[2].shape == (x_TH.shape[0], K):  # transformers 5: (logits, weights, indices)
        return logits, out[1], out[2]
    return logits, None, None


def sort_by_expert(idx_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx_TK.argsort(dim=-1)
    return idx_TK.gather(1, order), w_TK.float().gather(1, order)


# MoELayer's inference paths (small_batch_rows, all_experts_tokens): each one is held to the HF block
INFERENCE_PATHS = {"sorted": (0, 0), "small_batch": (10**6, 0), "all_experts": (0, 10**6)}


@pytest.mark.parametrize("path", list(INFERENCE_PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_router_parity(case: str, path: str) -> None:
    block, config = build_hf(case)
    layer = layer_from_hf_block(block, config)
    assert not layer.training
    layer.small_batch_rows, layer.all_experts_tokens = INFERENCE_PATHS[path]
    x = make_input()
    with torch.no_grad():
        expected = block(x.clone())
        ours = layer(x.clone())
        assert (layer.inference_path(x.reshape(-1, H), layer.last_router_output.topk_idx_TK) or "sorted") == path
        hf_logits, hf_w, hf_idx = hf_gate(block, x.reshape(-1, H))
    torch.testing.assert_close(ours, expected, **TOL)
    routed = layer.last_router_output
    assert routed is not None
    torch.testing.assert_close(routed.logits_TE, hf_logits.float(), **TOL)
    if hf_idx is not None:
        ours_idx, ours_w = sort_by_expert(routed.topk_idx_TK, routed.topk_weight_TK)
        theirs_idx, theirs_w = sort_by_expert(hf_idx, hf_w)
        assert torch.equal(ours_idx, theirs_idx)
        torch.testing.assert_close(ours_w, theirs_w, **TOL)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("mixtral", {"norm_topk_prob": True, "score_func": "softmax", "num_shared_experts": 0}),
        ("qwen2_moe", {"norm_topk_prob": False, "num_shared_experts": 1, "shared_expert_gate": True,
                       "shared_expert_intermediate_size": 40}),
        ("qwen3_moe_norm", {"norm_topk_prob": True}),
        ("olmoe", {"norm_topk_prob": False}),
        ("deepseek_v3", {"score_func": "sigmoid", "n_group": 4, "topk_group": 2, "expert_bias": True,
                         "routed_scaling_factor": 2.5, "num_shared_experts": 1,
                         "shared_expert_intermediate_size": FFN, "aux_loss_coef": 0.0}),
    ],
)
def test_config_mapping(case: str, expected: dict) -> None:
    _, cls_name, _ = CASES[case]
    _, config = build_hf(case)
    cfg = moe_config_from_hf(config, cls_name, capacity_factor=1.5)
    assert (cfg.num_experts, cfg.top_k, cfg.intermediate_size, cfg.activation) == (E, K, FFN, "silu")
    assert cfg.capacity_factor == 1.5  # overrides win
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


# "auto" is the per-expert loop on CPU, the weights applied in the combine; the SwiGLU Function's two backends take
# each row's routing weight inside the experts (before GEMM 2) and the combine is a plain sum (``sum_copies``)
EXPERT_IMPLS = ("auto", "swiglu_per_expert", "swiglu_grouped")


@pytest.mark.parametrize("impl", EXPERT_IMPLS)
@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe_raw"])
def test_backward_parity(case: str, impl: str, monkeypatch) -> None:
    import switchyard.moe.dispatcher as dispatcher_mod

    plain_sums = []
    monkeypatch.setattr(dispatcher_mod, "sum_copies", lambda *a: plain_sums.append(1) or sum_copies(*a))
    block, config = build_hf(case)
    layer = layer_from_hf_block(block, config)
    layer.experts.impl = impl
    x_hf, x_ours = make_input().requires_grad_(True), make_input().requires_grad_(True)
    upstream = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(7))
    (block(x_hf) * upstream).sum().backward()
    (layer(x_ours) * upstream).sum().backward()
    assert len(plain_sums) == (impl != "auto")  # the weights went through the experts
    torch.testing.assert_close(x_ours.grad, x_hf.grad, **TOL)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, **TOL)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, **TOL)
    torch.testing.assert_close(layer.experts.down_proj.grad, block.experts.down_proj.grad, **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe_raw"])
def test_backward_parity_on_cuda(case: str) -> None:
    """On CUDA the layer's own kernels run (Triton sort, gather, SwiGLU with the folded weights, grouped GEMMs), in
    fp32: outputs and gradients against the HF block on the same device."""
    block, config = build_hf(case)
    layer = layer_from_hf_block(block, config)
    block, layer = block.cuda(), layer.cuda()
    x_hf, x_ours = make_input().cuda().requires_grad_(True), make_input().cuda().requires_grad_(True)
    upstream = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(7)).cuda()
    expected, ours = block(x_hf), layer(x_ours)
    assert layer.experts.resolve_impl(x_ours.reshape(-1, H)) in ("swiglu_grouped", "swiglu_per_expert")
    (expected * upstream).sum().backward()
    (ours * upstream).sum().backward()
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, **TOL)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, **TOL)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, **TOL)
    torch.testing.assert_close(layer.experts.down_proj.grad, block.experts.down_proj.grad, **TOL)


@pytest.mark.parametrize("impl", EXPERT_IMPLS)
def test_expert_with_no_tokens(impl: str) -> None:
    """Expert 3 gets no token (its router row is pushed far down); output and grads still match HF."""
    block, config = build_hf("mixtral")
    x = make_input()
    x[..., 0] = x[..., 0].abs() + 1.0
    with torch.no_grad():
        block.gate.weight[3].zero_()
        block.gate.weight[3, 0] = -100.0  # logit_3 <= -100 for every token
    layer = layer_from_hf_block(block, config)
    layer.experts.impl = impl
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, ours = block(x_hf), layer(x_ours)
    assert layer.last_stats is not None and int(layer.last_stats.tokens_per_expert_E[3]) == 0
    assert not (hf_gate(block, x.reshape(-1, H))[2] == 3).any()
    torch.testing.assert_close(ours, expected, **TOL)
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, **TOL)
    grad = layer.experts.down_proj.grad
    assert grad is not None and torch.count_nonzero(grad[3]) == 0


def test_mixtral_bf16_loose() -> None:
    """bf16: HF computes router logits in the input dtype (bf16), ours in fp32 from the same bf16
    weights and inputs, so logits differ by bf16 rounding and a near-tied top-k could in principle
    flip; the outputs are compared loosely (bf16 eps is 2**-8), the logits against HF's upcast."""
    block, config = build_hf("mixtral")
    block = block.to(torch.bfloat16)
    layer = layer_from_hf_block(block, config)
    assert layer.experts.gate_up_proj.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.bfloat16
    x = make_input(dtype=torch.bfloat16)
    with torch.no_grad():
        expected, ours = block(x.clone()), layer(x.clone())
        hf_logits = hf_gate(block, x.reshape(-1, H))[0]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(layer.last_router_output.logits_TE, hf_logits.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("training", [False, True])
def test_one_expert_top1_equals_dense_ffn(training: bool) -> None:
    """megablocks' sanity test: a single always-chosen expert with weight 1 *is* the FFN it came from."""
    config = AutoConfig.for_model("llama", hidden_size=H, intermediate_size=FFN, hidden_act="silu")
    mlp = LlamaMLP(config)
    layer = MoELayer(MoEConfig(num_experts=1, top_k=1, router_jitter=0.0), H, intermediate_size=FFN)
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None])
        layer.experts.down_proj.copy_(mlp.down_proj.weight[None])
    layer.train(training)
    x = make_input()
    torch.testing.assert_close(layer(x), mlp(x), atol=1e-6, rtol=1e-6)


# -- transformers 4.x per-expert layout (nn.ModuleList of MLPs), checked against the fused 5.x block ----
def _legacy_copy(block: nn.Module, names: tuple[str, str, str]) -> nn.Module:
    """The same weights as a 4.x-style block: ``gate`` nn.Linear, ``experts`` ModuleList of MLPs."""
    legacy = type(type(block).__name__, (nn.Module,), {})()  # adapters key on the class name
    legacy.gate = nn.Linear(H, E, bias=False)
    legacy.experts = nn.ModuleList()
    with torch.no_grad():
        legacy.gate.weight.copy_(block.gate.weight)
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        for e in range(E):
            mlp = nn.Module()
            for name, w in zip(names, (gate_up[e, :FFN], gate_up[e, FFN:], down[e])):
                setattr(mlp, name, nn.Linear(w.shape[1], w.shape[0], bias=False))
                getattr(mlp, name).weight.copy_(w)
            legacy.experts.append(mlp)
    for attr in ("shared_expert", "shared_expert_gate", "shared_experts"):
        if hasattr(block, attr):
            setattr(legacy, attr, getattr(block, attr))
    return legacy.eval()


@pytest.mark.parametrize("case, names", [("mixtral", ("w1", "w3", "w2")),
                                         ("qwen2_moe", ("gate_proj", "up_proj", "down_proj"))])
def test_legacy_per_expert_layout(case: str, names: tuple[str, str, str]) -> None:
    block, config = build_hf(case)
    layer = layer_from_hf_block(_legacy_copy(block, names), config)
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), **TOL)


def test_collect_takes_only_local_experts() -> None:
    """An EP rank copies only its own experts (here ids 4..7 of 8, as rank 1 of ep=2 would)."""
    block, config = build_hf("deepseek_v3")
    cfg = moe_config_from_hf(config, "DeepseekV3MoE")
    src = _collect(block, ADAPTERS["DeepseekV3MoE"], cfg, [4, 5, 6, 7])
    assert torch.equal(src["experts.gate_up_proj"], block.experts.gate_up_proj[4:])
    assert torch.equal(src["experts.down_proj"], block.experts.down_proj[4:])
    assert torch.equal(src["router.expert_bias"], block.gate.e_score_correction_bias)


def test_unknown_block_and_mismatch_raise() -> None:
    block, config = build_hf("mixtral")
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        layer_from_hf_block(nn.Linear(H, H), config)
    with pytest.raises(ValueError, match="supported"):
        moe_config_from_hf(config, "SwitchTransformersSparseMLP")
    with pytest.raises(ValueError, match="unknown MoEConfig keys"):
        moe_config_from_hf(config, "MixtralSparseMoeBlock", not_a_field=1)
    config.num_local_experts = 4  # config disagrees with the block's 8 experts
    with pytest.raises(ValueError, match="holds 8 experts"):
        layer_from_hf_block(block, config)
    config.num_local_experts = E
    config.hidden_size = 48  # router weight is [8, 32]
    with pytest.raises(ValueError, match="router.weight"):
        layer_from_hf_block(block, config)


def test_registry_keys() -> None:
    assert set(SUPPORTED_BLOCKS) == {"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                                     "OlmoeSparseMoeBlock", "DeepseekV3MoE"}
