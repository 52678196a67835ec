"""The serving engine in one process (no HTTP, no ranks): continuous batching, stops, sampling.

Oracle: ``model.generate(do_sample=False)`` of the same model, token for token.

    python -m pytest -q tests/unit/test_serve_engine.py
"""

from __future__ import annotations

import random

import pytest
import torch

import switchyard as sy
from switchyard.serve.engine import Engine, ModelRunner, Sequence, SeqOutput, StepPlan
from switchyard.serve.runner import DecodeBatch
from switchyard.serve.loading import build_tiny_moe
from switchyard.serve.sampling import (SAMPLING_EPS, IncrementalDetokenizer, SamplingParams, find_stop,
                                       make_generator, sample_token)

PROMPTS = ["def hello(world):\n    return", "import os\n", "class Foo", "x", "for i in range(10):", "# comment\n"]


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and the machine has 2 cores)
    base = tmp_path_factory.getbasetemp()
    path = build_tiny_moe(base / "serve-tiny-moe", base / "serve-cache")
    yield sy.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(threads)


def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, past any EOS, as the engines below run (``engine_for``: no EOS ids): the
    tiny model's weights differ between torch builds, and one that emits EOS early (a CUDA machine's did) would
    otherwise end generate() and the engine at different points than the tests assume."""
    # an id no token has: transformers warns and generates max_new_tokens (None would fall back to the model's EOS)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1)
    return out[0, len(ids):].tolist()


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[int, list[SeqOutput]] = {}

    def sink(self, out: SeqOutput) -> None:
        self.outputs.setdefault(out.index, []).append(out)

    def text(self, index: int) -> str:
        return "".join(o.text for o in self.outputs[index])


def engine_for(model, tok, decode: str = "auto", **kwargs) -> Engine:
    runner = ModelRunner(model, count_experts=True, decode=decode, max_batch=kwargs.get("max_batch", 16))
    kwargs.setdefault("eos_token_ids", [])  # as greedy(): the tests that stop on EOS name their EOS ids
    return Engine(runner, tok, **kwargs)


@pytest.mark.parametrize("decode", ["static", "batched", "sequential"])
def test_requests_join_between_steps_and_match_generate(model_and_tok, decode):
    model, tok = model_and_tok
    engine, got = engine_for(model, tok, decode, max_batch=4), Collector()
    lengths = [6 + 5 * i for i in range(len(PROMPTS))]
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0), got.sink, index=i)
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    engine.submit(seqs[:2])
    plans = [engine.step(), engine.step()]
    engine.submit(seqs[2:])
    while (plan := engine.step()) is not None:
        plans.append(plan)
        assert len(plan.items) <= 4
    # a later request was prefilled (fresh) in the same step as earlier ones decoded
    assert any(any(f for _, _, f in p.items) and any(not f for _, _, f in p.items) for p in plans[2:])
    assert engine.idle() and not engine.running and sorted(engine._free_slots) == [0, 1, 2, 3]
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        want = greedy(model, seq.prompt_ids, n)
        assert seq.output_ids == want, i
        assert got.text(i) == tok.decode(want, skip_special_tokens=True)
        assert seq.finish_reason == "length" and got.outputs[i][-1].finish_reason == "length"
    assert len(engine.runner.batch) == 0 and not engine.runner.caches  # every row and cache freed
    prefills = {"sequential": lambda p: len(p.items), "batched": lambda p: sum(f for _, _, f in p.items),
                "static": lambda p: any(f for _, _, f in p.items)}[decode]  # static: the prompts go together
    decodes = {"sequential": lambda p: 0}.get(decode, lambda p: any(not f for _, _, f in p.items))
    # one forward per prefill (static: per step's prompts) + one for all decodes
    assert engine.runner.forwards == sum(prefills(p) + decodes(p) for p in plans)
    counts = engine.runner.expert_counts()
    assert counts is not None and len(counts) == 2 and len(counts[0]) == 4
    routed = sum(len(s.prompt_ids) + len(s.output_ids) - 1 for s in seqs) * 2  # top-2 copies of every fed token
    assert [sum(row) for row in counts] == [routed, routed]


def test_stop_string_ends_one_sequence_and_frees_its_slot(model_and_tok):
    model, tok = model_and_tok
    ids = tok(PROMPTS[0]).input_ids
    full_ids = greedy(model, ids, 40)
    full = tok.decode(full_ids, skip_special_tokens=True)
    stop = full[12:15]
    expected = full[: full.find(stop)]
    engine, got = engine_for(model, tok, max_batch=2), Collector()
    stopped = Sequence(ids, SamplingParams(max_tokens=40, temperature=0, stop=(stop, "never-there")), got.sink, 0)
    other = Sequence(tok(PROMPTS[1]).input_ids, SamplingParams(max_tokens=40, temperature=0), got.sink, 1)
    engine.submit([stopped, other])
    while not stopped.finished:
        engine.step()
    assert stopped.finish_reason == "stop" and got.text(0) == expected
    assert stop not in got.text(0)
    assert len(stopped.output_ids) < 40 and stopped.output_ids == full_ids[: len(stopped.output_ids)]
    assert stopped.slot is None and list(engine.running.values()) == [other]
    engine.run_until_idle()
    assert other.output_ids == greedy(model, other.prompt_ids, 40)


def test_eos_ends_a_sequence_unless_ignored(model_and_tok):
    model, tok = model_and_tok
    ids = tok(PROMPTS[2]).input_ids
    want = greedy(model, ids, 12)
    eos = want[4]  # pretend the 5th greedy token is EOS
    first = want.index(eos)
    engine, got = engine_for(model, tok, max_batch=2, eos_token_ids=[eos]), Collector()
    ends = Sequence(ids, SamplingParams(max_tokens=12, temperature=0), got.sink, 0)
    goes_on = Sequence(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), got.sink, 1)
    engine.submit([ends, goes_on])
    engine.run_until_idle()
    assert ends.finish_reason == "stop" and ends.output_ids == want[: first + 1]
    assert got.text(0) == tok.decode(want[:first], skip_special_tokens=True)
    assert goes_on.finish_reason == "length" and goes_on.output_ids == want


def test_more_requests_than_slots_wait_and_abort_frees_the_slot(model_and_tok):
    model, tok = model_and_tok
    engine, got = engine_for(model, tok, max_batch=2), Collector()
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=30, temperature=0), got.sink, i)
            for i, p in enumerate(PROMPTS[:4])]
    engine.submit(seqs)
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    engine.abort(seqs[0])
    engine.abort(seqs[3])  # still waiting: leaves the queue without ever running
    plan = engine.step()
    assert seqs[0].finish_reason == "abort" and seqs[3].finish_reason == "abort" and not seqs[3].output_ids
    assert plan is not None and 0 in plan.release
    assert {s.seq_id for s in engine.running.values()} == {seqs[1].seq_id, seqs[2].seq_id}
    engine.run_until_idle()
    for seq in seqs[1:3]:
        assert seq.output_ids == greedy(model, seq.prompt_ids, 30)


def test_sampling_is_seeded_per_sequence(model_and_tok):
    model, tok = model_and_tok
    ids = tok(PROMPTS[3]).input_ids

    def run(**kw) -> list[int]:
        engine = engine_for(model, tok, max_batch=4)
        seq = Sequence(ids, SamplingParams(max_tokens=20, **kw))
        noise = Sequence(tok(PROMPTS[4]).input_ids, SamplingParams(max_tokens=20, temperature=1.0))
        engine.submit([noise, seq] if kw.get("seed") == 1 else [seq])  # other traffic must not matter
        engine.run_until_idle()
        return seq.output_ids

    assert run(temperature=0.9, seed=1) == run(temperature=0.9, seed=1)
    assert run(temperature=0.9, seed=1) != run(temperature=0.9, seed=2)
    assert run(temperature=1.0, top_p=1e-6, seed=3) == greedy(model, ids, 20)


def test_a_tiny_temperature_is_greedy_and_never_overflows(model_and_tok):
    """temperature=1e-40 passes validation; logits / 1e-40 would be inf, softmax NaN, multinomial raise (and kill
    rank 0). Below SAMPLING_EPS it is greedy; at the epsilon the scaled logits stay finite."""
    tiny = SamplingParams(max_tokens=8, temperature=1e-40)
    assert tiny.greedy and make_generator(tiny, 0, torch.device("cpu")) is None
    large_V = torch.tensor([0.0, 3e34, -3e34, 1e34])  # 3e34 / 1e-5 overflows float32 unless shifted first
    assert sample_token(large_V, tiny, None) == 1
    at_eps = SamplingParams(max_tokens=8, temperature=SAMPLING_EPS, seed=0)
    assert not at_eps.greedy
    assert sample_token(large_V, at_eps, make_generator(at_eps, 0, torch.device("cpu"))) == 1
    model, tok = model_and_tok
    ids = tok(PROMPTS[1]).input_ids
    engine = engine_for(model, tok)
    seq = Sequence(ids, tiny)
    engine.submit([seq])
    engine.run_until_idle()
    assert seq.output_ids == greedy(model, ids, 8)


def test_context_limit_and_bad_params_are_refused(model_and_tok):
    model, tok = model_and_tok
    engine = engine_for(model, tok, max_batch=1)
    assert engine.max_model_len == model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        engine.submit([Sequence([1] * 200, SamplingParams(max_tokens=57))])
    for bad in (dict(max_tokens=0), dict(max_tokens=4, temperature=-1), dict(max_tokens=4, top_p=0),
                dict(max_tokens=4, stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_draining_engine_refuses_new_sequences(model_and_tok):
    from switchyard.serve.engine import EngineDraining

    model, tok = model_and_tok
    engine = engine_for(model, tok)
    running = Sequence(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=5, temperature=0))
    engine.submit([running])
    engine.begin_drain()
    with pytest.raises(EngineDraining):
        engine.submit([Sequence([1, 2], SamplingParams(max_tokens=2))])
    engine.run_until_idle()
    assert running.finish_reason == "length" and engine.idle()


@pytest.mark.parametrize("stop", ["drain timeout", "second signal"])
def test_a_drain_cut_short_ends_each_sequence_with_an_error_for_its_client(model_and_tok, stop):
    """The drain timeout, or Ctrl-C twice, aborted what was left with finish_reason "abort" and nothing else: the
    app answered a 200 carrying it (no OpenAI finish reason) and a stream its ``[DONE]``. Now each sequence still
    in flight (running or waiting for a slot) ends with an error saying why, which the app turns into a 503
    ``shutting_down``; a sequence aborted because its client went away has no error (nobody to tell)."""
    import signal
    import time
    from types import SimpleNamespace

    from switchyard.serve.workers import ControlChannel, Rank0Loop

    model, tok = model_and_tok
    engine, got = engine_for(model, tok, max_batch=2), Collector()
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=200, temperature=0), got.sink, i)
            for i, p in enumerate(PROMPTS[:3])]  # the third waits for a slot
    gone = Sequence(tok(PROMPTS[3]).input_ids, SamplingParams(max_tokens=200), got.sink, 3)
    execute = engine.runner.execute

    def slow(plan: StepPlan) -> torch.Tensor:  # 200 tokens take seconds: the drain cannot finish them
        time.sleep(0.01)
        return execute(plan)

    engine.runner.execute = slow

    class Server:  # uvicorn's stand-in: the signals arrive while it serves
        started = should_exit = False
        config = SimpleNamespace(timeout_graceful_shutdown=10)

        def run(self) -> None:
            self.started = True
            while not engine.running:
                time.sleep(0.01)
            engine.abort(gone)  # its client disconnected
            loop._on_signal(signal.SIGTERM, None)
            if stop == "second signal":
                loop._on_signal(signal.SIGINT, None)
            while not self.should_exit:
                time.sleep(0.01)

    engine.submit([*seqs, gone])
    loop = Rank0Loop(engine, ControlChannel(), Server(), drain_timeout_s=0.3 if stop == "drain timeout" else 300)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert loop.run() == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    why = "the drain timeout (0.3s)" if stop == "drain timeout" else "a second signal"
    for seq in seqs:
        last = got.outputs[seq.index][-1]
        assert (last.finish_reason, last.error_code) == ("abort", "shutting_down"), last
        assert last.error.startswith(f"the server is shutting down and {why} stopped this request"), last.error
        assert len(seq.output_ids) < 200
    assert got.outputs[3][-1].finish_reason == "abort" and got.outputs[3][-1].error is None
    assert engine.idle()


@pytest.mark.parametrize("mode", ["stream", "window"])
def test_detokenizer_deltas_concatenate_to_the_full_decode(model_and_tok, mode):
    """Both paths (tokenizers' DecodeStream for fast tokenizers, the two-window decode otherwise),
    on random ids: byte tokens split characters, special tokens are skipped; after a prompt, the deltas
    are what the output adds to the prompt's text."""
    _, tok = model_and_tok
    rng = random.Random(0)
    for i in range(30):
        prompt = tok(PROMPTS[i % len(PROMPTS)]).input_ids if i % 2 else []
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tok, prompt)
        assert detok._stream is not None  # the tiny tokenizer is a fast one
        if mode == "window":
            detok._stream = None
        text = "".join(detok.push(t) for t in ids) + detok.flush()
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
        assert text == decode(prompt + ids)[len(decode(prompt)):]


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A Llama-2/Mistral-style fast tokenizer built offline: Metaspace pieces, ``<0xNN>`` byte fallback, and the
    decoder that strips the leading space of the first token it decodes."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator(["The capital of France is Paris. Hello world, hello there."] * 20,
                                trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"]))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(trained.get_vocab(), key=trained.get_vocab().get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained.to_str())["model"]["merges"]]
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_completion_keeps_the_leading_space_of_its_first_token(model_and_tok, sentencepiece_tok):
    """The output was decoded alone, and a SentencePiece decoder strips the first token's leading space: the
    completion of "The capital of France" read "is Paris." (prompt + text: "The capital of Franceis Paris.").
    Now it is decoded after the prompt's last tokens, as vLLM does: " is Paris.", on both paths and in the engine."""
    tok = sentencepiece_tok
    prompt = tok("The capital of France").input_ids
    output = tok("The capital of France is Paris.").input_ids[len(prompt):]
    assert tok.convert_ids_to_tokens(output[0]) == "▁is" and tok.decode(output) == "is Paris."
    for stream in (True, False):
        detok = IncrementalDetokenizer(tok, prompt)
        if not stream:
            detok._stream = None
        assert "".join(detok.push(t) for t in output) + detok.flush() == " is Paris."
    model, _ = model_and_tok  # its vocabulary holds the tokenizer's ids; the bias makes "▁is" the greedy choice
    engine, got = engine_for(model, tok, max_batch=1, eos_token_ids=[]), Collector()
    engine.submit([Sequence(prompt, SamplingParams(max_tokens=2, temperature=0, logit_bias=((output[0], 100.0),)),
                            got.sink)])
    engine.run_until_idle()
    assert got.text(0) == " is is"


