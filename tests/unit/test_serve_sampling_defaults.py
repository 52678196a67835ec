"""Sampling: top_k (vLLM's extension) chooses among the tokens transformers' own warpers keep, and a model's
generation_config.json gives the sampling settings a request leaves out (as vLLM does), where the server sampled every
model at temperature 1 / top_p 1 whatever its config recommends (Qwen3: 0.6 / 0.95 / top_k 20).

    python -m pytest -q tests/unit/test_serve_sampling_defaults.py
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import switchyard as sy
from switchyard.serve import protocol as P
from switchyard.serve.sampling import SamplingParams, generation_defaults, sample_token
from tiny_models import build


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 3, 1.0), (0.7, 5, 0.8), (1.3, 1, 1.0), (1.0, 40, 0.5)])
def test_top_k_draws_only_what_generates_warpers_keep(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(top_k)) * 3
    kept = logits[None].clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        kept = warper(None, kept)  # generate()'s order: temperature, top-k, top-p
    allowed = set(torch.nonzero(kept[0] > float("-inf")).flatten().tolist())
    params = SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_token(logits, params, generator) for _ in range(400)}
    assert drawn <= allowed, (drawn - allowed, allowed)
    assert len(drawn) > 1 or len(allowed) == 1


def test_top_k_off_values_and_refusals() -> None:
    for off in (-1, 0):
        assert SamplingParams(max_tokens=1, top_k=off).top_k == off
    with pytest.raises(ValueError, match="top_k must be an integer >= -1"):
        SamplingParams(max_tokens=1, top_k=-2)
    assert P.CompletionRequest(model="m", prompt="x", top_k=20).top_k == 20


def test_generation_config_settings_are_the_defaults(tmp_path) -> None:
    """Oracle: transformers' GenerationConfig as saved and read back from generation_config.json."""
    model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    assert generation_defaults(model) == {}  # transformers' defaults (its top_k 50 included) are not the model's
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20).save_pretrained(tmp_path)
    model.generation_config = GenerationConfig.from_pretrained(tmp_path)
    assert generation_defaults(model) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert generation_defaults(object()) == {}
