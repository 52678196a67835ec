"""Chat data: the ids of a conversation rendered by the tokenizer's own template, and labels on its assistant turns.

The responses' characters are found in the render of the whole conversation (what ``apply_chat_template`` and the
server tokenize), in one of two ways:

- **prefixes** (exact for any template whose renders of growing prefixes are string prefixes of each other): the
  conversation up to each assistant turn rendered with the generation prompt, then through that turn; the turn is
  what the second adds to the first.
- **located** (templates that render an assistant turn differently once later turns follow, e.g. Qwen3's hybrid
  thinking, which writes an empty ``<think>`` block only in the turns after the last user message, and reasoning
  templates that drop earlier turns' ``<think>`` text): the context before each assistant turn must still render
  as in the whole conversation (but for an eos some templates, Phi-3's, write after the last message only); the turn
  runs from the generation prompt's header (what of it the render holds: DeepSeek-R1's prompt opens ``<think>``,
  its history does not) to its content's end and the end-of-turn text the template writes after it. Content the
  render does not hold (transformed by the template) is an error, never a guessed mask. Checked against
  transformers' ``{% generation %}`` mask on 19 public templates (Qwen3, Qwen2.5, Llama-2/3, Mistral, Gemma-2/3,
  Phi-3.5/4, OLMo-2, SmolLM2/3, DeepSeek-R1/V3, gpt-oss), where the two differ only in whether the newline after
  an end-of-turn token is trained (here it is, as the ChatML rule in docs/finetune.md says).
"""

from __future__ import annotations

from typing import Any, Callable

IGNORE_INDEX = -100
Render = Callable[[list[dict[str, Any]], bool], str]
NOT_DERIVABLE = ("the tokenizer's chat template renders {what}, so the response mask cannot be derived; use "
                 "format='prompt_response' or a template that renders each turn as it appears in the whole conversation")