def test_a_byte_run_rewriting_returned_text_falls_back_instead_of_raising(sentencepiece_tok, caplog):
    """With byte fallback, "A" then <0xE2> then "a" decodes to "��a": the run A+E2 is invalid, so the "A" already
    returned turns into "�". tokenizers' DecodeStream raised "Invalid prefix encountered" (vLLM #17448) inside
    the engine's step, which killed rank 0 and every request; now that sequence goes on with the window decoder."""
    tok = sentencepiece_tok
    ids = tok.convert_tokens_to_ids(["a", "<0x41>", "<0xE2>", "a", "▁is"])
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(t) for t in ids]
    assert detok._stream is None and "Invalid prefix" in caplog.text  # it did fail, and said so
    assert deltas[:3] == ["a", "A", ""] and deltas[4] == " is" and detok.flush() == ""
    primed = IncrementalDetokenizer(tok, ids[:4])  # the same run inside a prompt: the window from the start
    assert primed._stream is None and [primed.push(t) for t in ids[4:]] == [" is"]


def test_decode_batch_pads_joins_and_trims_leavers():
    from transformers import DynamicCache, LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=8)

    def cache(length: int, value: float):
        c = DynamicCache(config=config)
        c.update(torch.full((1, 1, length, 4), value), torch.full((1, 1, length, 4), -value), 0)
        return c

    batch = DecodeBatch(torch.nn.Linear(1, 1))
    batch.add(5, cache(3, 1.0), 3)
    batch.add(2, cache(6, 2.0), 6)  # longer: the first row is padded on the left
    assert batch.slots == [5, 2] and batch.length_B == [3, 6]
    assert batch.mask_BL.tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    keys = batch.cache.layers[0].keys
    assert keys.shape == (2, 1, 6, 4) and keys[0, 0, :3].abs().sum() == 0 and keys[0, 0, 3:].eq(1).all()
    batch.drop(2)  # the long row leaves: the columns only it used go too
    assert batch.slots == [5] and batch.mask_BL.tolist() == [[1, 1, 1]]
    assert batch.cache.layers[0].keys.shape == (1, 1, 3, 4) and batch.cache.layers[0].values.eq(-1).all()
    batch.drop(5)
    assert batch.cache is None and batch.slots == []


