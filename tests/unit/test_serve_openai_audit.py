"""The server as the official ``openai`` client uses it, in one process (engine + uvicorn threads, no ranks):
what an audit against OpenAI's API reference found wrong or missing.

Oracle: ``model.generate(do_sample=False)`` of the same model (with a logits processor written from OpenAI's
penalty formula where penalties are asked for), token for token; the engine decodes ``sequential``, the
computation ``generate`` does.

    python -m pytest -q tests/unit/test_serve_openai_audit.py
"""

from __future__ import annotations

import itertools
import json
import threading
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")

import switchyard as sy  # noqa: E402
from serving import in_process_server  # noqa: E402
from switchyard.serve import protocol as P  # noqa: E402
from switchyard.serve.sampling import SamplingParams  # noqa: E402

MODEL, KEY, CONTEXT = "serve-tiny-moe", "audit-key", 128
PROMPTS = ["def hello(world):\n    return", "import os\n"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoTokenizer

    from switchyard.serve.loading import build_tiny_moe

    base = tmp_path_factory.getbasetemp()
    path = build_tiny_moe(base / MODEL, base / "serve-cache")
    model, tok = sy.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with in_process_server(model, tok, MODEL, KEY, max_batch=4, max_model_len=CONTEXT) as (root, engine):
        base_url = f"{root}/v1"
        yield SimpleNamespace(client=openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60),
                              base_url=base_url, model=model, tok=tok, engine=engine)


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


def test_stream_chunks_carry_usage_only_when_include_usage_asks(served):
    """OpenAI: with ``stream_options.include_usage`` every chunk has ``"usage": null`` and one more chunk, with no
    choices, the usage; without it no chunk has the field (they all carried ``"usage": null``)."""
    def events(path: str, body: dict) -> list[dict]:
        status, text = call(served, path, {"model": MODEL, "max_tokens": 3, "stream": True, **body})
        assert status == 200, text
        data = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert data[-1] == "[DONE]", data
        return [json.loads(d) for d in data[:-1]]

    for path, body in (("/completions", {"prompt": "x"}), ("/chat/completions",
                                                           {"messages": [{"role": "user", "content": "x"}]})):
        plain = events(path, body)
        assert len(plain) >= 2 and not [c for c in plain if "usage" in c], (path, plain)
        asked = events(path, {**body, "stream_options": {"include_usage": True}})
        assert all(c["usage"] is None and c["choices"] for c in asked[:-1]), (path, asked)
        assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 3, (path, asked[-1])


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


def call(served, path: str, body: object = None, raw: bytes | None = None, auth: str = f"Bearer {KEY}") -> tuple:
    """(status, body text) of a request sent as given (a POST with a body; bytes the ``openai`` client would not
    send as such)."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(served.base_url + path, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json", "Authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_request_the_server_stops_gets_a_503_not_finish_reason_abort(served, monkeypatch):
    """A request the server ended unfinished (drain timeout, Ctrl-C twice: ``Engine.abort_all``, as ``Rank0Loop``
    calls it) came back as a 200 with ``finish_reason: "abort"``, which is no OpenAI finish reason, and a stream
    ended with ``[DONE]`` as if complete. Now, as after an engine failure: a plain request gets OpenAI's error body
    (503 ``shutting_down``), a stream an error event and no ``[DONE]``."""
    engine, why = served.engine, "the server is shutting down and the drain timeout (1s) stopped this request"
    execute = engine.runner.execute

    def stopping(plan):  # the engine's thread: once the three requests have tokens, the server stops them
        if len(engine.running) == 3 and all(len(s.output_ids) >= 2 for s in engine.running.values()):
            engine.abort_all(why)
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", stopping)
    outcome: dict = {}
    body = dict(model=MODEL, max_tokens=100, temperature=0)

    def plain() -> None:
        try:
            outcome["plain"] = served.client.completions.create(prompt="x", **body)
        except Exception as err:  # noqa: BLE001 - what the client sees is the point
            outcome["plain"] = err

    def chat_stream() -> None:
        try:
            outcome["chat"] = list(served.client.chat.completions.create(messages=[{"role": "user", "content": "x"}],
                                                                         stream=True, **body))
        except Exception as err:  # noqa: BLE001
            outcome["chat"] = err

    def raw_stream() -> None:
        status, text = call(served, "/completions", {**body, "prompt": "y", "stream": True})
        outcome["raw"] = (status, [e for e in text.split("\n\n") if e])

    threads = [threading.Thread(target=f) for f in (plain, chat_stream, raw_stream)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    error = {"message": why, "type": "server_error", "param": None, "code": "shutting_down"}
    assert isinstance(outcome["plain"], openai.InternalServerError), outcome["plain"]
    assert outcome["plain"].status_code == 503 and outcome["plain"].body == error
    assert type(outcome["chat"]) is openai.APIError and outcome["chat"].body == error, outcome["chat"]
    status, events = outcome["raw"]
    assert status == 200 and events[-1] == f"data: {json.dumps({'error': error}, separators=(',', ':'))}", events
    assert "data: [DONE]" not in events and not any('"abort"' in e for e in events), events
    assert engine.idle()


def test_wrong_types_are_400s_naming_the_param(served):
    """Lax pydantic coerced these (``max_tokens: true`` generated 1 token, ``"logprobs": false`` returned logprobs,
    ``[true, false]`` was a prompt of token ids 1 and 0); each is now OpenAI's 400 with ``param``."""
    client, user = served.client, [{"role": "user", "content": "x"}]
    for path_fields in ({"max_tokens": True}, {"max_tokens": "5"}, {"n": True}, {"temperature": "0.5"},
                        {"echo": "true"}, {"stream": "yes"}, {"stream": 1}, {"ignore_eos": "no"}, {"logprobs": False},
                        {"logprobs": True}, {"prompt": [True, False]}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=path_fields)
        assert (err.value.param, err.value.code) == (next(iter(path_fields)), "invalid_value"), path_fields
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=user, max_tokens=2, extra_body={"logprobs": 1})
    assert (err.value.param, err.value.code) == ("logprobs", "invalid_value")
    # what JSON allows still passes: an integer temperature, "" as content
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=1).choices[0].text is not None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}], max_tokens=2)
    assert chat.usage.completion_tokens == 2


