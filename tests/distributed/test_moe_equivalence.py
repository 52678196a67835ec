"""Expert parallelism changes where experts run, never what the layer computes.

Oracle: the same tokens through an ep=1 layer in one process (each rank's chunk separately, which is
what data parallelism means; with capacity the per-rank token count sets the capacity). Outputs,
input gradients, and parameter gradients summed over the ranks that share each parameter must match.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks
from tiny_models import saved_tensor_shapes

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS = 16, 24, 8

CASES = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top8": dict(top_k=8),
    "top2_capacity_probs": dict(top_k=2, capacity_factor=0.75, drop_policy="probs"),
    "top1_capacity_position": dict(top_k=1, capacity_factor=1.0, drop_policy="position"),
    "top2_shared_gate": dict(top_k=2, num_shared_experts=1, shared_expert_gate=True),
    "sigmoid_groups_bias": dict(top_k=2, score_func="sigmoid", n_group=4, topk_group=2, expert_bias=True,
                                routed_scaling_factor=2.5),
    "plain_gelu_bias": dict(top_k=2, gated=False, activation="gelu", bias=True),
}


def _tokens_per_rank(world: int, empty_rank: int | None, base: int = 3) -> list[int]:
    return [0 if r == empty_rank else base + 2 * r for r in range(world)]


def _check_cases(shape: dict, empty_rank: int | None, dtype_name: str, on_gpu: bool = False,
                 impl: str | None = None) -> list[str]:
    """On GPUs (NCCL) the sizes are big enough for the CUDA paths (Triton dispatch / combine, grouped GEMMs).
    ``impl``: the EP layer's experts impl where it applies (a SwiGLU one: the routing weights cross with the rows
    and are folded into the experts); the one-process reference keeps its default (the weighted combine on CPU)."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    dtype = getattr(torch, dtype_name)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    hidden, ffn, device = (256, 384, torch.device("cuda", torch.cuda.current_device())) if on_gpu else (HIDDEN, FFN, None)
    if on_gpu and dtype == torch.float32:  # GPU GEMMs sum in other orders at other row counts
        tol = dict(atol=1e-4, rtol=1e-4)
    manager = ProcessGroupManager(**shape)
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = _tokens_per_rank(world, empty_rank, base=301 if on_gpu else 3)
    checked = []
    for name, kwargs in CASES.items():
        config = MoEConfig(num_experts=EXPERTS, aux_loss_coef=0.01, z_loss_coef=0.001, **kwargs)
        torch.manual_seed(0)
        reference = MoELayer(config, hidden, ffn, dtype=dtype)
        with torch.no_grad():
            if config.expert_bias:
                reference.router.expert_bias.copy_(torch.randn(EXPERTS) * 0.1)
            # a sharper router than the default init, so top-k choices are far from ties
            reference.router.weight.mul_(20)
        layer = MoELayer(config, hidden, ffn, groups=manager, dtype=dtype)
        layer.load_state_dict(reference.state_dict())
        if impl is not None and layer.experts.swiglu:
            layer.experts.impl = impl
        reference.to(device), layer.to(device)
        gen = torch.Generator().manual_seed(1)
        x_all = torch.randn(sum(counts), hidden, generator=gen).to(dtype=dtype, device=device)
        g_all = torch.randn(sum(counts), hidden, generator=gen).to(dtype=dtype, device=device)
        chunks = list(zip(x_all.split(counts), g_all.split(counts)))

        # reference: every rank's chunk through the ep=1 layer, in one process
        ref_out, ref_xgrad = [], []
        for x, g in chunks:
            x = x.clone().requires_grad_(True)
            y = reference(x)
            loss = (y.float() * g.float()).sum() + (reference.aux_loss if reference.aux_loss is not None else 0)
            loss.backward()
            ref_out.append(y.detach())
            ref_xgrad.append(x.grad)

        x, g = chunks[rank]
        x = x.clone().requires_grad_(True)
        y = layer(x)
        loss = (y.float() * g.float()).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
        loss.backward()
        torch.testing.assert_close(y, ref_out[rank], **tol, msg=lambda m: f"{name}: output on rank {rank}: {m}")
        torch.testing.assert_close(x.grad, ref_xgrad[rank], **tol, msg=lambda m: f"{name}: input grad on rank {rank}: {m}")

        ref_params = dict(reference.named_parameters())
        for pname, param in layer.named_parameters():
            grad = param.grad.float().clone()
            is_expert = pname.startswith("experts.")
            dist.all_reduce(grad, group=manager.group("edp") if is_expert else manager.group("world"))
            want = ref_params[pname].grad.float()
            if is_expert:
                want = want[layer.local_expert_ids]
            what = f"{name}: grad of {pname} on rank {rank}"
            if dtype == torch.float32 or not on_gpu:
                torch.testing.assert_close(grad, want, **tol, msg=lambda m: f"{what}: {m}")
            else:  # bf16 sums over hundreds of tokens round per rank and per chunk: compare as vectors
                rel = ((grad - want).norm() / want.norm().clamp_min(1e-12)).item()
                assert rel < tol["rtol"], f"{what}: relative error {rel:.3g} (norm {want.norm().item():.3g})"
        checked.append(name)
    return checked


