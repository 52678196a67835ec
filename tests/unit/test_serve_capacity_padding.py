"""Serving under ``eval_capacity_factor``: the static decoder's padding rows take no expert capacity.

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_serve_capacity_padding.py

Capacity is per forward, so the oracle for a decode step over a bucket with padding rows is the same
running sequences in a bucket without any (``max_batch`` = their count): same prefill, same drops, same
logits at every step.
"""

from __future__ import annotations

import pytest
import torch

import switchyard as sy
from switchyard.hf.patch import moe_layers
from switchyard.serve.runner import ModelRunner, StepPlan

from tiny_models import TINY, build

PROMPT_LENGTHS = (5, 9, 3)
STEPS = 6


def _capacity_model(device: str) -> torch.nn.Module:
    config = sy.MoEConfig(num_experts=4, top_k=2, init="random", eval_capacity_factor=0.5)
    return sy.patch_model(build("llama", intermediate_size=48, attn_implementation="eager").to(device), config)


def _greedy_logits(runner: ModelRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each step's logits ``[sequences, V]``: one prefill of every prompt, then STEPS greedy decode steps."""
    slots = list(range(len(prompts)))
    steps = [runner.execute(StepPlan([(slot, ids, True) for slot, ids in zip(slots, prompts)]))]
    for _ in range(STEPS):
        tokens = steps[-1].argmax(-1).tolist()
        steps.append(runner.execute(StepPlan([(slot, [token], False) for slot, token in zip(slots, tokens)])))
    return [logits.float().cpu() for logits in steps]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_padding_rows_take_no_capacity_in_static_decode(device: str) -> None:
    """3 sequences in a bucket of 3 rows vs a bucket of 4 (one padding row): the padding row used to take
    expert capacity (the decode step's mask is 4-D, so the layers saw no token mask) and changed the real
    rows' logits by up to 0.4. On CUDA the graphs are captured by ``warmup`` with every row real, so
    replays must read the live row mask at its fixed address."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, prompts = _capacity_model(device), _prompts()
    unpadded = ModelRunner(model, decode="static", max_batch=len(prompts))
    unpadded.warmup()
    want = _greedy_logits(unpadded, prompts)
    dropped = sum(int(layer.last_stats.dropped_copies) for layer in moe_layers(model))
    assert dropped > 0, "the oracle's decode step drops nothing: padding taking capacity would go unseen"
    unpadded.close()

    padded = ModelRunner(model, decode="static", max_batch=len(prompts) + 1)
    assert padded.batch.use_graphs == (device == "cuda")
    padded.warmup()
    got = _greedy_logits(padded, prompts)
    padded.close()
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert all(layer.token_mask is None for layer in moe_layers(model))  # no step's mask left behind


def test_explicit_moe_token_mask_reaches_the_layers_and_is_checked() -> None:
    """The keyword the static decoder passes: its real tokens are the layers' token mask for that forward
    (before, transformers' forward swallowed the unknown keyword and every token counted as real)."""
    model, prompts = _capacity_model("cpu"), _prompts()
    ids_BS = torch.tensor([prompts[0][:3], prompts[1][:3]])
    with torch.no_grad():
        model(ids_BS, moe_token_mask=torch.tensor([[1, 1, 0], [0, 1, 1]]))
        for layer in moe_layers(model):
            assert int(layer.last_stats.routed_copies) == 4 * 2  # 4 real tokens, top-2
            assert layer.token_mask is None
        with pytest.raises(ValueError, match=r"moe_token_mask has 4 entries for 6 input tokens"):
            model(ids_BS, moe_token_mask=torch.ones(4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"shape \[B, S\] or \[T\] \(1 = real token\), got \(2, 3, 1\)"):
            model(ids_BS, moe_token_mask=torch.ones(2, 3, 1))
