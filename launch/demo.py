"""The README's main job on the embedded default: dense → upcycle → EP fine-tune → export → EP serve.

    python launch/demo.py [--ranks 2] [--dense-steps 60] [--out runs/demo]      # what `make demo` runs

1. builds the tiny Llama and BPE tokenizer offline (cached) and trains it densely for a few steps;
2. fine-tunes it with `deepspeed --num_gpus N launch/finetune.py` (upcycled to 4 experts, top-2,
   copy init, ep=N), which saves a switchyard checkpoint;
3. prints the dense loss, the upcycled model's loss at step 0 on the same batch (equal: copy init
   reproduces the dense model) and the loss after fine-tuning;
4. exports the checkpoint as a standard transformers Mixtral checkpoint (`switchyard export`);
5. serves it with `deepspeed --num_gpus N launch/serve.py --ep N`, asks one chat question with the
   official `openai` client, prints the answer, and shuts the server down with SIGTERM (drain, exit 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune" / "tiny.yaml"


def train_dense(out: Path, steps: int, ranks: int) -> tuple[float, float]:
    """Short dense pre-training in one process; returns (loss before, loss on the fine-tune's first batch)."""
    from transformers import AutoModelForCausalLM

    from switchyard.train.data import load_datasets, rank_batches
    from switchyard.train.model_source import cache_dir
    from switchyard.train.run_config import load_run_config
    from switchyard.train.tiny import build_tiny_dense_model, build_tokenizer

    config = load_run_config(CONFIG)
    tokenizer = build_tokenizer(cache_dir())
    model = AutoModelForCausalLM.from_pretrained(build_tiny_dense_model(cache_dir(), tokenizer))
    train_set, _ = load_datasets(config.data, tokenizer, cache_dir() / "datasets")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batches = rank_batches(train_set, 8, 0, 1, epoch=99, seed=config.data.seed)  # not the fine-tune's batches
    first = None
    for step in range(steps):
        loss = model(**next(batches)).loss
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 20 == 0:
            print(f"  dense step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # the fine-tune's first global batch: epoch 0, step 0, all data-parallel ranks together
    t = config.train
    batch = next(rank_batches(train_set, t.micro_batch_size * t.grad_accum * ranks, 0, 1, 0, config.data.seed))
    with torch.no_grad():
        return first, model(**batch).loss.item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=int(os.environ.get("RANKS", "2")))
    parser.add_argument("--dense-steps", type=int, default=60)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value settings for the fine-tune")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"== dense: tiny Llama trained for {args.dense_steps} steps ==", flush=True)
    loss_start, dense_loss = train_dense(out / "dense", args.dense_steps, args.ranks)
    print(f"  dense loss {loss_start:.3f} -> {dense_loss:.3f} (on the fine-tune's first batch)", flush=True)

    print(f"== upcycle to 4 experts (copy) and fine-tune on {args.ranks} ranks, ep={args.ranks} ==", flush=True)
    for last in ("finetune", "export"):  # the last demo's outputs: a fresh run refuses its checkpoints, and an export
        shutil.rmtree(out / last, ignore_errors=True)  # refuses a directory it cannot tell for an earlier export
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", str(args.ranks), "launch/finetune.py", "--config", str(CONFIG),
               f"model.source={out / 'dense'}", f"output_dir={out / 'finetune'}", f"parallel.ep={args.ranks}",
               "checkpoint.resume=null", *args.overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        return result.returncode
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    rows = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    checkpoint = out / "finetune" / "checkpoints" / (out / "finetune" / "checkpoints" / "latest").read_text()
    print(f"  dense model loss on batch 1:        {dense_loss:.4f}")
    print(f"  upcycled model loss at step 0:      {rows[0]['loss']:.4f}   (copy init: equal to the dense loss)")
    copy_init = not any(o.startswith("moe.init=") for o in args.overrides)
    if copy_init and not math.isclose(rows[0]["loss"], dense_loss, rel_tol=1e-4):
        print(f"demo: the upcycled model's step-0 loss {rows[0]['loss']:.6f} differs from the dense loss "
              f"{dense_loss:.6f} on the same batch; copy init must reproduce the dense model", file=sys.stderr)
        return 1
    print(f"  loss after {summary['steps']} fine-tune steps:     {rows[-1]['loss']:.4f}"
          f"   eval loss {summary.get('eval_loss', float('nan')):.4f}")
    print(f"  switchyard checkpoint: {checkpoint / 'model'}")
    print(f"  metrics: {out / 'finetune' / 'metrics.jsonl'}, heatmap: {summary['heatmap']}", flush=True)

    print("== export to a standard transformers MoE checkpoint ==", flush=True)
    exported = out / "export"
    result = subprocess.run([str(Path(sys.executable).with_name("switchyard")), "export", "--model",
                             str(checkpoint / "model"), "--out", str(exported)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:  # its own error, not a CalledProcessError traceback that hides it
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
        return result.returncode
    config = json.loads((exported / "config.json").read_text())
    print(f"  {exported}: {config['architectures'][0]}, {config.get('num_local_experts')} experts, loads with "
          "transformers alone (and vLLM / SGLang)", flush=True)

    print(f"== serve it with ep={args.ranks} and ask a question with the openai client ==", flush=True)
    return serve_and_ask(exported, args.ranks)


def serve_and_ask(model_dir: Path, ranks: int) -> int:
    from openai import OpenAI

    from switchyard.serve.launcher import ServerProcess

    with ServerProcess.start(model_dir, ep=ranks) as server:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        model_id = client.models.list().data[0].id
        question = "def fibonacci(n):"
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}],
                                               max_tokens=24, temperature=0)
        print(f"  user: {question}")
        print(f"  {model_id} (ep={ranks}): {reply.choices[0].message.content!r}")
        print(f"  usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
        code = server.drain()  # SIGTERM to rank 0: drain in-flight requests, stop every rank
    print(f"  server drained and stopped (launcher exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
