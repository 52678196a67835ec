"""Data pipeline audit: whole-split packing (no drop per map batch, the same rows at any num_proc), the cache
key of a tokenizer setting outside its serialization, chat masks of a template without {% generation %},
and clear errors or documented behaviour for blank, tiny or unreadable data.

    python -m pytest -q tests/unit/test_data_audit.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")  # not on the GPU image; CI installs it

import copy
import json
import logging
from pathlib import Path

import switchyard.train.data as data_mod
from switchyard.train.data import DataConfig, load_datasets
from switchyard.train.tiny import build_tokenizer

IGNORE = -100
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=1024, max_bytes=1_000_000)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_packing_cuts_the_whole_stream_whatever_the_map_batches(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks were cut per datasets.map batch, dropping each batch's tail (up to seq_len - 1 tokens per 1000
    documents, all of it when a batch held fewer than seq_len tokens), and num_proc moved the cuts: the rows
    depended on num_proc, and a cache built at one num_proc served another. Now only the final block is cut."""
    monkeypatch.setattr(data_mod, "_MAP_BATCH", 4)  # many map batches from a few documents
    texts = [f"doc {i}: " + "word " * (i % 9) for i in range(40)]
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    stream = [t for text in texts for t in ids(tok, text) + [tok.eos_token_id]]
    rows = {}
    for num_proc in (None, 2):  # separate caches: the rows must be equal, not just read from one cache
        train, _ = load_datasets(DataConfig(source=source, seq_len=16, eval_fraction=0, num_proc=num_proc), tok,
                                 tmp_path / f"cache{num_proc}")
        flat = [t for row in train["input_ids"] for t in row]
        assert len(train) == len(stream) // 16 and flat == stream[: len(flat)], num_proc
        assert train["labels"] == train["input_ids"]
        rows[num_proc] = train["input_ids"]
    assert rows[None] == rows[2]


def test_chat_packing_across_map_batches_keeps_labels_aligned(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_mod, "_MAP_BATCH", 3)
    convs = [[{"role": "user", "content": f"q{i} " * (i % 4 + 1)}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(20)]
    cfg = DataConfig(source=write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs]), format="chat",
                     seq_len=8, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, tmp_path / "cache")
    pairs = [data_mod.chat_ids_labels(tok, c) for c in convs]
    stream = [(t, lab) for i, labels in pairs for t, lab in zip(i, labels)]
    blocks = [stream[s : s + 8] for s in range(0, len(stream) - 7, 8)]
    want = [b for b in blocks if any(lab != IGNORE for _, lab in b[1:])]
    assert train["input_ids"] == [[t for t, _ in b] for b in want]
    assert train["labels"] == [[lab for _, lab in b] for b in want]


def test_a_tokenizer_setting_outside_its_serialization_misses_the_cache(tok, tmp_path: Path) -> None:
    """``split_special_tokens`` changes ids but not the backend's JSON: the cache served the old ids."""
    split = copy.deepcopy(tok)
    split.split_special_tokens = True
    text = "x = 1 <|assistant|> y"
    assert ids(split, text) != ids(tok, text)
    source = write_jsonl(tmp_path / "s.jsonl", [{"text": f"{text} {i}"} for i in range(20)])
    cfg = DataConfig(source=source, seq_len=8, eval_fraction=0)
    before, _ = load_datasets(cfg, tok, tmp_path / "cache")
    after, _ = load_datasets(cfg, split, tmp_path / "cache")
    flat = [t for row in after["input_ids"] for t in row]
    stream = [t for i in range(20) for t in ids(split, f"{text} {i}") + [split.eos_token_id]]
    assert flat == stream[: len(flat)] and after["input_ids"] != before["input_ids"]


def test_a_new_seq_len_reuses_the_tokenized_documents(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "r.jsonl", [{"text": f"def f{i}(): return {i}"} for i in range(30)])
    load_datasets(DataConfig(source=source, seq_len=8), tok, tmp_path / "cache")

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_mod, "_tokenize_batch", must_not_run)
    train, _ = load_datasets(DataConfig(source=source, seq_len=16), tok, tmp_path / "cache")
    assert len(train) > 0 and len(train[0]["input_ids"]) == 16


