"""Checkpoints move between EP sizes: saved at ep=1 and loaded at ep=2 (each rank reading only its own
experts), saved by ep=2 ranks and loaded at ep=1 and ep=2, an adopted Mixtral loaded at ep=2 — always
the logits of the ep=1 model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks

pytestmark = pytest.mark.distributed

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            max_position_embeddings=64, intermediate_size=48, tie_word_embeddings=True)
EXPERTS = 4


def _upcycled(groups=None):
    """The same drop-upcycled llama on every rank and EP size (expert randomness is seeded by expert id)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy
    from switchyard.hf.patch import moe_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY)).float().eval()
    sy.patch_model(model, sy.MoEConfig(num_experts=EXPERTS, top_k=2, init="drop_upcycle"), groups)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(50)  # identical on every rank: the router is dense
    return model


def _adopted_mixtral():
    from transformers import AutoConfig, AutoModelForCausalLM

    import switchyard as sy

    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", **{**TINY, "num_local_experts": EXPERTS, "num_experts_per_tok": 2})
    return sy.patch_model(AutoModelForCausalLM.from_config(config).float().eval())


def _logits(model, rank: int) -> torch.Tensor:
    x = torch.randint(0, TINY["vocab_size"], (1, 5 + rank), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        return model(x).logits


def _recording_reads(monkeypatch_target) -> list[tuple[str, str]]:
    """Wrap ``safe_open`` in the checkpoint module; returns the (file, key) pairs read through it."""
    from pathlib import Path

    reads: list[tuple[str, str]] = []
    real = monkeypatch_target.safe_open

    class Recording:
        def __init__(self, file, *args, **kwargs):
            self.file, self.inner = Path(file).name, real(file, *args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key):
            return self.handle.get_slice(key)

        def get_tensor(self, key):
            reads.append((self.file, key))
            return self.handle.get_tensor(key)

    monkeypatch_target.safe_open = Recording
    return reads


def _expert_id(key: str) -> int | None:
    from switchyard.hf.checkpoint import _EXPERT_KEY

    m = _EXPERT_KEY.match(key)
    return int(m["id"]) if m else None


def _ep1_to_ep2(path: str) -> dict:
    import switchyard as sy
    import switchyard.hf.checkpoint as ckpt
    from switchyard.hf.patch import moe_layers

    rank = dist.get_rank()
    reference = _upcycled()
    reads = _recording_reads(ckpt)
    loaded = sy.from_pretrained(path, groups=sy.ProcessGroupManager(ep=2))
    layers = moe_layers(loaded)
    ids = layers[0].local_expert_ids
    assert all(l.local_expert_ids == ids for l in layers)
    assert layers[0].experts.gate_up_proj.shape == (EXPERTS // 2, 2 * 48, 32)
    assert all(p.group_name == "ep_size_2" and p.allreduce is False for p in layers[0].experts.parameters())
    read_ids = {_expert_id(k) for _, k in reads} - {None}
    assert read_ids == set(ids), f"rank {rank} read experts {sorted(read_ids)}, owns {ids}"
    dense_read = {k for _, k in reads if _expert_id(k) is None}
    assert "model.embed_tokens.weight" in dense_read and "lm_head.weight" not in dense_read  # tied: stored once
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded, rank), _logits(reference, rank), atol=1e-5, rtol=1e-5)
    return {"ids": ids}


def _ep2_to_ep1(path: str) -> dict:
    import switchyard as sy
    import switchyard.hf.checkpoint as ckpt

    rank = dist.get_rank()
    groups = sy.ProcessGroupManager(ep=2)
    sharded = _upcycled(groups)
    sy.save_pretrained(sharded, path)
    reference = _upcycled()
    torch.testing.assert_close(_logits(sharded, rank), _logits(reference, rank), atol=1e-5, rtol=1e-5)
    single = sy.from_pretrained(path)  # ep=1: every expert, from both ranks' files
    torch.testing.assert_close(_logits(single, rank), _logits(reference, rank), atol=1e-5, rtol=1e-5)
    reads = _recording_reads(ckpt)
    again = sy.from_pretrained(path, groups=groups)  # same EP size: only this rank's expert file is opened
    torch.testing.assert_close(_logits(again, rank), _logits(reference, rank), atol=1e-5, rtol=1e-5)
    return {"files": sorted({f for f, _ in reads})}


