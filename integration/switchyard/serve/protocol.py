"""OpenAI-shaped request and response bodies (pydantic), and the error body every 4xx/5xx carries.

Requests validate types and ranges here (a violation is a 400 with ``param`` naming the field); types are strict,
as JSON writes them: ``"5"`` is not an integer, ``true`` is not 1, ``"true"`` is not a boolean (only an integer
where a number is expected is taken, ``"temperature": 1``). Checks that need the model (context length, token ids
in the vocabulary) live in the app.
Extensions beyond OpenAI's API, named as vLLM names them: ``ignore_eos`` and ``return_token_ids``
(responses then carry ``prompt_token_ids`` and per-choice ``token_ids``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Tag, field_validator, model_validator

from switchyard.serve.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# -- errors ---------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's body: its ``type`` is ``invalid_request_error`` for every 4xx (a wrong API key and an unknown model
    too; ``code`` tells them apart: ``invalid_api_key``, ``model_not_found``) and ``server_error`` for a 5xx."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code)).model_dump()


class FieldError(ValueError):
    """A request-level check's error naming the field to blame: the 400's ``param``, as OpenAI's errors name it
    (a model validator's own errors carry no field location)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# -- requests -------------------------------------------------------------------------------------------
class _Request(BaseModel):
    """A request body part. Unknown fields are ignored (as vLLM does); ``null`` for a field with a default
    means that default (OpenAI and vLLM accept ``"temperature": null``), while a required field stays required.
    Strict: pydantic's lax mode read ``"max_tokens": true`` as 1, ``"stream": "yes"`` as true and a prompt of
    booleans as token ids; a value of the wrong JSON type is a 400 naming the field."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required() or fields[key].default is None}


class StreamOptions(_Request):
    include_usage: bool = False


# Token-id prompts, tagged so that a prompt of the wrong shape is explained in words (``app.validation_error``
# reads the tags of a union's failed members): "a list of token ids", not "list[int]".
TokenIds = Annotated[list[int], Tag("token_ids")]
PromptIds = Annotated[list[list[int]], Tag("list[token_ids]")]


# Settings this server does not implement, with the values that mean "off" (vLLM's sampling and structured-output
# extensions, OpenAI's audio output): any other value is a 400 naming the field, not an unknown field dropped
# without a word, so a client tuned for vLLM (``extra_body={"min_p": 0.1}``) learns that it is not honoured.
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "min_p": (0,), "repetition_penalty": (1,), "min_tokens": (0,), "stop_token_ids": ([],),
    "include_stop_str_in_output": (False,), "use_beam_search": (False,), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "structured_outputs": (), "audio": (), "modalities": (["text"],),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "prompt_logprobs": (),
    "truncate_prompt_tokens": (), "allowed_token_ids": ([],), "bad_words": ([],)}
# vLLM's chat-only extensions this server does not take, which change the rendered prompt or the reply (a request's
# own template, RAG documents, chat echo): ignored, the server would answer another prompt
CHAT_UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    **UNSUPPORTED_SETTINGS, "chat_template": (), "documents": (), "echo": (False,)}


def _same(value: Any, off: Any) -> bool:
    """Equal and of the same JSON type: ``"top_k": false`` is not the "off" 0, nor ``"use_beam_search": 0`` false."""
    return value == off and isinstance(value, bool) == isinstance(off, bool)


class _SamplingRequest(_Request):
    """Fields both endpoints share; unsupported ones fail."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # vLLM's extension: the k most likely tokens only; -1 or 0 is off
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}, as OpenAI's
    ignore_eos: bool = False
    return_token_ids: bool = False

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_SETTINGS  # the endpoint's registry

    @model_validator(mode="before")
    @classmethod
    def _unsupported_settings(cls, data: Any) -> Any:
        for name, off in cls.unsupported.items():
            value = data.get(name) if isinstance(data, dict) else None
            if value is not None and not any(_same(value, o) for o in off):
                raise FieldError(name, f"{name}={value!r} is not supported by this server; leave {name} out")
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.strip().isdecimal():  # int() takes it (isdigit also passes "²", which int() refuses)
                raise ValueError(f"keys must be token ids (strings of digits such as \"50256\"), got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} is {bias}; it must be in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}]")
        return value

    @property
    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), float(bias)) for key, bias in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream=true (a response that is "
                             "not streamed carries its usage anyway)")  # OpenAI's and vLLM's 400
        return self


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | TokenIds | PromptIds
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token (OpenAI allows 5)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self) -> "CompletionRequest":
        for name, unsupported in (("best_of", (self.best_of or 1) > 1), ("suffix", self.suffix)):
            if unsupported:
                raise FieldError(name, "best_of > 1 and suffix are not supported")
        if self.echo and self.logprobs is not None:
            raise FieldError("echo", "echo with logprobs needs the prompt's log-probabilities, which this server does "
                             "not compute; drop logprobs (echo alone returns the prompt's text) or echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise FieldError("prompt", "prompt must not be an empty list")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """Name the part this server cannot read (an image, audio …) instead of pydantic's union errors."""
        for part in value if isinstance(value, list) else []:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content part type {kind!r} is not supported (the model reads text only): send "
                                 "the content as a string or as [{'type': 'text', 'text': ...}] parts")
        return value

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        """OpenAI refuses a message without content (absent, null or []; "" is content); only an assistant message
        that carries tool calls may omit it, and this server takes no tool calls."""
        if self.content is None or self.content == []:
            sent = "[]" if self.content == [] else "null" if "content" in self.model_fields_set else "no content field"
            extra = " (only an assistant message with tool_calls may omit it, and tool calls are not supported)" \
                if self.role == "assistant" else ""
            raise ValueError(f"a message with role {self.role!r} needs content{extra}, got {sent}: send a string "
                             "(\"\" is allowed) or a non-empty list of text parts")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = CHAT_UNSUPPORTED_SETTINGS

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None  # the deprecated form of tools
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's chat-template extensions, passed to transformers' apply_chat_template as it takes them
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # prefill: the reply continues the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. Qwen3's {"enable_thinking": false}

    @model_validator(mode="after")
    def _chat_template_settings(self) -> "ChatCompletionRequest":
        """What apply_chat_template would refuse deep inside, said as the request's mistake."""
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "continue_final_message continues the last message instead of "
                             "opening a new assistant turn, so it cannot go with add_generation_prompt: true (the "
                             "default); send add_generation_prompt: false with it")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise FieldError("continue_final_message", f"continue_final_message continues the last message, which "
                             f"here has role {self.messages[-1].role!r}; end messages with the assistant text to "
                             "continue")
        return self

    @model_validator(mode="after")
    def _chat_unsupported(self) -> "ChatCompletionRequest":
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise FieldError(name, "tools (and functions) are not supported: leave them out")
        for name in ("tool_choice", "function_call"):  # without tools only "none" (or "auto") can be honoured
            if getattr(self, name) not in (None, "none", "auto"):
                raise FieldError(name, f"{name}={getattr(self, name)!r} needs tools, which are not supported; "
                                 f"leave {name} out")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise FieldError("response_format", "only response_format {'type': 'text'} is supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        """Top alternatives per token for the engine (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[list[int]] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None  # OpenAI's chunks carry it as the responses do


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "switchyard"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_EXTENSIONS = ("token_ids", "prompt_token_ids")


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready body with OpenAI's nulls kept but unrequested extension fields left out."""
    data = model.model_dump(mode="json")
    for part in [data, *data.get("choices", [])]:
        for key in _EXTENSIONS:
            if key in part and part[key] is None:
                del part[key]
        delta = part.get("delta")
        if isinstance(delta, dict):  # chunks carry only what changed: {"content": "…"}
            part["delta"] = {k: v for k, v in delta.items() if v is not None}
    return data
