"""Load what ``--model`` names into this rank's expert-parallel model, and build the tiny demo model.

* a switchyard checkpoint (``config.json`` has a ``switchyard`` record): ``switchyard.from_pretrained``
  — each EP rank reads only its own experts' shard files plus the dense tensors;
* an HF MoE directory (exported by ``switchyard export``, or Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE /
  DeepSeek-V3): in one process transformers loads it and ``switchyard.patch_model`` adopts its MoE
  blocks. With more ranks, rank 0 first converts it once into a switchyard checkpoint in the cache
  (``SWITCHYARD_CACHE``/adopted, keyed by the directory and its files' sizes and times; a subprocess
  holds the whole model once; earlier conversions of the same directory are removed after an hour), then every
  rank reads only its own experts from that;
* ``tiny``: the embedded tiny Llama, upcycled to 4 experts and cached (``SWITCHYARD_CACHE``).

Only safetensors files are read (``use_safetensors=True``): nothing is unpickled. Before any weight is read
(or any conversion starts) every rank checks what a user can get wrong — config.json, the weights files'
presence and headers, the MoE blocks, ``--ep`` against the expert count, ``--max-model-len`` against the model's
context, the tokenizer — and a failure on any rank is a ``ValueError`` naming the file and the fix on every rank.
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

from switchyard.hf.checkpoint import index_path, inner_model_hint, on_every_rank, recover_interrupted_save
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
    if index_path(out).is_file():
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
            if not index_path(out).is_file():
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
                         f"model directory (e.g. from `switchyard export`), or `tiny`{inner_model_hint(path)}")
    return path


def load_for_serving(path: Path, groups: "ProcessGroupManager | None", dtype: str = "auto",
                     device: torch.device | str = "cpu", max_model_len: int | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode on ``device``, tokenizer) for this rank. Everything a user can get wrong (config,
    weights files, MoE blocks, ``--ep``, ``max_model_len``, tokenizer) is checked on every rank before any weight
    is read."""
    import switchyard as sy
    from transformers import AutoModelForCausalLM

    torch_dtype = _DTYPES.get(dtype)
    if groups is not None and groups.world_size > 1:  # a rank that alone sees a bad file (its node's copy) stops all
        adopt, tokenizer = on_every_rank(f"checking {path}", _checked, path, groups.size("ep"), max_model_len)
    else:
        adopt, tokenizer = _checked(path, 1, max_model_len)
    if adopt and groups is not None and groups.world_size > 1:
        path = adopted_checkpoint(path)  # then each rank reads only its experts, as below
        adopt = False
    if not adopt:
        model = sy.from_pretrained(path, groups=groups, dtype=torch_dtype, device=device)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch_dtype or "auto")
        except (RuntimeError, OSError) as err:  # e.g. weights shaped unlike config.json says
            raise ValueError(f"transformers could not load {path} ({_short(err)}); its weights do not match its "
                             "config.json (see transformers' report above)") from None
        sy.patch_model(model, None, groups)
        model.to(device)
    return model.eval(), tokenizer


def _checked(path: Path, ep: int, max_model_len: int | None) -> tuple[bool, Any]:
    """(whether ``path`` is an HF MoE directory to adopt, its tokenizer), after every check that reads no weights."""
    raw, config = read_config(path)
    context_length(max_model_len, config)
    adopt = not raw.get("switchyard")
    check_ep(path, check_adoptable(path, config) if adopt else _recorded_experts(raw), ep)
    return adopt, load_tokenizer(path)


def context_length(max_model_len: int | None, model_config: Any) -> int:
    """Prompt + completion bound: ``max_model_len``, else the model's ``max_position_embeddings`` (2048 if it has
    none). A value beyond the model's is refused (as vLLM does), not silently lowered: the user asked for a context
    the model was not trained for and would otherwise get a smaller one without a word."""
    model_len = getattr(model_config, "max_position_embeddings", None)
    if max_model_len is not None and model_len and max_model_len > model_len:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                         f"{model_len}; leave --max-model-len out or set it to at most {model_len}")
    bounds = [n for n in (max_model_len, model_len) if n]
    return min(bounds) if bounds else 2048


def _short(err: BaseException) -> str:
    """A library error on one line (transformers' span several), cut to a readable length."""
    return " ".join(str(err).split())[:300] or type(err).__name__


def read_config(path: Path) -> tuple[dict[str, Any], Any]:
    """(config.json as a dict, transformers' config of it). Every way it can be broken is an error naming the
    file: json's own names a line only, and transformers' failures (a field of the wrong type, a dtype torch
    does not have, inconsistent sizes) surfaced as tracebacks, or as "no tokenizer" from the tokenizer's loader."""
    from transformers import AutoConfig

    file = path / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): a truncated or hand-edited file; restore it "
                         "from where the model came from") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - anything transformers raises here is this file's content
        raise ValueError(f"{file} is not a config transformers can read ({type(err).__name__}: {_short(err)})"
                         ) from None
    return raw, config


def _recorded_experts(raw: dict[str, Any]) -> int | None:
    """The expert count a switchyard checkpoint records (None if the record does not say; loading checks it)."""
    moe = raw["switchyard"].get("moe") if isinstance(raw["switchyard"], dict) else None
    n = moe.get("num_experts") if isinstance(moe, dict) else None
    return n if isinstance(n, int) else None


