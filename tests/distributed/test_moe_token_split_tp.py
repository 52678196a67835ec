"""Tensor parallelism with etp = 1 (experts whole, tokens split over the tp ranks) changes where each token is
routed, never what the layer computes.

Oracle: the same weights in one unsharded ``MoELayer`` in one process, on each data-parallel rank's tokens (the ranks
of a tp group share them). An odd token count (padded to a multiple of tp inside the layer) and a token mask. With the
router losses off, outputs, input gradients, router and shared-expert gradients (the same bits on the tp ranks,
then summed over dp), expert gradients (summed over edp), the expert-bias update and the logged expert load equal
the reference on all of a dp rank's tokens. With them on, the reference runs each tp slice (padding included) and
weighs each slice's router loss 1/tp: the losses are per slice, averaged over the tp ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks
from tiny_models import assert_same_over_group, moe_layer_pair

pytestmark = pytest.mark.distributed

HIDDEN, FFN, EXPERTS = 16, 24, 4
COUNTS = (7, 9)  # tokens per dp rank: odd, so tp=2 pads one row
TOL = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(aux_loss_coef=0.0, z_loss_coef=0.0, expert_bias=True, num_shared_experts=1, shared_expert_gate=True)
LOSSES = dict(aux_loss_coef=0.01, z_loss_coef=0.001)


def _batches():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(c, HIDDEN, generator=gen) for c in COUNTS]
    gs = [torch.randn(c, HIDDEN, generator=gen) for c in COUNTS]
    masks = [torch.arange(c) % 3 != 1 for c in COUNTS]  # every third token is padding
    return xs, gs, masks


def _reference_full(reference, xs, gs, masks):
    """The unsharded layer on each dp rank's tokens; gradients accumulate over them."""
    outs, xgrads, counts = [], [], torch.zeros(EXPERTS)
    for x, g, mask in zip(xs, gs, masks):
        x = x.clone().requires_grad_(True)
        reference.token_mask = mask
        y = reference(x)
        (y * g).sum().backward()
        outs.append(y.detach())
        xgrads.append(x.grad)
        counts += reference.last_stats.tokens_per_expert_E.float()
    reference.update_expert_bias()
    return outs, xgrads, counts


def _reference_sliced(reference, xs, gs, masks, tp):
    """The unsharded layer on each tp slice of each dp rank's tokens (padded as the layer pads), each slice's router
    loss weighed 1/tp; returns outputs, input grads and each dp rank's mean router losses over its slices."""
    outs, xgrads, losses = [], [], []
    for x, g, mask in zip(xs, gs, masks):
        x = x.clone().requires_grad_(True)
        pad = -x.shape[0] % tp
        x_pad = torch.cat([x, x.new_zeros(pad, HIDDEN)])
        g_pad, mask_pad = torch.cat([g, g.new_zeros(pad, HIDDEN)]), torch.cat([mask, mask.new_zeros(pad)])
        ys, total, kinds = [], 0, {}
        for x_s, g_s, m_s in zip(x_pad.chunk(tp), g_pad.chunk(tp), mask_pad.chunk(tp)):
            reference.token_mask = m_s
            y_s = reference(x_s)
            total = total + (y_s * g_s).sum() + reference.aux_loss / tp
            ys.append(y_s.detach())
            for kind, value in reference.last_stats.losses.items():
                kinds[kind] = kinds.get(kind, 0) + value / tp
        total.backward()
        outs.append(torch.cat(ys)[:x.shape[0]])
        xgrads.append(x.grad)
        losses.append(kinds)
    return outs, xgrads, losses


def _check_grads(layer, reference, manager, where):
    ref_params = dict(reference.named_parameters())
    tp, tp_group = manager.size("tp"), manager.group("tp")
    for name, param in layer.named_parameters():
        grad = param.grad.clone()
        if name.startswith("experts."):
            assert param.allreduce is False and param.tensor_model_parallel is True, name  # whole, for DeepSpeed's norm
            assert param.shape[1:] == ref_params[name].shape[1:], name  # full FFN width
            dist.all_reduce(grad, group=manager.group("edp"))
            want = ref_params[name].grad[layer.local_expert_ids]
        else:
            assert_same_over_group(grad, tp_group, tp, f"{where}: the grad of {name} (tp group)")
            dist.all_reduce(grad, group=manager.group("dp"))
            want = ref_params[name].grad
        torch.testing.assert_close(grad, want, **TOL, msg=lambda m: f"{where}: grad of {name}: {m}")


