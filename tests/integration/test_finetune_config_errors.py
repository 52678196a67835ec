"""launch/finetune.py's DeepSpeed JSON errors under the real launcher: one line per rank, before any group or model."""

from __future__ import annotations

import pytest

from harness import REPO_ROOT, run_deepspeed_launcher

pytestmark = pytest.mark.distributed


def test_zero3_with_pipeline_stages_is_one_config_error_line_on_every_rank_before_anything_is_built(tmp_path):
    """ZeRO-3 holds switchyard's MoE layers with data and expert parallelism only (switchyard/deepspeed/zero3.py);
    with pipeline stages it is refused from the run config, before the process groups: one line per rank, no
    traceback, nothing written."""
    result = run_deepspeed_launcher(REPO_ROOT / "launch" / "finetune.py", 2,
                                    ["--config", "configs/finetune/tiny.yaml", f"output_dir={tmp_path / 'run'}",
                                     "deepspeed=configs/deepspeed/zero3.json", "parallel.pp=2", "parallel.ep=1"],
                                    timeout_s=150)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("finetune: config error: ZeRO stage 3 (configs/deepspeed/zero3.json) with parallel.pp=2: "
                        "not supported") == 2, output[-3000:]
    assert "Traceback" not in output and "process groups built" not in output
    assert not (tmp_path / "run").exists()
