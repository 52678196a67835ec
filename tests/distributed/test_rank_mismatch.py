"""EP ranks whose MoE layers disagree fail on every rank, naming each rank's value and the fix, never hang.

Oracle: each mistake on one rank of two (gloo) makes *both* raise the same ``ValueError`` within seconds. Before the
check, ranks built with different expert counts aborted inside gloo (one SIGABRT, the other "connection reset"), and
ranks in different grad modes or replicated-token modes waited in mismatched collectives until the timeout; a
different top_k, FFN width or capacity factor ran silently different models. What is allowed (different token counts
and sequence lengths per rank, a layer built on one rank alone) still works, and the check is one collective at the
first forward, none after.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

HIDDEN, FFN = 16, 24

# case → (what rank 1 does differently, the message's "different ..." part)
MISTAKES = {
    "num_experts": "different num_experts (EP rank 0: 8, EP rank 1: 4)",
    "top_k": "different top_k (EP rank 0: 2, EP rank 1: 1)",
    "hidden_size": "different hidden_size (EP rank 0: 16, EP rank 1: 32)",
    "intermediate_size": "different intermediate_size (EP rank 0: 24, EP rank 1: 32)",
    "capacity_factor": "different capacity_factor (EP rank 0: 1.25, EP rank 1: None)",
    "training": "different training (EP rank 0: True, EP rank 1: False)",
    "grad_enabled": "different grad_enabled (EP rank 0: True, EP rank 1: False)",
    "replicated_tokens": "different replicated_tokens (EP rank 0: False, EP rank 1: True)",
}
FIXES = {
    "training": "call model.train() or model.eval() on every rank alike",
    "grad_enabled": "run the forward with autograd on (or under torch.no_grad()) on every rank alike",
    "replicated_tokens": "set replicated_tokens on every EP rank alike",
}


def _mistake_on_rank_1(case: str) -> str:
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(ep=2)
    odd = dist.get_rank() == 1
    config = dict(num_experts=8, top_k=2, capacity_factor=1.25)
    hidden, ffn = HIDDEN, FFN
    if odd and case in ("num_experts", "top_k"):
        config[case] = {"num_experts": 4, "top_k": 1}[case]
    if odd and case == "capacity_factor":
        config["capacity_factor"] = None
    if odd and case == "hidden_size":
        hidden = 32
    if odd and case == "intermediate_size":
        ffn = 32
    layer = MoELayer(MoEConfig(**config), hidden, ffn, groups=manager)
    layer.train(not (odd and case == "training"))
    layer.replicated_tokens = odd and case == "replicated_tokens"
    with torch.set_grad_enabled(not (odd and case in ("grad_enabled", "replicated_tokens"))):
        with pytest.raises(ValueError) as caught:
            layer(torch.randn(5, hidden))
    return str(caught.value)


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_layer_built_or_called_differently_on_one_rank_fails_on_every_rank_naming_it(case):
    for message in run_on_ranks(_mistake_on_rank_1, 2, case, timeout_s=60):
        assert MISTAKES[case] in message, message
        assert FIXES.get(case, "build the layer from the same MoEConfig and hidden size on every rank") in message


def _patched_differently_on_rank_1(layers: list[list[int]]) -> str:
    """``patch_model`` with another layer selection on rank 1: the ranks' first MoE layers are other modules, or the
    models hold other numbers of them (their collectives would pair one layer's with another's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy

    manager = sy.ProcessGroupManager(ep=2)
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2), groups=manager, layers=layers[dist.get_rank()])
    with pytest.raises(ValueError) as caught:
        model(torch.randint(0, 32, (1, 5)))
    return str(caught.value)


@pytest.mark.parametrize("layers, differ", [
    ([[0, 1], [1, 2]], "different patched_as (EP rank 0: ('model.layers.0.mlp', 2), EP rank 1: ('model.layers.1.mlp', 2))"),
    ([[0, 1], [0]], "different patched_as (EP rank 0: ('model.layers.0.mlp', 2), EP rank 1: ('model.layers.0.mlp', 1))"),
])
def test_ranks_that_patched_other_layers_fail_on_every_rank(layers, differ):
    for message in run_on_ranks(_patched_differently_on_rank_1, 2, layers, timeout_s=60):
        assert differ in message and "patch the same layers on every rank" in message, message


def _compiled_at_ep2() -> list[float]:
    """A patched model under torch.compile: dynamo cannot trace the peers' all_gather_object (its process group), so
    the check runs outside the graph (it crashed the first forward: InternalTorchDynamoError)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy

    manager = sy.ProcessGroupManager(ep=2)
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    torch.manual_seed(0)
    model = sy.patch_model(AutoModelForCausalLM.from_config(config), sy.MoEConfig(num_experts=4, top_k=2),
                           groups=manager)
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    return [float(loss)]


def test_a_compiled_model_checks_its_peers_outside_the_graph():
    for losses in run_on_ranks(_compiled_at_ep2, 2, timeout_s=120):
        assert len(losses) == 1 and losses[0] == losses[0]  # a loss (not NaN), not a crash


def _uneven_batches_checked_once() -> tuple[int, float]:
    """[B, S, H] batches of other lengths on each rank (rank 0 none at all, then some) through an ep=2 layer vs the
    same weights at ep=1; a layer built on rank 0 alone (never called) takes no collective."""
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(ep=2)
    rank = dist.get_rank()
    config = MoEConfig(num_experts=8, top_k=2)
    torch.manual_seed(0)
    reference = MoELayer(config, HIDDEN, FFN)
    if rank == 0:
        MoELayer(config, HIDDEN, FFN, groups=manager)
    layer = MoELayer(config, HIDDEN, FFN, groups=manager)
    layer.load_state_dict(reference.state_dict())
    gathers, real = 0, dist.all_gather_object

    def counting(*args, **kwargs):
        nonlocal gathers
        gathers += 1
        return real(*args, **kwargs)

    dist.all_gather_object = counting
    worst = 0.0
    try:
        for step, (batch, seq) in enumerate([(2, 3), (1, 7), (3, 2)]):
            x = torch.randn(batch if rank or step else 0, seq + rank * (step + 1), HIDDEN, requires_grad=True)
            x_ref = x.detach().clone().requires_grad_(True)
            y, y_ref = layer(x), reference(x_ref)
            y.sum().backward()
            y_ref.sum().backward()
            if x.numel():
                worst = max(worst, (y - y_ref).abs().max().item(), (x.grad - x_ref.grad).abs().max().item())
    finally:
        dist.all_gather_object = real
    return gathers, worst


def test_uneven_batches_work_and_the_ranks_compare_once():
    for gathers, worst in run_on_ranks(_uneven_batches_checked_once, 2, timeout_s=60):
        assert gathers == 1
        assert worst < 1e-5
