"""The fine-tune loop's loss normalization under DeepSpeed's engine: every loss token of the global batch weighs
the same, across gradient accumulation and data-parallel ranks, as transformers' Trainer weighs them
(``num_items_in_batch``, ``average_tokens_across_devices``). Oracle: transformers' own model class and loss,
one forward over all the global batch's rows in one process.

A micro-batch without a label the model predicts (all -100 after the shift: e.g. packed prompt/response windows
whose only label is their first token) gave 0/0 = NaN and stopped training; with per-micro-batch means, a
micro-batch with 1 loss token weighed as much as one with 50."""

from __future__ import annotations

import math

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

SEQ, VOCAB, LR, AUX_COEF = 8, 96, 1.0, 0.1
# loss tokens after the shift (label positions 1..7) of each row, by [rank][micro-batch][row]; rank 0's second
# micro-batch has none, rank 1's first row has one label at position 0 (never predicted)
LOSS_SPANS = [[[(1, 8), (5, 8)], [(8, 8), (8, 8)]],
              [[(0, 1), (7, 8)], [(3, 8), (1, 8)]]]


def _rows(spans: list) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels for ``spans``: labels keep the ids in [start, end), -100 elsewhere."""
    gen = torch.Generator().manual_seed(sum(start * 8 + end for start, end in spans))
    ids = torch.randint(0, VOCAB, (len(spans), SEQ), generator=gen)
    labels = torch.full_like(ids, -100)
    for row, (start, end) in enumerate(spans):
        labels[row, start:end] = ids[row, start:end]
    return ids, labels


def _model(moe: bool, groups=None):
    import switchyard as sy
    from tiny_models import build

    model = build("llama", vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=48)
    if moe:
        sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=AUX_COEF, z_loss_coef=0.0),
                       groups=groups)
    return model.train()


def _loop_step(rank_spans: list, moe: bool) -> dict:
    """One optimizer step of the loop's micro-batch code (lm_loss_divisor, forward_backward, engine.step) on this
    rank's micro-batches; SGD at lr 1, ZeRO-0, no clipping: the update is minus the averaged gradient."""
    import deepspeed
    import torch.distributed as dist

    from switchyard import ProcessGroupManager
    from switchyard.deepspeed import optimizer_param_groups
    from switchyard.train.loop import forward_backward, lm_loss_divisor

    groups = ProcessGroupManager(ep=1)
    micro_spans = rank_spans[dist.get_rank()]
    model = _model(moe, groups)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": len(micro_spans[0]), "gradient_accumulation_steps": len(micro_spans),
              "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    optimizer = torch.optim.SGD(optimizer_param_groups(model, weight_decay=0.0), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=groups.mpu)
    micro_batches = [dict(zip(("input_ids", "labels"), _rows(spans))) for spans in micro_spans]
    loss_tokens, divisor = lm_loss_divisor(micro_batches, groups, torch.device("cpu"))
    lm_losses, aux_losses = [], []
    for micro in micro_batches:
        lm_loss, aux_loss, _ = forward_backward(engine, micro, divisor)
        engine.step()
        lm_losses.append(float(lm_loss))
        aux_losses.append(float(aux_loss))
    update = {k: (before[k] - v.detach()) / LR for k, v in model.named_parameters()}
    return {"update": update, "lm_losses": lm_losses, "aux_losses": aux_losses, "loss_tokens": loss_tokens}


def _oracle(rank_spans: list, moe: bool) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient and LM loss of transformers' mean token loss over all rows in one forward; with MoE, plus the
    router loss of each micro-batch, averaged over micro-batches and ranks (its weighting in the loop)."""
    model = _model(moe)
    micro_batches = [_rows(spans) for micro_spans in rank_spans for spans in micro_spans]
    ids, labels = (torch.cat(parts) for parts in zip(*micro_batches))
    out = model(input_ids=ids, labels=labels)
    lm_loss = out.loss - out.aux_loss if moe else out.loss
    loss = lm_loss
    if moe:
        loss = loss + torch.stack([model(input_ids=micro_ids).aux_loss for micro_ids, _ in micro_batches]).mean()
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}, float(lm_loss.detach())


def _check_update(update: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == update.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(update[key], grad, atol=1e-6, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_a_micro_batch_without_loss_tokens_trains_and_adds_no_gradient():
    """Its LM loss is 0 (was NaN), and the step's update is the gradient of the other micro-batch's loss alone."""
    spans = [[(2, 8), (6, 8)], [(0, 0), (0, 1)]]  # the second micro-batch: no label, one never predicted
    [result] = run_on_ranks(_loop_step, 1, [spans], False, timeout_s=240)
    assert result["lm_losses"][1] == 0.0 and math.isfinite(result["lm_losses"][0])
    assert result["loss_tokens"] == 6 + 2
    grads, lm_loss = _oracle([spans[:1]], moe=False)
    _check_update(result["update"], grads)
    assert sum(result["lm_losses"]) / 2 == pytest.approx(lm_loss, rel=1e-5)  # the loop logs the mean


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_every_loss_token_of_the_global_batch_weighs_the_same(moe):
    """2 dp ranks × 2 micro-batches of 2 rows with 0 to 7 loss tokens each: the update equals the gradient of one
    forward over the 8 rows (transformers' mean over its 23 loss tokens); router losses stay per micro-batch."""
    results = run_on_ranks(_loop_step, 2, LOSS_SPANS, moe, timeout_s=240)
    grads, lm_loss = _oracle(LOSS_SPANS, moe)
    for result in results:
        assert result["loss_tokens"] == 23
        _check_update(result["update"], grads)
    logged = sum(sum(r["lm_losses"]) for r in results) / 4  # the loop's logged loss: mean over micro-batches, dp
    assert logged == pytest.approx(lm_loss, rel=1e-5)
    if moe:
        assert all(aux > 0 for r in results for aux in r["aux_losses"])
