"""Pipeline stages (``train/pipeline.py``) against the unsplit transformers model as the oracle.

    timeout 600 python -m pytest -x -q tests/unit/test_pipeline_split.py -p no:cacheprovider

Deep copies of one tiny model are split into stages and run one after the other in this process, as the GPipe
schedule runs them over ranks: stage s's decoder output (captured by a forward hook on ``model.base_model``, as
``PipelineStage`` captures it) is stage s+1's ``inputs_embeds``. Backward runs through the chain the same way: the
last stage's loss, then each earlier stage's output with the gradient its successor's input received plus its
router-loss share. Logits, loss, router loss and every parameter's gradient must equal the unsplit model's (fp32;
train mode, no dropout or jitter: deterministic). Switchyard-patched MoE models are tested as training runs them.
"""

from __future__ import annotations

import copy
import re
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import switchyard as sy
from switchyard.hf.patch import router_loss_parts
from switchyard.train.pipeline import (PIPELINE_MODEL_TYPES, HeldElsewhere, SkippedLayer,
                                       check_inputs_embeds_pass_through, check_pipeline_model, split_model,
                                       stage_layer_ranges)

from test_patch import MOE_MODELS
from tiny_models import build, build_moe, ids

TOL = {"atol": 1e-6, "rtol": 1e-5}
ROUTER_LOSSES = {"aux_loss_coef": 0.05, "z_loss_coef": 0.01}  # large enough to move the gradients past TOL


def _adopted(model_type: str) -> nn.Module:
    return sy.patch_model(build_moe(model_type, **MOE_MODELS[model_type]), overrides=ROUTER_LOSSES)


def _upcycled(every_n: int | None = None) -> nn.Module:
    return sy.patch_model(build("llama", intermediate_size=48),
                          sy.MoEConfig(num_experts=4, top_k=2, **ROUTER_LOSSES), every_n=every_n)