def test_messages_without_content_and_failed_unions_say_what_is_wrong(served):
    """A user message without content was rendered as an empty one; ``"prompt": 5`` said "prompt.str: Input should
    be a valid string", as if only strings were taken."""
    client = served.client
    for message in ({"role": "user"}, {"role": "user", "content": None}, {"role": "user", "content": []},
                    {"role": "assistant", "content": None}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}, message])
        assert (err.value.param, err.value.code) == ("messages", "invalid_value")
        assert err.value.body["message"].startswith(f"messages.1: a message with role {message['role']!r} needs content")
    for fields, want in (({"prompt": 5}, "prompt must be a string, a list of strings, a list of token ids or a list "
                                         "of lists of token ids, got 5"),
                         ({"stop": 5}, "stop must be a string or a list of strings, got 5")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="x", extra_body=fields)
        assert err.value.body["message"] == want and err.value.param == next(iter(fields))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert err.value.body["message"] == "messages.0.content.0.text: Field required"


def test_every_400_has_a_code(served):
    """``n`` over max_n, too many prompts, token ids outside the vocabulary and bodies JSON could not parse (too
    deep, not UTF-8) had ``code: null`` while every other 400 has one."""
    cases = [({"model": MODEL, "prompt": "x", "n": 9}, None, "n", "invalid_value"),
             ({"model": MODEL, "prompt": ["x"] * 17}, None, "prompt", "invalid_value"),
             ({"model": MODEL, "prompt": [1, 10**9]}, None, "prompt", "invalid_value"),
             (None, b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "invalid_json"),
             (None, b'{"model": "m", "prompt": "\xff"}', None, "invalid_json"),
             (None, b'{"model": "m", "prompt": ', None, "invalid_json")]
    for body, raw, param, code in cases:
        status, text = call(served, "/completions", body, raw)
        reply = json.loads(text)
        assert status == 400 and (reply["error"]["param"], reply["error"]["code"]) == (param, code), reply
        assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"], reply



def test_chat_without_a_usable_template_is_a_400_with_a_code(served, monkeypatch):
    """A tokenizer with no chat template, and a template that raises on the messages (Mistral's refuses a
    system role), were 400s with ``code: null``."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    cases = [(None, "chat_template_missing", "no chat template; use /v1/completions"),
             ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
              "invalid_value", "the chat template rejected these messages: System role not supported")]
    for template, code, message in cases:
        monkeypatch.setattr(served.tok, "chat_template", template)
        with pytest.raises(openai.BadRequestError) as err:
            served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert (err.value.body["param"], err.value.body["code"]) == ("messages", code), err.value.body
        assert message in err.value.body["message"], err.value.body

def test_the_bearer_scheme_is_case_insensitive_and_the_key_is_not(served):
    """RFC 7235: the auth scheme is case-insensitive; ``bearer <key>`` was a 401."""
    def status(auth: str) -> int:
        return call(served, "/models", auth=auth)[0]

    assert [status(f"{scheme} {KEY}") for scheme in ("Bearer", "bearer", "BEARER", "bEaReR")] == [200] * 4
    assert status(f"bearer  {KEY}") == 200  # 1*SP between scheme and credentials
    for wrong in (f"bearer {KEY.upper()}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY, f"Bearer{KEY}",
                  f"Bearer: {KEY}", "bearer"):
        assert status(wrong) == 401, wrong
