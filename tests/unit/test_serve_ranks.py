"""The step protocol on 2 gloo ranks (no HTTP, no launcher): rank 0's engine broadcasts plans, rank 1
follows them, each EP rank computes its experts' share of the replicated tokens — and everything equals
one process.

    python -m pytest -q tests/unit/test_serve_ranks.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

PROMPTS = ["def hello(world):\n    return", "import os\n", "class Foo", "x", "for i in range(10):"]
LENGTHS = [9, 3, 14, 6, 11]


def serve(model_dir: str, ep: int, decode: str) -> tuple[list[list[int]], list[list[int]], int]:
    """(output ids per prompt, per-expert counts, forwards) — rank 0 drives, the others follow."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import switchyard as sy
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.sampling import SamplingParams
    from switchyard.hf.patch import moe_layers
    from switchyard.serve.workers import ControlChannel, worker_loop

    distributed = dist.is_initialized()
    groups = sy.ProcessGroupManager(ep=ep, register_with_deepspeed=False) if distributed else None
    channel = ControlChannel() if distributed else None
    model = sy.from_pretrained(model_dir, groups=groups)
    for layer in moe_layers(model):
        layer.replicated_tokens = True
    runner = ModelRunner(model, count_experts=True, decode=decode, max_batch=3)
    if distributed and dist.get_rank() != 0:
        assert worker_loop(runner, channel) == 0
        return [], [], runner.forwards
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(runner, tok, max_batch=3, broadcast=channel.send if channel else None)
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(PROMPTS, LENGTHS)]
    engine.submit(seqs[:2])
    engine.step()
    engine.heartbeat()  # an empty plan in between must not disturb the followers
    engine.submit(seqs[2:])
    engine.run_until_idle()
    if channel is not None:
        from switchyard.serve.engine import StepPlan

        channel.send(StepPlan(stop=True))
    return [s.output_ids for s in seqs], runner.expert_counts(), runner.forwards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from switchyard.serve.loading import build_tiny_moe

    base = tmp_path_factory.getbasetemp()
    return str(build_tiny_moe(base / "serve-tiny-moe", base / "serve-cache"))


@pytest.mark.parametrize("decode", ["static", "batched", "sequential"])
def test_two_ranks_follow_rank_0_and_match_one_process(model_dir, decode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want_ids, want_counts, want_forwards = serve(model_dir, 1, decode)
    finally:
        torch.set_num_threads(threads)
    rank0, rank1 = run_on_ranks(serve, 2, model_dir, 2, decode, timeout_s=120)
    assert rank0[0] == want_ids  # each token meets the same experts; only the sum over ranks is reordered
    assert rank0[1] == want_counts  # every rank routes every token: rank 0's counts are the totals
    assert rank0[2] == rank1[2] == want_forwards  # every rank ran every forward


def _load_hf_dir(exported: str, cache: str) -> tuple[list[int], list[float], list[str]]:
    """This rank's expert ids, the logits of a fixed input (replicated tokens), the cache's entries."""
    import os
    from pathlib import Path

    import switchyard as sy
    from switchyard.hf.patch import moe_layers
    from switchyard.serve.loading import load_for_serving

    os.environ["SWITCHYARD_CACHE"] = cache
    groups = sy.ProcessGroupManager(ep=2, register_with_deepspeed=False)
    model, _ = load_for_serving(Path(exported), groups)
    layers = moe_layers(model)
    for layer in layers:
        layer.replicated_tokens = True
    with torch.no_grad():
        logits = model(torch.arange(3, 40).view(1, -1)).logits[0, -1]
    return layers[0].local_expert_ids, logits.tolist(), sorted(p.name for p in (Path(cache) / "adopted").iterdir())


def test_an_hf_moe_dir_is_converted_once_then_each_rank_reads_its_experts(model_dir, tmp_path):
    """--model <HF MoE dir> on 2 ranks: rank 0 converts it into the cache once; each rank then holds only
    its experts, and the logits equal the HF dir's model in one process."""
    import switchyard as sy
    from switchyard.serve.loading import load_for_serving

    model, tok = load_for_serving(Path(model_dir), None)
    exported = sy.export_hf(model, tmp_path / "exported", tokenizer=tok)
    reference, _ = load_for_serving(Path(exported), None)
    with torch.no_grad():
        want = reference(torch.arange(3, 40).view(1, -1)).logits[0, -1]
    cache = str(tmp_path / "cache")
    rank0, rank1 = run_on_ranks(_load_hf_dir, 2, str(exported), cache, timeout_s=180)
    assert rank0[0] == [0, 1] and rank1[0] == [2, 3]
    assert len(rank0[2]) == 1 and rank0[2] == rank1[2]  # one conversion, shared by both ranks
    for got in (rank0[1], rank1[1]):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)
    run_on_ranks(_load_hf_dir, 2, str(exported), cache, timeout_s=180)  # a second start reuses it
    assert len(list((tmp_path / "cache" / "adopted").iterdir())) == 1


def _load_broken(exported: str, cache: str) -> str:
    import os

    import switchyard as sy
    from switchyard.serve.loading import load_for_serving

    os.environ["SWITCHYARD_CACHE"] = cache
    groups = sy.ProcessGroupManager(ep=2, register_with_deepspeed=False)
    try:
        load_for_serving(Path(exported), groups)
    except ValueError as err:
        return str(err)
    return "loaded"


