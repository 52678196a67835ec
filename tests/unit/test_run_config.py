"""The fine-tune run config: YAML + overrides, errors before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switchyard.deepspeed import fill_deepspeed_config
from switchyard.train.loop import total_steps
from switchyard.train.run_config import load_run_config
from switchyard.train.schedule import lr_multiplier

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune" / "tiny.yaml"


def test_tiny_yaml_loads_with_overrides():
    config = load_run_config(TINY, ["train.lr=5e-4", "moe.num_experts=8", "moe.every_n=2", "parallel.ep=4"])
    assert config.train.lr == 5e-4
    assert config.moe_config().num_experts == 8 and config.moe.every_n == 2
    assert config.parallel.ep == 4
    assert config.check_world(8)["dp"] == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], r"unknown config keys \['train.lrr'\]"),
        (["moe.num_expert=8"], r"unknown MoEConfig keys \['num_expert'\]"),
        (["moe.top_k=9"], "top_k=9 exceeds num_experts=4"),
        (["train.precision=fp16"], "train.precision='fp16' is unknown"),
        (["train.cuda_graph=yes please"], "train.cuda_graph must be true or false"),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be a positive integer"),
        (["train.max_steps=null"], "train needs max_steps or epochs"),
        (["data.seq_len=0"], "seq_len"),
        (["checkpoint.every=0"], "checkpoint.every and checkpoint.keep must be >= 1"),
        (["nonsense"], "must look like key.sub=value"),
        (["train.lr=abc"], r"train.lr must be a number, got 'abc'"),
        (["train.warmup_steps=abc"], r"train.warmup_steps must be an integer, got 'abc'"),
        (["checkpoint.every=abc"], r"checkpoint.every must be an integer, got 'abc'"),
        (["train.seed=abc"], r"train.seed must be an integer, got 'abc'"),
        (["train.momentum=abc"], r"train.momentum must be a number, got 'abc'"),
        (["output_dir=123"], r"output_dir must be a string, got 123"),
        (["train.max_steps=true"], r"train.max_steps must be an integer or null, got True"),
        (["moe.aux_loss_coef=abc"], r"moe.aux_loss_coef must be a number, got 'abc'"),
        (["model.tiny.hiden_size=64"], r"unknown config keys \['model.tiny.hiden_size'\].*hidden_size"),
        (["deepspeed=configs/deepspeed/nope.json"], r"deepspeed='configs/deepspeed/nope.json': no such file"),
        (["moe.layers=[0,1"], r"override 'moe.layers=\[0,1': the value is not valid YAML \(expected ',' or ']'"),
        (["data.source=@x"], r"not valid YAML .*if it is a string, quote it: data.source='\"@x\"'"),
        # train.freeze is a list: the string the hint offered was refused in turn
        (["train.freeze=*.self_attn.*"], r"\(a list: train.freeze='\[\"\*.self_attn.\*\"\]'\)"),
        (["train.lr=.nan"], "train.lr must be a finite number, got nan"),
        (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
        (["train.clip=nan"], "train.clip must be a finite number, got nan"),
        (["train.weight_decay=.nan"], "train.weight_decay must be a finite number"),
        (["train.momentum=-0.9"], "train.momentum must be >= 0, got .*-0.9"),
        (["train.freeze=[]"], r"train.freeze must be a non-empty list of glob patterns"),
        (["output_dir=''"], r"output_dir is empty \(an unset variable\?\)"),
        (["output_dir=configs/finetune/tiny.yaml"], r"output_dir='configs/finetune/tiny.yaml' is a file; a run writes"),
        (['train.freeze=["*.q_proj.*", ""]'], r"train.freeze must be a non-empty list of glob patterns"),
        (["train.freeze=self_attn"], r"train.freeze must be a list or null, got 'self_attn' \(str\)"),
    ],
)
def test_bad_values_are_errors_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(TINY, overrides)


def test_run_config_that_is_not_yaml_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 3\n lr: 1\n")
    with pytest.raises(ValueError, match=rf"run config {path} is not valid YAML: .* at line 3, column 2"):
        load_run_config(path)


def test_yaml_numbers_pyyaml_reads_as_strings_become_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("lr: 1.0e-3", "lr: 1e-4").replace("aux_loss_coef: 0.01",
                                                                                "aux_loss_coef: 1e-2"))
    config = load_run_config(path, ["model.tiny.rms_norm_eps=1e-6"])
    assert config.train.lr == 1e-4 and config.moe_config().aux_loss_coef == 1e-2
    assert config.model.tiny == {"rms_norm_eps": 1e-6}


def test_epochs_alone_trains_every_epoch():
    import datasets

    from switchyard.train.loop import StepBatches

    rows = [[i] * 4 for i in range(403)]  # micro-batch 4 at dp 1: 100 steps an epoch, 3 rows dropped
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    config = load_run_config(TINY, ["train.max_steps=null", "train.epochs=3"])
    assert total_steps(config, StepBatches(dataset, config, 0, 1)) == 300
    both = load_run_config(TINY, ["train.epochs=3"])
    assert total_steps(both, StepBatches(dataset, both, 0, 1)) == 40  # both: whichever ends first


def test_relative_deepspeed_path_is_found_from_the_run_config(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(TINY.read_text().replace("configs/deepspeed/zero2.json", "ds.json"))
    (tmp_path / "cfg" / "ds.json").write_text((REPO / "configs/deepspeed/zero0.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert load_run_config("cfg/run.yaml").deepspeed == str((tmp_path / "cfg" / "ds.json").resolve())
    assert Path(load_run_config(TINY).deepspeed).is_file()  # the default config from outside the repo
    # a run config kept outside the checkout, with no deepspeed key: the default is switchyard's own zero2.json
    (tmp_path / "mine.yaml").write_text("\n".join(line for line in TINY.read_text().splitlines()
                                                  if not line.startswith("deepspeed:")))
    assert load_run_config(tmp_path / "mine.yaml").deepspeed == str((REPO / "configs/deepspeed/zero2.json").resolve())


def test_resume_mismatches_name_the_structural_fields():
    config = load_run_config(TINY)
    same = load_run_config(TINY, ["parallel.ep=1", "train.max_steps=99", "train.lr=0.1", "moe.init=copy"])
    assert config.resume_mismatches(same.to_dict()) == []
    other = load_run_config(TINY, ["moe.num_experts=8", "data.seq_len=64"])
    assert [m.split(":")[0] for m in config.resume_mismatches(other.to_dict())] == ["moe.num_experts", "data.seq_len"]
    # frozen parameters have no optimizer state: the engine's state would not load with other ones frozen
    frozen = load_run_config(TINY, ['train.freeze=["*.self_attn.*"]'])
    assert [m.split(":")[0] for m in config.resume_mismatches(frozen.to_dict())] == ["train.freeze"]


def test_world_dependent_checks():
    config = load_run_config(TINY, ["train.global_batch_size=32"])
    with pytest.raises(ValueError, match=r"global_batch_size=32 but micro_batch_size × grad_accum × dp = 4 × 1 × 2 = 8"):
        config.check_world(2)
    with pytest.raises(ValueError, match="ep\\*etp = 2\\*1 = 2 does not divide tp\\*dp = 1\\*3 = 3"):
        load_run_config(TINY).check_world(3)
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by parallel.ep=8"):
        load_run_config(TINY, ["parallel.ep=8"]).check_world(8)


def test_tensor_parallel_layouts_are_checked_before_the_model():
    sizes = load_run_config(TINY, ["parallel.tp=2", "parallel.ep=2"]).check_world(4)
    assert (sizes["tp"], sizes["dp"], sizes["etp"], sizes["edp"]) == (2, 2, 2, 1)
    assert load_run_config(TINY, ["parallel.tp=2", "parallel.ep=1", "train.global_batch_size=4"]).check_world(2)["dp"] == 1
    # etp=1: experts whole, tokens split over the tp ranks; a loss or noise a slice of the tokens cannot honour is refused
    sizes = load_run_config(TINY, ["parallel.tp=2", "parallel.etp=1", "parallel.ep=2"]).check_world(2)
    assert (sizes["tp"], sizes["dp"], sizes["ep"], sizes["etp"], sizes["edp"]) == (2, 1, 2, 1, 1)
    with pytest.raises(ValueError, match=r"moe.seq_aux_loss_coef=0.01 with parallel.tp=2 and parallel.etp=1: .*set "
                                         r"moe.seq_aux_loss_coef=0 or leave parallel.etp unset"):
        load_run_config(TINY, ["parallel.tp=2", "parallel.etp=1", "moe.seq_aux_loss_coef=0.01"]).check_world(2)
    # pipeline stages: dp = world / (tp·pp), and the global batch counts dp only
    sizes = load_run_config(TINY, ["parallel.pp=2", "parallel.ep=2", "train.global_batch_size=8"]).check_world(4)
    assert (sizes["pp"], sizes["dp"], sizes["ep"], sizes["edp"]) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match=r"train.global_batch_size=8 but micro_batch_size × grad_accum × dp = 4 × 1 × 1"):
        load_run_config(TINY, ["parallel.pp=2", "parallel.ep=1", "train.global_batch_size=8"]).check_world(2)
    with pytest.raises(ValueError, match=r"ep\*etp = 2\*1 = 2 does not divide tp\*dp = 1\*1 = 1 \(world 2, pp 2\)"):
        load_run_config(TINY, ["parallel.pp=2", "parallel.ep=2"]).check_world(2)
    with pytest.raises(ValueError, match=r"ep\*etp = 2\*2 = 4 does not divide tp\*dp = 2\*1 = 2"):
        load_run_config(TINY, ["parallel.tp=2", "parallel.ep=2"]).check_world(2)


def test_expert_count_is_checked_only_where_the_run_config_decides_it(tmp_path):
    """An HF MoE model or a switchyard checkpoint keeps its own experts (any moe.num_experts is refused for
    an HF MoE model): MoESection's default of 4 experts used to fail ep=8 for a 64-expert model."""
    path = tmp_path / "adopt.yaml"
    path.write_text(f"model:\n  source: {tmp_path / 'qwen3-moe'}\ntrain:\n  max_steps: 10\n"
                    f"deepspeed: {REPO / 'configs/deepspeed/zero2.json'}\n")
    assert load_run_config(path, ["parallel.ep=8"]).check_world(8)["edp"] == 1
    with pytest.raises(ValueError, match="moe.num_experts=4 is not divisible by parallel.ep=8"):
        load_run_config(path, ["parallel.ep=8", "moe.num_experts=4"]).check_world(8)


