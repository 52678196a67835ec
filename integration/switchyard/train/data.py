"""Training data through HF ``datasets``: load, tokenize (cached), pack, split, shard over DP ranks.

Every example leaving this module has exactly ``seq_len`` tokens, so a micro-batch is a plain
stack and a step's token count is known up front. ``labels`` is ``-100`` wherever loss must not
apply (prompts in chat / prompt-response data, padding); the model shifts labels itself.

Each split goes through two batched ``datasets.map`` calls: tokenize (one row per document), then pack
the whole split's token stream into blocks (or pad each document). Their fingerprints we compute from
the split's own fingerprint + a hash of the tokenizer (its serialization and the ids of a probe text;
pickling a tokenizer is not a stable hash) + the settings, so a second run with the same inputs loads
the cached Arrow files instead of tokenizing again. Shuffling happens at batch time from
``(seed, epoch)``, so resuming at a step needs no re-tokenization and no stored permutation.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from switchyard.log import get_logger
from switchyard.train.chat_mask import IGNORE_INDEX, chat_ids_labels
from switchyard.train.tiny import _resolve_cache, settings_hash, stdlib_corpus, tokenizer_fingerprint

log = get_logger(__name__)

FORMATS = ("text", "chat", "prompt_response")
SAMPLE_BY = ("paragraph", "line", "document")
BUILDERS = {
    ".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"
}
_RECIPE_VERSION = 5  # bump when the processing below changes: invalidates tokenized caches (5: prompt + response as one text)
ROW_COLUMN = "__source_row"  # each raw row's number in data.source (from 0), for errors that name the row
_MAP_BATCH = 1000  # documents per datasets.map batch (the rows do not depend on it)


def _is_local(source: str) -> bool:
    return (
        any(c in source.partition(":")[0] for c in "*?[")  # not a hub split slice: "name:config:train[:10%]"
        or os.path.exists(os.path.expanduser(source))
        or Path(source).suffix.lower() in BUILDERS
        or source.startswith(("/", "./", "../", "~"))
    )


def resolve_local_files(source: str) -> tuple[str, list[str]] | None:
    """``(builder, sorted files)`` for a local file/dir/glob, ``None`` for a hub dataset name."""
    if not _is_local(source):
        return None
    path = os.path.expanduser(source)
    if os.path.isdir(path):  # hidden files and dirs (.ipynb_checkpoints/, .git/) are skipped, as a glob does
        files = [str(p) for p in sorted(Path(path).rglob("*")) if p.is_file() and p.suffix.lower() in BUILDERS
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    else:
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"data.source={source!r} matches no {'/'.join(BUILDERS)} file; fix the path or glob")
    if all(os.path.getsize(f) == 0 for f in files):  # datasets would fail with a bare StopIteration
        raise ValueError(f"data.source={source!r}: {'every file is' if len(files) > 1 else 'the file is'} empty "
                         f"({files[:3]}{' …' if len(files) > 3 else ''}); point data.source at files with data")
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(
            f"data.source={source!r} matches files of types {sorted(str(k) for k in kinds)}; use one of "
            f"{sorted(set(BUILDERS.values()))} (suffixes {'/'.join(BUILDERS)}), one type per source"
        )
    # an empty file holds no rows, and the csv builder fails on one ("No columns to parse from file")
    return kinds.pop(), [f for f in files if os.path.getsize(f) > 0]


def _csv_text_columns(files: list[str]) -> dict[str, Any]:
    """csv builder options that read every cell as the text written there: pandas would turn a column of
    numbers into ints (the tokenizer rejects them; "007" would become 7) and "NA"/"None"/"null" into nulls."""
    columns: dict[str, None] = {}
    for f in files:
        with open(f, newline="", encoding="utf-8-sig") as fh:  # pandas drops a BOM too
            try:
                columns.update(dict.fromkeys(next(csv.reader(fh), [])))
            except UnicodeDecodeError as err:
                raise ValueError(f"{f} is not UTF-8 ({err}); re-encode it (e.g. iconv -f latin1 -t utf-8)") from None
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    return {"features": features, "keep_default_na": False}


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes fixed-length examples.

    ``source``: "stdlib" (the embedded default), a local file/dir/glob, or a hub dataset name
    (``name``, ``name:config`` or ``name:config:split`` with an optional config and a split that may be
    sliced, ``name::train_sft[:10%]``; default split ``train``; needs network unless already in the cache).
    ``sample_by`` says how ``.txt`` files split into documents (each gets an eos).
    """

    source: str = "stdlib"
    format: str = "text"
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    seq_len: int = 128
    packing: bool = True
    eval_fraction: float = 0.05
    seed: int = 0
    max_samples: int | None = None
    num_proc: int | None = None
    sample_by: str = "paragraph"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(
                f"data.source={self.source!r} must be 'stdlib', a local path/glob or a hub dataset name"
            )
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not one of {FORMATS}")
        if self.source == "stdlib" and self.format != "text":
            raise ValueError(f"data.source='stdlib' is plain text; set data.format='text' (got {self.format!r})")
        for name in ("text_field", "messages_field", "prompt_field", "response_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be a non-empty column name")
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len!r} must be an integer >= 2")
        if not isinstance(self.packing, bool):
            raise ValueError(f"data.packing={self.packing!r} must be true or false")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction={self.eval_fraction!r} must be in [0, 1); 0 disables eval")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r} must be a non-negative integer")
        for name in ("max_samples", "num_proc"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"data.{name}={value!r} must be a positive integer or null")
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"data.sample_by={self.sample_by!r} is not one of {SAMPLE_BY}")
        if self.source != "stdlib":
            resolve_local_files(self.source)  # a local path that matches nothing fails here, early