def test_auto_decode_picks_static_and_engine_fits_the_runner(model_and_tok):
    model, tok = model_and_tok
    runner = ModelRunner(model, max_batch=3)
    assert runner.decode == "static"
    with pytest.raises(ValueError, match=r"max_batch must be in \[1, 3\].*ModelRunner with max_batch=8"):
        Engine(runner, tok, max_batch=8)
    with pytest.raises(ValueError, match="max_model_len=99999 exceeds"):
        Engine(runner, tok, max_model_len=99999)


def test_static_rows_compact_and_the_cache_grows_without_changing_tokens(model_and_tok):
    """Rows leave from the middle (the last row moves in) and the cache doubles from 4 positions
    several times mid-run; every sequence still equals generate() token for token."""
    from switchyard.serve.slot_cache import StaticDecoder

    model, tok = model_and_tok
    runner = ModelRunner(model, count_experts=True, decode="static", max_batch=3)
    runner.batch = StaticDecoder(model, 3, runner.max_model_len, on_step=runner._count_routed, initial_len=4)
    engine = Engine(runner, tok, eos_token_ids=[])  # as greedy()
    lengths = [3, 25, 9, 14, 30]
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(PROMPTS, lengths)]
    engine.submit(seqs)
    engine.run_until_idle()
    for seq, n in zip(seqs, lengths):
        assert seq.output_ids == greedy(model, seq.prompt_ids, n)
    assert runner.batch.cache_len >= max(len(s.prompt_ids) + n for s, n in zip(seqs, lengths)) - 1
    assert len(runner.batch) == 0


