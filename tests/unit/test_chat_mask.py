"""Chat labels under templates that are not prefix-stable (Qwen3's hybrid thinking, reasoning dropped from history).

Oracle: transformers' own ``return_assistant_tokens_mask`` over the same template with ``{% generation %}`` tags
around each assistant turn's output (tags do not change the render).

    python -m pytest -q tests/unit/test_chat_mask.py
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets")  # not on the GPU image; CI installs it

from switchyard.train.chat_mask import chat_ids_labels
from switchyard.train.data import DataConfig, load_datasets
from switchyard.train.tiny import build_tokenizer
from tiny_models import WithoutOffsets

IGNORE = -100
# Qwen3's rule, in a template of ours: an assistant turn after the last user message opens with a <think> block when
# it is the last message or has reasoning (empty unless the content carries one), earlier ones drop it; the
# generation prompt is the bare header.
THINKING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set answer = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set thought = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') if '</think>' in m.content else '' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or thought) %}"
    "{{- '<think>\\n' + thought + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- answer }}{%- for call in m.tool_calls or [] %}{{- '<tool_call>' + call.function.name + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 1 + 1?"},
     {"role": "assistant", "content": "It is 2."}, {"role": "user", "content": "And squared?"},
     {"role": "assistant", "content": "4."}],
    # the answer's text is in the user turn before it: only the assistant's copy is trained
    [{"role": "user", "content": "Say ok."}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "Again: ok"}, {"role": "assistant", "content": "ok"}],
    # reasoning in the history (dropped by the template) and in the last turn (kept)
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
     {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nhello\n"}],  # one turn: prefix-stable
    # a tool call with no content, before the last user message (so rendered without its <think> block there)
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                         "arguments": {}}}]},
     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."},
     {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome."}],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(the tokenizer with the template as a user would have it, the oracle's copy with generation tags)."""
    oracle = build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=1024, max_bytes=1_000_000)
    oracle.chat_template = THINKING
    tok = copy.deepcopy(oracle)
    tok.chat_template = THINKING.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return tok, oracle


def test_the_template_is_not_prefix_stable(tokenizers) -> None:
    tok, _ = tokenizers
    msgs = CONVERSATIONS[0]
    first_turn = tok.apply_chat_template(msgs[:3], tokenize=False)
    assert not tok.apply_chat_template(msgs, tokenize=False).startswith(first_turn)


def assert_labels_match_the_oracle(tok: Any, oracle: Any, msgs: list[dict]) -> None:
    """Our ids and labels against transformers' tokenization and {% generation %} mask of the tagged template."""
    assert tok.apply_chat_template(msgs, tokenize=False) == oracle.apply_chat_template(msgs, tokenize=False)
    ids, labels = chat_ids_labels(tok, msgs)
    ref = oracle.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert [lab != IGNORE for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert all(lab in (IGNORE, t) for lab, t in zip(labels, ids))
    assert sum(ref["assistant_masks"]) > 0


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_labels_match_transformers_generation_mask(tokenizers, index: int) -> None:
    assert_labels_match_the_oracle(*tokenizers, CONVERSATIONS[index])


def test_without_offsets_the_same_labels(tokenizers) -> None:
    tok, _ = tokenizers
    for msgs in CONVERSATIONS:
        ids, labels = chat_ids_labels(WithoutOffsets(tok), msgs)
        kept = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
        want = tok.decode([t for t, lab in zip(*chat_ids_labels(tok, msgs)) if lab != IGNORE])
        assert kept == want


def test_multi_turn_chat_data_trains_under_it(tokenizers, tmp_path: Path) -> None:
    """The failure of configs/finetune/adopt_qwen3_moe.yaml: multi-turn conversations under a thinking template."""
    import json

    tok, oracle = tokenizers
    rows = [{"messages": CONVERSATIONS[i % 3]} for i in range(9)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), format="chat", seq_len=256, packing=False, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    assert len(train) == 9
    for row, source in zip(train, rows):
        ref = oracle.apply_chat_template(source["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        n = len(ref["input_ids"])
        assert row["input_ids"][:n] == ref["input_ids"]
        assert [lab != IGNORE for lab in row["labels"][:n]] == [bool(m) for m in ref["assistant_masks"]]


# Two more rules of real templates, in templates of ours (the tags mark what the oracle trains):
OTHER_TEMPLATES = {
    # DeepSeek-R1's: the generation prompt opens the reasoning ("<A><think>\n"), while earlier turns keep only the
    # answer after "<A>": the header is what of it the whole render holds, "<A>", and is not trained
    "reasoning_prompt": (
        "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<A>' }}{% generation %}"
        "{{- m.content.split('</think>')[-1].lstrip() + '<E>' }}{% endgeneration %}"
        "{%- else %}{{- '<U>' + m.content }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<A><think>\\n' }}{%- endif %}"),
    # Phi-3's: an eos after the conversation's last message when no generation prompt follows, so the render before
    # an assistant turn ends in an eos the whole conversation does not have there (every multi-turn chat was refused);
    # the last turn ends with it, and it is trained with that turn
    "eos_after_the_last_message": (
        "{%- for m in messages %}{{- '<|' + m.role + '|>\\n' }}{%- if m.role == 'assistant' %}{% generation %}"
        "{{- m.content + '<|end|>\\n' }}{% endgeneration %}{%- else %}{{- m.content + '<|end|>\\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}"
        "{%- else %}{% generation %}{{- eos_token }}{% endgeneration %}{%- endif %}"),
}


@pytest.mark.parametrize("name", sorted(OTHER_TEMPLATES))
@pytest.mark.parametrize("index", [0, 1, 2])
def test_other_template_rules_match_transformers_generation_mask(tokenizers, name: str, index: int) -> None:
    oracle = copy.deepcopy(tokenizers[1])
    oracle.chat_template = OTHER_TEMPLATES[name]
    tok = copy.deepcopy(oracle)
    tok.chat_template = OTHER_TEMPLATES[name].replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert_labels_match_the_oracle(tok, oracle, CONVERSATIONS[index])


@pytest.mark.parametrize("template, what", [
    # the content rewritten, and the turn written otherwise when it is last: nowhere to find it, no guessed mask
    ("{% for m in messages %}{% if m.role == 'assistant' %}<a>{{ m.content | upper }}{% if loop.last %}!{% endif %}"
     "</a>{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}",
     "content in a form not found"),
    # the context before a turn is rendered differently once later turns follow
    ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "before message 2"),
])
def test_a_mask_that_cannot_be_derived_is_refused(tokenizers, template: str, what: str) -> None:
    bad = copy.deepcopy(tokenizers[0])
    bad.chat_template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match="cannot be derived") as err:
        chat_ids_labels(bad, CONVERSATIONS[0])
    assert what in str(err.value) and "prompt_response" in str(err.value)