def test_chat_masks_with_a_template_without_generation_marks(tok, tmp_path: Path) -> None:
    """ChatML-like: the assistant header is a prompt, every system/user turn is masked, a conversation opening
    with an assistant message (a greeting: transformers refuses to render the empty prompt before it) loads
    with that message as context, an empty conversation is no example, and a row cut at seq_len keeps its
    labels aligned with its ids."""
    chatml = copy.deepcopy(tok)
    chatml.chat_template = CHATML
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    conv = [{"role": "assistant", "content": "Hello, ask me."}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "Six, the answer is six."}]
    text = chatml.apply_chat_template(conv, tokenize=False)
    full = ids(chatml, text)
    cut = len(ids(chatml, text[: text.index("Six, the") + len("Six, the")]))  # inside the last answer
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}, {"messages": []}])
    train, _ = load_datasets(DataConfig(source=source, format="chat", seq_len=cut, packing=False, eval_fraction=0),
                             chatml, tmp_path / "cache")
    assert len(train) == 1
    row = train[0]
    assert row["input_ids"] == full[:cut] and all(lab in (IGNORE, t) for lab, t in zip(row["labels"], full))
    pieces, current = [], []
    for t, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE:
            current.append(t)
        elif current:
            pieces, current = pieces + [chatml.decode(current)], []
    pieces += [chatml.decode(current)] if current else []
    assert pieces == ["4.<|im_end|>\n", "Six, the"]


def test_blank_tiny_and_unreadable_data_give_clear_errors(tok, tmp_path: Path) -> None:
    def load(name: str, content: str, **kwargs) -> object:
        (tmp_path / name).write_text(content)
        cfg = DataConfig(source=str(tmp_path / name), eval_fraction=0, **{"seq_len": 8} | kwargs)
        return load_datasets(cfg, tok, tmp_path / "cache")

    with pytest.raises(ValueError, match=r"every row's data.text_field='text' is blank"):
        load("blank.txt", "  \n\t\n\n \n", sample_by="line")
    with pytest.raises(ValueError, match=r"2 document\(s\) hold \d+ tokens, fewer than one seq_len block; lower"):
        load("tiny.txt", "hi\n\nthere\n", seq_len=128)
    with pytest.raises(ValueError, match=r"data.source=.*bad.jsonl.*could not be read .*JSON parse error"):
        load("bad.jsonl", '{"text": "aaa"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"data.messages_field='messages', row 0: the tokenizer's chat template failed"):
        load("none.jsonl", json.dumps({"messages": [{"role": "user", "content": None},
                                                    {"role": "assistant", "content": "x"}]}) + "\n", format="chat")
    # whitespace-only lines are no documents (they were trained as "  <eos>")
    train, _ = load("ws.txt", "  \nreal text one\n\t\nreal text two\n" * 4, sample_by="line", seq_len=4)
    stream = [t for _ in range(4) for line in ("real text one", "real text two") for t in ids(tok, line) +
              [tok.eos_token_id]]
    flat = [t for row in train["input_ids"] for t in row]
    assert flat == stream[: len(flat)] and len(train) == len(stream) // 4


def test_cut_documents_are_counted_in_a_warning(tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    texts = ["short", "a much longer document " * 4, "x"]
    source = write_jsonl(tmp_path / "u.jsonl", [{"text": t} for t in texts])
    lengths = [len(ids(tok, t)) + 1 for t in texts]
    with caplog.at_level(logging.WARNING):
        load_datasets(DataConfig(source=source, seq_len=8, packing=False, eval_fraction=0), tok, tmp_path / "cache")
    cut = sum(n - 8 for n in lengths if n > 8)
    assert f"1 of 3 documents are longer than data.seq_len=8 and are cut there ({cut} of {sum(lengths)}" in caplog.text
