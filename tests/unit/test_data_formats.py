"""Data formats: csv/parquet/jsonl cells as written, rows of other schemas, chat ids as transformers tokenizes
them, hub names with a config and a split.

    python -m pytest -q tests/unit/test_data_formats.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")  # not on the GPU image; CI installs it

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

import switchyard.train.data as data_mod
from switchyard.train.data import DataConfig, chat_ids_labels, load_datasets
from tiny_models import WithoutOffsets
from switchyard.train.tiny import build_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=1024, max_bytes=1_000_000)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_csv_cells_are_the_text_written(tok, tmp_path: Path) -> None:
    """pandas would read a column of numbers as ints (a tokenizer error; "007" would be 7) and "NA" as null."""
    (tmp_path / "qa.csv").write_text("prompt,response\nWhat is 2+2?,4\nBond?,007\nMissing?,NA\nNone?,None\n")
    cfg = DataConfig(source=str(tmp_path / "qa.csv"), format="prompt_response", seq_len=32, packing=False,
                     eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    want = [("What is 2+2?", "4"), ("Bond?", "007"), ("Missing?", "NA"), ("None?", "None")]
    assert len(train) == len(want)
    for row, (prompt, response) in zip(train, want):
        n = len(ids(tok, prompt)) + len(ids(tok, response)) + 1
        assert row["input_ids"][:n] == ids(tok, prompt) + ids(tok, response) + [tok.eos_token_id]
        assert [t for t in row["labels"] if t != IGNORE] == ids(tok, response) + [tok.eos_token_id]


def test_empty_and_header_only_csv_files(tok, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("text\nhello world said the first program\n")
    (tmp_path / "d" / "b.csv").write_text("")  # one empty file among others holds no rows; it is no error
    train, _ = load_datasets(DataConfig(source=str(tmp_path / "d"), seq_len=4, eval_fraction=0), tok,
                             tmp_path / "cache")
    flat = [t for row in train["input_ids"] for t in row]
    assert len(train) > 0 and flat == ids(tok, "hello world said the first program")[: len(flat)]
    (tmp_path / "h.csv").write_text("text\n")
    with pytest.raises(ValueError, match=r"data.source=.*h.csv.* has no rows"):
        load_datasets(DataConfig(source=str(tmp_path / "h.csv"), eval_fraction=0), tok, tmp_path / "cache")


def test_a_non_text_value_names_the_column(tok, tmp_path: Path) -> None:
    (tmp_path / "n.jsonl").write_text('{"body": "x = 1"}\n{"body": 5}\n')
    with pytest.raises(ValueError, match=r"data.text_field='body'.*int"):
        load_datasets(DataConfig(source=str(tmp_path / "n.jsonl"), text_field="body", eval_fraction=0), tok,
                      tmp_path / "cache")


def test_rows_of_another_schema_are_no_examples(tok, tmp_path: Path) -> None:
    """Null cells (a row of another schema in the same files) are skipped, as blank text is: a pair without a
    response would otherwise train the model to end right after its bos."""
    pairs = [{"prompt": f"Q{i}:", "response": f" answer {i}"} for i in range(3)]
    rows = [pairs[0], {"text": "stray"}, pairs[1], {"prompt": "lonely"}, pairs[2]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "p.jsonl"), format="prompt_response", seq_len=12, packing=False,
                     eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    assert [tok.decode([t for t in r if t != IGNORE]) for r in train["labels"]] == [
        p["response"] + tok.eos_token for p in pairs
    ]
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
             {"text": "stray"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), format="chat", seq_len=16, packing=False, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    assert len(train) == 1


@pytest.mark.parametrize("content", ["\n\nx = 1\n", "\n    return x\n", "plain answer"])
def test_chat_ids_are_the_whole_conversation_tokenized(tok, content: str) -> None:
    """Oracle: transformers' apply_chat_template(tokenize=True) and its {% generation %} mask. Tokenizing the
    pieces between turns apart split "\\n" + "\\n\\n" where the whole render has one "\\n\\n" token."""
    msgs = [{"role": "user", "content": "write it"}, {"role": "assistant", "content": content},
            {"role": "user", "content": "\nagain"}, {"role": "assistant", "content": content}]
    got_ids, got_labels = chat_ids_labels(tok, msgs)
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert got_ids == ref["input_ids"]
    assert [lab != IGNORE for lab in got_labels] == [bool(m) for m in ref["assistant_masks"]]
    assert all(lab in (IGNORE, t) for lab, t in zip(got_labels, got_ids))


def test_chat_without_offsets_tokenizes_between_the_boundaries(tok) -> None:
    """A tokenizer without offset mappings (not ``is_fast``) gets the pieces between response boundaries."""

    msgs = [{"role": "system", "content": "terse"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"}]
    assert chat_ids_labels(WithoutOffsets(tok), msgs) == chat_ids_labels(tok, msgs)


def test_chat_rows_from_parquet_render_only_their_own_keys(tok, tmp_path: Path) -> None:
    """Arrow gives every struct the union of the keys (``None`` where a row had none), down to tool-call
    arguments: a call of ``{"city": ...}`` must not be trained as ``{"city": ..., "unit": null}``."""
    tools = copy.deepcopy(tok)
    tools.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n"
        "{% for c in m['tool_calls'] or [] %}{{ c['function']['name'] }}{{ c['function']['arguments'] | tojson }}"
        "{% endfor %}{{ (m['content'] or '') + eos_token }}{% else %}<|user|>\n{{ m['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )

    def call(name: str, arguments: dict) -> dict:
        return {"role": "assistant", "content": None,
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}

    convs = [[{"role": "user", "content": "weather?"}, call("weather", {"city": "Paris"})],
             [{"role": "user", "content": "convert"}, call("convert", {"unit": "C"})],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in convs]), tmp_path / "m.parquet")
    cfg = DataConfig(source=str(tmp_path / "m.parquet"), format="chat", seq_len=48, packing=False,
                     eval_fraction=0)
    train, _ = load_datasets(cfg, tools, tmp_path / "cache")
    assert len(train) == len(convs)
    for row, conv in zip(train, convs):
        want = tools.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert row["input_ids"][: len(want)] == want, tools.decode(row["input_ids"])


@pytest.mark.parametrize(
    "source, call",
    [
        ("org/ds", ("org/ds", None, "train")),
        ("org/ds:main", ("org/ds", "main", "train")),
        ("HuggingFaceH4/ultrachat_200k::train_sft", ("HuggingFaceH4/ultrachat_200k", None, "train_sft")),
        ("org/ds:main:train[:50%]", ("org/ds", "main", "train[:50%]")),
    ],
)
def test_hub_source_names_a_config_and_a_split(
    source: str, call: tuple, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple] = []

    def fake_load(name: str, config: str | None = None, split: str | None = None, **kwargs: Any) -> datasets.Dataset:
        seen.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"doc {i} " * 8 for i in range(8)]})

    monkeypatch.setattr(data_mod.datasets, "load_dataset", fake_load)
    load_datasets(DataConfig(source=source, seq_len=8, eval_fraction=0), tok, tmp_path / "cache")
    assert seen == [call]


def test_a_directory_source_skips_hidden_copies(tok, tmp_path: Path) -> None:
    """Jupyter keeps a copy of an open file in .ipynb_checkpoints/: it must not be trained twice."""
    rows = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(4))
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "d" / "train.jsonl").write_text(rows)
    (tmp_path / "d" / ".ipynb_checkpoints" / "train-checkpoint.jsonl").write_text(rows)
    assert data_mod.resolve_local_files(str(tmp_path / "d")) == ("json", [str(tmp_path / "d" / "train.jsonl")])


@pytest.mark.parametrize("fmt", ["text", "prompt_response"])
def test_a_map_batch_without_any_document(fmt: str, tok, tmp_path: Path) -> None:
    """A whole map batch of blank (or other-schema) rows, e.g. a run of blank lines with sample_by=line or a
    small eval split of them, is no documents; the tokenizer raised IndexError on the empty list."""
    doc = {"text": "x = 1  # one document"} if fmt == "text" else {"prompt": "Q:", "response": " x = 1"}
    rows = [{"text": ""}] * data_mod._MAP_BATCH + [doc] * 8
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "b.jsonl"), format=fmt, seq_len=8, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    assert len(train) > 0


def test_chat_and_response_data_errors_name_the_column_and_the_fix(tok, tmp_path: Path) -> None:
    """ShareGPT's {from, value} messages hit the template as a bare jinja error; messages stored as JSON text did
    not name the column; data whose prompts fill seq_len (or without assistant turns) advised a *lower* seq_len."""
    def load(rows: list[dict], **kwargs: Any) -> None:
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        load_datasets(DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=8, packing=False, eval_fraction=0,
                                 **kwargs), tok, tmp_path / "cache")

    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    with pytest.raises(ValueError, match=r"data.messages_field='messages'.*keys \['from', 'value'\], no 'role'"):
        load([{"messages": sharegpt}], format="chat")
    with pytest.raises(ValueError, match=r"data.messages_field='conv'.*got a string \(JSON text"):
        load([{"conv": json.dumps([{"role": "user", "content": "hi"}])}], format="chat", messages_field="conv")
    with pytest.raises(ValueError, match=r"examples of seq_len=8.*raise data.seq_len.*no assistant message"):
        load([{"messages": [{"role": "user", "content": "hi"}]}], format="chat")
    with pytest.raises(ValueError, match=r"no training examples of seq_len=8.*prompts fill.*raise data.seq_len"):
        load([{"prompt": "word " * 20, "response": " x"}], format="prompt_response")


def test_a_format_that_does_not_fit_the_columns_suggests_the_one_that_does(tok, tmp_path: Path) -> None:
    (tmp_path / "plain.jsonl").write_text('{"text": "hello world"}\n')
    with pytest.raises(ValueError, match=r"data.messages_field='messages' is not a column .* with data.format=chat "
                                         r".*set data.messages_field to the right column, or data.format=text"):
        load_datasets(DataConfig(source=str(tmp_path / "plain.jsonl"), format="chat", eval_fraction=0), tok,
                      tmp_path / "cache")
    (tmp_path / "odd.jsonl").write_text('{"body": "hello world"}\n')
    with pytest.raises(ValueError, match=r"set data.text_field to the right column$"):  # no other format fits
        load_datasets(DataConfig(source=str(tmp_path / "odd.jsonl"), eval_fraction=0), tok, tmp_path / "cache")


def test_prompt_and_response_are_tokenized_as_the_text_they_make(tmp_path: Path) -> None:
    """Tokenized apart, a SentencePiece tokenizer (Llama-2 / Mistral style: Metaspace, a word-start marker on the
    first word) began every response with "▁": '2+2=' + '4' trained '2+2= 4'. Oracle: the tokenizer on the joined
    text; the labels are the tokens that write response text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pairs = [("Translate to French: Hello\n", "Bonjour le monde"), ("Q: 2+2=", "4"), ("Question: what?", " Answer")]
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    words = " ".join(p + " " + r for p, r in pairs).split()  # merges within words: no token spans a boundary
    spm.train_from_iterator(words * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spm.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    cfg = DataConfig(source=str(tmp_path / "p.jsonl"), format="prompt_response", seq_len=64, packing=False,
                     eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    for row, (prompt, response) in zip(train, pairs):
        real = [i for i, keep in zip(row["input_ids"], row["attention_mask"]) if keep]
        assert real == tok(prompt + response)["input_ids"] + [tok.eos_token_id]
        assert tok.decode([t for t in row["labels"] if t != IGNORE]) == response.strip() + "</s>"


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "txt"])
def test_text_that_is_not_utf8_is_an_error_naming_the_source(suffix: str, tok, tmp_path: Path) -> None:
    """json and csv bytes that are not UTF-8 reach Arrow unchecked: the failure was a bare UnicodeDecodeError
    from inside datasets.map (jsonl) or the csv header scan, naming no file, column or fix; a .txt file's was
    named but its fix said the file did not parse."""
    path = tmp_path / f"latin.{suffix}"
    if suffix == "txt":
        path.write_bytes(b"caf\xe9 au lait\n")
        source, fmt, message = str(path), "text", r"latin.txt.* could not be read \(UnicodeDecodeError"
    elif suffix == "jsonl":
        path.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "plain"}\n')
        source, fmt, message = str(path), "text", r"data.text_field='text': data.source=.*latin.jsonl.* holds text"
    else:
        path.write_bytes(b"prompt,r\xe9ponse\nq,a\n")
        source, fmt, message = str(path), "prompt_response", r"latin.csv is not UTF-8"
    cfg = DataConfig(source=source, format=fmt, seq_len=8, packing=False, eval_fraction=0)
    with pytest.raises(ValueError, match=message + r".*iconv -f latin1 -t utf-8"):
        load_datasets(cfg, tok, tmp_path / "cache")
