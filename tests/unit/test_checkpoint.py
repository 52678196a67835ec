"""save_pretrained / from_pretrained in one process: round trips against the saved model's own logits,
the on-disk layout, and every failure naming its file and tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import switchyard as sy
from switchyard.hf.checkpoint import INDEX_NAME, CheckpointError
from switchyard.hf.patch import moe_layers
from tiny_models import TINY, build, ids


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def upcycled(model_type: str = "llama", init: str = "copy", every_n: int | None = None, **extra) -> torch.nn.Module:
    model = build(model_type, intermediate_size=48, **extra)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2, init=init), every_n=every_n)
    with torch.no_grad():  # decisive routing, so logits compare tightly
        for layer in moe_layers(model):
            layer.router.weight.mul_(50)
    return model


CASES = {
    "llama_copy_tied": lambda: upcycled("llama", "copy", tie_word_embeddings=True),
    "llama_drop_upcycle": lambda: upcycled("llama", "drop_upcycle"),
    "qwen3_every_2": lambda: upcycled("qwen3", "drop_upcycle", every_n=2, head_dim=8),
    "mixtral_adopted": lambda: sy.patch_model(build("mixtral", intermediate_size=48, num_local_experts=4,
                                                    num_experts_per_tok=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_gives_the_same_logits(case, tmp_path):
    model = CASES[case]()
    want = logits(model)
    sy.save_pretrained(model, tmp_path, max_shard_size="40KB")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # nothing pickled
    assert sum(f.startswith("dense-") for f in files) > 1  # sharded
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    tied = index["metadata"]["tied_weights"]
    assert set(index["weight_map"]) | set(tied) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    assert json.loads((tmp_path / "config.json").read_text())["switchyard"] == model.config.switchyard

    loaded = sy.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), want, atol=1e-6, rtol=1e-6)
    assert loaded.config.switchyard == model.config.switchyard
    assert not loaded.training
    for layer in moe_layers(loaded):
        assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in layer.experts.parameters())
    if case == "llama_copy_tied":
        assert tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if case == "llama_drop_upcycle":
        experts = moe_layers(loaded)[0].experts.gate_up_proj
        assert not torch.equal(experts[0], experts[1])


def test_loads_in_another_dtype_and_saving_again_replaces_old_shards(tmp_path):
    model = upcycled("llama", "drop_upcycle")
    sy.save_pretrained(model, tmp_path, max_shard_size="40KB")
    sy.save_pretrained(model, tmp_path)  # one shard now: the 40KB shards must be gone
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "dense-00001-of-00001.safetensors", "experts-ep000-of-001-00001-of-00001.safetensors"]
    loaded = sy.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(loaded).float(), logits(model), atol=0.3, rtol=0.05)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved")
    sy.save_pretrained(upcycled("llama", "drop_upcycle"), path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _expert_file(path: Path) -> Path:
    return next(path.glob("experts-*.safetensors"))


FAILURES = {
    "missing_shard": (lambda p: _expert_file(p).unlink(), r"shard file .*experts-ep000-of-001-00001-of-00001\.safetensors .*missing"),
    "truncated": (lambda p: _expert_file(p).write_bytes(_expert_file(p).read_bytes()[: _expert_file(p).stat().st_size // 2]),
                  r"cannot read .*experts-ep000-of-001-00001-of-00001\.safetensors: truncated or corrupt"),
    "shape": (lambda p: _edit_json(p / "config.json", lambda c: c.update(intermediate_size=40)),
              r"experts-ep000.*: tensor model\.layers\.\d\.mlp\.experts\.\d\.gate_up_proj has shape \(96, 32\) in the "
              r"checkpoint but the model built from config\.json expects \(80, 32\); if that model's layers had FFNs of "
              r"different sizes, config\.json \(one size\) cannot rebuild them"),
    "expert_count": (lambda p: _edit_json(p / "config.json", lambda c: c["switchyard"]["moe"].update(num_experts=8)),
                     r"index\.json: model\.layers\.0\.mlp has 4 experts in the checkpoint .* num_experts=8"),
    "key_not_in_index": (lambda p: _edit_json(p / INDEX_NAME, lambda i: i["weight_map"].pop("model.norm.weight")),
                         r"tensor model\.norm\.weight is not in .*switchyard\.safetensors\.index\.json"),
    "tensor_the_model_lacks": (lambda p: _edit_json(p / INDEX_NAME, lambda i: i["weight_map"].update(
        {"model.layers.9.mlp.router.weight": _expert_file(p).name})),
        r"index\.json lists 1 tensors the model built from config\.json does not have, e\.g\. \['model\.layers\.9"),
    "no_index": (lambda p: (p / INDEX_NAME).unlink(), r"switchyard\.safetensors\.index\.json is missing"),
    "truncated_index": (lambda p: (p / INDEX_NAME).write_text((p / INDEX_NAME).read_text()[:100]),
                        r"switchyard\.safetensors\.index\.json is not valid JSON .*truncated or hand-edited"),
    "truncated_config": (lambda p: (p / "config.json").write_text("{"), r"config\.json is not valid JSON"),
    "tensor_not_in_file": (lambda p: _edit_json(p / INDEX_NAME, lambda i: i["weight_map"].update(
        {"model.norm.weight": _expert_file(p).name})), r"experts-ep000.* lacks tensor model\.norm\.weight"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_broken_checkpoints_name_the_file_and_tensor(case, saved, tmp_path):
    damage, message = FAILURES[case]
    path = _copy(saved, tmp_path / "ckpt")
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        sy.from_pretrained(path)


def test_plain_transformers_dirs_and_unpatched_models_are_refused(tmp_path):
    model = build("llama", intermediate_size=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a switchyard checkpoint; load it with transformers or patch it"):
        sy.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not patched by switchyard"):
        sy.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    patched = upcycled("llama")
    snapshot = {k: v.clone() for k, v in patched.state_dict().items()}
    with pytest.raises(ValueError, match="max_shard_size='2 bananas'"):
        sy.save_pretrained(patched, tmp_path / "out", max_shard_size="2 bananas")
    assert not (tmp_path / "out").exists()
    for untouched, snap in ((model, before), (patched, snapshot)):
        after = untouched.state_dict()
        assert after.keys() == snap.keys() and all(torch.equal(after[k], snap[k]) for k in snap)


def test_records_the_weights_dtype_and_loads_in_it(tmp_path):
    model = upcycled("llama").to(torch.bfloat16)
    model.config.dtype = torch.float32  # what a model loaded in fp32 and then cast keeps in its config
    want = logits(model)
    sy.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.config.dtype == torch.float32  # the in-memory config is the user's, untouched
    loaded = sy.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(loaded), want, atol=0, rtol=0)


def _patched(auto_class) -> torch.nn.Module:
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TINY, "intermediate_size": 48, "pad_token_id": 0, "num_labels": 3})
    return sy.patch_model(auto_class.from_config(config).eval(), sy.MoEConfig(num_experts=4, top_k=2))


@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForSequenceClassification"])
def test_base_and_task_head_models_round_trip_as_their_own_class(auto_class, tmp_path):
    import transformers

    model = _patched(getattr(transformers, auto_class))
    sy.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(model).__name__]
    loaded = sy.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        want, got = model(ids()), loaded(ids())
    key = "logits" if "logits" in want else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)


def test_a_class_from_pretrained_cannot_rebuild_is_refused_before_writing(tmp_path):
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    model = MyLlama(build("llama", intermediate_size=48).config)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="MyLlama is not a class of transformers"):
        sy.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["mixtral_adopted", "llama_copy_tied"])
def test_transformers_save_pretrained_resumes_like_hf_trainer(case, tmp_path):
    """Trainer saves with model.save_pretrained and resumes with load_state_dict(load_file(...), strict=False):
    transformers' Mixtral key conversion must not rename our MoE layers' keys on the way out."""
    from safetensors.torch import load_file

    model = CASES[case]()
    with torch.no_grad():  # "training" moved every weight
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    want = logits(model)
    model.save_pretrained(tmp_path)
    fresh = CASES[case]()
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied: stored once
    torch.testing.assert_close(logits(fresh), want, atol=0, rtol=0)


def test_a_failed_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    """A save that dies halfway (disk full) must not cost the checkpoint already in the directory."""
    import switchyard.hf.checkpoint as ckpt

    earlier = upcycled("llama", "drop_upcycle")
    want = logits(earlier)
    sy.save_pretrained(earlier, tmp_path, max_shard_size="40KB")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    newer = upcycled("llama", "copy")
    real, calls = ckpt.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        sy.save_pretrained(newer, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no half-written or .tmp files either
    torch.testing.assert_close(logits(sy.from_pretrained(tmp_path)), want, atol=1e-6, rtol=1e-6)


def test_saving_over_another_models_directory_is_refused(tmp_path):
    """`switchyard upcycle --model ./llama --out ./llama` must not overwrite the dense model's config.json."""
    dense = build("llama", intermediate_size=48)
    dense.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"holds another model \(.*config\.json has no 'switchyard' record\).*new dir"):
        sy.save_pretrained(upcycled("llama"), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("tied", [True, False])
def test_the_meta_device_model_ties_its_head_as_the_config_says(tied):
    """empty_model builds on meta, where transformers leaves a tied LM head a parameter of its own until
    tie_weights: the plan counted it twice and every meta-device size was off by the vocabulary's embedding."""
    from transformers import LlamaConfig

    from switchyard.hf.checkpoint import empty_model

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=tied)
    model = empty_model(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    assert model.get_input_embeddings().weight.is_meta


@pytest.mark.parametrize("case,stages,sizes", [("llama_copy_tied", 2, None), ("llama_drop_upcycle", 3, None),
                                               ("qwen3_every_2", 4, None), ("mixtral_adopted", 2, None),
                                               ("llama_copy_tied", 2, [3, 1]), ("qwen3_every_2", 3, [1, 1, 2])])
def test_a_pipeline_stage_reads_only_its_own_tensors(case, stages, sizes, tmp_path, monkeypatch):
    """from_pretrained(stage=(s, P)) gives the stage split_model cuts from the whole loaded model (same tensors, the
    tied head as the last stage's buffer copy, the same layers and tie) and reads no other stage's tensor."""
    from switchyard.hf import checkpoint
    from switchyard.train.pipeline import split_model

    sy.save_pretrained(CASES[case](), tmp_path, max_shard_size="40KB")
    read_keys: list[str] = []
    real_read = checkpoint._read_tensors

    def recording_read(path, plan, wanted, device):
        read_keys.extend(source for pairs in plan.values() for _, source in pairs)
        return real_read(path, plan, wanted, device)

    for s in range(stages):
        whole = sy.from_pretrained(tmp_path)
        cut = split_model(whole, s, stages, sizes)
        monkeypatch.setattr(checkpoint, "_read_tensors", recording_read)
        read_keys.clear()
        staged = sy.from_pretrained(tmp_path, stage=(s, stages, sizes))
        monkeypatch.setattr(checkpoint, "_read_tensors", real_read)

        assert split_model(staged, s, stages, sizes) == cut  # the cut it was read as, again
        want, got = whole.state_dict(), staged.state_dict()
        assert set(got) == set(want), (s, set(got) ^ set(want))
        for key in want:
            assert torch.equal(got[key], want[key]), (s, key)
        layers = [f"model.layers.{i}." for i in range(TINY["num_hidden_layers"]) if i not in cut[0]]
        assert not [k for k in read_keys if k.startswith(tuple(layers))], (s, read_keys)
        assert ("model.embed_tokens.weight" in read_keys) == (s == 0 or (cut[1] and s == stages - 1))
        assert ("model.norm.weight" in read_keys) == (s == stages - 1)
    with pytest.raises(ValueError, match=r"pipeline stage 0 of 2 \(decoder layers 0–1\) already; it cannot become "
                                         r"stage 1 of 2 \(layers 2–3\)"):
        split_model(sy.from_pretrained(tmp_path, stage=(0, 2)), 1, 2)


def test_a_compiled_model_saves_as_the_model_it_wraps(tmp_path):
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    sy.save_pretrained(torch.compile(model), tmp_path / "ckpt")  # patch_model takes a compiled model: so does saving
    with torch.no_grad():
        torch.testing.assert_close(sy.from_pretrained(tmp_path / "ckpt")(ids()).logits, model(ids()).logits,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("stage", [(2, 2), (0, 0), (1, 1), (-1, 2), (True, 2)])
def test_a_stage_outside_the_pipeline_is_refused(tmp_path, stage):
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    sy.save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=rf"pipeline stage {stage[0]!r} of {stage[1]!r}: the stage is an index 0"):
        sy.from_pretrained(tmp_path / "ckpt", stage=stage)


@pytest.mark.parametrize("size", [0, -1, "0GB"])
def test_a_shard_size_below_one_byte_is_refused_before_writing(tmp_path, size):
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="must be at least one byte"):
        sy.save_pretrained(model, tmp_path / "ckpt", max_shard_size=size)
    assert not (tmp_path / "ckpt").exists()


