"""launch/finetune.py's DeepSpeed JSON errors under the real launcher: one line per rank, before any group or model."""

from __future__ import annotations

import pytest

from harness import REPO_ROOT, run_deepspeed_launcher

pytestmark = pytest.mark.distributed


def test_zero3_is_one_config_error_line_on_every_rank_before_anything_is_built(tmp_path):
    """ZeRO-3 cannot hold switchyard's MoE layers (DeepSpeed 0.19 asserts on non-AutoEP MoE modules at stage 3);
    it used to be refused from inside train(), after the process groups: a traceback on every rank."""
    result = run_deepspeed_launcher(REPO_ROOT / "launch" / "finetune.py", 2,
                                    ["--config", "configs/finetune/tiny.yaml", f"output_dir={tmp_path / 'run'}",
                                     "deepspeed=configs/deepspeed/zero3.json"], timeout_s=150)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("finetune: config error: ZeRO stage 3 is not supported with switchyard MoE layers") == 2, \
        output[-3000:]
    assert "Traceback" not in output and "process groups built" not in output
    assert not (tmp_path / "run").exists()