def test_a_failed_conversion_is_an_error_on_every_rank(model_dir, tmp_path):
    """The weights do not match the config: rank 0's conversion fails, and both ranks raise (no hang)."""
    import json
    import shutil

    import switchyard as sy
    from switchyard.serve.loading import load_for_serving

    model, tok = load_for_serving(Path(model_dir), None)
    exported = Path(sy.export_hf(model, tmp_path / "exported", tokenizer=tok))
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] *= 2  # every weight now has the wrong shape
    (broken / "config.json").write_text(json.dumps(config))
    messages = run_on_ranks(_load_broken, 2, str(broken), str(tmp_path / "cache"), timeout_s=180)
    assert all("converting" in m and "failed" in m for m in messages), messages
    assert not list((tmp_path / "cache" / "adopted").glob("broken-*"))  # nothing half-written is kept


def _idle_server(heartbeat_s: float, channel_timeout_s: float, idle_s: float) -> object:
    """Rank 0: Rank0Loop with an HTTP server stand-in that stops after ``idle_s`` (no requests); the other
    rank: the worker loop. Returns rank 0's exit code / the worker's."""
    import time

    import torch.distributed as dist

    from switchyard.serve.workers import ControlChannel, Rank0Loop, worker_loop

    channel = ControlChannel(timeout_s=channel_timeout_s)

    class Runner:
        forwards = 0

        def execute(self, plan):
            return torch.empty(0)

    if dist.get_rank() != 0:
        return worker_loop(Runner(), channel)

    class Engine:
        draining, steps = False, 0

        def step(self):
            return None

        def heartbeat(self):
            from switchyard.serve.runner import StepPlan

            channel.send(StepPlan())

        def wait_for_work(self, timeout):
            time.sleep(timeout)

    class Server:
        started, should_exit = False, False

        def run(self):
            self.started = True
            time.sleep(idle_s)

    return Rank0Loop(Engine(), channel, Server(), heartbeat_s=heartbeat_s).run()


def test_a_heartbeat_slower_than_the_collective_timeout_is_refused_on_every_rank():
    """heartbeat_s above the plan channel's timeout: the idle workers' wait for the next plan timed out (a gloo
    timeout traceback, the server dead after its first idle stretch), the opposite of what the heartbeat is for.
    Now rank 0 refuses anything above half the timeout at start, with the fix in the message, and stops the
    workers (exit 2 on rank 0, so the launcher fails too)."""
    # a heartbeat that fits keeps the idle worker alive past its timeout; the stand-in server then "dies": exit 1
    assert run_on_ranks(_idle_server, 2, 1.0, 3.0, 6.0, timeout_s=60) == [1, 0]
    assert run_on_ranks(_idle_server, 2, 5.0, 3.0, 6.0, timeout_s=60) == [2, 0]


def _serve_with_nan_logits(model_dir: str) -> tuple[list[list[int]], list[str | None], int]:
    """Like ``serve`` on 2 ranks, but rank 0's logits for one sequence turn NaN after 2 tokens (rank 0 only:
    sampling happens there). Returns (output ids, finish reasons, forwards)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import switchyard as sy
    from switchyard.hf.patch import moe_layers
    from switchyard.serve.engine import Engine, ModelRunner, Sequence, StepPlan
    from switchyard.serve.sampling import SamplingParams
    from switchyard.serve.workers import ControlChannel, worker_loop

    channel = ControlChannel()
    model = sy.from_pretrained(model_dir, groups=sy.ProcessGroupManager(ep=2, register_with_deepspeed=False))
    for layer in moe_layers(model):
        layer.replicated_tokens = True
    runner = ModelRunner(model, decode="static", max_batch=3)
    if dist.get_rank() != 0:
        assert worker_loop(runner, channel) == 0
        return [], [], runner.forwards
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(runner, tok, broadcast=channel.send)
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0.7 if i == 1 else 0, seed=0))
            for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS))]
    execute = runner.execute

    def poisoned(plan: StepPlan) -> torch.Tensor:
        logits = execute(plan).clone()
        for row, (slot, _, _) in enumerate(plan.items):
            if slot == seqs[1].slot and len(seqs[1].output_ids) == 2:
                logits[row] = float("nan")
        return logits

    runner.execute = poisoned
    engine.submit(seqs)
    engine.run_until_idle()
    channel.send(StepPlan(stop=True))
    return [s.output_ids for s in seqs], [s.finish_reason for s in seqs], runner.forwards


def test_nan_logits_on_rank_0_end_one_sequence_and_the_ranks_stay_in_step(model_dir):
    """Sampling NaN logits raised on rank 0 after the plan had gone out: rank 0 died mid-step and took the
    server with it. Now that sequence ends alone, the others finish, and both ranks ran the same forwards."""
    (ids, reasons, forwards), (_, _, worker_forwards) = run_on_ranks(_serve_with_nan_logits, 2, model_dir,
                                                                     timeout_s=120)
    assert reasons[1] == "abort" and len(ids[1]) == 2
    assert all(r in ("stop", "length") for i, r in enumerate(reasons) if i != 1), reasons
    assert forwards == worker_forwards > 0