# 4 decoder layers each. Sliding windows shorter than the sequence, on some layers only (qwen2, qwen3): each stage
# must build the same per-layer-type masks. qwen2_moe has a dense layer (mlp_only_layers=[1]), so its stages hold
# unequal numbers of MoE layers.
MODELS = {
    "llama": partial(build, "llama", intermediate_size=48),
    "mistral": partial(build, "mistral", intermediate_size=48, sliding_window=3),
    "qwen2": partial(build, "qwen2", intermediate_size=48, use_sliding_window=True, sliding_window=3,
                     max_window_layers=1),
    "qwen3": partial(build, "qwen3", intermediate_size=48, head_dim=8, use_sliding_window=True, sliding_window=3,
                     max_window_layers=2),
    **{model_type: partial(_adopted, model_type) for model_type in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")},
    # MLA attention (as many KV heads as heads), group-limited routing, a shared expert, a dense first layer
    "deepseek_v3": lambda: sy.patch_model(build_moe(
        "deepseek_v3", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=None, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
        overrides=ROUTER_LOSSES),
    # heads untied (their configs tie by default): the tied head has a test of its own below
    "gemma2": partial(build, "gemma2", intermediate_size=48, head_dim=8, tie_word_embeddings=False),
    "gemma3_text": partial(build, "gemma3_text", intermediate_size=48, head_dim=8, tie_word_embeddings=False,
                           sliding_window=3),
    "phi3": partial(build, "phi3", intermediate_size=48, pad_token_id=0),
    "cohere": partial(build, "cohere", intermediate_size=48, tie_word_embeddings=False),
    "olmo": partial(build, "olmo", intermediate_size=48),
    "olmo2": partial(build, "olmo2", intermediate_size=48),
    "olmo3": partial(build, "olmo3", intermediate_size=48),
    "stablelm": partial(build, "stablelm", intermediate_size=48),
    "starcoder2": partial(build, "starcoder2", intermediate_size=48, tie_word_embeddings=False),
    "ernie4_5": partial(build, "ernie4_5", intermediate_size=48, head_dim=8, tie_word_embeddings=False),
    "helium": partial(build, "helium", intermediate_size=48, head_dim=8, tie_word_embeddings=False),
}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows: left padding, none, right padding; padding is not a label."""
    x = ids(batch=3)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, -2:] = 0
    return x, mask, x.masked_fill(mask == 0, -100)


def _split(model: nn.Module, stages: int, sizes: list[int] | None = None) -> list[nn.Module]:
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ranges = stage_layer_ranges(model.config.num_hidden_layers, stages, sizes)
    parts = [copy.deepcopy(model) for _ in range(stages)]
    for stage, part in enumerate(parts):
        assert split_model(part, stage, stages, sizes) == (ranges[stage], tied)
    return parts


def _run(parts: list[nn.Module], x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list[Any]:
    """Forward through the stages in order, then backward through the chain; returns each stage's output."""
    outputs, produced, received = [], [], []
    hidden = None
    for stage, part in enumerate(parts):
        last = stage == len(parts) - 1
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if stage == 0:
            kwargs["input_ids"] = x
        else:
            hidden = hidden.detach().requires_grad_()
            kwargs["inputs_embeds"] = hidden
        if last:
            kwargs["labels"] = labels
        captured = {}
        handle = part.base_model.register_forward_hook(
            lambda module, args, out: captured.update(hidden=out.last_hidden_state))
        outputs.append(part(**kwargs))
        handle.remove()
        received.append(hidden)
        hidden = captured["hidden"]
        produced.append(hidden)
    outputs[-1].loss.backward()
    for stage in reversed(range(len(parts) - 1)):
        tensors, grads = [produced[stage]], [received[stage + 1].grad]
        aux = outputs[stage].get("aux_loss")
        if aux is not None:
            tensors.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(tensors, grads)
    return outputs


def _reference(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[nn.Module, Any]:
    ref = copy.deepcopy(model)
    out = ref(input_ids=x, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return ref, out


def _aux(output: Any) -> torch.Tensor:
    aux = output.get("aux_loss")
    return aux if aux is not None else torch.zeros(())


def _assert_same_gradients(ref: nn.Module, parts: list[nn.Module]) -> None:
    """Every parameter lives on exactly one stage and has the unsplit model's gradient there."""
    owned = [dict(part.named_parameters()) for part in parts]
    assert sorted(n for params in owned for n in params) == sorted(n for n, _ in ref.named_parameters())
    for name, param in ref.named_parameters():
        holders = [params[name] for params in owned if name in params]
        assert len(holders) == 1, f"{name} is a parameter of {len(holders)} stages"
        got = holders[0].grad if holders[0].grad is not None else torch.zeros_like(param)
        want = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")


def test_every_pipeline_model_type_has_a_test_model():
    assert set(MODELS) == set(PIPELINE_MODEL_TYPES)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_stages_reproduce_the_unsplit_model(model_type, stages):
    model = MODELS[model_type]().train()
    assert model.config.model_type == model_type and model.config.num_hidden_layers >= stages
    x, mask, labels = _batch()
    ref, want = _reference(model, x, mask, labels)
    parts = _split(model, stages)
    outputs = _run(parts, x, mask, labels)
    torch.testing.assert_close(outputs[-1].logits, want.logits, **TOL)
    # the last stage's loss holds its own router-loss share; the stages' shares sum to the unsplit model's
    shares = [_aux(out) for out in outputs]
    torch.testing.assert_close(sum(shares), _aux(want), **TOL)
    torch.testing.assert_close(outputs[-1].loss - shares[-1], want.loss - _aux(want), **TOL)
    assert (want.get("aux_loss") is not None) == (model_type in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe",
                                                                 "deepseek_v3"))
    _assert_same_gradients(ref, parts)


@pytest.mark.parametrize("stages, every_n", [(2, None), (3, None), (3, 2)])
def test_upcycled_router_loss_shares_sum_to_the_unsplit_models(stages, every_n):
    # every_n=2 on 3 stages: MoE layers 0 and 2 on stages 0 and 1, none on the last (its share is 0)
    model = _upcycled(every_n).train()
    x, mask, labels = _batch()
    ref, want = _reference(model, x, mask, labels)
    parts = _split(model, stages)
    outputs = _run(parts, x, mask, labels)
    assert want.aux_loss > 0
    shares = [_aux(out) for out in outputs]
    if every_n is None:
        assert all(share > 0 for share in shares)
    else:
        assert shares[-1] == 0 and outputs[-1].get("aux_loss") is None
    torch.testing.assert_close(sum(shares), want.aux_loss, **TOL)
    last = outputs[-1]
    lm = F.cross_entropy(last.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(last.loss, lm + shares[-1], **TOL)
    torch.testing.assert_close(last.loss - shares[-1] + sum(shares), want.loss, **TOL)
    # each kind's share, per stage, sums to the unsplit model's (what the training metrics report)
    want_parts, got_parts = router_loss_parts(ref), [router_loss_parts(part) for part in parts]
    assert set(want_parts) == {"load_balancing", "z_loss"}, want_parts
    for kind, value in want_parts.items():
        torch.testing.assert_close(sum(p.get(kind, torch.zeros(())) for p in got_parts), value, **TOL)
    _assert_same_gradients(ref, parts)


def test_tied_head_is_a_buffer_on_the_last_stage_and_its_gradient_completes_the_embeddings():
    model = build("llama", intermediate_size=48, tie_word_embeddings=True).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x, mask, labels = _batch()
    ref, want = _reference(model, x, mask, labels)
    parts = _split(model, 3)
    first, last = parts[0], parts[-1]
    assert "lm_head.weight" not in dict(last.named_parameters())
    assert "lm_head.weight" in dict(last.named_buffers()) and "lm_head.weight" in last.state_dict()
    torch.testing.assert_close(last.state_dict()["lm_head.weight"], model.lm_head.weight, rtol=0, atol=0)
    assert not any(name.startswith("lm_head.") for name, _ in first.named_parameters())
    assert isinstance(first.get_input_embeddings(), nn.Embedding)
    # PipelineStage.share_tied_weight: the last stage's head gets a fresh leaf copy that collects a gradient
    head = last.get_output_embeddings()
    head._buffers["weight"] = first.get_input_embeddings().weight.detach().clone().requires_grad_()
    outputs = _run(parts, x, mask, labels)
    torch.testing.assert_close(outputs[-1].logits, want.logits, **TOL)
    torch.testing.assert_close(outputs[-1].loss, want.loss, **TOL)
    # the embedding's gradient of the tied model = the first stage's embedding gradient + the head copy's
    embedding = first.get_input_embeddings().weight
    torch.testing.assert_close(embedding.grad + head.weight.grad, ref.model.embed_tokens.weight.grad, **TOL)
    embedding.grad += head.weight.grad
    _assert_same_gradients(ref, parts)


STATE_DICT_CASES = {**MODELS, "llama_tied": partial(build, "llama", intermediate_size=48, tie_word_embeddings=True),
                    "llama_upcycled_every_2": partial(_upcycled, 2)}


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("case", sorted(STATE_DICT_CASES))
def test_stage_state_dicts_partition_the_models(case, stages):
    model = STATE_DICT_CASES[case]()
    want = model.state_dict()
    parts = _split(model, stages)
    keys = [set(part.state_dict()) for part in parts]
    assert set().union(*keys) == set(want)
    assert sum(len(k) for k in keys) == len(want), "a tensor is saved by two stages"
    for part in parts:
        for name, tensor in part.state_dict().items():
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    ranges = stage_layer_ranges(model.config.num_hidden_layers, stages)
    holder = {i: s for s, r in enumerate(ranges) for i in r}
    for stage, part in enumerate(parts):
        layers = part.base_model.layers
        assert [i for i, layer in enumerate(layers) if not isinstance(layer, SkippedLayer)] == list(ranges[stage])
        skipped = {i: layer.held_by_stage for i, layer in enumerate(layers) if isinstance(layer, SkippedLayer)}
        assert skipped == {i: holder[i] for i in skipped}
        assert isinstance(part.get_input_embeddings(), HeldElsewhere) == (stage > 0)
        assert isinstance(part.base_model.norm, nn.Identity) == (stage < stages - 1)
        assert isinstance(part.lm_head, nn.Identity) == (stage < stages - 1)


def test_a_later_stage_refuses_token_ids():
    later = _split(MODELS["llama"](), 2)[1]
    with pytest.raises(RuntimeError, match="held by pipeline stage 0; this stage takes inputs_embeds"):
        later(input_ids=ids())


@pytest.mark.parametrize("num_layers", range(1, 13))
def test_stage_ranges_are_contiguous_and_even(num_layers):
    for stages in range(1, num_layers + 1):
        ranges = stage_layer_ranges(num_layers, stages)
        assert len(ranges) == stages and ranges[0].start == 0 and ranges[-1].stop == num_layers
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
        sizes = [len(r) for r in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the first stages take the extra layers


@pytest.mark.parametrize("sizes", [[1, 3], [3, 1], [1, 2, 1]])
def test_stages_of_chosen_sizes_reproduce_the_unsplit_model(sizes):
    """parallel.pp_layers: the stages hold the layers asked for, and run as the unsplit model."""
    model = build("llama", intermediate_size=48).train()
    x, mask, labels = _batch()
    ref, want = _reference(model, x, mask, labels)
    parts = _split(model, len(sizes), sizes)
    held = [[i for i, layer in enumerate(p.model.layers) if not isinstance(layer, SkippedLayer)] for p in parts]
    assert [len(h) for h in held] == sizes and sum(held, []) == list(range(4))
    outputs = _run(parts, x, mask, labels)
    torch.testing.assert_close(outputs[-1].logits, want.logits, **TOL)
    torch.testing.assert_close(outputs[-1].loss, want.loss, **TOL)
    _assert_same_gradients(ref, parts)


@pytest.mark.parametrize("sizes", [[2, 1], [4, 0], [1, 1, 2]])
def test_chosen_stage_sizes_must_cover_the_layers_once(sizes):
    """Too few layers, an empty stage, a count per stage for another number of stages: refused, naming the value."""
    want = rf"parallel\.pp_layers={re.escape(str(sizes))} must give each of the 2 pipeline stages at least one " \
           rf"decoder layer and sum to the model's 4 \(it sums to {sum(sizes)}\)"
    with pytest.raises(ValueError, match=want):
        stage_layer_ranges(4, 2, sizes)
    model = build("llama", intermediate_size=48)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=want):
        split_model(model, 0, 2, sizes)
    assert model.state_dict().keys() == before.keys()
    assert not any(isinstance(m, SkippedLayer) for m in model.modules())


def test_a_cut_model_answers_for_its_cut_and_refuses_another():
    model = build("llama", intermediate_size=48)
    assert split_model(model, 0, 2, [1, 3]) == (range(0, 1), False)
    assert split_model(model, 0, 2, [1, 3]) == (range(0, 1), False)
    with pytest.raises(ValueError, match=r"stage 0 of 2 \(decoder layers 0–0\) already; it cannot become stage 0 of "
                                         r"2 \(layers 0–1\)"):
        split_model(model, 0, 2)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match=r"parallel\.pp=4 but the model has 3 decoder layers.*parallel\.pp ≤ 3"):
        stage_layer_ranges(3, 4)
    model = build("llama", intermediate_size=48, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"parallel\.pp=3 but the model has 2 decoder layers"):
        check_pipeline_model(model, 3)
    check_pipeline_model(model, 2)


def test_a_model_type_not_known_to_split_is_refused_before_anything_changes():
    # Granite multiplies its embeddings inside the decoder: a later stage would scale its input again
    model = build("granite", intermediate_size=48, embedding_multiplier=12.0)
    check_pipeline_model(model, 1)  # one stage: nothing to split
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"parallel\.pp=2: .* not 'granite'; use parallel\.pp=1"):
        check_pipeline_model(model, 2)
    with pytest.raises(ValueError, match="not 'granite'"):
        split_model(model, 1, 2)
    assert not any(isinstance(m, (SkippedLayer, HeldElsewhere, nn.Identity)) for m in model.modules())
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_the_installed_transformers_passes_inputs_embeds_through_every_listed_decoder(model_type):
    model = MODELS[model_type]().train()
    modes = [m.training for m in model.modules()]
    check_inputs_embeds_pass_through(model)
    assert [m.training for m in model.modules()] == modes  # the probe ran in eval mode and put the modes back


def test_a_decoder_that_changes_inputs_embeds_is_refused_by_the_run_time_probe():
    """What PipelineStage checks on the installed transformers: Granite's embedding_multiplier, here past the type
    list, is caught by the probe, and the model is left as it was."""
    model = build("granite", intermediate_size=48, embedding_multiplier=12.0)
    before = [type(layer) for layer in model.model.layers], type(model.model.norm)
    with pytest.raises(ValueError, match=r"GraniteForCausalLM's decoder changes inputs_embeds before its first layer "
                                         r"\(transformers .*\).*use parallel\.pp=1"):
        check_inputs_embeds_pass_through(model)
    assert ([type(layer) for layer in model.model.layers], type(model.model.norm)) == before
    check_inputs_embeds_pass_through(build("granite", intermediate_size=48))  # a multiplier of 1 changes nothing


def test_one_stage_leaves_the_model_whole_and_a_tied_head_tied():
    model = build("llama", intermediate_size=48, tie_word_embeddings=True)
    assert split_model(model, 0, 1) == (range(0, 4), False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
