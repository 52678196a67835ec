"""Claims of the user docs that test_docs_snippets.py does not cover, checked against the code by introspection:
the run-config table of docs/finetune.md against the run config's dataclasses, the names, paths, constants and log
lines docs/moe-layer.md and docs/finetune.md quote, and the README's install facts. No model runs; seconds.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "integration" / "switchyard"


def text(name: str) -> str:
    return (REPO / name).read_text()


def _table_row(doc: str, section: str) -> str:
    match = re.search(rf"^\| `{section}` \| (.+) \|$", doc, re.M)
    assert match, f"docs/finetune.md has no row for `{section}` in the run-config table"
    return match.group(1)


def _keys_before_parenthesis(row: str) -> set[str]:
    """The backticked keys of a table row that are not inside a parenthesis (the values and examples are)."""
    depth, kept = 0, []
    for char in row:
        depth += char == "("
        if depth == 0:
            kept.append(char)
        depth -= char == ")" and depth > 0
    return set(re.findall(r"`([a-z_]+)`", "".join(kept)))


@pytest.mark.parametrize("section", ["train", "checkpoint", "parallel", "model", "data"])
def test_finetune_run_config_table_names_every_field(section):
    from switchyard.config import ParallelConfig
    from switchyard.train.data import DataConfig
    from switchyard.train.run_config import CheckpointSection, ModelSection, TrainSection

    cls = {"train": TrainSection, "checkpoint": CheckpointSection, "parallel": ParallelConfig,
           "model": ModelSection, "data": DataConfig}[section]
    fields = {f.name for f in dataclasses.fields(cls)}
    row = _table_row(text("docs/finetune.md"), section)
    documented = _keys_before_parenthesis(row)
    if section == "data":  # "field names" stands for the four *_field keys
        assert "field names" in row
        fields -= {f for f in fields if f.endswith("_field")}
        documented &= fields | {"source"}
    if section == "model":  # the value list of `source` (tiny, …) sits in the row too
        documented &= fields
    assert fields <= documented, f"`{section}` row misses {sorted(fields - documented)}"
    assert documented <= fields, f"`{section}` row names {sorted(documented - fields)}, not run-config keys"


def test_finetune_run_config_moe_row_and_choices():
    from switchyard.train import data, run_config

    doc = text("docs/finetune.md")
    moe = _table_row(doc, "moe")
    section = {f.name for f in dataclasses.fields(run_config.MoESection)} - {"config"}
    assert section <= set(re.findall(r"`([a-z_]+)`", moe)), section
    train, data_row = _table_row(doc, "train"), _table_row(doc, "data")
    for values, row in ((run_config.OPTIMIZERS, train), (run_config.SCHEDULES, train), (run_config.PRECISIONS, train),
                        (data.FORMATS, data_row), (data.SAMPLE_BY, data_row)):
        assert all(f"`{v}`" in row for v in values), values
    defaults = {f.name: f.default for f in dataclasses.fields(run_config.RunConfig)}
    assert f"default `{defaults['deepspeed']}`" in _table_row(doc, "deepspeed")
    assert f"`tiny.yaml`'s is `{defaults['output_dir']}`" in doc


def test_finetune_deepspeed_json_list_is_the_directory():
    doc = _table_row(text("docs/finetune.md"), "deepspeed")
    assert "`zero0/1/2[_bf16].json`, `zero3.json`" in doc
    on_disk = sorted(p.name for p in (REPO / "configs" / "deepspeed").glob("*.json"))
    assert on_disk == sorted([f"zero{s}{b}.json" for s in (0, 1, 2) for b in ("", "_bf16")] + ["zero3.json"])
    # "The ZeRO-1/2 configs set "bf16": {"check_grad_overflow": false} (… zero0_bf16.json has no such key)"
    for name in on_disk:
        config = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
        stage = config["zero_optimization"]["stage"]
        assert isinstance(stage, int)  # "The JSON must name the ZeRO stage as a number"
        assert not {"optimizer", "scheduler"} & set(config), name  # "the JSON must not define them"
        assert (config["bf16"].get("check_grad_overflow") is False) == (stage in (1, 2)), name


def test_finetune_quoted_log_lines_and_defaults_are_the_codes():
    doc = text("docs/finetune.md")
    engine = (PACKAGE / "deepspeed" / "engine.py").read_text()
    for quoted in ("gradient norm: one fused fp32 reduction", "optimizer step: the gradient's cast, the clip, Adam and "
                   "the 16-bit weights' copy in one pass"):
        assert quoted in doc.replace("\n  ", " ") and quoted in engine.replace('"\n                 "', ""), quoted
    assert "parameter tensors frozen" in doc and "parameter tensors frozen" in (PACKAGE / "train" / "loop.py").read_text()
    from switchyard.deepspeed import build_lock, optimizer_param_groups
    from switchyard.train import load_waves

    assert build_lock.STALE_AFTER_S == 300 and "older than 300 s" in doc
    assert "`SWITCHYARD_RANK0_WAIT_S` (default 7 days" in doc.replace("\n", " ")
    assert load_waves.RANK0_WAIT_S == 7 * 24 * 3600 or "SWITCHYARD_RANK0_WAIT_S" in __import__("os").environ
    import inspect

    assert inspect.signature(optimizer_param_groups).parameters["max_group_size"].default == 5e8
    assert "capped at 5e8 elements" in doc


def test_moe_layer_doc_paths_exist():
    """docs/moe-layer.md names files relative to the repository or to integration/switchyard (`moe/router.py`)."""
    doc = text("docs/moe-layer.md")
    paths = set(re.findall(r"(?<![\w/.])((?:integration/switchyard|moe|parallel|hf|tests|benchmarks|launch)/"
                           r"[\w./-]+\.(?:py|json|yaml|sh))(?:::(\w+))?", doc))
    assert len(paths) > 20
    for path, test in paths:
        found = [p for p in (REPO / path, PACKAGE / path) if p.is_file()]
        assert found, f"docs/moe-layer.md names {path}, which does not exist"
        if test:
            assert f"def {test}(" in found[0].read_text(), f"docs/moe-layer.md names {path}::{test}"


def test_moe_layer_doc_names_and_constants():
    import switchyard as sy
    from switchyard.moe import experts, layer

    doc = text("docs/moe-layer.md")
    table = doc[doc.index("| impl | what |"):]
    impls = re.findall(r"^\| `(\w+)` \| ", table[:table.index("\n\n")], re.M)
    assert sorted(impls) == sorted(experts.EXPERT_IMPLS)
    routing = doc[doc.index("## Routing options"):doc.index("## Losses")]
    fields = {f.name for f in dataclasses.fields(sy.MoEConfig)}
    named = {n for cell in re.findall(r"^\| ([^|]+) \|", routing, re.M) for n in re.findall(r"`(\w+)`", cell)}
    assert named <= fields, named - fields
    assert layer.ALL_EXPERTS_MAX_TOKENS == 128 and layer.ALL_EXPERTS_MIN_COPIES_PER_EXPERT == 2
    assert (layer.SMALL_BATCH_MAX_ROWS, layer.SMALL_BATCH_ROWS_PER_EXPERT) == (128, 2)  # min(128, 2 * E)
    assert sy.MoEConfig().expert_bias_update_rate == 1e-3  # "u = 1e-3 by default"
    assert layer.MoELayer.cuda_graph is False and layer.MoELayer.small_batch_rows is None
    assert layer.MoELayer.all_experts_tokens is None and layer.MoELayer.overlap_shared_experts is True
    moe = sy.MoELayer(sy.MoEConfig(num_experts=4, top_k=2, seq_aux_loss_coef=0.1, z_loss_coef=0.1), 8, 16)
    assert sorted(k for k in moe.state_dict() if k.startswith("experts.")) == sorted(
        f"experts.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj"))  # "in global expert ids"
    import torch

    moe(torch.randn(2, 3, 8))
    assert set(moe.last_stats.losses) == {"load_balancing", "sequence_balance", "z_loss"}
    for name in ("tokens_per_expert_E", "dropped_copies", "routed_copies", "dropped_fraction", "imbalance"):
        assert hasattr(moe.last_stats, name), name


def test_readme_install_facts():
    readme, makefile = text("README.md"), text("Makefile")
    assert "`torch==2.13.0`" in readme and "echo 'torch==2.13.0'" in makefile
    assert "`[test,serve]` extras" in readme and '-e ".[test,serve]"' in makefile
    assert "`.ci/run` calls `make test`" in readme and "make test" in (REPO / ".ci" / "run").read_text()
    assert "pip install -e '.[quack]'" in readme and "\nquack =" in text("setup.cfg")
    assert "bash launch/quickstart.sh" in makefile and "launch/demo.py" in text("launch/quickstart.sh")


def test_finetune_pipeline_model_types_are_the_codes():
    from switchyard.train.pipeline import PIPELINE_MODEL_TYPES

    doc = text("docs/finetune.md")
    listed = doc[doc.index("- Model types:"):]
    listed = listed[:listed.index("whose")]
    assert set(re.findall(r"`(\w+)`", listed)) == set(PIPELINE_MODEL_TYPES)
