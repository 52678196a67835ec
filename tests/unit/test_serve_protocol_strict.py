"""Request types as JSON writes them (no coercion), chat messages that must have content, and the 400 each
mistake gets (``param``, ``code``, a message saying what is accepted) — without a server.

    python -m pytest -q tests/unit/test_serve_protocol_strict.py
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from switchyard.serve import protocol as P
from switchyard.serve import app
from switchyard.serve.app import validation_error

USER = [{"role": "user", "content": "x"}]
BASE = {P.CompletionRequest: dict(model="m", prompt="x"), P.ChatCompletionRequest: dict(model="m", messages=USER)}

# every field of the request models, with values of a wrong JSON type that lax pydantic coerced (or took as is):
# booleans as integers, numeric and boolean strings, numbers as booleans, booleans as token ids
WRONG: dict[str, list[object]] = {
    "model": [5, True], "temperature": ["0.5", True], "top_p": ["1", False], "n": [True, "2", 1.0],
    "stop": [5, [True], ["a", 1]], "seed": ["1", True, 1.5], "stream": ["yes", 1, "true"],
    "stream_options": ["yes", [True]], "user": [5, False], "presence_penalty": ["0", True],
    "frequency_penalty": ["0", True], "logit_bias": [{"7": "1"}, {"7": True}, ["7"]], "ignore_eos": ["no", 0],
    "return_token_ids": ["true", 1], "max_tokens": [True, "5", 5.0], "max_completion_tokens": [True, "5"],
    "prompt": [5, [True, False], [[True]], [1.5], True], "echo": ["true", 1], "logprobs": [False, True, "1"],
    "best_of": [True, "1"], "suffix": [5], "messages": ["hi", [5], {"role": "user"}], "top_logprobs": [True, "2"],
    "tools": ["x"], "functions": ["x"], "tool_choice": [5], "function_call": [5], "response_format": ["text"],
    "top_k": ["1", True, 1.5], "add_generation_prompt": ["true", 1], "continue_final_message": ["true", 1],
    "chat_template_kwargs": ["x", [1]],
}
CHAT_LOGPROBS_WRONG = [1, "true"]  # chat's logprobs is a boolean
MESSAGE_WRONG = {"role": [5], "content": [5, [{"type": "text", "text": 5}], [{"type": "text", "text": True}]],
                 "name": [5, True]}


def _fields(model: type) -> set[str]:
    return set(model.model_fields)


def _refused(model: type, fields: dict) -> tuple[str, str | None, str]:
    with pytest.raises(ValidationError) as err:
        model.model_validate(fields)
    return validation_error(err.value.errors())


def test_the_table_covers_every_field_of_the_request_models():
    """A field added later without a wrong-type case here is a failure, not a silent coercion."""
    fields = _fields(P.CompletionRequest) | _fields(P.ChatCompletionRequest)
    assert fields == set(WRONG), fields ^ set(WRONG)
    assert _fields(P.ChatMessage) == set(MESSAGE_WRONG) and _fields(P.StreamOptions) == {"include_usage"}
    assert _fields(P.TextPart) == {"type", "text"}


@pytest.mark.parametrize("model", [P.CompletionRequest, P.ChatCompletionRequest])
def test_a_value_of_the_wrong_json_type_is_a_400_naming_its_field(model):
    """Lax pydantic read ``"max_tokens": true`` as 1, ``"5"`` as 5, ``"stream": "yes"`` as true, ``[true, false]``
    as token ids and completions' ``"logprobs": false`` as 0 (logprobs returned): each is now refused."""
    wrong = {**WRONG, "logprobs": CHAT_LOGPROBS_WRONG} if model is P.ChatCompletionRequest else WRONG
    for name in _fields(model):
        for value in wrong[name]:
            message, param, code = _refused(model, {**BASE[model], name: value})
            assert (param, code) == (name, "invalid_value"), (name, value, message)
            assert message.startswith(name), (name, value, message)
    for value in ("yes", 1):
        message, param, _ = _refused(model, {**BASE[model], "stream": True, "stream_options": {"include_usage": value}})
        assert param == "stream_options" and message.startswith("stream_options.include_usage"), message


def test_a_wrong_type_inside_a_chat_message_names_messages():
    for name, values in MESSAGE_WRONG.items():
        for value in values:
            message = {"role": "user", "content": "x", name: value}
            text, param, code = _refused(P.ChatCompletionRequest, dict(model="m", messages=[message]))
            assert (param, code) == ("messages", "invalid_value") and text.startswith("messages.0."), (name, value, text)


