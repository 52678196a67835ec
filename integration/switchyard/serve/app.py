"""The HTTP face of the engine (FastAPI): OpenAI's completions, chat, models; health and metrics.

    app = create_app(engine, tokenizer, "my-model", ServeConfig(...), ServeMetrics())

Handlers run on uvicorn's event loop (a thread of rank 0); they tokenize, validate against the model
(context length, vocabulary), hand ``Sequence``s to the engine and wait on an asyncio queue that the
engine's thread fills. A guard in front of every route enforces the body-size limit, the API key (all
routes but /health), and the drain (503 once SIGTERM arrived); every error is OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import re
import time
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.convert_slow_tokenizer import bytes_to_unicode

from switchyard.log import get_logger
from switchyard.serve import protocol as P
from switchyard.serve.config import ServeConfig
from switchyard.serve.engine import (ENGINE_FAILED, NONFINITE_LOGITS, SHUTTING_DOWN, Engine, EngineDraining, Sequence,
                                     SeqOutput)
from switchyard.serve.metrics import CONTENT_TYPE, ServeMetrics
from switchyard.serve.sampling import GENERATION_DEFAULTS, SamplingParams, generation_defaults

log = get_logger(__name__)

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
KNOWN_PATHS = (*GENERATE_PATHS, "/v1/models", "/health", "/metrics")
ROUTES = ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /v1/models/{id}", "GET /health",
          "GET /metrics")
DISCONNECT_POLL_S = 0.25
# a sequence that ended unfinished while its client waits (``SeqOutput.error_code``): the status its request gets
ERROR_STATUS = {ENGINE_FAILED: 500, NONFINITE_LOGITS: 500, SHUTTING_DOWN: 503}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for one raw byte


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(status, message, param, code), status_code=status, headers=headers)


def wrong_route(method: str, path: str, allow: str | None) -> str:
    """A 404 / 405's message: OpenAI's "Invalid URL (METHOD PATH)" and the fix — the method the route takes
    (``allow``, the 405's Allow header), or the routes there are; a path that lacks the ``/v1`` prefix is most often a
    base URL without it (the ``openai`` client appends ``/chat/completions`` to its ``base_url``)."""
    if allow:
        return f"Invalid method for URL ({method} {path}): this route takes {allow} only"
    missing_v1 = f"; did you mean /v1{path}? (a client's base_url ends with /v1)" if f"/v1{path}" in KNOWN_PATHS else ""
    return f"Invalid URL ({method} {path}): this server serves {', '.join(ROUTES)}{missing_v1}"


def validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) of a 400 for a request pydantic refused, from its first error: the field it names
    (a request-level check's ``FieldError`` names its own), the check's message without pydantic's "Value error, ",
    the value sent when pydantic's message does not show it, and what a union field accepts (``_explain``)."""
    errors = [{**e, "loc": _field_loc(e.get("loc", ()))} for e in errors]
    first = _explain(errors) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {cause or ''}".strip(), None, "invalid_json"
    if not loc and first.get("type") != "value_error":  # the body itself: empty, not an object, not JSON
        return ("the request body must be a JSON object sent with 'Content-Type: application/json' "
                f"({first.get('msg', 'invalid body')})", None, "invalid_value")
    kind, where = first.get("type"), ".".join(loc)
    param = getattr(cause, "param", None) or (loc[0] if loc else None)
    if kind == "union":
        return f"{where} {first['msg']}", param, "invalid_value"
    message = str(cause) if kind == "value_error" and isinstance(cause, Exception) else first.get("msg", "invalid value")
    if kind not in ("value_error", "missing") and "input" in first:
        message += f", got {_shown(first['input'])}"
    return f"{where + ': ' if where else ''}{message}", param, "invalid_value"


def _field_loc(loc: Any) -> tuple:
    """An error's location inside the request body (FastAPI's start with "body")."""
    loc = tuple(loc)
    return loc[1:] if loc[:1] == ("body",) else loc


# what a union member's tag in pydantic's error location accepts, in words (singular, plural); lists compose
_WORDS = {"str": ("a string", "strings"), "int": ("an integer", "integers"), "float": ("a number", "numbers"),
          "bool": ("true or false", "booleans"), "token_ids": ("a list of token ids", "lists of token ids"),
          "TextPart": ('a text part {"type": "text", "text": ...}', 'text parts {"type": "text", "text": ...}')}


def _describe(tag: Any) -> tuple[str, str] | None:
    """(singular, plural) words for a union member's tag (``str``, ``list[str]``, ``list[token_ids]`` …), or None
    when ``tag`` is no such tag (a field name, a list index)."""
    if not isinstance(tag, str):
        return None
    if tag in _WORDS:
        return _WORDS[tag]
    if (inner := re.fullmatch(r"list\[(.+)\]", tag)) is not None:
        items = (_describe(inner[1]) or (inner[1], inner[1]))[1]
        return f"a list of {items}", f"lists of {items}"
    if re.fullmatch(r"dict\[.*\]", tag):
        return "an object", "objects"
    return None


def _explain(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report. A union field's value that fits no member gets one error per member, each located
    under the member's tag ("prompt.str: Input should be a valid string" read as if only strings were taken). A
    value shaped like exactly one member (its errors lie inside the value: a list whose items are wrong) gets
    that member's first error without the tag; any other gets one error saying what the field accepts."""
    first = errors[0]
    loc = first["loc"]
    for i, part in enumerate(loc):
        if _describe(part) is None:
            continue
        group = [e for e in errors if e["loc"][:i] == loc[:i] and len(e["loc"]) > i and _describe(e["loc"][i])]
        tags = list(dict.fromkeys(e["loc"][i] for e in group))
        if len(tags) < 2:
            continue
        inside = list(dict.fromkeys(e["loc"][i] for e in group if len(e["loc"]) > i + 1))
        if len(inside) == 1:
            return _explain([{**e, "loc": e["loc"][:i] + e["loc"][i + 1:]} for e in group if e["loc"][i] == inside[0]])
        words = [_describe(tag)[0] for tag in tags]  # type: ignore[index]
        accepted = ", ".join(words[:-1]) + f" or {words[-1]}"
        sent = next((e["input"] for e in group if len(e["loc"]) == i + 1 and "input" in e), None)
        return {"loc": loc[:i], "type": "union",
                "msg": f"must be {accepted}" + (f", got {_shown(sent)}" if sent is not None else "")}
    return first


def _shown(value: Any, limit: int = 80) -> str:
    """A value as the client wrote it (JSON), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def unparsable_body(cause: BaseException | None) -> tuple[str, None, str]:
    """(message, param, code) of a 400 for a body FastAPI could not parse although it is not a JSON syntax error
    (that one is ``json_invalid``, in ``validation_error``): bytes that are not UTF-8, JSON nested too deeply for
    the parser. Both are ``invalid_json``, as a syntax error is."""
    if isinstance(cause, RecursionError):
        why = "it is nested too deeply to parse"
    elif isinstance(cause, UnicodeDecodeError):
        why = f"it is not UTF-8 ({cause})"
    else:
        why = f"{type(cause).__name__}: {cause}" if cause is not None else "it could not be parsed"
    return f"request body is not valid JSON: {why}; send a UTF-8 JSON object", None, "invalid_json"


def _tokenize(tokenizer: Any, text: str, param: str, **kwargs: Any) -> list[int]:
    """Token ids of user text. Valid JSON can still hold text the tokenizer refuses (a lone UTF-16 surrogate
    such as ``"\\ud800"``): that is the client's 400, not a 500."""
    try:
        return tokenizer(text, **kwargs).input_ids
    except Exception as err:  # noqa: BLE001 - tokenizers raise TypeError, slow ones UnicodeEncodeError, ...
        raise APIError(400, f"the text in `{param}` could not be tokenized: is it valid Unicode? (a lone surrogate "
                       "such as \\ud800 is not); send well-formed text", param=param, code="invalid_value") from err


def _endpoint(path: str) -> str:
    """The metrics label of a request path: a known route (``GET /v1/models/{id}`` as that template), else other."""
    if path in KNOWN_PATHS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Outermost ASGI wrapper: API key (401), body-size limit (413), drain (503), request metrics.

    A body without a Content-Length is counted as it arrives; past the limit the read fails, and
    whatever error the framework then writes is replaced by the 413. Any other non-JSON error the
    framework writes (its own 404/405 pages …) is rewritten into OpenAI's error body as well."""

    def __init__(self, app: Any, engine: Engine, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.app, self.engine, self.config, self.metrics = app, engine, config, metrics
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limit = scope.get("path", ""), self.config.max_body_bytes
        state = {"code": 500, "started": False, "replaced": False, "too_large": False, "seen": 0}

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    state["too_large"] = True
                    raise _BodyTooLarge()
            return message

        async def send_checked(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["code"] = code = 413 if state["too_large"] else message["status"]
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if state["too_large"] or (code >= 400 and not content_type.startswith(b"application/json")):
                    state["replaced"] = True
                    await self._error_for(code)(scope, receive, send)
                    return
            if not state["replaced"]:
                await send(message)

        try:
            early = self._reject(scope, path)
            await (early or self.app)(scope, receive_limited, send_checked)
        except _BodyTooLarge:
            if not state["started"]:
                state["code"] = 413
                await self._error_for(413)(scope, receive, send)
        finally:
            self.metrics.request(_endpoint(path), state["code"])

    def _error_for(self, code: int) -> JSONResponse:
        if code == 413:
            return _error(413, f"request body is larger than the limit of {self.config.max_body_bytes} bytes",
                          code="request_too_large")
        return _error(code, HTTPStatus(code).phrase)

    def _authorized(self, header: bytes) -> bool:
        """``Bearer <key>``: the scheme in any case and one or more spaces after it (RFC 7235's ``auth-scheme 1*SP
        token68``; clients send ``bearer``), the key exactly, compared in constant time."""
        assert self._key is not None
        scheme, _, key = header.partition(b" ")
        return hmac.compare_digest(key.lstrip(b" "), self._key) and scheme.lower() == b"bearer"

    def _reject(self, scope: dict, path: str) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        if self._key is not None and path != "/health":
            if not self._authorized(headers.get(b"authorization", b"")):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return self._error_for(413)
        if self.engine.draining and path in GENERATE_PATHS:
            return _error(503, self.engine.refusal(), code="shutting_down")
        return None


class _SSE(StreamingResponse):
    """Server-sent events whose generator is closed (and its sequences aborted) however the stream ends."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _token_ids_of(wanted: bool):
    """A streamed chunk's new token ids (the ``return_token_ids`` extension), or None when not asked for."""
    return lambda out: ([out.token_id] if out.token_id is not None else []) if wanted else None


async def _event_stream(gen: "_Generation", request: Request, req: Any, chunk: Callable[..., dict],
                        choice: Callable[[Any], Any], first: list | None = None) -> AsyncIterator[str]:
    """The SSE body shared by both endpoints: an optional opening chunk, one chunk per event that carries
    text, a finish reason or token ids, the usage chunk when asked for, then ``[DONE]``; the generation is
    aborted however the stream ends (a client disconnect included). If a sequence ends with an error (the engine
    failed, the server stopped it: ``_Generation.events``), the status line (200) is long sent: the last event is
    OpenAI's error body instead, with no ``[DONE]`` after it, so no client reads the stream as complete (the
    ``openai`` client raises ``APIError`` with the message)."""
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def sse_chunk(choices: list, usage: Any = None) -> str:
        body = chunk(choices, usage)
        if not with_usage:  # OpenAI's chunks carry "usage": null only when the last one is to hold the usage
            body.pop("usage", None)
        return _sse(body)

    try:
        if first is not None:
            yield sse_chunk(first)
        try:
            async for out in gen.events(request):
                if out.text or out.finish_reason or req.return_token_ids or out.logprob is not None:
                    yield sse_chunk([choice(out)])
        except APIError as err:
            yield _sse(P.error_body(err.status, err.message, err.param, err.code))
            return
        if with_usage:
            yield sse_chunk([], gen.usage())
        yield _sse("[DONE]")
    finally:
        gen.abort()


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n"


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's pieces are GPT-2 byte-level strings (its decoder is ``ByteLevel``, maybe inside a
    ``Sequence``): GPT-2, Llama 3, Qwen and the tiny tokenizer."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    config = json.loads(decoder.__getstate__())
    return any(d.get("type") == "ByteLevel" for d in [config, *config.get("decoders", [])])


class _Logprobs:
    """OpenAI's two logprobs shapes from the engine's ``(token id, (logprob, top (id, logprob) pairs))``.

    A token's text is what it adds after a plain anchor (the ids of "a"): a SentencePiece decoder strips the
    leading space of the first token it decodes, so decoded alone "▁Paris" read "Paris" while the completion's
    text (decoded after the prompt) has " Paris", and the tokens and ``text_offset`` would not line up with
    it. A byte-level token may be part of a character: then its text has U+FFFD; ``bytes`` are the token's
    raw bytes, so concatenating them rebuilds split characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._anchor = self._anchor_ids(tokenizer)
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()} if _byte_level(tokenizer) else None
        self._added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # special tokens: their text is theirs

    @staticmethod
    def _anchor_ids(tokenizer: Any) -> list[int]:
        """Token ids decoding to "a", or [] (then a token's text is its own decode)."""
        try:
            ids = tokenizer.encode("a", add_special_tokens=False)
            ok = bool(ids) and tokenizer.decode(ids, clean_up_tokenization_spaces=False) == "a"
        except Exception:  # noqa: BLE001 - a tokenizer without encode/decode of text: no anchor
            return []
        return ids if ok else []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def text(self, token_id: int) -> str:
        if token_id not in self._text:
            after = self._decode([*self._anchor, token_id]) if self._anchor else ""
            self._text[token_id] = after[1:] if after.startswith("a") else self._decode([token_id])
        return self._text[token_id]

    def raw_bytes(self, token_id: int) -> list[int]:
        if token_id not in self._bytes:
            self._bytes[token_id] = self._read_bytes(token_id)
        return self._bytes[token_id]

    def _read_bytes(self, token_id: int) -> list[int]:
        """Byte-level piece → GPT-2's byte table; SentencePiece ``<0xNN>`` → that byte; else the text's UTF-8."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)  # None: a padding id past the tokenizer's vocabulary
        if piece is not None and token_id not in self._added:
            if self._byte_of is not None and set(piece) <= self._byte_of.keys():
                return [self._byte_of[c] for c in piece]
            if self._byte_of is None and (fallback := _BYTE_FALLBACK.fullmatch(piece)):
                return [int(fallback[1], 16)]
        return list(self.text(token_id).encode("utf-8"))

    def completion(self, steps: list[tuple[int, Any]], offset: int = 0) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for token_id, (logprob, top) in steps:
            out.tokens.append(self.text(token_id))
            out.token_logprobs.append(logprob)
            best: dict[str, float] = {}
            for t, lp in top:  # best first; tokens decoding to the same text keep the best one's value
                best.setdefault(self.text(t), lp)
            best.setdefault(out.tokens[-1], logprob)  # OpenAI's always hold the sampled token: up to logprobs + 1
            out.top_logprobs.append(best)
            out.text_offset.append(offset)
            offset += len(out.tokens[-1])
        return out

    def chat(self, steps: list[tuple[int, Any]]) -> P.ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": self.text(token_id), "logprob": logprob, "bytes": self.raw_bytes(token_id)}

        return P.ChatLogprobs(content=[
            P.TokenLogprob(**entry(token_id, logprob), top_logprobs=[P.TopLogprob(**entry(t, lp)) for t, lp in top])
            for token_id, (logprob, top) in steps])


class _Generation:
    """The sequences of one request and the queue their outputs arrive on."""

    def __init__(self, engine: Engine, prompts: list[list[int]], n: int, params: SamplingParams) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[SeqOutput] = asyncio.Queue()
        self.seqs = [Sequence(prompt, params, sink=self._sink, index=i * n + j)
                     for i, prompt in enumerate(prompts) for j in range(n)]
        self.prompt_tokens = sum(len(p) for p in prompts)

    def _sink(self, out: SeqOutput) -> None:  # the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            pass

    def submit(self) -> None:
        try:
            self.engine.submit(self.seqs)
        except EngineDraining as err:
            raise APIError(503, str(err), code="shutting_down") from err
        except ValueError as err:
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from err

    async def events(self, request: Request) -> AsyncIterator[SeqOutput]:
        """Outputs until every sequence finished; aborts them all if the client goes away. A sequence that ended
        unfinished with an error is raised as OpenAI's error (``ERROR_STATUS``): the engine failed (500
        ``engine_failed``: the server is going down), the drain timed out or was cut short (503 ``shutting_down``),
        its logits broke (500 ``nonfinite_logits``); never a 200 with finish reason "abort"."""
        left, checked = len(self.seqs), time.monotonic()
        while left:
            try:  # an output already queued costs no task and no timer (wait_for makes both)
                out = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    out = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    out = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.abort()
                    return
            if out is not None and out.error is not None:
                code = out.error_code or ENGINE_FAILED
                raise APIError(ERROR_STATUS.get(code, 500), out.error, code=code)
            if out is not None:
                left -= out.finish_reason is not None
                yield out

    def abort(self) -> None:
        for seq in self.seqs:
            if not seq.finished:
                self.engine.abort(seq)

    def usage(self) -> P.Usage:
        completion = sum(len(s.output_ids) for s in self.seqs)
        return P.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                       total_tokens=self.prompt_tokens + completion)


def _named_parameters(function: Any) -> set[str]:
    """``function``'s own parameter names (not its ``**kwargs``): for apply_chat_template, what a template variable
    in ``chat_template_kwargs`` must not be (``tokenize``, ``return_dict`` … would change what it returns)."""
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return {name for name, p in inspect.signature(function).parameters.items() if p.kind not in kinds}


def create_app(engine: Engine, tokenizer: Any, model_name: str, config: ServeConfig,
               metrics: ServeMetrics) -> "Guard":
    """The ASGI app for uvicorn: the FastAPI routes behind the ``Guard`` (``.app`` is the FastAPI object)."""
    app = FastAPI(title="switchyard", docs_url=None, redoc_url=None, openapi_url=None)
    created = P.now()
    vocab_size = int(getattr(engine.runner.model.config, "vocab_size", 0) or len(tokenizer))
    max_len = engine.max_model_len
    logprobs_of = _Logprobs(tokenizer)
    template_parameters = _named_parameters(tokenizer.apply_chat_template) | {"messages"}  # the template's own
    sampling_defaults = generation_defaults(engine.runner.model)
    if sampling_defaults:
        log.info("sampling defaults from the model's generation_config.json for requests that leave them out: %s",
                 sampling_defaults, ranks=[0])

    # -- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, *validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400:  # FastAPI's only 400: a body json.loads refused for more than its syntax
            return _error(400, *unparsable_body(err.__cause__))
        headers = dict(err.headers or {})  # a 405's Allow header, which RFC 9110 requires
        if err.status_code in (404, 405):  # the router's: no route, or not with this method
            return _error(err.status_code, wrong_route(request.method, request.url.path, headers.get("Allow")),
                          headers=headers)
        return _error(err.status_code, str(err.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.error("internal error on %s: %r", request.url.path, err)
        return _error(500, "internal server error")

    # -- helpers --------------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check_ids(ids: list[int]) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param="prompt",
                           code="invalid_value")
        return ids

    def budget(prompts: list[list[int]], max_tokens: int | None, param: str, tokens_param: str = "max_tokens",
               defaulted: bool = False) -> int:
        """Tokens each sequence may generate: ``max_tokens``, or (None) the rest of the context. A prompt that
        leaves no room is the fault of ``param`` (the prompt or messages), whatever max_tokens says; else the
        error names ``tokens_param`` (the field the client sent) and the most it may be."""
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            raise APIError(400, f"this model's context is {max_len} tokens and the prompt has {longest}, which "
                           f"leaves no room to generate; shorten {param}", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return max_len - longest
        if longest + max_tokens > max_len:
            raise APIError(400, f"this model's context is {max_len} tokens; the prompt has {longest} and "
                           f"{tokens_param}{' (not sent: the server default_max_tokens)' if defaulted else ''} asks "
                           f"for {max_tokens} more; set {tokens_param} to at most {max_len - longest}",
                           param=tokens_param, code="context_length_exceeded")
        return max_tokens

    def params_of(req: P._SamplingRequest, max_tokens: int, limit_n: int, logprobs: int | None) -> SamplingParams:
        if req.n > limit_n:
            raise APIError(400, f"n={req.n} is larger than this server's limit of {limit_n}", param="n",
                           code="invalid_value")
        bad = [t for t, _ in req.logit_bias_ids if t >= vocab_size]
        if bad:
            raise APIError(400, f"logit_bias names token ids {bad[:5]} outside the vocabulary [0, {vocab_size})",
                           param="logit_bias", code="invalid_value")
        sampling = {name: getattr(req, name) if name in req.model_fields_set else sampling_defaults.get(
            name, getattr(req, name)) for name in GENERATION_DEFAULTS}  # sent (not null) wins, then the model's
        return SamplingParams(max_tokens=max_tokens, **sampling, seed=req.seed,
                              stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos, logprobs=logprobs,
                              logit_bias=req.logit_bias_ids, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty)

    async def collect(gen: _Generation, request: Request) -> tuple[list[str], list[str | None], list[list[int]],
                                                                   list[list[tuple[int, Any]]]]:
        texts = [""] * len(gen.seqs)
        reasons: list[str | None] = [None] * len(gen.seqs)
        steps: list[list[tuple[int, Any]]] = [[] for _ in gen.seqs]  # (token id, logprob) per choice
        async for out in gen.events(request):
            texts[out.index] += out.text
            reasons[out.index] = out.finish_reason or reasons[out.index]
            if out.logprob is not None and out.token_id is not None:
                steps[out.index].append((out.token_id, out.logprob))
        return texts, reasons, [s.output_ids for s in gen.seqs], steps

    # -- routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    card = P.ModelCard(id=model_name, created=created, max_model_len=max_len)

    @app.get("/v1/models")
    async def models() -> dict:
        return P.ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model_id:path}")  # a served name may hold a '/' ("org/model")
    async def model_card(model_id: str) -> dict:
        check_model(model_id)
        return card.model_dump()

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        raw = req.prompt  # one prompt (text or token ids) or a list of them
        sources = [raw] if isinstance(raw, str) or all(isinstance(x, int) for x in raw) else list(raw)
        if len(sources) > config.max_prompts:
            raise APIError(400, f"{len(sources)} prompts in one request; the limit is {config.max_prompts}",
                           param="prompt", code="invalid_value")
        prompts = [check_ids(_tokenize(tokenizer, s, "prompt") if isinstance(s, str) else list(s))  # type: ignore
                   for s in sources]
        echoes = [""] * len(prompts)  # echo: each choice's text starts with its prompt's (as sent, or decoded)
        if req.echo:
            echoes = [s if isinstance(s, str) else
                      tokenizer.decode(p, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                      for s, p in zip(sources, prompts)]
        max_tokens = req.max_tokens or config.default_max_tokens
        params = params_of(req, budget(prompts, max_tokens, "prompt", defaulted=req.max_tokens is None), config.max_n,
                           req.logprobs)
        gen = _Generation(engine, prompts, req.n, params)
        gen.submit()
        rid, model, created = P.new_id("cmpl"), model_name, P.now()  # every chunk carries the same id and created
        ids_of = _token_ids_of(req.return_token_ids)

        if req.stream:
            def chunk(choices: list, usage: Any = None) -> dict:
                return P.dump(P.CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage))

            offsets = [0] * len(gen.seqs)  # text_offset runs on across a choice's chunks

            def choice(out: Any) -> Any:
                logprobs = None
                if out.logprob is not None and out.token_id is not None:
                    logprobs = logprobs_of.completion([(out.token_id, out.logprob)], offsets[out.index])
                    offsets[out.index] += len(logprobs.tokens[0])
                return P.CompletionChoice(index=out.index, text=out.text, finish_reason=out.finish_reason,
                                          token_ids=ids_of(out), logprobs=logprobs)

            first = ([P.CompletionChoice(index=i, text=echoes[i // req.n], finish_reason=None)
                      for i in range(len(gen.seqs))] if req.echo else None)
            return _SSE(_event_stream(gen, request, req, chunk, choice, first=first))
        try:
            texts, reasons, ids, steps = await collect(gen, request)
        finally:
            gen.abort()
        choices = [P.CompletionChoice(index=i, text=echoes[i // req.n] + t, finish_reason=r,
                                      token_ids=ids[i] if req.return_token_ids else None,
                                      logprobs=logprobs_of.completion(steps[i]) if req.logprobs is not None else None)
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return P.dump(P.CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=gen.usage(),
                                           prompt_token_ids=prompts if req.return_token_ids else None))

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                           code="chat_template_missing")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        template_kwargs = req.chat_template_kwargs or {}
        taken = sorted(set(template_kwargs) & template_parameters)
        if taken:
            raise APIError(400, f"chat_template_kwargs may not set {taken}: they are apply_chat_template's own "
                           "parameters, not template variables; leave them out (add_generation_prompt and "
                           "continue_final_message are request fields of their own)", param="chat_template_kwargs",
                           code="invalid_value")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                 continue_final_message=req.continue_final_message, tokenize=False,
                                                 **template_kwargs)
        except Exception as err:  # noqa: BLE001 - a template may reject a role order, etc.
            raise APIError(400, f"the chat template rejected these messages: {err}", param="messages",
                           code="invalid_value") from err
        prompt = check_ids(_tokenize(tokenizer, text, "messages", add_special_tokens=False))
        tokens_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        params = params_of(req, budget([prompt], req.max_new_tokens, "messages", tokens_param), config.max_n,
                           req.logprobs_wanted)
        gen = _Generation(engine, [prompt], req.n, params)
        gen.submit()
        rid, model, created = P.new_id("chatcmpl"), model_name, P.now()  # every chunk: the same id and created
        ids_of = _token_ids_of(req.return_token_ids)

        if req.stream:
            def chunk(choices: list, usage: Any = None) -> dict:
                return P.dump(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

            def choice(out: Any) -> Any:
                delta = P.DeltaMessage(content=out.text) if out.text else P.DeltaMessage()
                logprobs = (logprobs_of.chat([(out.token_id, out.logprob)])
                            if out.logprob is not None and out.token_id is not None else None)
                return P.ChatChunkChoice(index=out.index, delta=delta, finish_reason=out.finish_reason,
                                         token_ids=ids_of(out), logprobs=logprobs)

            first = [P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                     for i in range(len(gen.seqs))]
            return _SSE(_event_stream(gen, request, req, chunk, choice, first=first))
        try:
            texts, reasons, ids, steps = await collect(gen, request)
        finally:
            gen.abort()
        choices = [P.ChatChoice(index=i, message=P.ChatMessageOut(content=t), finish_reason=r,
                                token_ids=ids[i] if req.return_token_ids else None,
                                logprobs=logprobs_of.chat(steps[i]) if req.logprobs else None)
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return P.dump(P.ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=gen.usage(),
                                               prompt_token_ids=prompt if req.return_token_ids else None))

    return Guard(app, engine, config, metrics)