@pytest.mark.parametrize(
    "world, shape, empty_rank",
    [(2, dict(ep=2), None), (4, dict(ep=4), 1), (4, dict(ep=2), 2)],
    ids=["ep2", "ep4_rank1_empty", "dp2xep2_rank2_empty"],
)
def test_expert_parallel_matches_one_process(world, shape, empty_rank):
    results = run_on_ranks(_check_cases, world, shape, empty_rank, "float32", timeout_s=240)
    assert all(r == list(CASES) for r in results)


@pytest.mark.parametrize(
    "world, shape, empty_rank", [(2, dict(ep=2), None), (4, dict(ep=4), 1)], ids=["ep2", "ep4_rank1_empty"])
def test_expert_parallel_with_folded_routing_weights_matches_one_process(world, shape, empty_rank):
    """The SwiGLU experts take each received row's routing weight (sent in an all-to-all of its own): same outputs
    and gradients as the weighted combine in one process, with ranks that send or receive no rows."""
    results = run_on_ranks(_check_cases, world, shape, empty_rank, "float32", False, "swiglu_grouped",
                           timeout_s=240)
    assert all(r == list(CASES) for r in results)


def _fold_keeps_no_expert_outputs() -> tuple[int, int]:
    """[T*K, H]-wide tensors saved for the backward at ep = 2, folded vs weighted combine (same layer, batch)."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(ep=2)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=2), HIDDEN, FFN, groups=manager)
    layer.experts.impl = "swiglu_grouped"
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(dist.get_rank()))
    saved, outputs = {}, {}
    for fold in (True, False):
        layer.fold_routing_weights = fold
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        with saved_tensor_shapes() as shapes:
            out = layer(x_in)
        out.square().sum().backward()
        outputs[fold] = [out.detach(), x_in.grad, *(p.grad for p in layer.parameters())]
        saved[fold] = sum(1 for shape in shapes if len(shape) == 2 and shape[1] == HIDDEN and shape[0] > 40)
    for got, want in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return saved[True], saved[False]


def test_folded_routing_weights_at_ep2_keep_one_expert_output_fewer():
    for folded, weighted in run_on_ranks(_fold_keeps_no_expert_outputs, 2, timeout_s=120):
        assert folded == weighted - 1, (folded, weighted)


def test_expert_parallel_bf16():
    results = run_on_ranks(_check_cases, 2, dict(ep=2), None, "bfloat16", timeout_s=240)
    assert all(r == list(CASES) for r in results)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_expert_parallel_matches_one_process_on_gpus(dtype_name):
    """Two GPUs, NCCL: the all-to-alls, the Triton dispatch / combine and the grouped GEMMs of the training
    path against the same layer in one process on one GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    results = run_on_ranks(_check_cases, 2, dict(ep=2), None, dtype_name, True, timeout_s=300, backend="nccl")
    assert all(r == list(CASES) for r in results)


