"""The tokenizer beside a model, refused when it cannot tokenize.

transformers 5 loads a directory without any tokenizer file as an *empty* tokenizer (one special token) instead of
failing: a fine-tune on it trains on end-of-sequence tokens only and a server answers every prompt as empty. Both
the fine-tune and the server load through :func:`load_tokenizer`, which names the directory and the fix instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
PROBE_TEXT = "Hello world, 123."


class TokenizerError(ValueError):
    """The directory has no usable tokenizer (this module's checks; transformers' own errors pass through)."""


def has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(source: str | Path, fix: str) -> Any:
    """``AutoTokenizer.from_pretrained(source)`` (a local directory or a hub id); a ``TokenizerError`` ending in
    ``fix`` when a local directory holds no tokenizer file, or when the tokenizer turns text into no tokens."""
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    if local.is_dir() and not has_tokenizer_files(local):
        raise TokenizerError(f"{source} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): {fix}")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    try:
        probe = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exceptions (e.g. no unk token)
        raise TokenizerError(f"the tokenizer of {source} cannot tokenize {PROBE_TEXT!r} ({err}): {fix}") from None
    if not probe:
        raise TokenizerError(f"the tokenizer of {source} turns {PROBE_TEXT!r} into no tokens ({len(tokenizer)} in "
                             f"its vocabulary: an empty tokenizer): {fix}")
    return tokenizer
