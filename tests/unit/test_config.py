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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aux_loss_coef=None), r"MoEConfig\.aux_loss_coef must be a number, got None"),
        (dict(capacity_factor="1.25"), r"MoEConfig\.capacity_factor must be a number or None, got '1\.25'"),
        (dict(routed_scaling_factor="2"), r"MoEConfig\.routed_scaling_factor must be a number, got '2'"),
        (dict(norm_topk_prob="false"), r"MoEConfig\.norm_topk_prob must be True or False, got 'false'"),
        (dict(num_shared_experts=1.0), r"MoEConfig\.num_shared_experts must be an integer, got 1\.0"),
        (dict(num_shared_experts=True), r"MoEConfig\.num_shared_experts must be an integer, got True"),
        (dict(num_experts=8.0), r"MoEConfig\.num_experts must be an integer, got 8\.0"),
        (dict(activation=None), r"MoEConfig\.activation must be a string, got None"),
        (dict(extra=[]), r"MoEConfig\.extra must be a dict, got \[\]"),
        (dict(num_shared_experts=1, shared_expert_intermediate_size=-4),
         "shared_expert_intermediate_size must be a positive integer, got -4"),
        (dict(num_shared_experts=1, shared_expert_intermediate_size=0),
         "shared_expert_intermediate_size must be a positive integer, got 0"),
    ],
)
def test_moe_config_wrong_types_are_value_errors_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_moe_config_takes_ints_for_real_fields():
    config = MoEConfig(aux_loss_coef=0, routed_scaling_factor=2, capacity_factor=1, shared_expert_intermediate_size=8)
    assert (config.aux_loss_coef, config.routed_scaling_factor, config.capacity_factor) == (0, 2, 1)


def test_nan_and_inf_are_refused_for_float_fields():
    """NaN passes every range check (its comparisons are all False): ``aux_loss_coef=nan`` used to load."""
    import math

    from switchyard import MoEConfig

    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"MoEConfig.aux_loss_coef must be a finite number"):
            MoEConfig(aux_loss_coef=value)
        with pytest.raises(ValueError, match=r"MoEConfig.capacity_factor must be a finite number"):
            MoEConfig(capacity_factor=value)
