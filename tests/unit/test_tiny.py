"""The embedded default: stdlib corpus, cached byte-level BPE tokenizer, tiny seeded Llama.

    python -m pytest -q tests/unit/test_tiny.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")  # not on the GPU image; CI installs it

import math
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchyard.train.tiny import (
    BOS,
    EOS,
    PAD,
    ROLE_TOKENS,
    UNK,
    build_tiny_dense_model,
    build_tokenizer,
    default_cache_dir,
    stdlib_corpus,
    stdlib_files,
)

TOK_KW = dict(vocab_size=1024, max_bytes=1_000_000)  # small and fast; the default recipe is the same code
MODEL_KW = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sy_cache")


@pytest.fixture(scope="module")
def tok(cache: Path):
    return build_tokenizer(cache, **TOK_KW)


def test_stdlib_corpus_is_deterministic_and_skips_tests() -> None:
    files = stdlib_files()
    assert len(files) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and files == stdlib_files()
    for path in files:
        assert not {"test", "tests", "site-packages", "__pycache__"} & set(path.relative_to(root).parts), path
    a, b = stdlib_corpus(max_files=5), stdlib_corpus(max_files=5)
    assert a == b and len(a) == 5 and all(isinstance(t, str) and t for t in a)
    assert sum(map(len, stdlib_corpus(max_bytes=50_000))) < 50_000 + max(map(len, stdlib_corpus()))


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWITCHYARD_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SWITCHYARD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "switchyard"


def test_tokenizer_specials_and_round_trip(tok) -> None:
    assert len(tok) == TOK_KW["vocab_size"]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (PAD, BOS, EOS, UNK)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    text = "def f(x):\n    return {'héllo': x ** 2}  # ünïcode ✓ 😀\n\tTabs\r\n"
    ids = tok(text)["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # the pipeline places them
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    for role in ROLE_TOKENS:  # role markers are single tokens
        assert len(tok(role)["input_ids"]) == 1


def test_tokenizer_is_cached_and_deterministic(cache: Path, tok, tmp_path: Path) -> None:
    start = time.perf_counter()
    again = build_tokenizer(cache, **TOK_KW)
    assert time.perf_counter() - start < 1.0
    assert again.get_vocab() == tok.get_vocab()
    fresh = build_tokenizer(tmp_path, **TOK_KW)  # rebuilt from scratch elsewhere: identical
    assert fresh.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = build_tokenizer(cache, vocab_size=512, max_bytes=TOK_KW["max_bytes"])
    assert len(other) == 512 and len(list((cache / "tokenizer").iterdir())) == 2
    reloaded = AutoTokenizer.from_pretrained(next(p for p in (cache / "tokenizer").iterdir()))
    assert reloaded.chat_template == tok.chat_template
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(cache, vocab_size=10)


def test_chat_template_renders_and_masks_responses(tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello.<|eos|>"
        "<|user|>\nBye?\n<|assistant|>\nBye.<|eos|>"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi?\n<|assistant|>\n")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "Hello.<|eos|>Bye.<|eos|>"


def test_tiny_model_builds_loads_and_gives_finite_loss(cache: Path, tok) -> None:
    start = time.perf_counter()
    path = build_tiny_dense_model(cache, tok, **MODEL_KW)
    build_s = time.perf_counter() - start
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 256)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    ids = tok(stdlib_corpus(max_files=1)[0], add_special_tokens=False)["input_ids"][:128]
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(len(tok))) < 1.0  # random init ≈ uniform
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tok.get_vocab()

    start = time.perf_counter()
    assert build_tiny_dense_model(cache, tok, **MODEL_KW) == path  # reused, not rebuilt
    assert time.perf_counter() - start < min(1.0, build_s)
    assert build_tiny_dense_model(cache, tok, **{**MODEL_KW, "num_hidden_layers": 3}) != path


def test_tiny_model_is_seeded_and_rebuilds_stale_named_dir(cache: Path, tok, tmp_path: Path) -> None:
    a = AutoModelForCausalLM.from_pretrained(build_tiny_dense_model(cache, tok, **MODEL_KW))
    b_path = build_tiny_dense_model(tmp_path, tok, name="mine", **MODEL_KW)
    b = AutoModelForCausalLM.from_pretrained(b_path)
    assert b_path == tmp_path / "mine"
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    rng_before = torch.get_rng_state()
    c_path = build_tiny_dense_model(tmp_path, tok, name="mine", seed=1, **MODEL_KW)  # same name, new settings
    assert torch.equal(rng_before, torch.get_rng_state())  # caller's RNG untouched
    c = AutoModelForCausalLM.from_pretrained(c_path)
    assert c_path == b_path and not torch.equal(c.lm_head.weight, a.lm_head.weight)
    assert not list(tmp_path.glob(".*"))  # no temporary or stale dirs left behind
