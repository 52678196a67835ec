"""How the fine-tune loads an HF source into host memory: at the training precision (half the bytes in a bf16 run,
the same values the engine's cast would give), and how many ranks of a node may load it at once."""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")  # switchyard.train.run_config imports the data module

import torch

from harness import REPO_ROOT
from switchyard.train.load_waves import LoadFootprint, ranks_at_once
from switchyard.train.run_config import load_run_config

TINY = REPO_ROOT / "configs" / "finetune" / "tiny.yaml"


@pytest.mark.parametrize("available,expected", [
    (8 * 10 + 8 * 60, 8),  # room for every rank's share and eight loaders
    (8 * 10 + 2 * 60 + 59, 2),  # two loaders fit, not three
    (8 * 10 + 59, 1),  # not even one: one at a time (the loader warns)
    (10, 1),
])
def test_wave_size_leaves_room_for_every_ranks_kept_share(available, expected):
    assert ranks_at_once(LoadFootprint(loaded_bytes=60, kept_bytes=10), 8, available) == expected


def test_the_run_config_refuses_a_wave_of_no_ranks():
    with pytest.raises(ValueError, match=r"model.load_ranks_at_once=0 must be >= 1"):
        load_run_config(TINY, ["model.load_ranks_at_once=0"])


def test_a_bf16_run_loads_the_source_in_bf16_with_the_values_the_engines_cast_gives():
    from switchyard.moe.layer import MoELayer
    from switchyard.train.model_source import load_footprint, load_model, resolve_source

    fp32_config = load_run_config(TINY, ["parallel.ep=1"])
    bf16_config = load_run_config(TINY, ["parallel.ep=1", "train.precision=bf16"])
    source = resolve_source(fp32_config)
    fp32_model, _ = load_model(fp32_config, None, source)
    bf16_model, _ = load_model(bf16_config, None, source)

    assert {p.dtype for p in fp32_model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16_model.parameters()} == {torch.bfloat16}
    routers = {f"{name}.router." for name, m in fp32_model.named_modules() if isinstance(m, MoELayer)}
    fp32_params = dict(fp32_model.named_parameters())
    compared = 0
    for name, param in bf16_model.named_parameters():
        if any(name.startswith(prefix) for prefix in routers):
            continue  # drawn at random in the layer's dtype
        assert torch.equal(param, fp32_params[name].to(torch.bfloat16)), name
        compared += 1
    assert compared > len(routers) * 2  # embeddings, attention, norms, head and the copied experts

    fp32_size, bf16_size = load_footprint(fp32_config, source), load_footprint(bf16_config, source)
    assert fp32_size.loaded_bytes == 2 * bf16_size.loaded_bytes > 0
    # the upcycled share holds the experts on top of the dense model; at ep=2 each rank keeps half of them
    assert bf16_size.kept_bytes > bf16_size.loaded_bytes
    halved = load_footprint(bf16_config, source, world=2, ep=2)
    assert halved.loaded_bytes == bf16_size.loaded_bytes and halved.kept_bytes < bf16_size.kept_bytes
    # a rank of two pipeline stages keeps its stage only (the heaviest stage's share)
    staged = load_footprint(bf16_config, source, world=2, pp=2)
    assert staged.loaded_bytes == bf16_size.loaded_bytes and staged.kept_bytes < bf16_size.kept_bytes


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_any_weight_is_read(tmp_path):
    """Token ids past the embedding crash the first batch that holds one, deep inside the model: refused up front."""
    from transformers import AutoConfig, AutoTokenizer

    from switchyard.train.model_source import load_model, resolve_source

    config = load_run_config(TINY, ["parallel.ep=1"])
    tiny = resolve_source(config)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path)  # 2048 tokens
    AutoConfig.from_pretrained(tiny, vocab_size=300).save_pretrained(tmp_path)  # and no weights at all
    with pytest.raises(ValueError, match=r"has 2048 tokens but .* embeds 300 \(config.json vocab_size\): ids ≥ 300"):
        load_model(config, None, str(tmp_path))
