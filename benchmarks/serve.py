"""Serving speed: switchyard's engine vs transformers' ``generate()``, then a load test of the HTTP server.

    python benchmarks/serve.py --out benchmarks/results/serve.json          # one GPU (issue §6 shapes)
    python benchmarks/serve.py --tiny                                       # CPU logic check (temp file)
    python benchmarks/serve.py --tiny --ep 2                                # load test on 2 ranks (deepspeed)

Model: a Qwen3-MoE-shaped causal LM with random weights (hidden 1024, 16 layers, 64 experts, top-8,
expert ffn 512, vocab 32000, ~1.7B parameters); ``--tiny`` shrinks it. Both sides use the same weights:

    transformers   ``model.generate`` of the HF model, experts ``_experts_implementation="grouped_mm"``
                   (eager where grouped_mm cannot run), one batch of B prompts of equal length
    switchyard     the same model after ``patch_model`` (adopted blocks), driven by the server's own
                   ``Engine`` + ``ModelRunner`` in process (no HTTP), B sequences submitted at once;
                   decode="auto" (static KV cache + CUDA graphs on GPU), graphs captured in a warm-up

Per batch size B: ``ttft_s`` = time until every sequence has its first token (the prefill step),
``decode_tok_s`` = B·(N−1) / (time from then to the last token); greedy, EOS ignored, N (>= 2) new tokens.
``same_tokens_as_generate``: the share of the B sequences whose N greedy tokens equal ``generate()``'s, and
``same_prefix_as_generate`` the mean share of each sequence's tokens before the first difference (bf16
near-ties may flip a token and everything after it; in fp32 both are 1.0): the speed-up is of the same output.
The load test starts ``launch/serve.py`` (``--ep``), runs C concurrent streaming ``openai`` clients, and
reports throughput and p50/p99 of time to first token, inter-token latency and end-to-end latency.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common sits here
from bench_common import _git_commit, int_at_least  # noqa: E402  (_git_commit: the device's tree lacks .git)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "serve.json"
FULL = dict(hidden_size=1024, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512,
            intermediate_size=3072, vocab_size=32000, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=128, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(**shape, norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    config._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


@torch.inference_mode()
def bench_generate(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> dict[str, float]:
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    decode = max(total - ttft, 1e-9)
    return {"ttft_s": ttft, "decode_tok_s": len(prompts) * (new_tokens - 1) / decode, "total_s": total,
            "output_ids": out[:, ids.shape[1]:].tolist()}


def bench_engine(model, tokenizer, prompts: list[list[int]], new_tokens: int, device: torch.device) -> dict[str, float]:
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.sampling import SamplingParams

    runner = ModelRunner(model, max_batch=len(prompts))  # as the server: graphs captured up front
    runner.warmup()

    def run(n: int) -> tuple[float, float, list[list[int]]]:
        engine = Engine(runner, tokenizer)
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        seqs = [Sequence(p, params) for p in prompts]
        sync(device)
        t0 = time.perf_counter()
        engine.submit(seqs)
        engine.step()  # every sequence is prefilled and has its first token
        sync(device)
        t1 = time.perf_counter()
        engine.run_until_idle()
        sync(device)
        assert all(len(s.output_ids) == n for s in seqs)
        return t1 - t0, time.perf_counter() - t1, [list(s.output_ids) for s in seqs]

    run(2)  # warm-up
    ttft, decode, output_ids = run(new_tokens)
    row = {"ttft_s": ttft, "decode_tok_s": len(prompts) * (new_tokens - 1) / max(decode, 1e-9),
           "total_s": ttft + decode, "decode_mode": runner.decode, "output_ids": output_ids}
    graphs = getattr(runner.batch, "_graphs", {})
    if graphs:  # the GPU's share of a step: one graph replayed back to back (the rest of a step is host work)
        graph = graphs[max(graphs)]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync(device)
        row["graph_replay_ms"] = (time.perf_counter() - t0) / 20 * 1e3
        row["step_ms"] = decode / (new_tokens - 1) * 1e3
    return row


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    """Share of sequences with identical tokens, and the mean share of tokens before the first difference."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return {"same_tokens_as_generate": sum(a == b for a, b in zip(ours, ref)) / len(ref),
            "same_prefix_as_generate": sum(prefix(a, b) / len(b) for a, b in zip(ours, ref)) / len(ref)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def load_test(model_dir: Path, ep: int, clients: int, requests: int, prompt_len: int, max_tokens: int,
              vocab: int, timeout_s: float) -> dict[str, Any]:
    import openai

    from switchyard.serve.launcher import ServerProcess

    prompts = prompts_for(clients * requests, prompt_len, min(vocab, 1024), seed=1)
    ttft, itl, e2e, tokens = [], [], [], []
    lock = threading.Lock()
    with ServerProcess.start(model_dir, ep=ep, args=["--max-batch", str(clients)]) as server:
        server.wait_ready(timeout_s)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)
        model_id = client.models.list().data[0].id

        def worker(c: int) -> None:
            for r in range(requests):
                t0 = time.perf_counter()
                times, count = [], 0
                stream = client.completions.create(model=model_id, prompt=prompts[c * requests + r],
                                                   max_tokens=max_tokens, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True, "return_token_ids": True})
                for chunk in stream:
                    for choice in chunk.choices:
                        got = len(choice.model_extra.get("token_ids") or [])
                        if got:
                            times.append(time.perf_counter())
                            count += got
                with lock:
                    ttft.append(times[0] - t0)
                    itl.extend(b - a for a, b in zip(times, times[1:]))
                    e2e.append(times[-1] - t0)
                    tokens.append(count)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        wall = time.perf_counter() - started
        try:
            code: int | None = server.drain()
        except subprocess.TimeoutExpired:  # recorded, not fatal: the measurements above stand
            code = None
    summary = {"clients": clients, "requests": clients * requests, "max_tokens": max_tokens, "prompt_len": prompt_len,
               "ep": ep, "wall_s": wall, "tokens": sum(tokens), "throughput_tok_s": sum(tokens) / wall,
               "server_exit_code": code}
    for name, values in (("ttft_s", ttft), ("itl_s", itl), ("e2e_s", e2e)):
        summary[name] = {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}
    return summary