def test_an_empty_save_path_is_refused_not_taken_for_the_working_directory(tmp_path, monkeypatch):
    model = build("llama", intermediate_size=48)
    sy.patch_model(model, sy.MoEConfig(num_experts=4, top_k=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"save_pretrained path is empty \(''; an unset variable\?\)"):
        sy.save_pretrained(model, "")
    assert not list(tmp_path.iterdir())


def test_a_shard_size_given_as_a_string_of_digits_is_bytes_and_garbage_is_refused(tmp_path):
    """The CLI's ``--max-shard-size 200000`` passes the string '200000', which was refused with a message saying
    an int of bytes is allowed."""
    model = upcycled("llama")
    sy.save_pretrained(model, tmp_path / "digits", max_shard_size="40000")
    sy.save_pretrained(model, tmp_path / "int", max_shard_size=40000)
    index = json.loads((tmp_path / "digits" / INDEX_NAME).read_text())
    assert index["weight_map"] == json.loads((tmp_path / "int" / INDEX_NAME).read_text())["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(logits(sy.from_pretrained(tmp_path / "digits")), logits(model), atol=0, rtol=0)
    for garbage in ("1.5", "-5", "12 34", 2.5):
        with pytest.raises(ValueError, match=rf"max_shard_size={garbage!r} is not a size like '2GB', '500MB' or a "
                                             r"whole number of bytes"):
            sy.save_pretrained(model, tmp_path / "bad", max_shard_size=garbage)
    assert not (tmp_path / "bad").exists()