def test_what_json_allows_is_still_taken():
    """An integer where a number is expected (``"temperature": 1``), ``null`` as the default, an empty string as
    content (OpenAI accepts ``""``), every prompt shape, and the unsupported settings' "off" values."""
    req = P.CompletionRequest(model="m", prompt=[[1, 2], [3]], temperature=1, top_p=1, presence_penalty=0,
                              logit_bias={"7": 100}, n=None, stream=None, logprobs=0, max_tokens=3)
    assert (req.temperature, req.top_p, req.n, req.stream, req.logprobs) == (1.0, 1.0, 1, False, 0)
    assert isinstance(req.temperature, float) and req.logit_bias_ids == ((7, 100.0),)
    for prompt in ("x", ["x", "y"], [1, 2]):
        assert P.CompletionRequest(model="m", prompt=prompt).prompt == prompt
    chat = P.ChatCompletionRequest(model="m", messages=[{"role": "system", "content": ""},
                                                        {"role": "user", "content": [{"type": "text", "text": ""}]},
                                                        {"role": "assistant", "content": "ok"}],
                                   logprobs=True, top_logprobs=2, temperature=0, stream=True,
                                   stream_options={"include_usage": True})
    assert [m.text() for m in chat.messages] == ["", "", "ok"] and chat.temperature == 0.0
    P.CompletionRequest(model="m", prompt="x", top_k=-1, min_p=0, repetition_penalty=1.0, use_beam_search=False)


def test_an_unsupported_settings_off_value_must_have_its_json_type():
    """``"min_p": false`` compared equal to the "off" 0 (and ``"use_beam_search": 0`` to false) and passed."""
    for name, value in (("min_p", False), ("use_beam_search", 0), ("include_stop_str_in_output", 0)):
        message, param, code = _refused(P.CompletionRequest, dict(model="m", prompt="x", **{name: value}))
        assert (param, code) == (name, "invalid_value") and "is not supported by this server" in message, message


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "user", "content": []}, {"role": "system", "content": None},
                                     {"role": "assistant", "content": None}, {"role": "tool"}])
def test_a_message_without_content_is_a_400_naming_its_index(message):
    """OpenAI refuses them; they were rendered as empty messages (an assistant message may omit content only with
    tool calls, which this server does not take)."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, message]
    text, param, code = _refused(P.ChatCompletionRequest, dict(model="m", messages=messages))
    assert (param, code) == ("messages", "invalid_value"), text
    assert text.startswith(f"messages.2: a message with role {message['role']!r} needs content"), text
    assert ("tool calls are not supported" in text) == (message["role"] == "assistant"), text


def test_a_union_that_fails_says_what_it_accepts():
    """``"prompt": 5`` was "prompt.str: Input should be a valid string" (as if only strings were taken)."""
    cases = [
        (P.CompletionRequest, dict(prompt=5), "prompt", "prompt must be a string, a list of strings, a list of token "
                                                        "ids or a list of lists of token ids, got 5"),
        (P.CompletionRequest, dict(prompt=[True, False]), "prompt", "prompt must be a string, a list of strings, a "
                                                                    "list of token ids or a list of lists of token "
                                                                    "ids, got [true, false]"),
        (P.CompletionRequest, dict(prompt="x", stop=5), "stop", "stop must be a string or a list of strings, got 5"),
        # shaped like one member only (a list of parts): that member's own error, without pydantic's tag
        (P.CompletionRequest, dict(prompt="x", stop=["a", 5]), "stop", "stop.1: Input should be a valid string, "
                                                                       "got 5"),
        (P.ChatCompletionRequest, dict(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages",
         "messages.0.content.0.text: Field required"),
        (P.ChatCompletionRequest, dict(messages=[{"role": "user", "content": 5}]), "messages",
         'messages.0.content must be a string or a list of text parts {"type": "text", "text": ...}, got 5'),
        (P.ChatCompletionRequest, dict(messages=USER, tool_choice=5), "tool_choice",
         "tool_choice must be a string or an object, got 5"),
    ]
    for model, fields, param, want in cases:
        message, got_param, code = _refused(model, dict(model="m", **fields))
        assert (message, got_param, code) == (want, param, "invalid_value")


def test_a_body_that_does_not_parse_is_invalid_json():
    """Bodies json.loads refuses for more than syntax (FastAPI's 400 "There was an error parsing the body") had
    ``code: null``; a syntax error already had ``invalid_json``."""
    try:
        json.loads("[" * 100_000 + "]" * 100_000)
    except RecursionError as err:
        deep = err
    try:
        b'"\xff"'.decode()
    except UnicodeDecodeError as err:
        not_utf8 = err
    for cause, words in ((deep, "nested too deeply"), (not_utf8, "not UTF-8")):
        message, param, code = app.unparsable_body(cause)
        assert (param, code) == (None, "invalid_json") and words in message, message
    message, param, code = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                                              "input": {}, "ctx": {"error": "Expecting value"}}])
    assert (message, code) == ("request body is not valid JSON: Expecting value", "invalid_json")


def test_request_models_are_strict():
    """The mechanism, named: a new request model that forgets it fails here."""
    models = [P.CompletionRequest, P.ChatCompletionRequest, P.ChatMessage, P.StreamOptions, P.TextPart]
    assert all(m.model_config.get("strict") for m in models)
