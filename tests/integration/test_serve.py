"""launch/serve.py on 2 CPU ranks (ep=2) under the real deepspeed launcher, driven by the official
``openai`` client. One server is shared by every test in this module.

Oracle: ``model.generate(do_sample=False)`` of the same checkpoint in this process (ep=1), token for
token (the server returns token ids through the ``return_token_ids`` extension).

    python -m pytest -q tests/integration/test_serve.py
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("openai")

import openai  # noqa: E402

import switchyard as sy  # noqa: E402
from switchyard.serve.launcher import ServerProcess  # noqa: E402
from switchyard.serve.loading import build_tiny_moe  # noqa: E402

pytestmark = pytest.mark.distributed

KEY = "test-key-123"
MODEL = "serve-tiny-moe"
CONTEXT = 256
PROMPTS = ["def hello(world):\n    return", "import os\n", "class Foo(object):", "x = [", "for i in range(10):",
           "# comment\n", "while True:", "try:\n    pass", "from typing import", "print(", "async def main():",
           "return None", "if __name__", "with open(", "lambda x:", "raise ValueError("]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return build_tiny_moe(base / MODEL, base / "serve-cache")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # fewer slots than the 16 concurrent clients (some wait for a slot), and idle heartbeats between requests
    config = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
    config.write_text("max_batch: 6\nheartbeat_s: 0.2\n")
    with ServerProcess.start(model_dir, ep=2, api_key=KEY, args=["--config", str(config)]) as srv:
        srv.wait_ready()
        yield srv
        assert srv.proc.poll() is None, f"the server died during the tests:\n{srv.output()}"


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy ``generate`` in this process, one thread like each server rank (same float summation)."""
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = sy.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)

    def greedy(ids: list[int], max_tokens: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens)
        return out[0, len(ids):].tolist()

    greedy.tok = tok  # type: ignore[attr-defined]
    greedy.model = model  # type: ignore[attr-defined]
    yield greedy
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def http(server, method: str, path: str, body: object = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None, key: str | None = KEY) -> tuple[int, dict | str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.base_url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == CONTEXT
    status, body = http(server, "GET", "/v1/models/gpt-9")
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert http(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    for key in (None, "wrong"):
        status, body = http(server, "GET", "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # RFC 7235: the scheme is case-insensitive ("bearer" was a 401), the key is not
    assert http(server, "GET", "/v1/models", key=None, headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert http(server, "GET", "/v1/models", key=None, headers={"Authorization": f"bearer {KEY.upper()}"})[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_completion_matches_generate(client, reference):
    tok = reference.tok
    ids = tok(PROMPTS[0]).input_ids
    want = reference(ids, 24)
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                         extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert ids_of(choice) == want
    assert choice.text == tok.decode(want, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), len(want))
    # token-id prompts and several prompts with n in one request
    response = client.completions.create(model=MODEL, prompt=[ids, tok(PROMPTS[1]).input_ids], max_tokens=8,
                                         temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    short = tok.decode(reference(ids, 8), skip_special_tokens=True)
    assert response.choices[0].text == response.choices[1].text == short


def test_chat_and_streaming_match_generate(client, reference):
    tok = reference.tok
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    want = reference(ids, 20)
    text = tok.decode(want, skip_special_tokens=True)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                              extra_body={"return_token_ids": True})
    assert ids_of(response.choices[0]) == want and response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant" and response.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(want)

    stream = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True)
    want = reference(tok(PROMPTS[2]).input_ids, 16)
    assert "".join(c.choices[0].text for c in stream) == tok.decode(want, skip_special_tokens=True)


def _logprobs_of(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_completion_and_chat_streamed_or_not(client, reference):
    """logprobs (completions: top n; chat: logprobs + top_logprobs) equal the model's log-softmax at each
    generated position, computed in this process; the token strings are the tokens' own decodes."""
    tok, model = reference.tok, reference.model
    ids = tok(PROMPTS[4]).input_ids
    want_ids = reference(ids, 10)
    want = _logprobs_of(model, ids, want_ids)
    chosen = want.gather(1, torch.tensor(want_ids).view(-1, 1)).view(-1)

    response = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=10, temperature=0, logprobs=2)
    lp = response.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in want_ids]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), chosen, atol=1e-4, rtol=1e-4)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp_t, abs=1e-4)
               for top, lp_t in zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the chosen token is the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    stream = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=10, temperature=0, logprobs=1,
                                       stream=True)
    streamed = [c.choices[0].logprobs for c in stream if c.choices[0].logprobs is not None]
    torch.testing.assert_close(torch.tensor([x for s in streamed for x in s.token_logprobs]), chosen,
                               atol=1e-4, rtol=1e-4)
    assert [x for s in streamed for x in s.text_offset] == lp.text_offset

    messages = [{"role": "user", "content": "def add(a, b):"}]
    chat_ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids
    chat_want = reference(chat_ids, 8)
    chat_lp = _logprobs_of(model, chat_ids, chat_want)
    for stream in (False, True):
        result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=stream)
        if stream:
            content = [e for c in result if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        else:
            content = result.choices[0].logprobs.content
        assert [e.token for e in content] == [tok.decode([t]) for t in chat_want]
        assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)
        for entry, row in zip(content, chat_lp):
            values, top_ids = row.topk(3)
            assert [t.token for t in entry.top_logprobs] == [tok.decode([t]) for t in top_ids.tolist()]
            torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), values,
                                       atol=1e-4, rtol=1e-4)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_a_tiny_temperature_is_greedy_and_the_server_goes_on(client, reference):
    """temperature=1e-40 is valid; it used to overflow in the sampler and kill rank 0 (and the job)."""
    tok = reference.tok
    ids = tok(PROMPTS[1]).input_ids
    response = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=1e-40,
                                         extra_body={"return_token_ids": True})
    assert ids_of(response.choices[0]) == reference(ids, 6)
    after = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert after.choices[0].text == tok.decode(reference(tok(PROMPTS[2]).input_ids, 6), skip_special_tokens=True)


