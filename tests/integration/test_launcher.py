"""Scripts under the real `deepspeed` launcher on CPU ranks."""

from __future__ import annotations

import pytest

from harness import REPO_ROOT, run_deepspeed_launcher

pytestmark = pytest.mark.distributed


def test_all_to_all_demo_under_deepspeed_launcher():
    result = run_deepspeed_launcher(REPO_ROOT / "launch" / "all_to_all_demo.py", 2, timeout_s=180)
    assert result.returncode == 0, result.stdout[-5000:]
    assert result.stdout.count("forward and backward all-to-all verified") == 2, result.stdout[-5000:]


def test_moe_layer_demo_at_zero_stage_0_clips_the_global_norm_itself():
    # stage 0 at ep > 1: fill_deepspeed_config refuses DeepSpeed's clipping, the demo clips the global norm
    result = run_deepspeed_launcher(REPO_ROOT / "launch" / "moe_layer_demo.py", 2,
                                    ["--deepspeed-config", "configs/deepspeed/zero0.json"], timeout_s=180)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "output equals the single-process layer on every rank" in result.stdout, result.stdout[-5000:]
    assert "DeepSpeed ZeRO-0 step done" in result.stdout, result.stdout[-5000:]


def test_cli_layout_prints_the_worked_example():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "layout", "--world", "8", "--tp", "2", "--ep", "2", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    import json

    layout = json.loads(out)
    assert layout["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    bad = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "layout", "--world", "8", "--ep", "3"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "ep*etp = 3*1 = 3 does not divide tp*dp = 1*8 = 8" in bad.stderr


def test_finetune_config_for_two_ranks_in_one_process_is_one_line_saying_how_to_start_it(tmp_path):
    """docs/finetune.md's one-process command needs parallel.ep=1; without it the world check used to be a
    traceback from inside train(). Now: one config-error line, exit 2, nothing written."""
    from harness import run_script

    result = run_script(REPO_ROOT / "launch" / "finetune.py",
                        ["--config", "configs/finetune/tiny.yaml", f"output_dir={tmp_path / 'run'}"], timeout_s=120)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finetune: config error: ep*etp = 2*1 = 2 does not divide" in result.stderr
    assert "deepspeed --num_gpus 2 launch/finetune.py" in result.stderr and "parallel.ep=1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_serve_with_ep_in_one_process_says_how_to_start_the_ranks():
    from harness import run_script

    result = run_script(REPO_ROOT / "launch" / "serve.py", ["--model", "tiny", "--ep", "2"], timeout_s=120)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "--ep 2 needs 2 ranks" in out and "deepspeed --num_gpus 2 launch/serve.py" in out, out[-3000:]
