"""The server as the official ``openai`` client (and curl) uses it, in one process (engine + uvicorn threads): what a
client audit found — vLLM extensions that changed the prompt or the text dropped without a word (now honoured where
transformers' apply_chat_template takes them, refused otherwise), 404 / 405 errors that named neither the URL nor the
fix, a 405 without its ``Allow`` header.

Oracles: transformers' ``apply_chat_template`` (the prompt the chat-template settings render), RFC 9110 (a 405
carries ``Allow``), the ``openai`` client's own URL building (``base_url`` + ``/chat/completions``).

    python -m pytest -q tests/unit/test_serve_audit_client.py
"""

from __future__ import annotations

import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

import switchyard as sy  # noqa: E402
from serving import in_process_server  # noqa: E402

MODEL, KEY, CONTEXT = "serve-tiny-moe", "audit-client-key", 128
USER = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoTokenizer

    from switchyard.serve.loading import build_tiny_moe

    base = tmp_path_factory.getbasetemp()
    path = build_tiny_moe(base / MODEL, base / "serve-cache")
    model, tok = sy.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tok.chat_template += "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    model.generation_config.top_k = 1  # the model's own sampling default: greedy unless a request sets top_k
    with in_process_server(model, tok, MODEL, KEY, max_batch=2, max_model_len=CONTEXT) as (root, _):
        yield SimpleNamespace(client=openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0, timeout=30),
                              root=root, tok=tok)


def test_vllm_chat_fields_that_change_the_prompt_are_refused_not_ignored(served):
    """A ``chat_template``, ``documents`` and chat ``echo`` were dropped as unknown fields: the server rendered its
    default prompt, not the one the client asked for, and answered it with a 200."""
    client = served.client
    asked = {"chat_template": "{{ messages[0]['content'] }}", "documents": [{"text": "x"}], "echo": True}
    for name, value in asked.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={name: value})
        assert (err.value.param, err.value.code) == (name, "invalid_value"), (name, err.value.body)
        assert f"leave {name} out" in err.value.message, err.value.message
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2,
                                          extra_body={"echo": False}).usage.completion_tokens == 2


def served_prompt(served, messages: list[dict], **body) -> list[int]:
    reply = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                                  extra_body={"return_token_ids": True, **body})
    return reply.model_extra["prompt_token_ids"]


def test_chat_template_settings_render_as_transformers_renders_them(served):
    """``chat_template_kwargs`` (Qwen3's ``enable_thinking``), ``add_generation_prompt`` and ``continue_final_message``
    (prefill the answer) were ignored: the server answered its default prompt. Oracle: transformers'
    apply_chat_template with the same settings."""
    tok = served.tok
    prefill = [*USER, {"role": "assistant", "content": "    return"}]

    def render(messages: list[dict], **settings) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, **settings)
        return tok(text, add_special_tokens=False).input_ids

    default = render(USER, add_generation_prompt=True)
    assert served_prompt(served, USER) == default
    no_thinking = render(USER, add_generation_prompt=True, enable_thinking=False)
    assert no_thinking != default  # the fixture's template reads enable_thinking
    assert served_prompt(served, USER, chat_template_kwargs={"enable_thinking": False}) == no_thinking
    assert served_prompt(served, USER, add_generation_prompt=False) == render(USER, add_generation_prompt=False)
    continued = render(prefill, continue_final_message=True)
    assert served_prompt(served, prefill, add_generation_prompt=False, continue_final_message=True) == continued
    assert continued != render(prefill, add_generation_prompt=True)


@pytest.mark.parametrize("body, messages, param, says", [
    ({"continue_final_message": True}, "prefill", "continue_final_message", "send add_generation_prompt: false"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "user", "continue_final_message",
     "has role 'user'"),
    ({"chat_template_kwargs": {"tokenize": True}}, "user", "chat_template_kwargs", "may not set ['tokenize']"),
])
def test_chat_template_settings_that_cannot_work_are_a_400(served, body: dict, messages: str, param: str,
                                                           says: str) -> None:
    chat = [*USER, {"role": "assistant", "content": "x"}] if messages == "prefill" else USER
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=1, extra_body=body)
    assert err.value.param == param and says in err.value.message, err.value.body


def test_vllm_fields_that_change_the_text_or_the_prompt_are_refused_on_both_endpoints(served):
    """``skip_special_tokens: false`` (special tokens in the text), ``prompt_logprobs``, ``truncate_prompt_tokens``,
    ``allowed_token_ids`` and ``bad_words`` were ignored: a 200 without what was asked for."""
    client = served.client
    asked = {"skip_special_tokens": False, "spaces_between_special_tokens": False, "prompt_logprobs": 1,
             "truncate_prompt_tokens": 4, "allowed_token_ids": [5, 6], "bad_words": ["def"]}
    calls = (lambda body: client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=body),
             lambda body: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body=body))
    for call in calls:
        for name, value in asked.items():
            with pytest.raises(openai.BadRequestError) as err:
                call({name: value})
            assert (err.value.param, err.value.code) == (name, "invalid_value"), (name, err.value.body)
        off = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "allowed_token_ids": [],
               "bad_words": [], "prompt_logprobs": None}
        assert call(off).usage.completion_tokens == 2
    # completions' own echo is OpenAI's and stays honoured
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True).choices[0].text.startswith("x")


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def test_a_wrong_method_is_a_405_with_allow_and_a_wrong_url_names_the_fix(served):
    """A 405 came without the ``Allow`` header RFC 9110 requires and both said only "Method Not Allowed" /
    "Not Found"; a client whose ``base_url`` lacks ``/v1`` (the most common mistake) got a bare "Not Found"."""
    status, headers, body = get(f"{served.root}/v1/chat/completions")
    assert status == 405 and headers.get("allow") == "POST", (status, headers)
    assert "Invalid method for URL (GET /v1/chat/completions)" in body and "takes POST" in body, body
    status, headers, _ = get(f"{served.root}/v1/models", "POST")
    assert status == 405 and headers.get("allow") == "GET"
    no_v1 = openai.OpenAI(base_url=served.root, api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as err:
        no_v1.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert err.value.body["message"].startswith("Invalid URL (POST /chat/completions)"), err.value.body
    assert "did you mean /v1/chat/completions?" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        served.client.post("/chat/completion", body={}, cast_to=object)  # a typo: the routes are listed
    assert "Invalid URL (POST /v1/chat/completion)" in err.value.message and "POST /v1/chat/completions" in \
        err.value.message and "did you mean" not in err.value.message


def test_the_models_generation_config_gives_the_sampling_defaults(served):
    """A request that leaves top_k out takes the generation_config's (1 here: the greedy tokens whatever the seed);
    one that sends it samples. The server used temperature 1 / top_p 1 / no top_k for every model."""
    client, prompt = served.client, "def add(a, b):"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    for seed in (1, 2, 3):
        assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=seed).choices[0].text == greedy
    sampled = {client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=seed,
                                         extra_body={"top_k": -1}).choices[0].text for seed in range(4)}
    assert sampled != {greedy}

