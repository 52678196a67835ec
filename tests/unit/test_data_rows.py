"""Data errors name the row of data.source (counted before the eval split and max_samples), and rows that give no
document are counted in the log.

    python -m pytest -q tests/unit/test_data_rows.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")  # not on the GPU image; CI installs it

import json
import logging
from pathlib import Path

from switchyard.train.data import DataConfig, load_datasets
from switchyard.train.tiny import build_tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=1024, max_bytes=1_000_000)
    tok.chat_template = CHATML
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bad_row", [0, 7, 18])
def test_a_value_that_is_not_text_names_its_row(tok, tmp_path: Path, bad_row: int) -> None:
    rows = [{"text": f"document number {i}"} for i in range(20)]
    rows[bad_row] = {"text": 12345}
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=rf"data.text_field='text': row {bad_row} holds a int \('12345'\), not text"):
        load_datasets(DataConfig(source=source, seq_len=8, eval_fraction=0.25), tok, tmp_path / "cache")


def test_a_conversation_the_template_fails_on_names_its_row(tok, tmp_path: Path) -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    rows = [{"messages": good} for _ in range(12)]
    rows[9] = {"messages": [{"role": "user"}, {"role": "assistant", "content": "no question"}]}
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DataConfig(source=source, format="chat", seq_len=64, packing=False, eval_fraction=0.25)
    with pytest.raises(ValueError, match=r"data.messages_field='messages', row 9: the tokenizer's chat template failed"):
        load_datasets(cfg, tok, tmp_path / "cache")


def test_rows_without_a_document_are_counted(tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"prompt": f"Q{i}:", "response": f" answer {i}"} for i in range(6)]
    rows[1] = {"prompt": "Q1:"}  # another schema in the same file
    rows[4] = {"text": "stray"}
    source = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.INFO):
        train, _ = load_datasets(DataConfig(source=source, format="prompt_response", seq_len=8, packing=False,
                                            eval_fraction=0), tok, tmp_path / "cache")
    assert len(train) == 4
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "no document" in r.getMessage()]
    assert len(warned) == 1 and "train: 2 of 6 rows" in warned[0].getMessage()
    assert "data.format=prompt_response" in warned[0].getMessage()


def test_blank_text_rows_are_counted_at_info(tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"text": t} for t in ["one document", "", "   ", "another document"]]
    source = write_jsonl(tmp_path / "b.jsonl", rows)
    with caplog.at_level(logging.INFO):
        load_datasets(DataConfig(source=source, seq_len=4, eval_fraction=0), tok, tmp_path / "cache")
    counted = [r for r in caplog.records if "no document" in r.getMessage()]
    assert [r.levelno for r in counted] == [logging.INFO] and "train: 2 of 4 rows" in counted[0].getMessage()
