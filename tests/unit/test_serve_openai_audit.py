"""The server as the official ``openai`` client uses it, in one process (engine + uvicorn threads, no ranks):
what an audit against OpenAI's API reference found wrong or missing.

Oracle: ``model.generate(do_sample=False)`` of the same model (with a logits processor written from OpenAI's
penalty formula where penalties are asked for), token for token; the engine decodes ``sequential``, the
computation ``generate`` does.

    python -m pytest -q tests/unit/test_serve_openai_audit.py
"""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")

import switchyard as sy  # noqa: E402
from switchyard.serve import protocol as P  # noqa: E402
from switchyard.serve.sampling import SamplingParams  # noqa: E402

MODEL, KEY, CONTEXT = "serve-tiny-moe", "audit-key", 128
PROMPTS = ["def hello(world):\n    return", "import os\n"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn
    from transformers import AutoTokenizer

    from switchyard.parallel.ports import free_port
    from switchyard.serve.app import create_app
    from switchyard.serve.config import ServeConfig
    from switchyard.serve.engine import Engine, ModelRunner
    from switchyard.serve.loading import build_tiny_moe
    from switchyard.serve.metrics import ServeMetrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.getbasetemp()
    path = build_tiny_moe(base / MODEL, base / "serve-cache")
    model, tok = sy.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    # no EOS ids: every answer runs to max_tokens, whatever this torch build's tiny weights say (as the engine tests)
    engine = Engine(ModelRunner(model, decode="sequential", max_batch=4, max_model_len=CONTEXT), tok, eos_token_ids=[])
    app = create_app(engine, tok, MODEL, ServeConfig(model=MODEL, api_key=KEY), ServeMetrics())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    stop = threading.Event()

    def engine_loop() -> None:
        while not stop.is_set():
            if engine.step() is None:
                engine.wait_for_work(0.02)

    workers = [threading.Thread(target=server.run, daemon=True), threading.Thread(target=engine_loop, daemon=True)]
    for worker in workers:
        worker.start()
    while not server.started:
        assert workers[0].is_alive(), "uvicorn did not start"
        workers[0].join(0.02)
    base_url = f"http://127.0.0.1:{port}/v1"
    yield SimpleNamespace(client=openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60),
                          base_url=base_url, model=model, tok=tok)
    server.should_exit = True
    stop.set()
    for worker in workers:
        worker.join(10)
    torch.set_num_threads(threads)


def greedy(model, ids: list[int], max_new_tokens: int, presence: float = 0.0, frequency: float = 0.0) -> list[int]:
    """``generate``'s greedy continuation, with OpenAI's penalties as a logits processor when asked for:
    ``mu[j] - c[j] * frequency - (c[j] > 0) * presence``, c counting the generated tokens only."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            out = input_ids[:, len(ids):]
            counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
            return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence

    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1,
                         logits_processor=LogitsProcessorList([OpenAIPenalties()]))
    return out[0, len(ids):].tolist()


def test_presence_and_frequency_penalties_follow_openais_formula(served):
    """Both penalties (OpenAI: numbers in [-2, 2]) were a 400 "not supported" for any value but 0."""
    client, tok = served.client, served.tok
    ids = tok(PROMPTS[1]).input_ids
    plain = greedy(served.model, ids, 16)
    for presence, frequency in ((0.6, 1.5), (-2.0, -1.0)):  # fewer repeats; more repeats
        want = greedy(served.model, ids, 16, presence, frequency)
        assert want != plain, (presence, frequency)
        response = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                             presence_penalty=presence, frequency_penalty=frequency,
                                             extra_body={"return_token_ids": True})
        assert response.choices[0].model_extra["token_ids"] == want, (presence, frequency)
    assert len(set(want)) < len(set(plain))  # the negative penalties repeat tokens
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat_ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
                                            frequency_penalty=2.0, extra_body={"return_token_ids": True})
    got = [t for chunk in stream for c in chunk.choices for t in c.model_extra.get("token_ids", [])]
    assert got == greedy(served.model, chat_ids, 12, frequency=2.0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", presence_penalty=2.5)
    assert err.value.param == "presence_penalty"
    with pytest.raises(ValueError, match=r"frequency_penalty must be in \[-2, 2\]"):
        SamplingParams(max_tokens=1, frequency_penalty=-2.5)


def test_echo_returns_the_prompt_before_the_completion(served):
    """``echo: true`` (OpenAI: the prompt, then the completion) was a 400; only echo with logprobs (the prompt's
    logprobs, which the server does not compute) still is."""
    client, tok = served.client, served.tok
    ids = tok(PROMPTS[1]).input_ids
    completion = tok.decode(greedy(served.model, ids, 6), skip_special_tokens=True)
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=6, temperature=0, echo=True, n=2)
    texts = [c.text for c in response.choices]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert texts[0] == texts[1] != PROMPTS[0] and texts[0].startswith(PROMPTS[0])
    assert texts[2] == texts[3] == PROMPTS[1] + completion
    assert response.usage.completion_tokens == 4 * 6
    stream = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=6, temperature=0, echo=True, n=2,
                                       stream=True)
    streamed = [""] * 4
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text == tok.decode(ids, skip_special_tokens=True) + completion  # token ids: decoded
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True, logprobs=1)
    assert err.value.param == "echo" and "prompt's log-probabilities" in err.value.message


def test_every_chunk_of_a_stream_has_the_same_created(served, monkeypatch):
    """OpenAI: each chunk has the same ``created`` (the completion's); chunks carried the time they were sent."""
    clock = itertools.count(1_700_000_000)
    monkeypatch.setattr(P, "now", lambda: next(clock))  # a second passes between any two calls
    client, every_token = served.client, {"return_token_ids": True}  # a chunk per token, text or not
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body=every_token))
    text = list(client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True, extra_body=every_token))
    for chunks in (chat, text):
        assert len(chunks) >= 4 and len({(c.id, c.created) for c in chunks}) == 1, [c.created for c in chunks]


def test_error_bodies_carry_openais_types(served):
    """OpenAI's ``type`` is ``invalid_request_error`` for every 4xx (``code`` names the case) and ``server_error`` for
    a 5xx; a wrong key was ``authentication_error``, an unknown model ``not_found_error``, a 500 ``internal_error``."""
    with pytest.raises(openai.NotFoundError) as missing:
        served.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as bad_value:
        served.client.completions.create(model=MODEL, prompt="x", temperature=-1)
    got = [(e.value.type, e.value.code, e.value.param) for e in (missing, wrong_key, bad_value)]
    assert got == [("invalid_request_error", "model_not_found", "model"),
                   ("invalid_request_error", "invalid_api_key", None),
                   ("invalid_request_error", "invalid_value", "temperature")]
    assert [P.error_body(status, "m")["error"]["type"] for status in (405, 413, 500, 503)] == \
        ["invalid_request_error", "invalid_request_error", "server_error", "server_error"]