def test_null_parameters_mean_the_default(server):
    """Explicit JSON nulls (as OpenAI and vLLM accept them) were a 400; they mean the default."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "presence_penalty",
                           "frequency_penalty", "ignore_eos", "return_token_ids", "logprobs", "user"])
    for path, body in (("/v1/completions", {"prompt": "x", "echo": None, "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                 "top_logprobs": None})):
        status, reply = http(server, "POST", path, body={"model": MODEL, **body, **nulls})
        assert status == 200, (path, reply)
        assert len(reply["choices"]) == 1 and reply["choices"][0]["logprobs"] is None, path  # n=1, no logprobs
        assert "token_ids" not in reply["choices"][0] and reply["usage"]["completion_tokens"] >= 1, path


def test_text_the_tokenizer_refuses_and_an_overlong_chat_prompt_are_400s(server):
    """A lone surrogate (valid JSON) was a 500; a chat prompt over the context without max_tokens blamed the
    max_tokens the client never sent."""
    for path, body, param in (
            ("/v1/completions", b'{"model": "%s", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
            ("/v1/chat/completions",
             b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}', "messages")):
        status, reply = http(server, "POST", path, raw=body % MODEL.encode())
        assert (status, reply["error"]["param"]) == (400, param), reply
        assert "could not be tokenized" in reply["error"]["message"]
    messages = [{"role": "user", "content": "hello world " * 200}]
    status, reply = http(server, "POST", "/v1/chat/completions", body={"model": MODEL, "messages": messages})
    error = reply["error"]
    assert (status, error["param"], error["code"]) == (400, "messages", "context_length_exceeded"), reply
    assert f"context is {CONTEXT} tokens" in error["message"] and "max_tokens" not in error["message"]


def test_sse_wire_format(server):
    request = urllib.request.Request(
        server.base_url + "/v1/completions", method="POST",
        data=json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 4, "temperature": 0, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: "):])
    assert first["object"] == "text_completion" and first["choices"][0]["index"] == 0


def test_sixteen_concurrent_clients_each_get_their_own_greedy_answer(client, reference):
    tok = reference.tok
    lengths = [3 + 4 * i for i in range(16)]  # sequences finish at different steps
    wants = [reference(tok(p).input_ids, n) for p, n in zip(PROMPTS, lengths)]

    def ask(i: int) -> list[int]:
        if i % 2:
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                               stream=True, extra_body={"return_token_ids": True})
            return [t for chunk in stream for c in chunk.choices for t in c.model_extra["token_ids"]]
        response = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                             extra_body={"return_token_ids": True})
        return ids_of(response.choices[0])

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16), timeout=120))
    assert got == wants
    assert time.monotonic() - started < 120


def test_sampling_options(client, reference):
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0.9)
    a = client.completions.create(seed=11, **kw).choices[0].text
    assert client.completions.create(seed=11, **kw).choices[0].text == a
    many = client.completions.create(seed=11, n=3, **kw)
    assert len(many.choices) == 3 and many.choices[0].text == a
    assert 3 <= many.usage.completion_tokens <= 36
    assert many.usage.prompt_tokens == len(reference.tok(PROMPTS[3]).input_ids)
    tok = reference.tok
    full = tok.decode(reference(tok(PROMPTS[4]).input_ids, 30), skip_special_tokens=True)
    stop = full[10:13]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=30, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.find(stop)] and response.choices[0].finish_reason == "stop"


def test_logit_bias_matches_generate_sequence_bias(client, reference):
    """``logit_bias`` (once silently ignored) is added to the logits before the choice: greedy equals
    ``generate(sequence_bias=…)``, on both endpoints; the completion's ``top_logprobs`` hold the chosen token."""
    tok = reference.tok
    ids = tok(PROMPTS[2]).input_ids
    plain = reference(ids, 10)
    bias = {plain[0]: -100.0, **{t: 4.0 for t in sorted(set(plain))[1:4]}}
    want = reference.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10,
                                    sequence_bias={(t,): b for t, b in bias.items()})[0, len(ids):].tolist()
    assert want != plain
    response = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=1,
                                         logit_bias={str(t): b for t, b in bias.items()},
                                         extra_body={"return_token_ids": True})
    assert ids_of(response.choices[0]) == want
    lp = response.choices[0].logprobs
    assert all(token in top for token, top in zip(lp.tokens, lp.top_logprobs))  # OpenAI: up to logprobs + 1
    assert any(len(top) == 2 for top in lp.top_logprobs)  # the bias chose a token the model did not rank first
    messages = [{"role": "user", "content": "x"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0.7, seed=1,
                                          logit_bias={"7": 100})
    assert chat.choices[0].message.content == tok.decode([7] * 4, skip_special_tokens=True)


BAD = {
    "malformed json": ("/v1/completions", None, b'{"model": "x", "prompt": ', 400),
    "not an object": ("/v1/completions", [1, 2], None, 400),
    "max_tokens type": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "lots"}, None, 400),
    "temperature type": ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, None, 400),
    "prompt type": ("/v1/completions", {"model": MODEL, "prompt": 123}, None, 400),
    "messages type": ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, None, 400),
    "no messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}, None, 400),
    "bad role": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None, 400),
    "missing prompt": ("/v1/completions", {"model": MODEL}, None, 400),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, None, 404),
    "unknown model chat": ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
                           None, 404),
    "prompt too long": ("/v1/completions", {"model": MODEL, "prompt": [5] * (CONTEXT + 1), "max_tokens": 1}, None, 400),
    "prompt + max_tokens too long": ("/v1/completions", {"model": MODEL, "prompt": [5] * 200, "max_tokens": 57}, None,
                                     400),
    "max_tokens 0": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None, 400),
    "max_tokens negative": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": -3}, None, 400),
    "temperature negative": ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, None, 400),
    "top_p 0": ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, None, 400),
    "n too big": ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 1000}, None, 400),
    "token id out of vocab": ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, None, 400),
    "empty prompt": ("/v1/completions", {"model": MODEL, "prompt": ""}, None, 400),
    "too many stops": ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, None, 400),
    "logprobs too many": ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, None, 400),
    "top_logprobs alone": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, None, 400),
    "echo with logprobs": ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, None, 400),
    "penalty out of range": ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, None, 400),
    "logit_bias out of vocab": ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}, None,
                                400),
    "logit_bias not an id": ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}}, None, 400),
    "tool_choice without tools": ("/v1/chat/completions", {"model": MODEL, "tool_choice": "required",
                                                           "messages": [{"role": "user", "content": "x"}]}, None, 400),
    "functions": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                           "functions": [{"name": "f", "parameters": {}}]}, None, 400),
    "min_p (vLLM's, not honoured)": ("/v1/completions", {"model": MODEL, "prompt": "x", "min_p": 0.5}, None, 400),
    "image part": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, None, 400),
    "unknown route": ("/v1/engines", {"model": MODEL}, None, 404),
    # types are strict (these were coerced: 1 token, a prompt of token ids 1 and 0, logprobs returned)
    "max_tokens true": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, None, 400),
    "stream 'yes'": ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, None, 400),
    "boolean prompt": ("/v1/completions", {"model": MODEL, "prompt": [True, False]}, None, 400),
    "logprobs false": ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": False}, None, 400),
    "user message without content": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, None,
                                     400),
    "too many prompts": ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 17}, None, 400),
    "deeply nested": ("/v1/completions", None, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    "not utf-8": ("/v1/completions", None, b'{"model": "x", "prompt": "\xff"}', 400),
}