def chat_ids_labels(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns.

    The ids are those of the whole rendered conversation: tokenizing the pieces apart would differ where a token
    spans a boundary (a response starting with a newline). A token overlapping a response is trained, as in
    transformers' ``return_assistant_tokens_mask``. An assistant message that opens the conversation is context,
    not trained: there is no prompt to render its header from (transformers refuses an empty conversation).
    """
    messages = _checked(messages)
    render = _renderer(tokenizer, messages)
    text = render(messages, False)
    spans = _prefix_spans(messages, render, text)
    if spans is None:
        spans = _located_spans(messages, render, text, getattr(tokenizer, "eos_token", None))
    if not getattr(tokenizer, "is_fast", False):  # no offsets: tokenize the pieces between the boundaries
        ids: list[int] = []
        labels: list[int] = []
        bounds = [0, *(b for span in spans for b in span), len(text)]
        for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
            seg = tokenizer(text[start:end], add_special_tokens=False)["input_ids"] if end > start else []
            ids += seg
            labels += seg if k % 2 else [IGNORE_INDEX] * len(seg)
        return ids, labels
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    trained = [any(end > lo and start < hi for lo, hi in spans) for start, end in encoded["offset_mapping"]]
    return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]


def _checked(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        got = "a string (JSON text? store the messages as a list of objects)" if isinstance(messages, str) else (
            type(messages).__name__)
        raise ValueError(f"chat data: expected a list of {{role, content}} messages, got {got}")
    messages = _drop_none(messages)
    roleless = next((m for m in messages if "role" not in m), None)
    if roleless is not None:  # the template's own error would be a bare jinja UndefinedError
        raise ValueError(
            f"chat data: a message has keys {sorted(roleless)}, no 'role'; messages must be {{role, content}} with "
            f"roles such as system/user/assistant (ShareGPT's {{from: human/gpt, value}}: convert them first)"
        )
    return messages


def _drop_none(value: Any) -> Any:
    """``value`` without ``None`` entries in its dicts, recursively. Arrow stores a column of messages as
    structs with the union of their keys, so a message read back from parquet (or a hub dataset) carries
    every key another one had, as ``None``, down to tool-call arguments (which templates render with
    ``tojson``); transformers drops only a message's own ``None`` keys."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _renderer(tokenizer: Any, messages: list[dict[str, Any]]) -> Render:
    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        from jinja2 import TemplateError  # what apply_chat_template needs anyway

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except (TemplateError, TypeError) as e:  # a bare jinja error from deep inside datasets.map otherwise
            shape = [{k: type(v).__name__ for k, v in m.items()} for m in messages[:4]]
            raise ValueError(f"the tokenizer's chat template failed on a conversation ({type(e).__name__}: {e}); "
                             f"its first messages' keys and value types: {shape}{' …' if len(messages) > 4 else ''}; "
                             f"fix the data or the template") from e

    return render


def _assistant_turns(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of the trained turns: an opening assistant turn answers nothing, it is context."""
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i > 0]


def _prefix_spans(messages: list[dict[str, Any]], render: Render, text: str) -> list[tuple[int, int]] | None:
    """Each response's character range in ``text`` from prefix renders; ``None`` if they are not string prefixes."""
    spans: list[tuple[int, int]] = []
    done = ""
    for i in _assistant_turns(messages):
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return None
        spans.append((len(prompt), len(full)))
        done = full
    return spans if text.startswith(done) else None


def _located_spans(messages: list[dict[str, Any]], render: Render, text: str,
                   eos: str | None) -> list[tuple[int, int]]:
    """Each response's character range in ``text``, found between the context that precedes it (which must render
    as in ``text``) and the next response's context: from the generation prompt's header, through the content, to
    the end-of-turn text the template writes after it."""
    turns = _assistant_turns(messages)
    prompts = [render(messages[:i], True) for i in turns]
    contexts = [_context(render(messages[:i], False), eos, text) for i in turns]
    spans: list[tuple[int, int]] = []
    for k, (i, context, prompt) in enumerate(zip(turns, contexts, prompts)):
        if not text.startswith(context) or (spans and len(context) < spans[-1][1]):
            raise ValueError(NOT_DERIVABLE.format(
                what=f"the conversation before message {i} differently once later turns follow"))
        limit = len(contexts[k + 1]) if k + 1 < len(contexts) else len(text)
        header = full_header = prompt[len(context):] if prompt.startswith(context) else ""
        while header and not text.startswith(header, len(context), limit):  # the part history holds: R1's
            header = header[:-1]  # prompt opens "<think>\n", its earlier turns do not
        start = len(context) + len(header)
        own = render(messages[: i + 1], False)  # this turn last, as the template writes it
        turn = own[len(prompt):] if own.startswith(prompt) else ""
        content, at = _find_content(messages[i].get("content"), turn, text[:limit], start)
        if at < 0 and start > len(context):  # a partly matched header may have run into the content
            content, at = _find_content(messages[i].get("content"), turn, text[:limit], len(context))
            start = min(start, at) if at >= 0 else start
        if at < 0:
            raise ValueError(NOT_DERIVABLE.format(
                what=f"assistant message {i}'s content in a form not found in the conversation's render"))
        closing = own[own.rfind(content) + len(content):] if content in own else ""  # its end-of-turn text
        end = at + len(content)
        if not text.startswith(closing, end, limit):  # this turn written last closes otherwise (Phi-3's eos,
            before = render(messages[: i + 1], True)  # gpt-oss' <|return|>): as history, a prompt following
            closing = before[before.rfind(content) + len(content):] if content in before else closing
            closing = closing.removesuffix(full_header) if full_header else closing
        while closing and not text.startswith(closing, end, limit):
            closing = closing[:-1]
        spans.append((start, end + len(closing)))
    return spans


def _context(context: str, eos: str | None, text: str) -> str:
    """The render before a turn as the whole conversation holds it: without the eos a template writes after a
    conversation's last message only (Phi-3: ``{% else %}{{ eos_token }}`` when no generation prompt follows)."""
    if eos and not text.startswith(context) and context.endswith(eos) and text.startswith(context[: -len(eos)]):
        return context[: -len(eos)]
    return context


def _find_content(content: Any, turn: str, text: str, start: int) -> tuple[str, int]:
    """``(the turn's text as rendered, where it starts in text)`` at or after ``start``, ``(…, -1)`` if absent. Tried:
    the content as written, stripped (templates trim), without a ``<think>…</think>`` part (reasoning templates drop
    earlier turns' reasoning); then the whole turn as the template writes it last (``turn``: an empty content with
    tool calls), with and without its reasoning block."""
    forms = [content, content.strip(), _after_think(content)] if isinstance(content, str) else []
    forms += [turn, _after_think(turn)]
    for form in forms:
        if form and (at := text.find(form, start)) >= 0:
            return form, at
    return "", -1


def _after_think(text: str) -> str:
    return text.split("</think>")[-1].strip() if "</think>" in text else ""
