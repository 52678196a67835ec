"""Tiny transformers models built offline, shared by the checkpoint and export tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            max_position_embeddings=64)


def build(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra})).float().eval()


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(3))
