"""Tiny transformers models built offline, shared by the checkpoint and export tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            max_position_embeddings=64)


def build(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra})).float().eval()


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(3))


# MoE fields, each kept only where the family's config has it (families name the expert count differently)
MOE_TINY = dict(intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2, num_local_experts=4,
                num_experts=4, n_routed_experts=4, moe_num_experts=4, head_dim=8, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def build_moe(model_type: str, **extra) -> torch.nn.Module:
    """A tiny model of a transformers MoE family: ``TINY`` and the ``MOE_TINY`` fields its config knows, then
    ``extra`` (a value of None drops a field). Routers and correction biases that transformers zero-inits are drawn
    at random, or every expert would tie and a wrong routing rule could still match."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    # one expert count given in extra wins over MOE_TINY's for all of them (aliases of one field in some configs)
    counted = any(k in extra for k in _EXPERT_COUNTS)
    tiny = {k: v for k, v in {**TINY, **MOE_TINY}.items() if not (counted and k in _EXPERT_COUNTS)}
    fields = {**{k: v for k, v in tiny.items() if hasattr(default, k)}, **extra}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if v is not None})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.abs().sum() == 0:
                param.normal_(0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    return model


def moe_layer_pair(config, hidden: int, ffn: int, groups) -> tuple:
    """(an unsharded one-process MoELayer, the same weights in a layer built with ``groups`` and tensor-parallel
    sharded): the reference and the layer under test of the tensor-parallel layer tests. The router is scaled far
    from top-k ties, so both route alike."""
    from switchyard.moe.layer import MoELayer

    torch.manual_seed(0)
    reference = MoELayer(config, hidden, ffn)
    with torch.no_grad():
        reference.router.weight.mul_(20)
    layer = MoELayer(config, hidden, ffn, groups=groups)
    layer.load_state_dict(reference.state_dict())
    layer.shard_experts_tensor_parallel()
    return reference, layer


def assert_same_over_group(tensor: torch.Tensor, group, size: int, what: str) -> None:
    """Every rank of ``group`` (``size`` ranks) holds the same ``tensor``: a replicated parameter's gradient, say."""
    import torch.distributed as dist

    peers = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(peers, tensor.contiguous(), group=group)
    assert all(torch.equal(p, tensor) for p in peers), f"{what} differs over the group's ranks"


@contextmanager
def saved_tensor_shapes() -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the tensors autograd saves for the backward inside the block (what a backward keeps)."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield shapes


class WithoutOffsets:
    """A fast tokenizer seen as a slow one (``is_fast`` False, no offset mappings): the chat masking's other path."""

    is_fast = False

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(*args, **kwargs)