def batch_sizes(text: str) -> list[int]:
    """``--batches 1,16,64``: each a batch size >= 1 (argparse names a bad one and the range)."""
    return [int_at_least(1)(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model, few tokens: a CPU logic check")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result JSON (default {DEFAULT_OUT}; --tiny: a temp file)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--batches", type=batch_sizes, default=None,
                        help="comma-separated batch sizes (default 1,16,64; --tiny 1,4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (128; --tiny 8)")
    parser.add_argument("--prompt-len", type=int_at_least(1), default=None, help="prompt tokens (128; --tiny 16)")
    parser.add_argument("--ep", type=int_at_least(1), default=1,
                        help="expert-parallel ranks for the load test's server")
    parser.add_argument("--clients", type=int_at_least(1), default=None,
                        help="concurrent streaming clients (32; --tiny 4)")
    parser.add_argument("--skip-load-test", action="store_true")
    parser.add_argument("--skip-generate", action="store_true", help="only switchyard in the decode comparison")
    args = parser.parse_args(argv)
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: decode speed is timed from the 2nd token on; pass 2 or more")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = TINY if args.tiny else FULL
    batches = args.batches if args.batches is not None else ([1, 4] if args.tiny else [1, 16, 64])
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if args.tiny else 128)
    prompt_len = args.prompt_len if args.prompt_len is not None else (16 if args.tiny else 128)
    clients = args.clients if args.clients is not None else (4 if args.tiny else 32)
    out = args.out or (Path(tempfile.mkdtemp(prefix="serve-bench-")) / "serve.json" if args.tiny else DEFAULT_OUT)

    import transformers

    import switchyard as sy
    from switchyard.train.tiny import build_tokenizer

    tokenizer = build_tokenizer(None, vocab_size=1024, max_bytes=1_000_000)
    hf_model = build_model(shape, dtype, device)
    n_params = sum(p.numel() for p in hf_model.parameters())
    print(f"model: Qwen3-MoE-shaped, {n_params / 1e9:.3f}B parameters, {dtype}, {device}", flush=True)
    ours = sy.patch_model(copy.deepcopy(hf_model)) if not args.skip_generate else sy.patch_model(hf_model)
    results: dict[str, Any] = {"decode": {"switchyard": {}, "transformers_generate": {}}}
    ours_rows, ref_rows = results["decode"]["switchyard"], results["decode"]["transformers_generate"]
    for batch in batches:
        prompts = prompts_for(batch, prompt_len, shape["vocab_size"])
        row = ours_rows[str(batch)] = bench_engine(ours, tokenizer, prompts, new_tokens, device)
        ref = None if args.skip_generate else bench_generate(hf_model, prompts, new_tokens, device)
        ours_ids = row.pop("output_ids")
        ratio = ""
        if ref is not None:
            row.update(agreement(ours_ids, ref.pop("output_ids")))
            ref_rows[str(batch)] = ref
            ratio = (f"  ({row['decode_tok_s'] / ref['decode_tok_s']:.2f}x generate's {ref['decode_tok_s']:.1f}; "
                     f"{row['same_tokens_as_generate']:.0%} of sequences token for token as generate's)")
        print(f"batch {batch:3d}: switchyard {row['decode_tok_s']:9.1f} tok/s, "
              f"ttft {row['ttft_s'] * 1e3:8.1f} ms{ratio}", flush=True)
    results["meta"] = {
        "command": shlex.join(["python", "benchmarks/serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny, "shape": shape, "parameters": n_params, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": new_tokens,
        "prompt_len": prompt_len, "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")  # the decode numbers, even if the load test fails
    del hf_model
    if not args.skip_load_test:
        with tempfile.TemporaryDirectory(prefix="serve-bench-model-") as tmp:
            sy.save_pretrained(ours.to("cpu") if device.type == "cuda" else ours, tmp, tokenizer=tokenizer)
            results["load_test"] = load_test(Path(tmp), args.ep, clients, 2, prompt_len, new_tokens,
                                             shape["vocab_size"], timeout_s=600)
        lt = results["load_test"]
        print(f"load test: {lt['clients']} streaming clients, {lt['throughput_tok_s']:.1f} tok/s, "
              f"ttft p50 {lt['ttft_s']['p50']:.3f}s p99 {lt['ttft_s']['p99']:.3f}s, "
              f"itl p50 {lt['itl_s']['p50'] * 1e3:.1f}ms p99 {lt['itl_s']['p99'] * 1e3:.1f}ms", flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