def _load_raw(cfg: DataConfig, cache: Path) -> datasets.Dataset:
    hf_cache = str(cache / "datasets")
    if cfg.source == "stdlib":
        key = settings_hash({"max_files": cfg.max_samples, "python": platform.python_version(), "v": 1})
        corpus = cache / "corpus" / f"stdlib-{key}.jsonl"
        if not corpus.is_file():  # written once, atomically: ranks may race here
            corpus.parent.mkdir(parents=True, exist_ok=True)
            tmp = corpus.with_name(f"{corpus.name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                for text in stdlib_corpus(max_files=cfg.max_samples):
                    f.write(json.dumps({"text": text}) + "\n")
            os.replace(tmp, corpus)
        return datasets.load_dataset("json", data_files=[str(corpus)], split="train", cache_dir=hf_cache)
    local = resolve_local_files(cfg.source)
    if local is not None:
        builder, files = local
        kwargs: dict[str, Any] = {}
        if builder == "text":
            kwargs = {"sample_by": cfg.sample_by}
        elif builder == "csv":
            kwargs = _csv_text_columns(files)
        try:
            return datasets.load_dataset(
                builder, data_files=files, split="train", cache_dir=hf_cache, num_proc=cfg.num_proc, **kwargs
            )
        except ValueError as e:
            if "corresponds to no data" not in str(e):
                raise
            raise ValueError(f"data.source={cfg.source!r} has no rows ({builder} files {files[:3]}"
                             f"{' …' if len(files) > 3 else ''}); point data.source at data") from e
        except datasets.exceptions.DatasetGenerationError as e:  # says only "An error occurred …"
            cause = e.__cause__ or e.__context__
            fix = ("re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)" if isinstance(cause, UnicodeDecodeError)
                   else f"fix the file (a {builder} file that does not parse?)")
            raise ValueError(f"data.source={cfg.source!r}: the {builder} files {files[:3]}"
                             f"{' …' if len(files) > 3 else ''} could not be read ({type(cause).__name__}: {cause}); "
                             f"{fix}") from e
    name, config, split = (cfg.source.split(":", 2) + ["", ""])[:3]
    try:
        return datasets.load_dataset(
            name, config or None, split=split or "train", cache_dir=hf_cache, num_proc=cfg.num_proc
        )
    except Exception as e:
        raise RuntimeError(
            f"data.source={cfg.source!r} is not a local file/dir/glob, and loading it as a Hugging Face hub "
            f"dataset failed ({type(e).__name__}: {e}). A hub source is 'name', 'name:config' or "
            f"'name:config:split' (split 'train' unless named, e.g. 'name::train_sft'); hub datasets need "
            f"network access (or an existing cache); otherwise point data.source at local "
            f".txt/.jsonl/.json/.parquet/.csv files"
        ) from e


def _check_columns(cfg: DataConfig, raw: datasets.Dataset) -> None:
    needed = {
        "text": ["text_field"], "chat": ["messages_field"], "prompt_response": ["prompt_field", "response_field"]
    }
    # another format whose default columns this source has: likely the format is what is wrong
    fits = [fmt for fmt, names in needed.items() if fmt != cfg.format
            and all(DataConfig.__dataclass_fields__[n].default in raw.column_names for n in names)]
    for name in needed[cfg.format]:
        column = getattr(cfg, name)
        if column not in raw.column_names:
            other = f", or data.format={fits[0]} (its columns are there)" if fits else ""
            raise ValueError(
                f"data.{name}={column!r} is not a column of data.source={cfg.source!r} with data.format="
                f"{cfg.format} (columns: {raw.column_names}); set data.{name} to the right column{other}"
            )


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` if this tokenizer adds bos by itself (Llama-style), else ``[]`` (respect its convention)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and with_special and with_special[0] == bos else []


def _column(batch: dict[str, list], cfg: dict[str, Any], field: str) -> list[Any]:
    """The column named by ``cfg[field]``. Bytes that are not UTF-8 in a json or csv file reach Arrow unchecked and
    fail only here, as a bare UnicodeDecodeError naming neither the file nor the column."""
    try:
        return batch[cfg[field]]
    except UnicodeDecodeError as err:
        raise ValueError(f"data.{field}={cfg[field]!r}: data.source={cfg.get('source')!r} holds text that is not "
                         f"UTF-8 ({err}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _strings(batch: dict[str, list], cfg: dict[str, Any], field: str) -> list[str | None]:
    """The column named by ``cfg[field]``, checked to hold text (or nulls): the tokenizer's own error
    for a number or a list names neither the column nor the value."""
    values = _column(batch, cfg, field)
    for value, row in zip(values, batch[ROW_COLUMN]):
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"data.{field}={cfg[field]!r}: row {row} holds a {type(value).__name__} ({str(value)[:60]!r}), not "
                f"text; point data.{field} at a text column or write the values as strings"
            )
    return values


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text; a map batch may have none left (all blank), where the tokenizer would raise."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _prompt_response_ids(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Each pair as (ids of ``prompt + response`` tokenized as one text, how many of them are the prompt's: the
    tokens that end within it; one spanning the boundary writes response text, so it is the response's). Tokenized
    apart, a SentencePiece tokenizer (Llama-2, Mistral) opened every response with a word-start "▁": the model
    learned to answer with a space that was not in the data. A slow tokenizer has no offsets: the two apart."""
    if not pairs:
        return []
    if not getattr(tokenizer, "is_fast", False):
        prompts, responses = _encode(tokenizer, [p for p, _ in pairs]), _encode(tokenizer, [r for _, r in pairs])
        return [(p + r, len(p)) for p, r in zip(prompts, responses)]
    encoded = tokenizer([p + r for p, r in pairs], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (prompt, _) in zip(encoded["input_ids"], encoded["offset_mapping"], pairs):
        n_prompt = 0
        while n_prompt < len(ids) and offsets[n_prompt][1] <= len(prompt):
            n_prompt += 1
        out.append((ids, n_prompt))
    return out


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, cfg: dict[str, Any]) -> dict[str, list]:
    """Raw rows → one row of ``input_ids``, ``labels`` and length ``n`` per document (none for blank rows)."""
    eos, fmt = tokenizer.eos_token_id, cfg["format"]
    prefix = _bos_prefix(tokenizer) if fmt != "chat" else []
    examples: list[tuple[list[int], list[int]]] = []
    if fmt == "text":  # blank or whitespace-only text (blank lines under sample_by=line) is no document
        texts = [t for t in _strings(batch, cfg, "text_field") if t and not t.isspace()]
        examples = [(prefix + ids + [eos], prefix + ids + [eos]) for ids in _encode(tokenizer, texts)]
    elif fmt == "prompt_response":
        # a row without one of the two (null: another schema in the same files) is no example; an empty
        # prompt or response ("") is
        columns = zip(_strings(batch, cfg, "prompt_field"), _strings(batch, cfg, "response_field"))
        pairs = [(p, r) for p, r in columns if p is not None and r is not None]
        for ids, n_prompt in _prompt_response_ids(tokenizer, pairs):
            examples.append((prefix + ids + [eos], [IGNORE_INDEX] * (len(prefix) + n_prompt) + ids[n_prompt:] + [eos]))
    else:
        # a null or empty conversation (another schema in the same files) is no example, as blank text
        for messages, row in zip(_column(batch, cfg, "messages_field"), batch[ROW_COLUMN]):
            if messages in (None, []):
                continue
            try:
                examples.append(chat_ids_labels(tokenizer, messages))
            except ValueError as e:  # name the column and the row: the error is raised deep inside datasets.map
                raise ValueError(f"data.messages_field={cfg['messages_field']!r}, row {row}: {e}") from e
    examples = [(ids, labels) for ids, labels in examples if ids]
    return {"input_ids": [i for i, _ in examples], "labels": [lab for _, lab in examples],
            "n": [len(i) for i, _ in examples]}


def _pack_batch(
    batch: dict[str, list], indices: list[int], docs: datasets.Dataset, cum: np.ndarray, seq_len: int
) -> dict[str, list]:
    """The blocks of the whole split's token stream (``seq_len`` each, block k = tokens ``[k·seq_len,
    (k+1)·seq_len)``) that start within this map batch's documents; the last one reads on into the
    documents after the batch. So only the split's final partial block is dropped, and the rows do not
    depend on how ``datasets.map`` cuts batches (``num_proc``). ``cum[i]``: tokens before document i."""
    out: dict[str, list] = {"input_ids": [], "labels": []}
    if not indices:
        return out
    a, b = indices[0], indices[-1] + 1
    assert indices == list(range(a, b)), "batched map hands a contiguous range of documents"
    first = -(-int(cum[a]) // seq_len)  # ceil: a block starting before cum[a] belongs to the batch before
    stop = min(-(-int(cum[b]) // seq_len), int(cum[-1]) // seq_len)
    if stop <= first:
        return out
    ids = [t for doc in batch["input_ids"] for t in doc]
    labels = [t for doc in batch["labels"] for t in doc]
    if stop * seq_len > cum[b]:  # the last block runs on into the next documents
        more = docs[b : int(np.searchsorted(cum, stop * seq_len, side="left"))]
        ids += [t for doc in more["input_ids"] for t in doc]
        labels += [t for doc in more["labels"] for t in doc]
    for k in range(first, stop):
        start = k * seq_len - int(cum[a])
        out["input_ids"].append(ids[start : start + seq_len])
        out["labels"].append(labels[start : start + seq_len])
    return _learnable_rows(out)


def _pad_batch(batch: dict[str, list], seq_len: int, pad: int) -> dict[str, list]:
    """One row per document, cut at ``seq_len`` and padded (label -100, attention 0)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        ids, labels, n_pad = ids[:seq_len], labels[:seq_len], max(0, seq_len - len(ids))
        out["input_ids"].append(ids + [pad] * n_pad)
        out["labels"].append(labels + [IGNORE_INDEX] * n_pad)
        out["attention_mask"].append([1] * len(ids) + [0] * n_pad)
    return _learnable_rows(out)


def _learnable_rows(out: dict[str, list]) -> dict[str, list]:
    """The rows with a label after position 0. The model shifts labels, so position 0 is never predicted: a row
    whose only labels sit there (a packed block opening with the eos of a response, then prompt) has nothing to
    learn (a NaN loss for a model that averages per micro-batch)."""
    keep = [i for i, labels in enumerate(out["labels"]) if any(t != IGNORE_INDEX for t in labels[1:])]
    return out if len(keep) == len(out["labels"]) else {k: [v[i] for i in keep] for k, v in out.items()}


def _features(cfg: DataConfig) -> datasets.Features:
    seq = lambda dtype: datasets.List(datasets.Value(dtype), length=cfg.seq_len)  # noqa: E731
    cols = {"input_ids": seq("int32"), "labels": seq("int32")}
    if not cfg.packing:
        cols["attention_mask"] = seq("int8")
    return datasets.Features(cols)


_DOC_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "n": datasets.Value("int64"),
})


def _tokenizer_key(tokenizer: Any) -> str:
    """``tokenizer_fingerprint`` plus the ids of a probe: settings kept outside the tokenizer's serialization
    (``split_special_tokens``) change ids too, and a cache keyed without them would be silently stale."""
    probe = " ".join(tokenizer.all_special_tokens) + " Hello  world\n\tx = 1  # ü 你好\n\n"
    ids = [tokenizer(probe, add_special_tokens=special)["input_ids"] for special in (False, True)]
    return settings_hash({"fp": tokenizer_fingerprint(tokenizer), "probe": ids}, 16)


def _no_examples_error(cfg: DataConfig, n_docs: int, n_tokens: int) -> ValueError:
    """Why no row survived: no text, too little for one block, or (prompt/response, chat) no response token to
    learn within the first ``seq_len`` tokens, where the fix is a *longer* ``seq_len`` or responses in the data."""
    head = f"data.source={cfg.source!r} gave no training examples of seq_len={cfg.seq_len}"
    if n_docs == 0:
        field = {"text": "text_field", "chat": "messages_field"}.get(cfg.format, "prompt_field")
        return ValueError(f"{head}: every row's data.{field}={getattr(cfg, field)!r} is blank, empty or null; "
                          f"point data.source at data or data.{field} at the column that holds it")
    if cfg.packing and n_tokens < cfg.seq_len:
        return ValueError(f"{head}: its {n_docs} document(s) hold {n_tokens} tokens, fewer than one seq_len block; "
                          f"lower data.seq_len to at most {n_tokens} or add data")
    responses = ("no assistant message follows another message (an opening one is context)" if cfg.format == "chat"
                 else "the responses are missing")
    return ValueError(f"{head} with a response token to learn: the prompts fill the first seq_len tokens "
                      f"(raise data.seq_len), or {responses}")


def _doc_lengths(docs: datasets.Dataset) -> np.ndarray:
    return np.asarray(docs.with_format("numpy")["n"], dtype=np.int64) if len(docs) else np.zeros(0, np.int64)


def _to_examples(cfg: DataConfig, docs: datasets.Dataset, pad: int, split: str, fingerprint: str) -> datasets.Dataset:
    """Documents → ``seq_len``-token rows (packed blocks, or one padded row per document); logs the token count."""
    n = _doc_lengths(docs)
    cum = np.concatenate([[0], np.cumsum(n, dtype=np.int64)])
    common: dict[str, Any] = dict(
        batched=True, batch_size=_MAP_BATCH, remove_columns=docs.column_names, features=_features(cfg),
        num_proc=cfg.num_proc, new_fingerprint=fingerprint, desc=f"{'pack' if cfg.packing else 'pad'} {split}",
    )
    if cfg.packing:
        rows = docs.map(_pack_batch, with_indices=True, fn_kwargs={"docs": docs, "cum": cum, "seq_len": cfg.seq_len},
                        **common)
        dropped = int(cum[-1]) - int(cum[-1]) // cfg.seq_len * cfg.seq_len
        log.info(f"{split}: {len(docs)} documents, {int(cum[-1])} tokens → {len(rows)} blocks of {cfg.seq_len}; "
                 f"dropped: the last partial block ({dropped} tokens), {int(cum[-1]) // cfg.seq_len - len(rows)} "
                 f"blocks without a label after position 0", ranks=[0])
        return rows
    rows = docs.map(_pad_batch, fn_kwargs={"seq_len": cfg.seq_len, "pad": pad}, **common)
    long = n > cfg.seq_len
    if long.any():
        log.warning(f"{split}: {int(long.sum())} of {len(docs)} documents are longer than data.seq_len="
                    f"{cfg.seq_len} and are cut there ({int((n[long] - cfg.seq_len).sum())} of {int(cum[-1])} tokens "
                    f"not trained); raise data.seq_len or set data.packing=true to train all of them", ranks=[0])
    return rows


# why a row of each format gives no document (the tokenizer turning text into no tokens aside)
_NO_DOCUMENT = {
    "text": "blank, whitespace-only or null data.text_field",
    "prompt_response": "a null or missing data.prompt_field or data.response_field",
    "chat": "a null, missing or empty data.messages_field",
}


def _log_rows_without_document(cfg: DataConfig, split: str, n_rows: int, n_docs: int) -> None:
    """Rows skipped as no document are counted: blank lines of a text file are routine (info), but a structured
    row without its field is likely another schema mixed into the files (warning)."""
    if n_docs == n_rows:
        return
    message = f"{split}: {n_rows - n_docs} of {n_rows} rows of data.source={cfg.source!r} are no document " \
              f"({_NO_DOCUMENT[cfg.format]}) and are skipped"
    if cfg.format == "text":
        log.info(message, ranks=[0])
    else:
        log.warning(f"{message}; check that data.format={cfg.format} and its field names fit those rows", ranks=[0])


def load_datasets(
    cfg: DataConfig, tokenizer: Any, cache_dir: str | os.PathLike | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and eval datasets of ``seq_len``-token examples (eval is ``None`` if disabled or empty).

    Columns: ``input_ids``, ``labels`` and, unpacked, ``attention_mask``. The eval split is taken
    from documents before packing (no document straddles both splits). Two cached maps per split:
    tokenize (one row per document), then pack or pad, so a new ``seq_len`` does not tokenize again.
    Safe to call on every rank at once (cache writes are atomic); calling it on one rank first, then
    a barrier, saves work.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; it is needed to separate documents and end responses: "
                         "set eos_token in its tokenizer_config.json or use a tokenizer that has one")
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.format='chat' needs a tokenizer with a chat template, and "
                         f"{getattr(tokenizer, 'name_or_path', None) or type(tokenizer).__name__} has none: set "
                         "model.tokenizer to one that has (e.g. the instruct variant's), or give the tokenizer a "
                         "chat_template in its tokenizer_config.json; for prompt/response data use "
                         "format='prompt_response'")
    cache = _resolve_cache(cache_dir) / "data"
    raw = _load_raw(cfg, cache)
    if len(raw) == 0:
        raise ValueError(f"data.source={cfg.source!r} has no rows; point data.source at data")
    _check_columns(cfg, raw)
    raw = raw.add_column(ROW_COLUMN, np.arange(len(raw)),  # before max_samples and the split: source numbering
                         new_fingerprint=settings_hash({"in": raw._fingerprint, "column": ROW_COLUMN}, 16))
    if cfg.max_samples is not None and len(raw) > cfg.max_samples:
        raw = raw.select(range(cfg.max_samples))
    splits: dict[str, datasets.Dataset] = {"train": raw}
    if cfg.eval_fraction > 0:
        n_eval = math.ceil(len(raw) * cfg.eval_fraction)
        if len(raw) < 2 or n_eval >= len(raw):
            raise ValueError(
                f"data.eval_fraction={cfg.eval_fraction} leaves no training documents out of {len(raw)}; "
                f"lower it, set it to 0, or add data (for one .txt file try data.sample_by='paragraph')"
            )
        parts = raw.train_test_split(test_size=n_eval, shuffle=True, seed=cfg.seed)
        splits = {"train": parts["train"], "eval": parts["test"]}

    # what the split fingerprint does not already cover (source, seed, max_samples, eval_fraction)
    processing = ("format", "text_field", "messages_field", "prompt_field", "response_field")
    settings = {k: getattr(cfg, k) for k in processing}
    tok_key = _tokenizer_key(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, datasets.Dataset] = {}
    for split, ds in splits.items():
        docs = ds.map(
            _tokenize_batch,
            batched=True,
            batch_size=_MAP_BATCH,
            remove_columns=ds.column_names,
            features=_DOC_FEATURES,
            fn_kwargs={"tokenizer": tokenizer, "cfg": {**settings, "source": cfg.source}},  # source: for errors
            num_proc=cfg.num_proc,
            new_fingerprint=settings_hash({"in": ds._fingerprint, "tok": tok_key, "cfg": settings,
                                           "v": _RECIPE_VERSION}, 16),
            desc=f"tokenize {split}",
        )
        _log_rows_without_document(cfg, split, len(ds), len(docs))
        key = {"in": docs._fingerprint, "seq_len": cfg.seq_len, "packing": cfg.packing, "v": _RECIPE_VERSION}
        out[split] = _to_examples(cfg, docs, pad, split, settings_hash(key, 16))
        if split == "train" and len(out[split]) == 0:
            raise _no_examples_error(cfg, len(docs), int(_doc_lengths(docs).sum()))
    eval_ds = out.get("eval")
    if eval_ds is not None and len(eval_ds) == 0:
        log.warning(f"the eval split has no complete seq_len={cfg.seq_len} example; eval is disabled", ranks=[0])
        eval_ds = None
    log.info(
        f"data {cfg.source!r}: {len(out['train'])} train / {len(eval_ds) if eval_ds is not None else 0} eval "
        f"examples of {cfg.seq_len} tokens",
        ranks=[0],
    )
    return out["train"], eval_ds


def steps_per_epoch(dataset: datasets.Dataset, micro_batch_size: int, dp_size: int) -> int:
    """Complete global batches (``micro_batch_size * dp_size`` examples) in one epoch."""
    return len(dataset) // (micro_batch_size * dp_size)


def rank_batches(
    dataset: datasets.Dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    epoch: int,
    seed: int,
    start_step: int = 0,
    shuffle: bool = True,
    start_example: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of one epoch, as int64 tensors ``[micro_batch, seq_len]``.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` (a pair, so seed 1/epoch 0
    and seed 0/epoch 1 differ). The global batch of step ``s`` is the examples at positions
    ``[s*G, (s+1)*G)`` with ``G = dp_size * micro_batch_size``; rank ``dp_rank`` takes the
    contiguous slice ``[dp_rank*mb, (dp_rank+1)*mb)`` of it. So the union over ranks is exactly the
    single-rank batch of ``G``, and ``start_step`` resumes exactly where a run stopped. The
    incomplete last global batch is dropped. ``start_example`` shifts the global batches to start
    that many examples into the epoch's order: a resume whose global batch size changed continues at
    the examples consumed, not at the step count. Pass the *data-parallel* coordinates: ranks of one
    tensor/pipeline group share a dp_rank and so see the same batch; expert-parallel ranks are
    data-parallel ranks and see different batches. Eval batches come from ``eval_rank_batches``.
    """
    checks = (("micro_batch_size", micro_batch_size, 1), ("dp_size", dp_size, 1), ("epoch", epoch, 0), ("seed", seed, 0))
    for name, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r} must be in [0, dp_size={dp_size})")
    n_steps = steps_per_epoch(dataset, micro_batch_size, dp_size)
    if n_steps == 0:
        raise ValueError(
            f"the dataset has {len(dataset)} examples, fewer than one global batch of "
            f"micro_batch_size*dp_size = {micro_batch_size}*{dp_size}; lower the batch size or add data"
        )
    if not isinstance(start_example, int) or not 0 <= start_example <= len(dataset):
        raise ValueError(f"start_example={start_example!r} must be in [0, {len(dataset)}] (the examples)")
    n_steps = (len(dataset) - start_example) // (micro_batch_size * dp_size)
    if not isinstance(start_step, int) or not 0 <= start_step <= n_steps:
        raise ValueError(f"start_step={start_step!r} must be in [0, steps_per_epoch={n_steps}]")
    order = _epoch_order(len(dataset), seed, epoch) if shuffle else np.arange(len(dataset))
    order = order[start_example:]
    formatted, columns = _as_torch(dataset)
    return _iterate(formatted, order, columns, micro_batch_size, dp_rank, dp_size, start_step, n_steps)


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of an epoch, drawn from the pair ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _as_torch(dataset: datasets.Dataset) -> tuple[datasets.Dataset, list[str]]:
    """The dataset formatted as torch tensors over the columns a batch carries, and those columns."""
    columns = [c for c in ("input_ids", "labels", "attention_mask") if c in dataset.column_names]
    return dataset.with_format("torch", columns=columns), columns


def eval_rank_batches(
    dataset: datasets.Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, max_batches: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's eval micro-batches: the split in one fixed shuffled order (``seed``: packed sequences of a
    document are consecutive, so the first rows in order would be a few documents only), up to ``max_batches``
    global batches, the last one short if the split ends there (an eval split smaller than one global batch is
    still evaluated). The same rows at every eval, so eval losses compare across steps.

    Every rank yields the same number of micro-batches, since MoE layers exchange tokens between ranks;
    positions past the end of the split repeat row 0 with all labels ``-100``, so they add no loss.
    """
    global_batch = micro_batch_size * dp_size
    formatted, columns = _as_torch(dataset)
    order = torch.from_numpy(_epoch_order(len(dataset), seed, 0))
    for step in range(min(max_batches, math.ceil(len(dataset) / global_batch))):
        first = step * global_batch + dp_rank * micro_batch_size
        positions = torch.arange(first, first + micro_batch_size)
        real = positions < len(dataset)
        rows = formatted[order[torch.where(real, positions, 0)].tolist()]
        batch = {c: rows[c].to(torch.long) for c in columns}
        batch["labels"][~real] = IGNORE_INDEX
        yield batch


def _iterate(
    ds: datasets.Dataset,
    order: np.ndarray,
    columns: list[str],
    mb: int,
    dp_rank: int,
    dp_size: int,
    start: int,
    stop: int,
) -> Iterator[dict[str, torch.Tensor]]:
    for step in range(start, stop):
        first = step * dp_size * mb + dp_rank * mb
        rows = ds[order[first : first + mb].tolist()]
        yield {c: rows[c].to(torch.long) for c in columns}