def _check_training(shape: dict) -> list[str]:
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.train.loop import _expert_fractions
    from switchyard.train.metrics import ExpertLoad

    manager = ProcessGroupManager(**shape)
    tp, dp_rank = manager.size("tp"), manager.rank("dp")
    assert manager.size("etp") == 1 and manager.size("dp") * tp == dist.get_world_size()
    assert set(manager.ranks("tp")) <= set(manager.ranks("ep")) or manager.size("ep") == 1  # ep laid over tp × dp
    xs, gs, masks = _batches()
    xs, gs, masks = xs[:manager.size("dp")], gs[:manager.size("dp")], masks[:manager.size("dp")]
    checked = []
    for name, kwargs in (("exact", EXACT), ("losses", LOSSES)):
        config = MoEConfig(num_experts=EXPERTS, top_k=2, **kwargs)
        reference, layer = moe_layer_pair(config, HIDDEN, FFN, manager)
        if name == "exact":
            ref_out, ref_xgrad, ref_counts = _reference_full(reference, xs, gs, masks)
        else:
            ref_out, ref_xgrad, ref_losses = _reference_sliced(reference, xs, gs, masks, tp)
        x = xs[dp_rank].clone().requires_grad_(True)
        layer.token_mask = masks[dp_rank][None]  # [B, S] with a [B, S, H] input
        y = layer(x[None])[0]
        loss = (y * gs[dp_rank]).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
        loss.backward()
        where = f"{name} on rank {dist.get_rank()}"
        with torch.no_grad():  # transformers' router_logits: every token's, the tp ranks' slices gathered
            want_logits = reference.router(xs[dp_rank]).logits_TE
        torch.testing.assert_close(layer.router_logits().detach(), want_logits, **TOL,
                                   msg=lambda m: f"{where}: router logits: {m}")
        torch.testing.assert_close(y, ref_out[dp_rank], **TOL, msg=lambda m: f"{where}: output: {m}")
        torch.testing.assert_close(x.grad, ref_xgrad[dp_rank], **TOL, msg=lambda m: f"{where}: input grad: {m}")
        _check_grads(layer, reference, manager, where)
        if name == "exact":
            load = ExpertLoad()
            load.add_forward("layer", layer)
            fractions, _ = _expert_fractions(load, manager, {"layer"})
            want = (ref_counts / ref_counts.sum()).tolist()
            assert fractions["layer"] == pytest.approx(want, abs=1e-5), where
            layer.update_expert_bias()  # counts summed over tp, then dp: the reference's over every token
            torch.testing.assert_close(layer.router.expert_bias, reference.router.expert_bias, rtol=0, atol=0)
            assert reference.router.expert_bias.abs().sum() > 0
        else:
            assert set(layer.last_stats.losses) == {"load_balancing", "z_loss"}
            for kind, value in layer.last_stats.losses.items():
                torch.testing.assert_close(value, ref_losses[dp_rank][kind], **TOL, msg=lambda m: f"{where}: {kind}")
        # eval: the same forward without a graph to record
        layer.eval(), reference.eval()
        layer.token_mask = reference.token_mask = masks[dp_rank]
        with torch.no_grad():
            torch.testing.assert_close(layer(xs[dp_rank]), reference(xs[dp_rank]), **TOL,
                                       msg=lambda m: f"{where}: eval output: {m}")
        checked.append(name)
    return checked


def _check_refusals() -> list[str]:
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer
    from switchyard.parallel.tensor_shards import gather_from_group, scatter_to_group

    manager = ProcessGroupManager(tp=2, etp=1)
    with pytest.raises(ValueError, match=r"seq_aux_loss_coef=0.01 with tp=2 and etp=1: .*set seq_aux_loss_coef=0"):
        MoELayer(MoEConfig(num_experts=EXPERTS, seq_aux_loss_coef=0.01), HIDDEN, FFN, groups=manager)
    with pytest.raises(ValueError, match=r"router_jitter=0.01 with tp=2 and etp=1: .*set router_jitter=0"):
        MoELayer(MoEConfig(num_experts=EXPERTS, router_jitter=0.01), HIDDEN, FFN, groups=manager)
    layer = MoELayer(MoEConfig(num_experts=EXPERTS), HIDDEN, FFN, groups=manager)
    layer.replicated_tokens = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="replicated_tokens .* set replicated_tokens=False"):
        layer(torch.randn(4, HIDDEN))
    group = manager.group("tp")
    with pytest.raises(ValueError, match="3 rows do not split over 2 ranks; pad them to a multiple of 2"):
        scatter_to_group(torch.zeros(3, 2), group)
    # the pair's own contract: slice forward, all-gather backward; all-gather forward, slice backward
    rank = dist.get_rank()
    x = torch.arange(8.0).reshape(4, 2).requires_grad_(True)
    part = scatter_to_group(x, group)
    assert part.tolist() == x.detach()[2 * rank:2 * rank + 2].tolist()
    (part * (rank + 1)).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    mine = torch.full((1, 2), float(rank), requires_grad=True)
    whole = gather_from_group(mine, group)
    assert whole.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    (whole * torch.tensor([[1.0], [2.0]])).sum().backward()
    assert mine.grad.tolist() == [[rank + 1.0, rank + 1.0]]
    return ["refusals"]


@pytest.mark.parametrize("world, shape", [(2, dict(tp=2, ep=2, etp=1)), (4, dict(tp=2, ep=2, etp=1)),
                                          (2, dict(tp=2, ep=1, etp=1))], ids=["tp2xep2", "tp2xep2xdp2", "tp2xep1"])
def test_token_split_tensor_parallel_matches_one_process(world, shape):
    results = run_on_ranks(_check_training, world, shape, timeout_s=60)
    assert all(r == ["exact", "losses"] for r in results)


def test_token_split_refusals_and_the_scatter_gather_pair():
    assert run_on_ranks(_check_refusals, 2, timeout_s=60) == [["refusals"], ["refusals"]]
