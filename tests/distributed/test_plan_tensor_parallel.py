"""`switchyard plan --tp` counts what each rank really holds once the launcher's tensor parallelism has run.

    /work/main/.venv/bin/python -m pytest -q tests/distributed/test_plan_tensor_parallel.py -p no:cacheprovider

Oracle: the same tiny models built for real on gloo ranks, patched with the groups and sharded by
``apply_tensor_parallel`` as fine-tuning does; each rank's parameter elements must be the plan's per-rank count
(planned from config.json alone, on the meta device).
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

# name → (family, config fields, plan flags). llama: biases everywhere (rowwise o_proj/down biases and the experts'
# down_proj_bias stay whole, the others split), upcycled in layers 0 and 2; qwen2_moe: adopted, with shared experts
# (sharded by switchyard, outside the plan); deepseek_v3: MLA attention outside the plan, its shared experts inside.
MODELS = {
    "llama": ("llama", dict(num_hidden_layers=4, intermediate_size=64, head_dim=8, attention_bias=True,
                            mlp_bias=True), ["--num-experts", "4", "--top-k", "2", "--every-n", "2"]),
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, num_experts=4, decoder_sparse_step=1,
                                    mlp_only_layers=[1]), []),
    "deepseek_v3": ("deepseek_v3", dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                                        n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1,
                                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=None), []),
}


def _build(name: str) -> torch.nn.Module:
    from tiny_models import build, build_moe

    family, fields, _ = MODELS[name]
    return build(family, **fields) if name == "llama" else build_moe(family, **fields)


def _patched(name: str, groups=None) -> torch.nn.Module:
    import switchyard as sy

    if name != "llama":
        return sy.patch_model(_build(name), None, groups)  # adopted
    return sy.patch_model(_build(name), sy.MoEConfig(num_experts=4, top_k=2, init="copy"), groups, every_n=2)


def _held_per_rank(tp: int, ep: int) -> dict[str, tuple[int, dict]]:
    """Each model as fine-tuning holds it on this rank (patched with the groups, then sharded over tp): its
    parameter elements and its sharded parameters."""
    import switchyard as sy
    from switchyard.parallel import apply_tensor_parallel
    from switchyard.parallel.tensor_shards import shard_of

    groups = sy.ProcessGroupManager(tp=tp, ep=ep)
    held = {}
    for name in MODELS:
        model = _patched(name, groups)
        apply_tensor_parallel(model, groups)
        shards = {key: shard for key, p in model.named_parameters() if (shard := shard_of(p)) is not None}
        held[name] = (sum(p.numel() for p in model.parameters()), shards)
    return held


@pytest.mark.parametrize("world, tp, ep", [(2, 2, 1), (4, 2, 2)])
def test_plan_per_rank_parameters_are_what_each_tp_rank_holds(tmp_path, capsys, world, tp, ep):
    from switchyard.cli import main
    from switchyard.parallel.tensor_parallel import tensor_parallel_shards
    from switchyard.parallel.tensor_shards import shard_of

    held = run_on_ranks(_held_per_rank, world, tp, ep, timeout_s=120)
    for name, (_, _, flags) in MODELS.items():
        model = _patched(name)
        assert tensor_parallel_shards(model, tp) == held[0][name][1], name  # what apply_tensor_parallel shards
        assert not any(shard_of(p) for p in model.parameters())  # and nothing changed
        _build(name).config.save_pretrained(tmp_path / name)  # the config the job starts from, not the patched one
        argv = ["plan", "--model", str(tmp_path / name), *flags, "--world", str(world), "--tp", str(tp), "--ep",
                str(ep), "--json"]
        capsys.readouterr()  # DeepSpeed's import logs to stdout
        assert main(argv) == 0
        got = json.loads(capsys.readouterr().out)
        assert (got["tp"], got["dp"], got["edp"]) == (tp, world // tp, world // (tp * ep))
        assert [got["params_per_rank"]] * world == [rank[name][0] for rank in held], name
        assert got["params_per_rank"] < got["params_total"]