def _adopted_ep1_to_ep2(path: str) -> list[int]:
    """An adopted HF MoE model is rebuilt with meta experts: no rank materializes all of them."""
    import switchyard as sy
    from switchyard.hf.patch import moe_layers

    loaded = sy.from_pretrained(path, groups=sy.ProcessGroupManager(ep=2))
    assert loaded.config.switchyard["mode"] == "adopt"
    rank = dist.get_rank()
    torch.testing.assert_close(_logits(loaded, rank), _logits(_adopted_mixtral(), rank), atol=1e-5, rtol=1e-5)
    return moe_layers(loaded)[0].local_expert_ids


def _both_directions(ep1_dir: str, ep2_dir: str, adopted_dir: str) -> tuple[dict, dict, list[int]]:
    """One spawn for all checks: starting ranks costs more than the checks themselves."""
    return _ep1_to_ep2(ep1_dir), _ep2_to_ep1(ep2_dir), _adopted_ep1_to_ep2(adopted_dir)


def test_checkpoints_move_between_ep1_and_ep2(tmp_path):
    import switchyard as sy

    ep1_dir, ep2_dir, adopted_dir = tmp_path / "saved_at_ep1", tmp_path / "saved_at_ep2", tmp_path / "adopted"
    sy.save_pretrained(_upcycled(), ep1_dir)  # one process, before the ranks start
    sy.save_pretrained(_adopted_mixtral(), adopted_dir)
    results = run_on_ranks(_both_directions, 2, str(ep1_dir), str(ep2_dir), str(adopted_dir), timeout_s=150)
    # saved at ep=1, loaded at ep=2: each rank holds and reads only half the experts
    assert [r[0]["ids"] for r in results] == [[0, 1], [2, 3]]
    assert [r[2] for r in results] == [[0, 1], [2, 3]]
    # saved by the ep=2 ranks: one expert file per EP rank; at ep=2 each rank opens only its own
    files = sorted(p.name for p in ep2_dir.glob("*.safetensors"))
    assert files == ["dense-00001-of-00001.safetensors", "experts-ep000-of-002-00001-of-00001.safetensors",
                     "experts-ep001-of-002-00001-of-00001.safetensors"]
    for rank, (_, result, _) in enumerate(results):
        assert result["files"] == ["dense-00001-of-00001.safetensors",
                                   f"experts-ep{rank:03d}-of-002-00001-of-00001.safetensors"]


def _failing_saves(foreign_dir: str, disk_full_dir: str) -> list[str]:
    """Two saves and a load that fail on one rank only; each must raise on every rank (not leave the others
    waiting in their next collective)."""
    from pathlib import Path

    import switchyard as sy
    import switchyard.hf.checkpoint as ckpt

    groups = sy.ProcessGroupManager(ep=2)
    model = _upcycled(groups)
    errors = []
    try:  # rank 0 refuses a directory holding another model
        sy.save_pretrained(model, foreign_dir)
    except Exception as err:  # noqa: BLE001
        errors.append(str(err))
    real = ckpt.save_file

    def full_disk(tensors, file, **kwargs):
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device")
        return real(tensors, file, **kwargs)

    ckpt.save_file = full_disk
    try:  # rank 1 cannot write its experts
        sy.save_pretrained(model, disk_full_dir)
    except Exception as err:  # noqa: BLE001
        errors.append(str(err))
    ckpt.save_file = real
    sy.save_pretrained(model, f"{disk_full_dir}-ok")
    if dist.get_rank() == 0:
        Path(f"{disk_full_dir}-ok", "experts-ep001-of-002-00001-of-00001.safetensors").unlink()
    dist.barrier()
    try:  # only rank 1 reads the missing file
        sy.from_pretrained(f"{disk_full_dir}-ok", groups=groups)
    except Exception as err:  # noqa: BLE001
        errors.append(str(err))
    return errors


def test_a_save_or_load_failing_on_one_rank_fails_on_every_rank(tmp_path):
    from transformers import AutoConfig

    foreign, disk_full = tmp_path / "foreign", tmp_path / "disk_full"
    AutoConfig.for_model("llama", **TINY).save_pretrained(foreign)
    results = run_on_ranks(_failing_saves, 2, str(foreign), str(disk_full), timeout_s=90)
    for rank, errors in enumerate(results):
        assert len(errors) == 3, f"rank {rank} did not fail both saves and the load: {errors}"
        assert "holds another model" in errors[0]
        assert "No space left on device" in errors[1]
        assert "experts-ep001-of-002-00001-of-00001.safetensors (listed in switchyard.safetensors.index.json) is missing" \
            in errors[2]
    assert "failed on rank 0" in results[1][0] and "failed on rank 1" in results[0][1]
    assert "from_pretrained" in results[0][2] and "failed on rank 1" in results[0][2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk_full-ok", "foreign"]  # nothing of the failed save
