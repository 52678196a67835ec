"""A user's HF Trainer script (``TrainingArguments(deepspeed=…)``) at ep=2 on CPU ranks against one process.

The script (``hf_trainer_ep_script.py``) builds the optimizer with
``switchyard.deepspeed.hf_trainer.moe_optimizer_cls_and_kwargs``; without it ZeRO-1/2 stop in the engine ("None of
the param groups are marked as MoE"). The oracle is plain torch in this process: the same tiny model, the same
global batches, SGD with the clip active (ZeRO-1/2), no DeepSpeed and no Trainer.
"""

from __future__ import annotations

import pytest
import torch

from harness import REPO_ROOT, load_script, run_script_on_ranks

pytestmark = pytest.mark.distributed

SCRIPT = REPO_ROOT / "tests" / "integration" / "hf_trainer_ep_script.py"


def one_process(clip: float) -> tuple[torch.nn.Module, list[float], list[float]]:
    script = load_script(SCRIPT, "hf_trainer_ep_script")
    model = script.tiny_patched()
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR)
    rows = script.rows()
    losses, norms = [], []
    for step in range(script.STEPS):
        batch = rows[4 * step: 4 * step + 4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses, norms


# stage 0 without clipping: its clip is refused at ep > 1 (the script checks the refusal)
@pytest.mark.parametrize("config, clip", [("zero1", 1.0), ("zero2", 1.0), ("zero0", 0.0)])
def test_trainer_at_ep2_matches_one_process(tmp_path, config, clip):
    import switchyard as sy

    result = run_script_on_ranks(SCRIPT, 2, ["--deepspeed", f"configs/deepspeed/{config}.json", "--out",
                                             str(tmp_path), "--max-grad-norm", str(clip)], timeout_s=120)
    assert result.returncode == 0, result.stdout[-5000:]
    model, losses, norms = one_process(clip)
    params = model.state_dict()
    held = set()
    for rank in (0, 1):
        run = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(run["losses"], losses, atol=1e-6, rtol=1e-6)
        if config != "zero0":  # DeepSpeed reports no norm at stage 0
            torch.testing.assert_close(run["grad_norms"], norms, atol=1e-6, rtol=1e-5)
        for name, value in run["params"].items():
            torch.testing.assert_close(value, params[name], atol=2e-6, rtol=1e-5, msg=f"rank {rank}: {name}")
        held |= set(run["params"])
        assert run["reload_logits_diff"] == 0.0  # switchyard.save_pretrained → from_pretrained at ep=2
        assert "or set max_grad_norm=0.0" in run["refusals"]["stage0_clip"], run["refusals"]
        assert "save_strategy='steps'" in run["refusals"]["save"], run["refusals"]
    assert held == set(params)  # every expert trained on some rank
    ids = load_script(SCRIPT, "hf_trainer_ep_script").rows()[:2]
    with torch.no_grad():  # the ep=2 save read in one process
        torch.testing.assert_close(sy.from_pretrained(tmp_path / "model")(input_ids=ids).logits,
                                   model(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
