"""The GPU fast path: static KV cache + CUDA graphs give generate()'s greedy tokens (skipped without CUDA).

Oracle: transformers' ``generate(do_sample=False)`` of the unpatched model, one prompt at a time, fp32
(bf16 rounding differs with the batch shape, so token equality is only meaningful in fp32).

    python -m pytest -q tests/unit/test_serve_cuda_graphs.py
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu


def _qwen3_moe(device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(hidden_size=128, num_hidden_layers=3, num_experts=16, num_experts_per_tok=4,
                            moe_intermediate_size=64, intermediate_size=256, vocab_size=512, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, norm_topk_prob=True,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_graph_decode_matches_generate_with_joins_and_leaves():
    import switchyard as sy
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.sampling import SamplingParams

    device = torch.device("cuda")
    reference = _qwen3_moe(device)
    model = sy.patch_model(copy.deepcopy(reference))
    runner = ModelRunner(model, decode="auto", max_batch=5)
    assert runner.decode == "static" and runner.batch.use_graphs

    class _Tok:  # the engine only detokenizes; ids are what is compared
        def decode(self, ids, **kwargs):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = Engine(runner, _Tok(), eos_token_ids=[])
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 3, 12, 8)]
    lengths = [20, 6, 33, 11, 25, 4, 15]
    seqs = [Sequence(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    engine.submit(seqs[:3])
    for _ in range(4):
        engine.step()
    engine.submit(seqs[3:])  # more than max_batch: some wait for a slot
    engine.run_until_idle()
    with torch.inference_mode():
        for seq, prompt, n in zip(seqs, prompts, lengths):
            out = reference.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=0)
            assert seq.output_ids == out[0, len(prompt):].tolist()
    assert set(runner.batch._graphs) <= {1, 2, 4, 5} and runner.batch._graphs


def test_warmup_runs_every_moe_path(monkeypatch):
    """The warm-up reaches the MoE layers' sort path too (a long dummy prefill), not only the decode
    buckets' small-batch and all-experts paths, so no kernel first compiles during a client's prefill;
    and it leaves every slot free."""
    import switchyard as sy
    from switchyard.moe.layer import INFERENCE_PATHS, MoELayer
    from switchyard.serve.engine import ModelRunner

    taken: list[str] = []
    for path, fn in list(INFERENCE_PATHS.items()):
        monkeypatch.setitem(INFERENCE_PATHS, path, lambda *a, _fn=fn, _p=path, **k: (taken.append(_p), _fn(*a, **k))[1])
    sorted_forward = MoELayer._sorted_forward
    monkeypatch.setattr(MoELayer, "_sorted_forward", lambda self, *a, **k: (taken.append("sort"), sorted_forward(self, *a, **k))[1])
    model = sy.patch_model(_qwen3_moe(torch.device("cuda")).to(torch.bfloat16))
    runner = ModelRunner(model, decode="auto", max_batch=16)  # 16 experts, top-4: buckets 1..16
    runner.warmup()
    assert {"sort", "small_batch", "all_experts"} <= set(taken), set(taken)
    assert not runner.caches and set(runner.batch._graphs) == {1, 2, 4, 8, 16}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_server_with_graphs_matches_one_process(tmp_path):
    """ep=2 on 2 GPUs (NCCL all-reduce captured in the graphs) answers as the model in one process."""
    import json
    import urllib.request

    import switchyard as sy
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.launcher import ServerProcess
    from switchyard.serve.loading import build_tiny_moe
    from switchyard.serve.sampling import SamplingParams
    from transformers import AutoTokenizer

    path = build_tiny_moe(tmp_path / "tiny-moe", tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(path)
    prompts = ["def hello(world):\n    return", "import os\n", "class Foo", "for i in range(10):"]
    lengths = [12, 20, 7, 16]
    runner = ModelRunner(sy.from_pretrained(path).to("cuda"), max_batch=4)
    engine = Engine(runner, tok, eos_token_ids=[])
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    engine.submit(seqs)
    engine.run_until_idle()
    with ServerProcess.start(path, ep=2, args=["--max-batch", "4"]) as server:
        server.wait_ready(300)
        for prompt, n, seq in zip(prompts, lengths, seqs):
            body = json.dumps({"model": path.name, "prompt": prompt, "max_tokens": n, "temperature": 0,
                               "ignore_eos": True, "return_token_ids": True}).encode()
            request = urllib.request.Request(f"{server.base_url}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                choice = json.loads(response.read())["choices"][0]
            assert choice["token_ids"] == seq.output_ids, prompt
        assert server.drain() == 0


def test_graphs_survive_random_joins_aborts_slot_reuse_and_cache_growth():
    """Random arrivals (prompts of 1 to 200 tokens), aborts mid-decode, slots reused at once, and a cache
    that starts at 8 positions and grows (the graphs recaptured) while rows decode: every sequence equals
    generate() in fp32 — no stale K/V of a slot's earlier sequence, no entry lost when the cache grows."""
    import random

    import switchyard as sy
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.sampling import SamplingParams
    from switchyard.serve.slot_cache import StaticDecoder

    device = torch.device("cuda")
    reference = _qwen3_moe(device)
    model = sy.patch_model(copy.deepcopy(reference))
    runner = ModelRunner(model, decode="static", max_batch=6)
    runner.batch = StaticDecoder(model, 6, runner.max_model_len, on_step=runner._count_routed, initial_len=8)
    assert runner.batch.use_graphs

    class _Tok:
        def decode(self, ids, **kwargs):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = Engine(runner, _Tok(), eos_token_ids=[2])  # min_new_tokens would mask EOS in generate(): end on it
    rng = random.Random(0)
    seqs, aborted = [], set()
    for _ in range(80):
        if rng.random() < 0.35:
            for _ in range(rng.randint(1, 3)):
                n = rng.choice([1, 2, 7, 40, 120, 200, 255])
                seq = Sequence([rng.randrange(3, 512) for _ in range(n)],
                               SamplingParams(max_tokens=rng.randint(1, min(40, 256 - n)), temperature=0))
                seqs.append(seq)
                engine.submit([seq])
        if rng.random() < 0.1 and engine.running:
            victim = rng.choice(list(engine.running.values()))
            engine.abort(victim)
            aborted.add(victim.seq_id)
        engine.step()
    engine.run_until_idle()
    assert runner.batch.cache_len > 8 and len(runner.batch) == 0
    with torch.inference_mode():
        for seq in seqs:
            n = seq.params.max_tokens
            out = reference.generate(torch.tensor([seq.prompt_ids], device=device), do_sample=False,
                                     max_new_tokens=n, pad_token_id=0)
            want = out[0, len(seq.prompt_ids):].tolist()
            want = want[:want.index(2) + 1] if 2 in want else want
            if seq.seq_id in aborted:
                want = want[:len(seq.output_ids)]
            assert seq.output_ids == want, (len(seq.prompt_ids), n, seq.finish_reason)


