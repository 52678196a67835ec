"""ZeRO-2 and ZeRO-3 with the optimizer offloaded to the CPU, on a GPU: the same run as without offloading.

switchyard steps torch's AdamW (fused on CUDA) rather than DeepSpeedCPUAdam, so with
``offload_optimizer`` DeepSpeed hands it fp32 master weights on the CPU. Oracle: the same launcher run with
the optimizer on the GPU. With SGD the final weights agree to float rounding (the update on the CPU vs the
GPU); with AdamW the losses of every step agree, and every weight is within the 2·lr per step by which
Adam's normalized update can differ where a gradient is near zero (its sign is then rounding noise). On CPU
ranks both runs are on the CPU anyway, so this test needs a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import REPO_ROOT, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

CONFIG = str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml")
RUN = ["parallel.ep=1", "data.seq_len=64", "data.max_samples=400", "train.max_steps=6", "train.warmup_steps=1",
       "train.eval_every=1000", "checkpoint.every=6", "train.precision=bf16"]


def finetune(out: Path, deepspeed_json: Path, optimizer: list[str]) -> list[float]:
    args = ["--config", CONFIG, f"output_dir={out}", f"deepspeed={deepspeed_json}", *RUN, *optimizer]
    result = run_script(REPO_ROOT / "launch" / "finetune.py", args, timeout_s=280)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    import switchyard as sy

    return sy.from_pretrained(out / "checkpoints" / "step_000006" / "model").state_dict()


OPTIMIZERS = {"sgd": ["train.optimizer=sgd", "train.lr=0.5", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"],
              "adamw": ["train.optimizer=adamw", "train.lr=1.0e-3"]}


@pytest.mark.parametrize("stage_json", ["zero2_bf16.json", "zero3.json"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_offloaded_optimizer_trains_like_the_gpu_optimizer(tmp_path, optimizer, stage_json):
    on_gpu = json.loads((REPO_ROOT / "configs" / "deepspeed" / stage_json).read_text())
    offload = json.loads(json.dumps(on_gpu))
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    offload["zero_force_ds_cpu_optimizer"] = False
    paths = {}
    for name, cfg in (("gpu", on_gpu), ("offload", offload)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(cfg))
    losses_gpu = finetune(tmp_path / "run_gpu", paths["gpu"], OPTIMIZERS[optimizer])
    losses_offload = finetune(tmp_path / "run_offload", paths["offload"], OPTIMIZERS[optimizer])
    assert len(losses_gpu) == len(losses_offload) == 6
    assert losses_offload[0] == pytest.approx(losses_gpu[0], rel=1e-6)
    assert losses_offload == pytest.approx(losses_gpu, rel=2e-3)
    assert losses_gpu[-1] < losses_gpu[0]
    weights_gpu, weights_offload = final_weights(tmp_path / "run_gpu"), final_weights(tmp_path / "run_offload")
    assert weights_gpu.keys() == weights_offload.keys()
    # SGD: rounding of the same update; AdamW: up to 2·lr a step where a near-zero gradient's sign is noise
    atol = 1e-3 if optimizer == "sgd" else 2 * 1e-3 * 6
    for name, tensor in weights_gpu.items():
        torch.testing.assert_close(weights_offload[name].float(), tensor.float(), rtol=1e-2, atol=atol,
                                   msg=lambda message, name=name: f"{name}: {message}")
