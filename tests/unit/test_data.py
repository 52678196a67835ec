"""Data: loading, cached tokenization, packing, response-only labels, eval split, DP sharding, resume.

    python -m pytest -q tests/unit/test_data.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")  # not on the GPU image; CI installs it

import copy
import json
import os
from pathlib import Path

import datasets
import pytest
import torch

import switchyard.train.data as data_mod
from switchyard.train.data import (
    DataConfig, chat_ids_labels, eval_rank_batches, load_datasets, rank_batches, steps_per_epoch
)
from switchyard.train.tiny import build_tokenizer, stdlib_corpus

IGNORE = -100
CHATS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}."},
        {"role": "user", "content": "And squared?"},
        {"role": "assistant", "content": f"{i * i}, friend {i}."},
    ]
    for i in range(12)
]
PAIRS = [{"prompt": f"Q: name {i} files\nA:", "response": f" file_{i}.py and mod{i}.py"} for i in range(12)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=1024, max_bytes=1_000_000)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def docs(n: int) -> list[str]:
    return [f"def f{i}(x):\n    return x * {i}  # {'pad ' * (i % 7)}\n" for i in range(n)]


def stream_of(tok, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def test_packing_blocks_concatenate_to_the_token_stream(tok, cache: Path, tmp_path: Path) -> None:
    texts = docs(30)
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg = DataConfig(source=source, seq_len=16, eval_fraction=0)
    train, ev = load_datasets(cfg, tok, cache)
    assert ev is None and train.column_names == ["input_ids", "labels"]
    stream = stream_of(tok, texts)
    assert len(train) == len(stream) // 16
    flat = [t for row in train["input_ids"] for t in row]
    assert all(len(row) == 16 for row in train["input_ids"]) and flat == stream[: len(flat)]
    assert train["labels"] == train["input_ids"]


def test_stdlib_source_packs_the_stdlib_files(tok, cache: Path) -> None:
    train, _ = load_datasets(DataConfig(max_samples=3, eval_fraction=0, seq_len=64), tok, cache)
    flat = [t for row in train["input_ids"] for t in row]
    assert flat == stream_of(tok, stdlib_corpus(max_files=3))[: len(flat)] and len(flat) > 64


def test_unpacked_text_pads_and_masks(tok, cache: Path, tmp_path: Path) -> None:
    texts = ["x = 1\n", "y = 'a long line of text that is certainly longer than sixteen tokens' * 3\n"]
    cfg = DataConfig(source=write_jsonl(tmp_path / "u.jsonl", [{"body": t} for t in texts]), text_field="body",
                     seq_len=16, packing=False, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, cache)
    short = tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = train[0]
    n = len(short)
    assert row["input_ids"][:n] == short and row["input_ids"][n:] == [tok.pad_token_id] * (16 - n)
    assert row["labels"] == short + [IGNORE] * (16 - n) and row["attention_mask"] == [1] * n + [0] * (16 - n)
    assert train[1]["attention_mask"] == [1] * 16 and IGNORE not in train[1]["labels"]  # truncated


def response_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_chat_labels_only_on_assistant_turns(tok, cache: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS]), format="chat",
                     seq_len=96, packing=False, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, cache)
    assert len(train) == len(CHATS)
    for row, msgs in zip(train, CHATS):
        want = "".join(m["content"] + tok.eos_token for m in msgs if m["role"] == "assistant")
        assert response_text(tok, row["input_ids"], row["labels"]) == want
        # external oracle: transformers' own {% generation %} mask over the template's tokenization
        ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        n = len(ref["input_ids"])
        assert row["input_ids"][:n] == ref["input_ids"]
        assert [lab != IGNORE for lab in row["labels"][:n]] == [bool(m) for m in ref["assistant_masks"]]
        assert row["labels"][n:] == [IGNORE] * (96 - n)


def test_chat_packing_keeps_per_example_masks(tok, cache: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS]), format="chat",
                     seq_len=32, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, cache)
    pairs = [chat_ids_labels(tok, m) for m in CHATS]
    ids = [t for i, _ in pairs for t in i]
    labels = [t for _, lab in pairs for t in lab]
    flat_ids = [t for row in train["input_ids"] for t in row]
    flat_labels = [t for row in train["labels"] for t in row]
    # blocks made only of prompt tokens are dropped; here every 32-token block holds an answer
    assert len(train) == len(ids) // 32
    assert flat_ids == ids[: len(flat_ids)] and flat_labels == labels[: len(flat_ids)]


def test_prompt_response_masks_the_prompt(tok, cache: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=write_jsonl(tmp_path / "p.jsonl", PAIRS), format="prompt_response", seq_len=48,
                     packing=False, eval_fraction=0)
    train, _ = load_datasets(cfg, tok, cache)
    for row, pair in zip(train, PAIRS):
        assert response_text(tok, row["input_ids"], row["labels"]) == pair["response"] + tok.eos_token
        n_prompt = len(tok(pair["prompt"], add_special_tokens=False)["input_ids"])
        assert row["labels"][:n_prompt] == [IGNORE] * n_prompt and row["labels"][n_prompt] != IGNORE


def test_chat_template_that_is_not_prefix_stable_is_refused(tok) -> None:
    bad = copy.deepcopy(tok)
    bad.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot be derived"):
        chat_ids_labels(bad, CHATS[0])


@pytest.mark.parametrize("kind", ["csv", "parquet", "txt", "dir"])
def test_csv_parquet_txt_and_dir_sources(kind: str, tok, cache: Path, tmp_path: Path) -> None:
    texts = [t.replace("\n", " ").strip() for t in docs(10)]
    table = datasets.Dataset.from_dict({"text": texts})
    if kind == "csv":
        table.to_csv(tmp_path / "d.csv", index=False)
    elif kind == "parquet":
        table.to_parquet(tmp_path / "d.parquet")
    else:
        (tmp_path / "d.txt").write_text("\n\n".join(texts) + "\n")  # paragraphs = documents
    source = str(tmp_path) if kind == "dir" else str(tmp_path / f"d.{kind}")
    train, _ = load_datasets(DataConfig(source=source, seq_len=8, eval_fraction=0), tok, cache)
    flat = [t for row in train["input_ids"] for t in row]
    if kind in ("txt", "dir"):  # datasets' text builder strips the blank-line separators, not the final newline
        texts = texts[:-1] + [texts[-1] + "\n"]
    stream = stream_of(tok, texts)
    assert flat == stream[: len(flat)] and len(train) == len(stream) // 8


def test_eval_split_sizes_and_disjoint(tok, cache: Path, tmp_path: Path) -> None:
    texts = docs(40)
    cfg = DataConfig(source=write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in texts]), seq_len=64,
                     packing=False, eval_fraction=0.1)
    train, ev = load_datasets(cfg, tok, cache)
    assert ev is not None and (len(train), len(ev)) == (36, 4)
    def decode(ds: datasets.Dataset) -> set[str]:
        return {tok.decode([t for t in r if t != tok.pad_token_id]) for r in ds["input_ids"]}

    assert not decode(train) & decode(ev) and len(decode(train) | decode(ev)) == 40
    again_train, again_ev = load_datasets(cfg, tok, cache)
    assert again_ev["input_ids"] == ev["input_ids"]  # the split is seeded


def test_second_call_is_a_cache_hit(tok, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(source=write_jsonl(tmp_path / "k.jsonl", [{"text": t} for t in docs(50)]), seq_len=16)
    train, ev = load_datasets(cfg, tok, cache)
    files = [f["filename"] for f in train.cache_files + ev.cache_files]
    assert all(f.startswith(str(cache)) for f in files)
    mtimes = [os.path.getmtime(f) for f in files]

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenization ran again instead of loading the cache")

    for stage in ("_tokenize_batch", "_pack_batch", "_pad_batch"):
        monkeypatch.setattr(data_mod, stage, must_not_run)
    train2, ev2 = load_datasets(cfg, tok, cache)
    assert [f["filename"] for f in train2.cache_files + ev2.cache_files] == files
    assert [os.path.getmtime(f) for f in files] == mtimes and train2["input_ids"] == train["input_ids"]
    with pytest.raises(AssertionError, match="tokenization ran again"):  # a changed setting misses
        load_datasets(DataConfig(source=cfg.source, seq_len=32), tok, cache)


def synthetic(n: int, seq: int = 4) -> datasets.Dataset:
    rows = [[i] * seq for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def ids_of(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_shuffle_is_deterministic_per_seed_and_epoch() -> None:
    ds = synthetic(64)
    run = lambda **kw: ids_of(rank_batches(ds, 4, 0, 1, **kw))  # noqa: E731
    assert run(epoch=0, seed=0) == run(epoch=0, seed=0)
    assert run(epoch=0, seed=0) != run(epoch=1, seed=0) and run(epoch=0, seed=0) != run(epoch=0, seed=1)
    assert run(epoch=1, seed=0) != run(epoch=0, seed=1)  # (seed, epoch) is a pair, not a sum
    assert sum(run(epoch=0, seed=0), []) != list(range(64))
    assert sorted(sum(run(epoch=3, seed=5), [])) == list(range(64))
    assert sum(run(epoch=0, seed=0, shuffle=False), []) == list(range(64))
    batch = next(rank_batches(ds, 4, 0, 1, epoch=0, seed=0))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 4)


def test_dp_ranks_partition_the_single_rank_global_batch() -> None:
    ds = synthetic(53)  # 53 // (2*3) = 8 steps; the incomplete last global batch is dropped
    assert steps_per_epoch(ds, 3, 2) == 8
    single = ids_of(rank_batches(ds, 6, 0, 1, epoch=2, seed=7))
    r0 = ids_of(rank_batches(ds, 3, 0, 2, epoch=2, seed=7))
    r1 = ids_of(rank_batches(ds, 3, 1, 2, epoch=2, seed=7))
    assert len(single) == len(r0) == len(r1) == 8
    for whole, a, b in zip(single, r0, r1):
        assert a + b == whole and not set(a) & set(b)
    seen = sum(r0 + r1, [])
    assert len(seen) == len(set(seen)) == 48


def test_start_step_resumes_exactly() -> None:
    ds = synthetic(40)
    full = list(rank_batches(ds, 2, 1, 2, epoch=1, seed=3))
    it = rank_batches(ds, 2, 1, 2, epoch=1, seed=3)
    first = [next(it) for _ in range(4)]
    resumed = list(rank_batches(ds, 2, 1, 2, epoch=1, seed=3, start_step=4))
    assert len(full) == 10 and len(resumed) == 6
    for a, b in zip(full, first + resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(rank_batches(ds, 2, 1, 2, epoch=1, seed=3, start_step=10)) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "markdown"}, "data.format"),
        ({"seq_len": 1}, "data.seq_len"),
        ({"eval_fraction": 1.0}, "data.eval_fraction"),
        ({"eval_fraction": -0.1}, "data.eval_fraction"),
        ({"packing": "yes"}, "data.packing"),
        ({"max_samples": 0}, "data.max_samples"),
        ({"num_proc": -2}, "data.num_proc"),
        ({"seed": -1}, "data.seed"),
        ({"sample_by": "sentence"}, "data.sample_by"),
        ({"format": "chat"}, "stdlib"),
        ({"source": ""}, "data.source"),
        ({"source": "/nonexistent/dir/x.jsonl"}, "matches no"),
        ({"text_field": ""}, "data.text_field"),
    ],
)
def test_bad_config_is_a_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_bad_inputs_at_load_and_batch_time(
    tok, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("text\nx\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(ValueError, match="types"):
        DataConfig(source=str(tmp_path / "mixed"))
    src = write_jsonl(tmp_path / "q.jsonl", [{"body": t} for t in docs(5)])
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a column.*body"):
        load_datasets(DataConfig(source=src, eval_fraction=0), tok, cache)
    with pytest.raises(ValueError, match="no training examples"):
        load_datasets(DataConfig(source=src, text_field="body", seq_len=4096, eval_fraction=0), tok, cache)
    with pytest.raises(ValueError, match="eval_fraction"):
        load_datasets(DataConfig(source=src, text_field="body", max_samples=1), tok, cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(RuntimeError, match=r"some-user/no-such-dataset.*network"):
        load_datasets(DataConfig(source="some-user/no-such-dataset"), tok, cache)
    ds = synthetic(8)
    for kwargs, match in [
        (dict(dp_rank=2, dp_size=2), "dp_rank"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(micro_batch_size=5, dp_size=2), "fewer than one global batch"),
        (dict(start_step=5), "start_step"),
    ]:
        args = dict(micro_batch_size=2, dp_rank=0, dp_size=1, epoch=0, seed=0) | kwargs
        with pytest.raises(ValueError, match=match):
            rank_batches(ds, **args)


def test_empty_data_file_is_refused_at_config_time(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data.source=.*empty.jsonl.*the file is empty"):
        DataConfig(source=str(tmp_path / "empty.jsonl"))
    (tmp_path / "full.jsonl").write_text('{"text": "x"}\n')  # one empty file among others is fine
    DataConfig(source=str(tmp_path / "*.jsonl"))


def test_eval_smaller_than_a_global_batch_is_evaluated_on_every_rank() -> None:
    ds = synthetic(5)  # micro-batch 2 × dp 2 = 4 per global batch: one full, one with a single row
    per_rank = [list(eval_rank_batches(ds, 2, r, 2, max_batches=8)) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]  # the same number of forwards on every rank (MoE all-to-all)
    kept = [row[0].item() for batches in per_rank for b in batches for row, labels in zip(b["input_ids"], b["labels"])
            if (labels != IGNORE).any()]
    assert sorted(kept) == list(range(5))
    assert [len(list(eval_rank_batches(synthetic(1), 4, r, 2, max_batches=8))) for r in range(2)] == [1, 1]
    assert len(list(eval_rank_batches(ds, 2, 0, 2, max_batches=1))) == 1


def test_eval_batches_sample_the_whole_split_in_a_fixed_order() -> None:
    """Packed sequences of one document are consecutive: the first eval batches must not be its first rows."""
    ds = synthetic(40)
    first = [row.item() for r in range(2) for b in eval_rank_batches(ds, 2, r, 2, max_batches=1, seed=3)
             for row in b["input_ids"][:, 0]]
    assert first != list(range(4)) and max(first) >= 4  # not the split's first rows
    again = [row.item() for r in range(2) for b in eval_rank_batches(ds, 2, r, 2, max_batches=1, seed=3)
             for row in b["input_ids"][:, 0]]
    assert again == first  # the same rows at every eval


def test_a_row_whose_only_label_is_at_position_0_is_dropped(tok, cache: Path, tmp_path: Path) -> None:
    """The model shifts labels, so position 0 is never predicted: a packed block opening with the eos of a
    response, then only prompt, has no loss token (a NaN loss for a model that averages per micro-batch)."""
    rows = [{"prompt": "Q:", "response": " x"}, {"prompt": "Q: " + "word " * 40, "response": " y"}]
    ids = {k: [tok(r[k], add_special_tokens=False)["input_ids"] for r in rows] for k in ("prompt", "response")}
    stream = [pair for p, r in zip(ids["prompt"], ids["response"])  # (id, label) of the packed stream
              for pair in [(t, IGNORE) for t in p] + [(t, t) for t in r + [tok.eos_token_id]]]
    seq_len = len(ids["prompt"][0]) + len(ids["response"][0])  # block 1 opens with the first eos, then prompt
    blocks = [stream[s : s + seq_len] for s in range(0, len(stream) - seq_len + 1, seq_len)]
    assert blocks[1][0] == (tok.eos_token_id, tok.eos_token_id) and {lab for _, lab in blocks[1][1:]} == {IGNORE}
    cfg = DataConfig(source=write_jsonl(tmp_path / "p.jsonl", rows), format="prompt_response", seq_len=seq_len,
                     eval_fraction=0)
    train, _ = load_datasets(cfg, tok, cache)
    want = [b for b in blocks if any(lab != IGNORE for _, lab in b[1:])]
    assert len(want) < len(blocks) and train["labels"] == [[lab for _, lab in b] for b in want]
    assert train["input_ids"] == [[t for t, _ in b] for b in want]


def test_a_cache_of_an_older_recipe_is_not_reused(
    tok, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenized caches written by older processing (here: an older version) miss."""
    cfg = DataConfig(source=write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in docs(8)]), seq_len=8,
                     eval_fraction=0)
    stale = {"input_ids": [[7] * 8], "labels": [[7] * 8], "n": [8]}
    with monkeypatch.context() as m:
        m.setattr(data_mod, "_RECIPE_VERSION", data_mod._RECIPE_VERSION - 1)
        m.setattr(data_mod, "_tokenize_batch", lambda batch, tokenizer, cfg: stale)
        assert load_datasets(cfg, tok, cache)[0]["input_ids"] == stale["input_ids"]
    assert load_datasets(cfg, tok, cache)[0]["input_ids"] != stale["input_ids"]
