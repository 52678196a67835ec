"""A user's HF Trainer script on a switchyard-patched tiny Llama at ep=2 (tests/integration/test_hf_trainer_ep.py).

    deepspeed --num_gpus 2 tests/integration/hf_trainer_ep_script.py --deepspeed configs/deepspeed/zero2.json --out DIR

Trains 3 SGD steps on fixed rows (sequential sampling, so the global batch of step s is rows 4s … 4s+3), then writes
each rank's losses, grad norms and parameters, the settings the helper refuses, and whether the model saved with
``switchyard.save_pretrained`` reloads with the same logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import switchyard as sy
from switchyard.deepspeed.hf_trainer import moe_optimizer_cls_and_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import build  # noqa: E402

STEPS, LR, CLIP = 3, 0.5, 1.0  # the clip is active: the first step's norm is 1.27


def tiny_patched(groups=None) -> torch.nn.Module:
    model = build("llama", hidden_act="silu", intermediate_size=64)
    return sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.0), groups=groups).train()


def rows() -> torch.Tensor:
    return torch.randint(0, 96, (4 * STEPS, 16), generator=torch.Generator().manual_seed(5))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-grad-norm", type=float, default=CLIP)
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    out = Path(cli.out)

    def arguments(**changes) -> TrainingArguments:
        settings = dict(output_dir=str(out / "trainer"), deepspeed=cli.deepspeed, per_device_train_batch_size=2,
                        max_steps=STEPS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
                        max_grad_norm=cli.max_grad_norm, train_sampling_strategy="sequential", save_strategy="no",
                        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        return TrainingArguments(**{**settings, **changes})

    args = arguments()
    groups = sy.ProcessGroupManager(ep=2)
    model = tiny_patched(groups)
    refusals = {}
    for name, bad in (("save", dict(save_strategy="steps")),
                      ("stage0_clip", dict(deepspeed="configs/deepspeed/zero0.json", max_grad_norm=1.0))):
        try:
            moe_optimizer_cls_and_kwargs(arguments(**bad), model)
        except ValueError as err:
            refusals[name] = str(err)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows()],
                      optimizer_cls_and_kwargs=moe_optimizer_cls_and_kwargs(args, model))
    trainer.train()

    sy.save_pretrained(model, out / "model")
    reloaded = sy.from_pretrained(out / "model", groups=groups)
    ids = rows()[:2]
    with torch.no_grad():
        logits, again = model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    rank = torch.distributed.get_rank()
    history = [h for h in trainer.state.log_history if "loss" in h]
    torch.save({"losses": [h["loss"] for h in history], "grad_norms": [h.get("grad_norm") for h in history],
                "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "reload_logits_diff": float((logits - again).abs().max()), "refusals": refusals},
               out / f"rank{rank}.pt")
    print(f"rank {rank} trained", flush=True)


if __name__ == "__main__":
    main()