def test_warmup_captures_every_bucket_and_leaves_no_trace(model_and_tok, monkeypatch):
    """The server's warm-up (graphs faked on CPU: a 'replay' runs the step eagerly): one capture per
    bucket, largest first; afterwards nothing is decoding, counts are zero, outputs equal generate()."""
    from switchyard.serve.slot_cache import StaticDecoder

    captured = []

    class EagerGraph:
        def __init__(self, decoder, bucket):
            self.decoder, self.bucket = decoder, bucket

        def replay(self):
            self.decoder._step(self.bucket)

    def fake_capture(self, bucket):
        captured.append(bucket)
        self._graphs[bucket] = EagerGraph(self, bucket)

    monkeypatch.setattr(StaticDecoder, "_capture", fake_capture)
    model, tok = model_and_tok
    runner = ModelRunner(model, count_experts=True, decode="static", max_batch=6)
    runner.batch.use_graphs = True
    runner.warmup()
    assert captured == [6, 4, 2, 1] and len(runner.batch) == 0 and not runner.caches
    assert runner._unsynced_LE.sum() == 0
    engine = Engine(runner, tok, eos_token_ids=[])  # as greedy()
    seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=9, temperature=0)) for p in PROMPTS[:3]]
    engine.submit(seqs)
    engine.run_until_idle()
    assert captured == [6, 4, 2, 1]  # no capture while serving
    for seq in seqs:
        assert seq.output_ids == greedy(model, seq.prompt_ids, 9)
    routed = sum(len(s.prompt_ids) + len(s.output_ids) - 1 for s in seqs) * 2
    assert [sum(row) for row in runner.expert_counts()] == [routed, routed]  # padding rows not counted