def _serve_growing(model_dir: str, device_type: str) -> tuple[list[list[int]], int]:
    """(output ids, forwards): rank 0 drives, the others follow; a static cache that starts at 8 positions and
    grows twice while rows decode, so every rank drops its graphs (NCCL all-reduces captured in them) and
    recaptures them together."""
    import os

    import torch.distributed as dist

    import switchyard as sy
    from switchyard.hf.patch import moe_layers
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.sampling import SamplingParams
    from switchyard.serve.slot_cache import StaticDecoder
    from switchyard.serve.workers import ControlChannel, worker_loop

    distributed = dist.is_initialized()
    device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", "0")) if device_type == "cuda" else None)
    groups = sy.ProcessGroupManager(ep=2, register_with_deepspeed=False) if distributed else None
    channel = ControlChannel() if distributed else None
    model = sy.from_pretrained(model_dir, groups=groups, device=device)
    for layer in moe_layers(model):
        layer.replicated_tokens = True
    runner = ModelRunner(model, decode="static", max_batch=4)
    runner.batch = StaticDecoder(model, 4, runner.max_model_len, on_step=runner._count_routed, initial_len=8)
    if distributed and dist.get_rank() != 0:
        assert worker_loop(runner, channel) == 0
        runner.close()
        return [], runner.forwards

    class _Tok:
        def decode(self, ids, **kwargs):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = Engine(runner, _Tok(), eos_token_ids=[], broadcast=channel.send if channel else None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (3, 12, 40, 1, 90, 7)]
    lengths = [30, 9, 25, 60, 20, 14]
    seqs = [Sequence(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    engine.submit(seqs[:3])
    for _ in range(5):
        engine.step()
    engine.submit(seqs[3:])
    engine.run_until_idle()
    if channel is not None:
        from switchyard.serve.runner import StepPlan

        channel.send(StepPlan(stop=True))
    assert runner.batch.cache_len > 16
    runner.close()
    return [s.output_ids for s in seqs], runner.forwards


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_graphs_recaptured_after_growth_match_one_process(tmp_path):
    """ep=2 on 2 GPUs over NCCL: the graphs (with their all-reduces) are dropped and recaptured as the cache grows
    mid-run on both ranks, and the tokens and forward counts equal one process's."""
    from harness import run_on_ranks

    from switchyard.serve.loading import build_tiny_moe

    path = str(build_tiny_moe(tmp_path / "tiny-moe", tmp_path / "cache"))
    want_ids, want_forwards = _serve_growing(path, "cuda")
    rank0, rank1 = run_on_ranks(_serve_growing, 2, path, "cuda", backend="nccl", timeout_s=300)
    assert rank0[0] == want_ids and rank0[1] == rank1[1] == want_forwards