def raw_post(server, head: dict[str, str], chunks: list[bytes]) -> tuple[int, dict]:
    """POST over a bare socket: the server may answer (and close) before the whole body is sent."""
    import http.client
    import socket

    lines = ["POST /v1/completions HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in head.items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server already refused the body
                break
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_oversized_bodies_get_413(server, client):
    two_mib = 2 << 20
    status, reply = raw_post(server, {"Content-Length": str(two_mib)}, [b"{" + b" " * 1000])
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    piece = b"a" * 65536  # chunked upload without a Content-Length: cut off after the limit
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    status, reply = raw_post(server, {"Transfer-Encoding": "chunked"}, [chunk] * 40 + [b"0\r\n\r\n"])
    assert status == 413 and set(reply["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None


def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, client, reference):
    for name, (path, body, raw, want) in BAD.items():
        status, reply = http(server, "POST", path, body=body, raw=raw)
        assert status == want, (name, status, reply)
        assert isinstance(reply, dict) and set(reply["error"]) == {"message", "type", "param", "code"}, (name, reply)
        assert reply["error"]["message"], name
        assert status != 400 or reply["error"]["code"] is not None, (name, reply)  # n, prompts, vocab, parse: null
    status, reply = http(server, "GET", "/v1/completions")
    assert status == 405 and "error" in reply
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    tok = reference.tok
    response = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=10, temperature=0)
    assert response.choices[0].text == tok.decode(reference(tok(PROMPTS[5]).input_ids, 10), skip_special_tokens=True)


def test_a_context_overflow_names_the_field_sent_and_its_largest_value(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CONTEXT}
    status, reply = http(server, "POST", "/v1/chat/completions", body=chat)
    prompt = CONTEXT - int(re.search(r"at most (\d+)", reply["error"]["message"]).group(1))
    assert status == 400 and reply["error"]["param"] == "max_completion_tokens"
    assert reply["error"]["message"].startswith(f"this model's context is {CONTEXT} tokens; the prompt has {prompt}")
    fits = {**chat, "max_completion_tokens": CONTEXT - prompt}
    status, reply = http(server, "POST", "/v1/chat/completions", body=fits)
    assert status == 200 and reply["usage"]["total_tokens"] <= CONTEXT
    status, reply = http(server, "POST", "/v1/completions", body={"model": MODEL, "prompt": [5] * (CONTEXT - 4)})
    assert status == 400 and reply["error"]["param"] == "max_tokens"  # none sent: the default 16 did not fit
    message = reply["error"]["message"]
    assert "not sent: the server default_max_tokens" in message and "at most 4" in message


def metric(server, name: str) -> float:
    _, text = http(server, "GET", "/metrics")
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_disconnect_mid_stream_cancels_the_sequence(server, client, reference):
    aborted = 'switchyard_sequences_finished_total{finish_reason="abort"}'
    before = metric(server, aborted)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while metric(server, aborted) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, aborted) == before + 1
    assert metric(server, "switchyard_num_requests_running") == 0
    # a non-streaming request whose client goes away is cancelled too (the handler polls for the disconnect)
    import socket

    body = json.dumps({"model": MODEL, "prompt": [5], "max_tokens": 250, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 20
        while metric(server, "switchyard_num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 20
    while metric(server, aborted) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, aborted) == before + 2
    tok = reference.tok
    response = client.completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=6, temperature=0)
    assert response.choices[0].text == tok.decode(reference(tok(PROMPTS[7]).input_ids, 6), skip_special_tokens=True)


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=3)
    status, text = http(server, "GET", "/metrics")
    assert status == 200
    for name in ("switchyard_requests_total", "switchyard_prompt_tokens_total", "switchyard_generation_tokens_total",
                 "switchyard_time_to_first_token_seconds_bucket", "switchyard_time_per_output_token_seconds_bucket",
                 "switchyard_num_requests_running", "switchyard_num_requests_waiting",
                 "switchyard_sequences_finished_total", 'switchyard_expert_tokens_total{expert="3"'):
        assert name in text, name
    assert metric(server, "switchyard_generation_tokens_total") > 0
    assert re.search(r'^switchyard_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text, re.M)
    client.models.retrieve(MODEL)  # a known route, not "other"
    _, text = http(server, "GET", "/metrics")
    assert re.search(r'^switchyard_requests_total\{endpoint="/v1/models/\{id\}",status="200"\} [1-9]', text, re.M)