def _reshard(save_ep: int, load_ep: int):
    """Each rank of an ep=save_ep layer saves only its experts; the union loads at ep=load_ep."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    config = MoEConfig(num_experts=EXPERTS, top_k=2, num_shared_experts=1)
    rank = dist.get_rank()
    save_groups, load_groups = ProcessGroupManager(ep=save_ep), ProcessGroupManager(ep=load_ep)
    torch.manual_seed(0)  # dense weights identical on every rank
    saved = MoELayer(config, HIDDEN, FFN, groups=save_groups)
    with torch.no_grad():  # experts differ per EP rank: as after training
        saved.experts.gate_up_proj.add_(float(save_groups.rank("ep")))
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, saved.state_dict())
    union = {}
    for shard in shards:
        union.update(shard)
    assert sum(k.endswith(".gate_up_proj") and k.startswith("experts.") for k in union) == EXPERTS
    loaded = MoELayer(config, HIDDEN, FFN, groups=load_groups)
    loaded.load_state_dict(union)
    single = MoELayer(config, HIDDEN, FFN)
    single.load_state_dict(union)
    x = torch.randn(5 + rank, HIDDEN, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), single(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(saved(x), single(x), atol=1e-5, rtol=1e-5)
    return loaded.local_expert_ids


@pytest.mark.parametrize("save_ep, load_ep", [(2, 4), (4, 2), (4, 1)])
def test_state_dict_saved_at_one_ep_loads_at_another(save_ep, load_ep):
    ids = run_on_ranks(_reshard, 4, save_ep, load_ep, timeout_s=120)
    per_rank = EXPERTS // load_ep
    assert ids[1] == list(range((1 % load_ep) * per_rank, (1 % load_ep + 1) * per_rank))


def _replicated_cases(shape: dict) -> list[str]:
    """Serving mode: every EP rank holds the same tokens; outputs equal one process on those tokens."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(**shape)
    checked = []
    for name, kwargs in CASES.items():
        config = MoEConfig(num_experts=EXPERTS, eval_capacity_factor=kwargs.pop("capacity_factor", None), **kwargs)
        torch.manual_seed(0)
        reference = MoELayer(config, HIDDEN, FFN).eval()
        with torch.no_grad():
            reference.router.weight.mul_(20)
        layer = MoELayer(config, HIDDEN, FFN, groups=manager).eval()
        layer.load_state_dict(reference.state_dict())
        layer.replicated_tokens = True
        for tokens in (1, 7):  # one token: most ranks hold none of its experts
            x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                want, got = reference(x), layer(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{name}, {tokens} tokens")
            # every rank routes every token: its per-expert counts are the totals
            assert torch.equal(layer.last_stats.tokens_per_expert_E, reference.last_stats.tokens_per_expert_E)
        with pytest.raises(RuntimeError, match="inference mode"):
            layer(x.requires_grad_(True))
        checked.append(name)
    return checked


@pytest.mark.parametrize("world, shape", [(2, dict(ep=2)), (4, dict(ep=4))], ids=["ep2", "ep4"])
def test_replicated_tokens_match_one_process(world, shape):
    results = run_on_ranks(_replicated_cases, world, shape, timeout_s=180)
    assert all(r == list(CASES) for r in results)


def _mismatched_dtypes() -> str:
    """EP rank 1 runs the layer in bf16, the others in fp32: every rank raises, naming each rank's dtype
    (rows of different sizes would abort gloo on one rank, or exchange garbage over NCCL)."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(ep=dist.get_world_size())
    dtype = torch.bfloat16 if dist.get_rank() == 1 else torch.float32
    layer = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=2), HIDDEN, FFN, groups=manager, dtype=dtype)
    with pytest.raises(ValueError, match="different dtype") as caught:
        layer(torch.randn(5, HIDDEN, dtype=dtype))
    return str(caught.value)


def test_ranks_with_different_dtypes_all_raise_naming_them():
    for message in run_on_ranks(_mismatched_dtypes, 2, timeout_s=120):
        assert "EP rank 0: torch.float32" in message and "EP rank 1: torch.bfloat16" in message, message
