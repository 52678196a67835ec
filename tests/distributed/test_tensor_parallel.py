"""Tensor parallelism of transformers models on 2 gloo ranks (tp=2) against the unsharded model in one process.

    /work/main/.venv/bin/python -m pytest -q tests/distributed/test_tensor_parallel.py -p no:cacheprovider

Oracle: the same transformers model, same seed, unsharded, on each rank: logits, loss, every parameter's
gradient (sharded ones gathered over tp) and the full state dict must match it.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

SMALL = dict(num_hidden_layers=2, intermediate_size=64, head_dim=8)
DENSE = {
    "llama": dict(attention_bias=True, mlp_bias=True),  # rowwise biases: added once, after the all-reduce
    "qwen2": {},  # q/k/v biases: sharded with their rows
    "qwen3": {},  # per-head q_norm/k_norm: replicated, gradients summed over tp
    "mistral": {},
}
MOE = {  # layer 0 of qwen2_moe is MoE (shared experts outside the plan), 1 dense; deepseek_v3 the other way round,
    # its plan naming mlp.shared_experts.* inside the MoE layer (sharded once, by the MoE rule)
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=4, decoder_sparse_step=1, mlp_only_layers=[1]),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=None),
}


def _nonzero_biases_and_norms(model: torch.nn.Module) -> torch.nn.Module:
    """transformers starts biases at 0 and norms at 1: drawn at random, a misplaced bias or norm slice shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + (0 if name.endswith("bias") else 1))
    return model


def _gathered_grads(model, groups) -> dict[str, torch.Tensor]:
    from switchyard.parallel.tensor_shards import gather_tensor, shard_of

    grads = {}
    for name, param in model.named_parameters():
        shard = shard_of(param)
        grad = param.grad
        if shard is not None:
            grad = gather_tensor(grad, shard, groups.group(shard.group_kind), groups.size(shard.group_kind))
        grads[name] = grad
    return grads


def _check_against_unsharded(build, groups, before_sharding=lambda model: None) -> int:
    """Shard one fresh model, compare it with another unsharded one; returns how many parameters were sharded."""
    from tiny_models import ids

    from switchyard.parallel import apply_tensor_parallel, full_state_dict
    from switchyard.parallel.tensor_shards import shard_of

    reference, model = build(), build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_sharding(model)
    apply_tensor_parallel(model, groups)
    sharded = {k: v.clone() for k, v in model.state_dict().items()}
    assert list(model.state_dict()) == list(before)  # names stay: checkpoints and DeepSpeed rely on them
    x = ids()
    want, got = reference(input_ids=x, labels=x), model(input_ids=x, labels=x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    want.loss.backward()
    got.loss.backward()
    reference_grads = dict((name, p.grad) for name, p in reference.named_parameters())
    for name, grad in _gathered_grads(model, groups).items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    full = full_state_dict(model, groups)
    assert list(full) == list(before)
    for key, tensor in before.items():
        assert torch.equal(full[key], tensor), key
    assert list(model.state_dict()) == list(before)  # the shards are back in place
    # a rank that will not write a parameter gets a placeholder of the full shape that holds no memory
    split = {name for name, p in model.named_parameters() if shard_of(p) is not None}
    placeholders = full_state_dict(model, groups, wanted=lambda param: False)
    assert list(placeholders) == list(before)
    for key, tensor in placeholders.items():
        assert tensor.shape == before[key].shape, key
        assert (tensor.stride() == (0,) * tensor.dim()) == (key in split), key
    with torch.no_grad():  # (replicated entries of a state dict share the parameters' storage: left alone)
        for param in model.parameters():
            if shard_of(param) is not None:
                param.zero_()
    model.load_state_dict(full)  # a full state dict loads into the sharded model as each rank's slices
    now = model.state_dict()
    assert all(torch.equal(now[key], tensor) for key, tensor in sharded.items())
    return sum(shard_of(p) is not None for p in model.parameters())


def _dense_families() -> dict[str, int]:
    from tiny_models import build

    from switchyard import ProcessGroupManager

    groups = ProcessGroupManager(tp=2)
    sharded = {}
    for family, extra in DENSE.items():
        sharded[family] = _check_against_unsharded(
            lambda: _nonzero_biases_and_norms(build(family, **SMALL, **extra)), groups)
    return sharded


def test_dense_families_match_the_unsharded_model():
    sharded = run_on_ranks(_dense_families, 2, timeout_s=120)
    # per layer: q/k/v/gate/up weights and o/down weights; llama adds q/k/v/gate/up biases, qwen2 q/k/v biases
    assert sharded == [{"llama": 2 * 12, "qwen2": 2 * 10, "qwen3": 2 * 7, "mistral": 2 * 7}] * 2


def _moe_families() -> dict[str, tuple[int, list[str]]]:
    """MoE layers built without groups route on full-width experts everywhere: with their own expert sharding
    stubbed out, the tp model equals the unsharded one only if the shared experts are sharded right."""
    import switchyard as sy
    from tiny_models import build_moe

    from switchyard import ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    groups = ProcessGroupManager(tp=2)
    results = {}
    for family, extra in MOE.items():
        calls: list[str] = []

        def stub_expert_sharding(model) -> None:
            for name, module in model.named_modules():
                if isinstance(module, MoELayer):
                    module.shard_experts_tensor_parallel = lambda name=name: calls.append(name)

        def build() -> torch.nn.Module:
            return sy.patch_model(_nonzero_biases_and_norms(build_moe(family, num_hidden_layers=2, **extra)))

        results[family] = (_check_against_unsharded(build, groups, stub_expert_sharding), calls)
    return results


def test_moe_layers_shard_their_experts_and_their_shared_experts_are_sharded_here():
    results = run_on_ranks(_moe_families, 2, timeout_s=120)[0]
    # qwen2_moe: q/k/v weights and biases and o (7) per layer, layer 0's shared experts 3, layer 1's dense MLP 3;
    # deepseek_v3: attention (MLA) is not in its plan: layer 0's dense MLP 3, layer 1's shared experts 3
    assert results == {"qwen2_moe": (2 * 7 + 3 + 3, ["model.layers.0.mlp"]),
                       "deepseek_v3": (3 + 3, ["model.layers.1.mlp"])}


def _packed_shards_round_trip() -> bool:
    from switchyard import ProcessGroupManager
    from switchyard.parallel.tensor_shards import TensorShard, gather_tensor, shard_tensor

    groups = ProcessGroupManager(tp=2)
    full = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    for shard in (TensorShard(1, "tp"), TensorShard(1, "tp", packed=2), TensorShard(0, "tp")):
        local = shard_tensor(full, shard, groups.rank("tp"), 2)
        assert torch.equal(gather_tensor(local, shard, groups.group("tp"), 2), full), shard
    return True


def test_shards_gather_back_to_the_full_tensor():
    assert run_on_ranks(_packed_shards_round_trip, 2, timeout_s=60) == [True, True]