def test_prefill_groups_bound_padded_tokens():
    from switchyard.serve.runner import _prefill_groups

    prompts = [(0, [1] * 3), (1, [1] * 5), (2, [1] * 2), (3, [1] * 12), (4, [1])]
    groups = _prefill_groups(prompts, 10)
    assert [[slot for slot, _ in g] for g in groups] == [[0, 1], [2], [3], [4]]
    assert all(len(g) * max(len(ids) for _, ids in g) <= 10 or len(g) == 1 for g in groups)


def test_graph_buckets_cover_every_batch_size():
    from switchyard.serve.slot_cache import buckets_for

    assert buckets_for(1) == [1] and buckets_for(6) == [1, 2, 4, 6] and buckets_for(8) == [1, 2, 4, 8]


def test_plan_wire_round_trip_and_find_stop():
    plan = StepPlan([(0, [1, 2, 3], True), (3, [7], False)], [2], False)
    assert StepPlan.from_wire(plan.to_wire()) == plan
    assert find_stop("abcXYdefXY", ("XY", "de"), 0) == 3
    assert find_stop("abcXYdefXY", ("XY",), 4) == 8
    assert find_stop("abc", ("z",), 0) == -1


def test_sliding_window_models_decode_without_the_static_cache():
    """A model with sliding-window layers cannot use the full-length static cache: auto falls back (to
    batched, then sequential once the cache kinds show), static is refused with the reason, and the
    tokens still equal generate()."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                           max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()

    class Tok:
        def decode(self, ids, **kwargs):
            return "".join(chr(65 + i % 26) for i in ids)

    with pytest.raises(ValueError, match="sliding-window"):
        ModelRunner(model, decode="static")
    runner = ModelRunner(model, decode="auto", max_batch=2)
    assert runner.decode == "batched"
    engine = Engine(runner, Tok(), eos_token_ids=[])
    prompts = [[5, 9, 3, 7, 11, 4, 8, 20, 30], [6, 2, 40]]
    seqs = [Sequence(p, SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
    engine.submit(seqs)
    engine.run_until_idle()
    assert runner.decode == "sequential"
    for seq in seqs:
        assert seq.output_ids == greedy(model, seq.prompt_ids, 10)


def test_static_cache_out_of_memory_names_the_fix(model_and_tok, monkeypatch):
    model, _ = model_and_tok
    decoder = ModelRunner(model, decode="static", max_batch=2).batch
    kv = [(torch.zeros(2, 3, 16), torch.zeros(2, 3, 16))] * decoder.num_layers

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(torch, "zeros", out_of_memory)
    with pytest.raises(ValueError, match=r"static KV cache \(2 rows x 256 positions.*lower max_batch or max_model_len"):
        decoder.add(0, kv, 3)


def _model_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position, one forward over prompt + output."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("decode", ["static", "sequential"])
def test_logprobs_are_the_models_log_softmax(model_and_tok, decode):
    model, tok = model_and_tok
    engine, got = engine_for(model, tok, decode, max_batch=3), Collector()
    prompts = [tok(p).input_ids for p in PROMPTS[:3]]
    seqs = [Sequence(prompts[0], SamplingParams(max_tokens=12, temperature=0, logprobs=3), got.sink, 0),
            Sequence(prompts[1], SamplingParams(max_tokens=12, temperature=0.8, seed=5, logprobs=0), got.sink, 1),
            Sequence(prompts[2], SamplingParams(max_tokens=12, temperature=0), got.sink, 2)]  # none asked
    engine.submit(seqs)
    engine.run_until_idle()
    for i, seq in enumerate(seqs[:2]):
        outs = [o for o in got.outputs[i] if o.token_id is not None]
        assert [o.token_id for o in outs] == seq.output_ids
        want = _model_logprobs(model, seq.prompt_ids, seq.output_ids)
        chosen = torch.tensor([o.logprob[0] for o in outs])
        torch.testing.assert_close(chosen, want.gather(1, torch.tensor(seq.output_ids).view(-1, 1)).view(-1),
                                   atol=1e-5, rtol=1e-5)
        for o, row in zip(outs, want):
            top = o.logprob[1]
            assert len(top) == seq.params.logprobs
            if top:  # the best alternatives, best first; greedy picks the first
                values, ids = row.topk(len(top))
                assert [t for t, _ in top] == ids.tolist() and top[0][0] == o.token_id
                torch.testing.assert_close(torch.tensor([lp for _, lp in top]), values, atol=1e-5, rtol=1e-5)
    assert all(o.logprob is None for o in got.outputs[2])
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(max_tokens=1, logprobs=21)


@pytest.mark.parametrize("decode", ["static", "sequential"])
def test_logit_bias_steers_the_choice_like_generate_sequence_bias(model_and_tok, decode):
    """OpenAI's ``logit_bias`` was silently ignored. Oracle: ``generate(sequence_bias=…)`` (single tokens: the bias
    added to the logits before the choice); a biased and an unbiased sequence share the batch, and the reported
    logprobs stay the model's own (vLLM's convention)."""
    model, tok = model_and_tok
    ids = tok(PROMPTS[0]).input_ids
    plain = greedy(model, ids, 12)
    bias = tuple((t, 5.0) for t in sorted(set(plain))[1:4]) + ((plain[0], -50.0),)
    want = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                          sequence_bias={(t,): b for t, b in bias})[0, len(ids):].tolist()
    assert want != plain  # the bias matters
    engine, got = engine_for(model, tok, decode, max_batch=2), Collector()
    biased = Sequence(ids, SamplingParams(max_tokens=12, temperature=0, logit_bias=bias, logprobs=0), got.sink, 0)
    other = Sequence(ids, SamplingParams(max_tokens=12, temperature=0), got.sink, 1)
    engine.submit([biased, other])
    engine.run_until_idle()
    assert biased.output_ids == want and other.output_ids == plain
    raw = _model_logprobs(model, ids, want).gather(1, torch.tensor(want).view(-1, 1)).view(-1)
    torch.testing.assert_close(torch.tensor([o.logprob[0] for o in got.outputs[0]]), raw, atol=1e-5, rtol=1e-5)
    pinned = Sequence(ids, SamplingParams(max_tokens=6, temperature=1.0, seed=0, logit_bias=((7, 100.0),)))
    engine.submit([pinned])
    engine.run_until_idle()
    assert pinned.output_ids == [7] * 6  # +100 wins a draw too
    for bad in (((7, 100.5),), ((-1, 1.0),)):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(max_tokens=1, logit_bias=bad)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_end_only_their_sequence(model_and_tok, temperature):
    """A row of NaN logits (an fp16 overflow, a broken checkpoint) made ``torch.multinomial`` raise inside the
    engine's step, which killed rank 0's loop and with it every request on the server (greedy: argmax silently
    picked a NaN's index). Only that sequence ends (``abort``); the others still equal generate()."""
    model, tok = model_and_tok
    engine, got = engine_for(model, tok, max_batch=3), Collector()
    broken = Sequence(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=10, temperature=temperature, seed=1),
                      got.sink, 0)
    others = [Sequence(tok(p).input_ids, SamplingParams(max_tokens=10, temperature=0), got.sink, i)
              for i, p in enumerate(PROMPTS[1:3], start=1)]
    engine.submit([broken, *others])
    execute = engine.runner.execute

    def poisoned(plan: StepPlan) -> torch.Tensor:
        logits = execute(plan).clone()
        for row, (slot, _, _) in enumerate(plan.items):
            if slot == broken.slot and len(broken.output_ids) == 3:
                logits[row, 5] = float("nan")
        return logits

    engine.runner.execute = poisoned
    engine.run_until_idle()
    assert broken.finish_reason == "abort" and len(broken.output_ids) == 3
    last = got.outputs[0][-1]
    assert last.finish_reason == "abort" and last.token_id is None
    # its client is told why (the app's 500 nonfinite_logits), not handed finish_reason "abort" in a 200
    assert last.error_code == "nonfinite_logits" and "no finite value (NaN or inf) after 3 generated" in last.error
    for seq in others:
        assert seq.finish_reason == "length" and seq.output_ids == greedy(model, seq.prompt_ids, 10)
    assert engine.idle() and sorted(engine._free_slots) == [0, 1, 2]


def test_logprob_tokens_line_up_with_the_completion_text_under_sentencepiece(sentencepiece_tok):
    """A token decoded alone lost its leading space ("▁is" → "is"), so the logprobs' tokens and text_offset did
    not line up with the completion text, which keeps it (" is Paris.")."""
    from switchyard.serve.app import _Logprobs

    tok = sentencepiece_tok
    prompt = tok("The capital of France").input_ids
    output = tok("The capital of France is Paris.").input_ids[len(prompt):]
    logprobs = _Logprobs(tok).completion([(t, (-1.0, ())) for t in output], offset=0)
    assert "".join(logprobs.tokens) == " is Paris."
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(output))]
    assert _Logprobs(tok).chat([(output[0], (-1.0, ()))]).content[0].token == " is"
