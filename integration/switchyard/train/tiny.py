"""The embedded default: a byte-level BPE tokenizer and a tiny Llama, built offline and cached.

The default run must need no download, so both are derived from a corpus present on every machine
with Python: the standard library's ``.py`` sources. Builds are deterministic (sorted files, seeded
init) and keyed by a hash of their settings, so a changed setting rebuilds into a new directory
instead of silently reusing a stale one. Writes go to a temporary directory that is renamed into
place, so ranks that build concurrently (or a build killed midway) never leave a half-written
artifact that looks complete.

    python -c "from switchyard.train.tiny import *; print(build_tiny_dense_model(None, build_tokenizer(None)))"
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from switchyard.log import get_logger

log = get_logger(__name__)

# Bump when the build recipe changes, so caches made by older code are not reused.
_RECIPE_VERSION = 1
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# `{% generation %}` marks the trained span, so transformers' `return_assistant_tokens_mask`
# works too; the eos closing each answer is inside it, so the model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_COMPLETE = ".switchyard_complete.json"

TINY_LLAMA_DEFAULTS: dict[str, Any] = dict(
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
)


def tiny_setting_defaults() -> dict[str, Any]:
    """Every setting ``build_tiny_dense_model`` uses (its own arguments and the LlamaConfig fields) with its
    default; LlamaConfig would keep any other key silently, so callers validate keys against this."""
    from transformers import LlamaConfig

    return {**LlamaConfig().to_dict(), **TINY_LLAMA_DEFAULTS, "name": None, "seed": 0}


def default_cache_dir() -> Path:
    """``$SWITCHYARD_CACHE`` or ``~/.cache/switchyard``."""
    env = os.environ.get("SWITCHYARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "switchyard"


def _resolve_cache(cache_dir: str | os.PathLike | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def settings_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of JSON-able settings (sorted keys), used to key cache directories."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The stdlib's ``.py`` files sorted by relative path, without test dirs or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found if max_files is None else found[:max_files]


def stdlib_corpus(max_files: int | None = None, max_bytes: int | None = None) -> list[str]:
    """Text of the stdlib's ``.py`` files (one string per file), deterministic for a Python build.

    Files that are not UTF-8 are skipped; ``max_files`` counts files kept, ``max_bytes`` stops
    once that many characters have been collected (keeps tokenizer training fast).
    """
    texts: list[str] = []
    total = 0
    for path in stdlib_files():
        if max_files is not None and len(texts) >= max_files:
            break
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            total += len(text)
    return texts


def _atomic_build(target: Path, build: Callable[[Path], None], marker: dict[str, Any]) -> Path:
    """Run ``build(tmp)`` and rename ``tmp`` to ``target``; a concurrent winner is kept as is."""
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text(json.dumps(marker, sort_keys=True, indent=1))
        if target.exists() and not (target / _COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a partial dir from an older, killed build
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # lost the race to a build that is not done
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tokenizer_settings(vocab_size: int, max_files: int | None, max_bytes: int | None) -> dict[str, Any]:
    return {
        "recipe": _RECIPE_VERSION,
        "vocab_size": vocab_size,
        "max_files": max_files,
        "max_bytes": max_bytes,
        "python": platform.python_version(),  # the corpus is this Python's stdlib
        "special": [PAD, BOS, EOS, UNK, *ROLE_TOKENS],
        "chat_template": CHAT_TEMPLATE,
    }


def build_tokenizer(
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = 2048,
    max_files: int | None = None,
    max_bytes: int | None = 8_000_000,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the stdlib corpus, cached in ``cache_dir/tokenizer/<hash>``.

    Byte-level means no input is ever unknown (``<|unk|>`` exists only for tools that expect
    one); the role tokens are special so chat prompts split at exact token boundaries. No
    bos/eos is added by ``tokenizer(text)``: the data pipeline and chat template place them.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: need >= 300 (256 bytes + specials + merges)")
    settings = _tokenizer_settings(vocab_size, max_files, max_bytes)
    target = _resolve_cache(cache_dir) / "tokenizer" / settings_hash(settings)

    def build(tmp: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        texts = stdlib_corpus(max_files=max_files, max_bytes=max_bytes)
        if not texts:
            raise RuntimeError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(settings["special"]),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer, length=len(texts))
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=UNK,
            extra_special_tokens=list(ROLE_TOKENS),
            chat_template=CHAT_TEMPLATE,
            padding_side="right",
        )
        hf.save_pretrained(tmp)
        log.info(f"trained tokenizer: vocab {len(hf)} on {len(texts)} stdlib files", ranks=[0])

    _atomic_build(target, build, settings)
    return PreTrainedTokenizerFast.from_pretrained(target)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what changes token ids: the full backend serialization, template and specials.

    Used for cache keys instead of pickling the tokenizer, whose pickle can change after use.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ]
    return hashlib.sha256(state.encode() + json.dumps(extra, default=str).encode()).hexdigest()[:16]


def build_tiny_dense_model(
    cache_dir: str | os.PathLike | None,
    tokenizer: PreTrainedTokenizerFast,
    name: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A small seeded Llama (+ the tokenizer) saved as safetensors; returns its directory.

    ``overrides`` replace entries of ``TINY_LLAMA_DEFAULTS`` (any LlamaConfig field). The
    directory is ``cache_dir/<name>``, default name ``tiny-llama-<hash of settings>``; an existing
    complete directory with the same settings is reused, a stale one is rebuilt.
    """
    ignored = sorted(set(overrides) & {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"})
    if ignored:
        log.warning(f"build_tiny_dense_model ignores {ignored}: they come from the tokenizer", ranks=[0])
    cfg_kwargs = {**TINY_LLAMA_DEFAULTS, **overrides}
    cfg_kwargs.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tok_key = tokenizer_fingerprint(tokenizer)
    settings = {"recipe": _RECIPE_VERSION, "seed": seed, "config": cfg_kwargs, "tokenizer": tok_key}
    key = settings_hash(settings)
    target = _resolve_cache(cache_dir) / (name or f"tiny-llama-{key}")
    marker = target / _COMPLETE
    if marker.is_file() and json.loads(marker.read_text()).get("key") != key:
        log.warning(f"{target} was built with other settings; rebuilding it", ranks=[0])
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        try:
            os.rename(target, stale)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(stale, ignore_errors=True)

    def build(tmp: Path) -> None:
        config = AutoConfig.for_model("llama", **cfg_kwargs)
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        log.info(f"built tiny llama: {n_params / 1e6:.2f}M params -> {target}", ranks=[0])

    return _atomic_build(target, build, {"key": key, **settings})