def test_run_config_fills_its_deepspeed_json_for_the_world():
    filled = load_run_config(TINY, ["train.grad_accum=2"]).deepspeed_config(4)
    assert filled["train_batch_size"] == 4 * 2 * 4 and filled["gradient_clipping"] == 1.0
    stage0 = load_run_config(TINY, ["deepspeed=configs/deepspeed/zero0.json"]).deepspeed_config(2)
    assert stage0["gradient_clipping"] == 0.0  # ep=2 at stage 0: the loop clips with the global norm itself
    zero3 = ["deepspeed=configs/deepspeed/zero3.json"]
    assert load_run_config(TINY, zero3).deepspeed_config(2)["zero_optimization"]["stage"] == 3  # data × experts
    for overrides, world, what in ((["parallel.tp=2", "parallel.ep=1"], 2, "parallel.tp=2"),
                                   (["parallel.pp=2", "parallel.ep=1"], 2, "parallel.pp=2"),
                                   (["train.cuda_graph=true"], 2, "train.cuda_graph=true")):
        with pytest.raises(ValueError, match=rf"ZeRO stage 3 \(configs/deepspeed/zero3.json\) with {what}: not "
                                             r"supported\. ZeRO-3 partitions switchyard's MoE layers with data and "
                                             r"expert parallelism only"):
            load_run_config(TINY, zero3 + overrides).deepspeed_config(world)
    with pytest.raises(ValueError, match="does not divide"):
        load_run_config(TINY).deepspeed_config(3)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"zero_optimization": {"stage": 2},}', r"ds.json is not valid JSON: Expecting property name .* line 1"),
        ("[]", "ds.json must be a JSON object, got list"),
        ('{"zero_optimization": {"stage": "auto"}}', r"zero_optimization.stage='auto'; the stage is one of the numbers 0, 1, 2 or 3"),
        ('{"bf16": true}', r'bf16=True; it must be a section, e.g. "bf16": \{"enabled": "auto"\}'),
    ],
)
def test_malformed_deepspeed_json_is_an_error_naming_the_file_or_key(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        fill_deepspeed_config(path, micro_batch_size=4, grad_accum=1, dp_size=1, clip=1.0, precision="fp32")


def test_optimizer_offload_needs_deepspeeds_flag_for_a_torch_optimizer(tmp_path):
    """DeepSpeed refused it only after the model was built, telling the user to add an optimizer section."""
    zero2 = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    zero2["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(zero2))
    common = dict(micro_batch_size=4, grad_accum=1, dp_size=2, clip=1.0, precision="fp32")
    with pytest.raises(ValueError, match=r'offloads the optimizer to cpu.*"zero_force_ds_cpu_optimizer": false'):
        fill_deepspeed_config(path, **common)
    path.write_text(json.dumps({**zero2, "zero_force_ds_cpu_optimizer": False}))
    assert fill_deepspeed_config(path, **common)["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_deepspeed_auto_values_filled_and_conflicts_refused(tmp_path):
    filled = fill_deepspeed_config(REPO / "configs/deepspeed/zero2.json", micro_batch_size=4, grad_accum=2,
                                   dp_size=4, clip=1.0, precision="bf16")
    assert filled["train_batch_size"] == 32 and filled["bf16"]["enabled"] is True
    assert filled["gradient_accumulation_steps"] == 2 and filled["zero_optimization"]["stage"] == 2
    assert filled["bf16"]["check_grad_overflow"] is False  # docs/performance.md: 12-15 ms of each ZeRO step
    conflicting = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    conflicting["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(conflicting))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=16 but the run config implies 4"):
        fill_deepspeed_config(path, micro_batch_size=4, grad_accum=1, dp_size=1, clip=1.0, precision="fp32")
    with pytest.raises(ValueError, match=r"bf16.enabled=True but the run config implies False \(train.precision\)"):
        fill_deepspeed_config(REPO / "configs/deepspeed/zero2_bf16.json", micro_batch_size=4, grad_accum=1,
                              dp_size=1, clip=1.0, precision="fp32")
    offloaded = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    offloaded["zero_optimization"]["offload_param"] = {"device": "cpu"}
    path.write_text(json.dumps(offloaded))
    with pytest.raises(ValueError, match=r"with zero_optimization.offload_param: not supported.*offloading the weights "
                                         r"is not tested there"):
        fill_deepspeed_config(path, micro_batch_size=4, grad_accum=1, dp_size=1, clip=1.0, precision="fp32")


def test_stage0_clipping_with_sharded_experts_is_refused_with_the_fix():
    zero0 = REPO / "configs/deepspeed/zero0.json"
    common = dict(micro_batch_size=4, grad_accum=1, dp_size=2, precision="fp32")
    with pytest.raises(ValueError, match=r"ep=2 ranks .* clip=0.0\) .*clip_global_grad_norm_\(model, 1.0"):
        fill_deepspeed_config(zero0, clip=1.0, ep_size=2, **common)
    assert fill_deepspeed_config(zero0, clip=0.0, ep_size=2, **common)["gradient_clipping"] == 0.0
    assert fill_deepspeed_config(zero0, clip=1.0, ep_size=1, **common)["gradient_clipping"] == 1.0
    assert fill_deepspeed_config(REPO / "configs/deepspeed/zero2.json", clip=1.0, ep_size=2,
                                 **common)["gradient_clipping"] == 1.0


def test_stage0_concrete_clipping_equal_to_train_clip_is_accepted_when_the_caller_clips(tmp_path):
    path = tmp_path / "zero0_clip1.json"
    path.write_text(json.dumps({**json.loads((REPO / "configs/deepspeed/zero0.json").read_text()),
                                "gradient_clipping": 1.0}))
    common = dict(micro_batch_size=4, grad_accum=1, dp_size=2, precision="fp32", ep_size=2)
    assert fill_deepspeed_config(path, clip=1.0, caller_clips=True, **common)["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="gradient_clipping=1.0 but the run config implies 0.5"):
        fill_deepspeed_config(path, clip=0.5, caller_clips=True, **common)


def test_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_multiplier(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    assert values[-1] >= 0.1 and lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(5, 10, 0, "constant", 0.1) == 1.0


def test_optimizer_param_groups_split_moe_groups_at_the_cap():
    import torch
    import torch.nn as nn

    from switchyard.deepspeed import optimizer_param_groups
    from switchyard.deepspeed.config import MOE_MAX_GROUP_SIZE

    model = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4),
                           "experts": nn.ParameterList([nn.Parameter(torch.zeros(10, 10)) for _ in range(4)])})
    for param in model["experts"].parameters():  # how switchyard tags expert parameters for DeepSpeed
        param.allreduce, param.group_name = False, "ep_size_1"
    groups = optimizer_param_groups(model, 0.1)
    assert MOE_MAX_GROUP_SIZE > 400
    assert [(g["name"], len(g["params"]), g["weight_decay"], g.get("moe", False)) for g in groups] == [
        ("decay", 1, 0.1, False), ("no_decay", 3, 0.0, False), ("ep_size_1", 4, 0.1, True)]
    capped = [g for g in optimizer_param_groups(model, 0.1, max_group_size=250) if g.get("moe")]
    assert [len(g["params"]) for g in capped] == [2, 2]
    with pytest.raises(ValueError, match="max_group_size=0"):
        optimizer_param_groups(model, 0.1, max_group_size=0)


def test_pp_layers_needs_one_count_per_stage_and_pp_above_one():
    assert load_run_config(TINY, ["parallel.pp=2", "parallel.pp_layers=[1, 3]"]).parallel.pp_layers == [1, 3]
    for overrides, message in ((["parallel.pp=2", "parallel.pp_layers=[4]"], r"pp_layers=\[4\] must list one layer "
                                r"count per pipeline stage, 2 of them"),
                               (["parallel.pp_layers=[4]"], r"pp_layers=\[4\] divides the layers among pipeline "
                                r"stages, but pp=1"),
                               (["parallel.pp=2", "parallel.pp_layers=[0, 4]"], r"every pp_layers entry .* must be a "
                                r"positive integer, got 0")):
        with pytest.raises(ValueError, match=message):
            load_run_config(TINY, overrides)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_run_config_is_valid_at_its_smallest_world(path):
    """The example configs (adopt an HF MoE, upcycle a hub model) carry hub ids that CI cannot fetch: their keys,
    types, batch arithmetic and DeepSpeed JSON are checked here, as the launcher checks them before any download."""
    import math

    config = load_run_config(path)
    p = config.parallel
    world = p.tp * p.pp * (math.lcm(p.tp, p.ep * p.etp) // p.tp)  # the fewest ranks whose dp the ep group divides
    assert config.check_world(world)["dp"] * p.tp * p.pp == world
    assert config.deepspeed_config(world)["bf16"]["enabled"] == (config.train.precision == "bf16")