def check_ep(path: Path, num_experts: int | None, ep: int) -> None:
    """``--ep`` must split the experts evenly; checked before an HF directory's conversion (which can take
    long), with the sizes that would work."""
    if num_experts is None or num_experts % ep == 0:
        return
    fits = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    raise ValueError(f"--ep {ep} does not divide the {num_experts} experts of {path}; use an --ep that divides "
                     f"{num_experts} ({', '.join(map(str, fits))}) and start that many ranks (or a multiple)")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in the model directory. The server needs one (prompts, chat template, detokenizing);
    transformers' own error for a directory without one (e.g. ``switchyard upcycle`` of a model saved without
    its tokenizer) names neither the directory nor the fix."""
    from switchyard.hf.tokenizer import TokenizerError
    from switchyard.hf.tokenizer import load_tokenizer as load_checked

    fix = ("save the model's tokenizer into it: AutoTokenizer.from_pretrained(<the original model>).save_pretrained("
           f"{str(path)!r})")
    try:
        return load_checked(path, fix)
    except TokenizerError:
        raise
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path} has no tokenizer the server can load ({_short(err)}); {fix}") from None


def check_adoptable(path: Path, config: Any) -> int:
    """An HF MoE directory switchyard can serve: readable safetensors weights, MoE blocks it adopts (checked
    on the meta device: no weights are read). Returns the expert count."""
    from transformers import AutoModelForCausalLM

    from switchyard.hf.adopt import SUPPORTED_BLOCKS, moe_config_from_hf, refuse_unadoptable

    check_safetensors(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        refuse_unadoptable(skeleton)  # an MoE switchyard cannot reproduce: its reason, not "upcycle it"
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    block = next((type(m).__name__ for m in skeleton.modules() if type(m).__name__ in SUPPORTED_BLOCKS), None)
    if block is None:
        raise ValueError(f"{path} ({config.model_type}) has no MoE blocks switchyard can adopt "
                         f"({sorted(SUPPORTED_BLOCKS)}); upcycle a dense model first, then serve the result: "
                         f"`switchyard upcycle --model {path} --num-experts 8 --top-k 2 --out {path}-moe`")
    return moe_config_from_hf(config, block).num_experts


def check_safetensors(path: Path) -> None:
    """Every weights file transformers will read is there and whole (a header that does not cover the file:
    an interrupted download or copy). Headers only; transformers' own errors named no fix, after a traceback."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({type(err).__name__}: {err}); restore it from "
                             "where the model came from") from None
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors files; switchyard reads checkpoints only as "
                         "safetensors (convert .bin files with transformers' save_pretrained)")
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file} (listed in {index.name}) is missing: an incomplete download or copy; fetch "
                             "the model again")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise ValueError(f"cannot read {file}: truncated or corrupt safetensors file ({err}); fetch the "
                             "model again") from None


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
    if index_path(out).is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True, dtype="auto")
    sy.patch_model(model)
    return _save_aside(model, AutoTokenizer.from_pretrained(src), out)


SOURCE_MARK = "switchyard_source"  # in each cached conversion: the directory it was converted from
PRUNE_AFTER_S = 3600.0  # an older conversion of the same directory is removed once it is this old


def _prune_older_conversions(path: Path, out: Path) -> None:
    """Mark ``out`` with its source and remove the cache's earlier conversions of the same directory (the key
    changes with every re-export into it, so each one left a full copy of the model behind). Only those older than
    ``PRUNE_AFTER_S``: a server started from one a moment ago may still be reading it."""
    import shutil
    import time

    resolved = path.resolve()
    source = str(resolved)
    (out / SOURCE_MARK).write_text(source)
    for other in out.parent.glob(f"{resolved.name}-*"):
        mark = other / SOURCE_MARK
        if other != out and mark.is_file() and mark.read_text() == source \
                and time.time() - mark.stat().st_mtime > PRUNE_AFTER_S:
            log.info("removing %s, an earlier conversion of %s", other, path)
            shutil.rmtree(other, ignore_errors=True)


def adopted_checkpoint(path: Path) -> Path:
    """The switchyard checkpoint of HF MoE directory ``path`` in the cache, built by rank 0 (in a
    subprocess: a save inside this world would wait for the other ranks) while the others wait; a failed
    build is an error on every rank. Multi-node: ``SWITCHYARD_CACHE`` must be shared."""
    import torch.distributed as dist

    from switchyard.train.model_source import cache_dir

    out = cache_dir() / "adopted" / f"{path.resolve().name}-{_source_key(path)}"
    status: list[str | None] = [None]
    if dist.get_rank() == 0 and not index_path(out).is_file():
        log.info("converting %s into a switchyard checkpoint at %s (once; then each rank reads only its "
                 "experts)", path, out)
        code = f"from switchyard.serve.loading import convert_hf_moe_dir; convert_hf_moe_dir({str(path)!r}, {str(out)!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            status[0] = f"converting {path} failed:\n{done.stderr[-3000:]}"
        else:
            _prune_older_conversions(path, out)
    # the others wait on a gloo group of their own: a big model's conversion outlasts the usual timeout
    import datetime

    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    dist.broadcast_object_list(status, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if status[0] is not None:
        raise ValueError(status[0])
    return out
