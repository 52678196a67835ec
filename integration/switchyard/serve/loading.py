"""Load what ``--model`` names into this rank's expert-parallel model, and build the tiny demo model.

* a switchyard checkpoint (``config.json`` has a ``switchyard`` record): ``switchyard.from_pretrained``
  — each EP rank reads only its own experts' shard files plus the dense tensors;
* an HF MoE directory (exported by ``switchyard export``, or Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE /
  DeepSeek-V3): in one process transformers loads it and ``switchyard.patch_model`` adopts its MoE
  blocks. With more ranks, rank 0 first converts it once into a switchyard checkpoint in the cache
  (``SWITCHYARD_CACHE``/adopted, keyed by the directory and its files' sizes and times; a subprocess
  holds the whole model once), then every rank reads only its own experts from that;
* ``tiny``: the embedded tiny Llama, upcycled to 4 experts and cached (``SWITCHYARD_CACHE``).

Only safetensors files are read (``use_safetensors=True``): nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from switchyard.hf.checkpoint import recover_interrupted_save
from switchyard.log import get_logger

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager

log = get_logger(__name__)

TINY_MODEL_KW: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TINY_TOKENIZER_KW: dict[str, Any] = dict(vocab_size=1024, max_bytes=1_000_000)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_moe(out: str | Path, cache_dir: str | Path | None = None, num_experts: int = 4, top_k: int = 2,
                   **model_overrides: Any) -> Path:
    """A tiny Llama (offline: stdlib-trained BPE, seeded weights) upcycled with drop-upcycling, saved
    as a switchyard checkpoint in ``out`` (experts differ, so routing matters). Returns ``out``."""
    import switchyard as sy
    from transformers import AutoModelForCausalLM

    from switchyard.train.tiny import build_tiny_dense_model, build_tokenizer

    out = Path(out)
    if (out / "model.safetensors.index.json").is_file():
        return out
    tokenizer = build_tokenizer(cache_dir, **TINY_TOKENIZER_KW)
    dense = build_tiny_dense_model(cache_dir, tokenizer, **{**TINY_MODEL_KW, **model_overrides})
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, use_safetensors=True)
    sy.patch_model(model, sy.MoEConfig(num_experts=num_experts, top_k=top_k, init="drop_upcycle"))
    return _save_aside(model, tokenizer, out)


def _save_aside(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """``save_pretrained`` into a temp dir beside ``out``, then rename: a concurrent or killed build
    never leaves a half-written checkpoint (a concurrent one that finished first wins)."""
    import switchyard as sy

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sy.save_pretrained(model, tmp, tokenizer=tokenizer)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_dir(model: str) -> Path:
    """``tiny`` → the cached tiny MoE (built by rank 0 first); else the directory, checked."""
    if model == "tiny":
        import torch.distributed as dist

        from switchyard.train.model_source import cache_dir

        out = cache_dir() / "serve-tiny-moe"
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return build_tiny_moe(out, cache_dir())
        if dist.get_rank() == 0:  # save_pretrained inside a world of N would wait for the other ranks: build aside
            code = ("from switchyard.serve.loading import build_tiny_moe; "
                    f"build_tiny_moe({str(out)!r}, {str(cache_dir())!r})")
            subprocess.run([sys.executable, "-c", code], check=True)
        dist.barrier()
        return out
    path = Path(model)
    recover_interrupted_save(path)  # a killed re-save leaves the checkpoint aside; put it back
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there; pass a switchyard checkpoint, an HF MoE "
                         "model directory (e.g. from `switchyard export`), or `tiny`")
    return path


def load_for_serving(path: Path, groups: "ProcessGroupManager | None", dtype: str = "auto",
                     device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode on ``device``, tokenizer) for this rank."""
    import switchyard as sy
    from transformers import AutoModelForCausalLM

    torch_dtype = _DTYPES.get(dtype)
    adopt = not json.loads((path / "config.json").read_text()).get("switchyard")
    if adopt:
        check_adoptable(path)  # on every rank, before any rank converts: a bad directory fails everywhere
    tokenizer = load_tokenizer(path)  # likewise before any conversion or weight is read
    if adopt and groups is not None and groups.world_size > 1:
        path = adopted_checkpoint(path)  # then each rank reads only its experts, as below
    if json.loads((path / "config.json").read_text()).get("switchyard"):
        model = sy.from_pretrained(path, groups=groups, dtype=torch_dtype, device=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch_dtype or "auto")
        sy.patch_model(model, None, groups)
        model.to(device)
    return model.eval(), tokenizer


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in the model directory. The server needs one (prompts, chat template, detokenizing);
    transformers' own error for a directory without one (e.g. ``switchyard upcycle`` of a model saved without
    its tokenizer) names neither the directory nor the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__  # transformers' is several lines
        raise ValueError(f"{path} has no tokenizer the server can load ({reason}); save the model's tokenizer "
                         f"into it: AutoTokenizer.from_pretrained(<the original model>).save_pretrained({str(path)!r})"
                         ) from None


def check_adoptable(path: Path) -> None:
    """An HF MoE directory switchyard can serve: safetensors weights, MoE blocks it adopts (checked on
    the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from switchyard.hf.adopt import SUPPORTED_BLOCKS

    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no *.safetensors files; switchyard reads checkpoints only as "
                         "safetensors (convert .bin files with transformers' save_pretrained)")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if not any(type(m).__name__ in SUPPORTED_BLOCKS for m in skeleton.modules()):
        raise ValueError(f"{path} ({config.model_type}) has no MoE blocks switchyard can adopt "
                         f"({sorted(SUPPORTED_BLOCKS)}); upcycle a dense model first: `switchyard upcycle`")


def _source_key(path: Path) -> str:
    """Changes whenever the directory's weights or config change (path, names, sizes, mtimes)."""
    import hashlib

    digest = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.startswith("tokenizer")):
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def convert_hf_moe_dir(src: str | Path, out: str | Path) -> Path:
    """Adopt an HF MoE directory's blocks (all experts, one process) and save it as a switchyard
    checkpoint at ``out`` (written aside, then renamed: a crash never leaves half a checkpoint)."""
    import switchyard as sy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    if (out / "model.safetensors.index.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True, dtype="auto")
    sy.patch_model(model)
    return _save_aside(model, AutoTokenizer.from_pretrained(src), out)


def adopted_checkpoint(path: Path) -> Path:
    """The switchyard checkpoint of HF MoE directory ``path`` in the cache, built by rank 0 (in a
    subprocess: a save inside this world would wait for the other ranks) while the others wait; a failed
    build is an error on every rank. Multi-node: ``SWITCHYARD_CACHE`` must be shared."""
    import torch.distributed as dist

    from switchyard.train.model_source import cache_dir

    out = cache_dir() / "adopted" / f"{path.resolve().name}-{_source_key(path)}"
    status: list[str | None] = [None]
    if dist.get_rank() == 0 and not (out / "model.safetensors.index.json").is_file():
        log.info("converting %s into a switchyard checkpoint at %s (once; then each rank reads only its "
                 "experts)", path, out)
        code = f"from switchyard.serve.loading import convert_hf_moe_dir; convert_hf_moe_dir({str(path)!r}, {str(out)!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            status[0] = f"converting {path} failed:\n{done.stderr[-3000:]}"
    # the others wait on a gloo group of their own: a big model's conversion outlasts the usual timeout
    import datetime

    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    dist.broadcast_object_list(status, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if status[0] is not None:
        raise ValueError(status[0])
    return out
