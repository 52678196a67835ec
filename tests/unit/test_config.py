import pytest

from switchyard import MoEConfig, ParallelConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=4, top_k=5), "top_k=5 exceeds num_experts=4"),
        (dict(num_experts=0), "num_experts must be a positive integer, got 0"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor must be > 0"),
        (dict(activation="swishy"), "activation 'swishy' is unknown"),
        (dict(n_group=4), "needs both n_group and topk_group"),
        (dict(num_experts=8, n_group=3, topk_group=1), "num_experts=8 is not divisible by n_group=3"),
        (dict(num_experts=8, top_k=4, n_group=4, topk_group=1), "hold 2 experts, fewer than top_k=4"),
        (dict(score_func="relu"), "score_func='relu' is unknown"),
        (dict(drop_policy="random"), "drop_policy='random' is unknown"),
        (dict(shared_expert_gate=True), "shared_expert_gate=True needs num_shared_experts >= 1"),
        (dict(init="magic"), "init='magic' is unknown"),
        (dict(aux_loss_coef=-1), "aux_loss_coef must be >= 0"),
    ],
)
def test_moe_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_moe_config_round_trips_and_rejects_unknown_keys():
    config = MoEConfig(num_experts=16, top_k=4, capacity_factor=1.25)
    assert MoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['experts'\]"):
        MoEConfig.from_dict({"experts": 8})


def test_parallel_config_defaults_etp_to_tp():
    assert ParallelConfig(tp=4).etp == 4
    assert ParallelConfig(tp=4).derived(16) == {"tp": 4, "pp": 1, "dp": 4, "ep": 1, "etp": 4, "edp": 4}
