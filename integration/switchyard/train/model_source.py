"""Turn ``model.source`` into a patched, expert-parallel model and its tokenizer.

Sources, recognized in this order: ``"tiny"`` (the embedded default, built offline and cached), a
switchyard checkpoint dir (``config.json`` has a ``switchyard`` record), an HF MoE model (adopted),
any other HF causal LM (upcycled with ``moe``). Rank 0 builds caches first; the others wait.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from switchyard.hf.adopt import SUPPORTED_BLOCKS
from switchyard.hf.checkpoint import recover_interrupted_save
from switchyard.hf.tokenizer import load_tokenizer
from switchyard.log import get_logger
from switchyard.moe.layer import LOSS_COEFFICIENTS
from switchyard.train.load_waves import LoadFootprint, footprint_of, load_dtype, load_in_waves, patient_group
from switchyard.train.run_config import RunConfig

log = get_logger(__name__)
LOSS_COEFFICIENT_KEYS = frozenset(LOSS_COEFFICIENTS.values())  # moe.* keys a switchyard checkpoint's run may change

# model_type of transformers' MoE models whose blocks switchyard adopts
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def cache_dir() -> Path:
    return Path(os.environ.get("SWITCHYARD_CACHE", Path.home() / ".cache" / "switchyard"))


def rank0_first(fn, *args, **kwargs) -> Any:
    """Run ``fn`` on rank 0, then on the others (which then find rank 0's cache). The others wait on a gloo
    group of their own with ``RANK0_WAIT_S`` as its timeout, and raise rank 0's error if ``fn`` failed there."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    group = patient_group()
    outcome: list[Any] = [None]  # rank 0's error as (type name, message), or None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            outcome[0] = (type(err).__name__, str(err))
            dist.broadcast_object_list(outcome, src=0, group=group)
            raise
        dist.broadcast_object_list(outcome, src=0, group=group)
        return result
    dist.broadcast_object_list(outcome, src=0, group=group)
    if outcome[0] is not None:
        name, message = outcome[0]
        raise (ValueError(message) if name == "ValueError" else RuntimeError(f"rank 0 failed: {name}: {message}"))
    return fn(*args, **kwargs)


def resolve_source(config: RunConfig) -> str:
    """The directory or hub id to load; builds the embedded tiny model when asked for it."""
    if config.model.source != "tiny":
        return config.model.source
    from switchyard.train.tiny import build_tiny_dense_model, build_tokenizer

    def build() -> str:
        tokenizer = build_tokenizer(cache_dir())
        return str(build_tiny_dense_model(cache_dir(), tokenizer, **config.model.tiny))

    return rank0_first(build)


def load_model(config: RunConfig, groups, source: str, from_checkpoint: Path | None = None,
               after_load: Callable[[nn.Module], None] | None = None):
    """(model, tokenizer). ``from_checkpoint``: a switchyard model dir that overrides ``source``
    (resuming at another expert-parallel layout). ``after_load(model)`` runs on the patched model; for an HF source
    inside the rank's load wave, so that cutting the rank's pipeline stage and tensor-parallel shard there leaves
    only its share in host memory while the next wave loads."""
    import switchyard as sy

    recover_interrupted_save(source)  # a killed re-save leaves a checkpoint aside: put it back before reading
    tokenizer_source = config.model.tokenizer or source
    tokenizer = load_tokenizer(tokenizer_source, "save the model's tokenizer there (tokenizer.save_pretrained(<dir>)) or "
                               "name one with model.tokenizer" if tokenizer_source == source else
                               "point model.tokenizer at a directory or hub id holding the tokenizer")
    hf_config = AutoConfig.from_pretrained(from_checkpoint or source)  # below the checkpoint's branch: source's
    check_vocabulary(tokenizer, hf_config, tokenizer_source, str(from_checkpoint or source))
    warn_beyond_positions(hf_config, config.data.seq_len, str(from_checkpoint or source))
    cut = after_load or (lambda model: None)
    # a switchyard checkpoint: each rank reads its experts, and of a pipeline its stage only
    stage = (groups.rank("pp"), groups.size("pp"), config.parallel.pp_layers) \
        if groups is not None and groups.size("pp") > 1 else None
    if from_checkpoint is not None:
        log.info("loading model weights from %s for ep=%d", from_checkpoint, groups.size("ep"), ranks=[0])
        model = sy.from_pretrained(from_checkpoint, groups=groups, stage=stage)
        cut(model)
        return model, tokenizer
    record = getattr(hf_config, "switchyard", None)
    if record:
        _refuse_unused_moe_settings(config, source, record)
        model = sy.from_pretrained(source, groups=groups, stage=stage)
        _set_loss_coefficients(model, config)
        cut(model)
        return model, tokenizer
    sizes = {"world": dist.get_world_size(), **{k: groups.size(k) for k in ("ep", "tp", "etp", "pp")}} \
        if groups is not None and dist.is_initialized() else {}

    def load() -> nn.Module:
        model = _load_and_patch(config, groups, source, hf_config)
        cut(model)
        return model

    model = load_in_waves(load, lambda: load_footprint(config, source, **sizes), config.model.load_ranks_at_once)
    return model, tokenizer


def _text_config(hf_config):
    """The language model's config (a multimodal config keeps it apart)."""
    return getattr(hf_config, "get_text_config", lambda: hf_config)()


def warn_beyond_positions(hf_config, seq_len: int, model_source: str) -> None:
    """Sequences longer than the model was built for train positions it never saw (rotary), or index past a
    learned position table; the server later refuses such lengths. A warning: some models extrapolate on purpose."""
    text_config = _text_config(hf_config)
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if limit is not None and seq_len > limit:
        log.warning("data.seq_len=%d exceeds %s's max_position_embeddings=%d: positions past %d were never trained "
                    "(and a learned position table has no rows for them); lower data.seq_len to %d or less unless the "
                    "model is meant to extrapolate", seq_len, model_source, limit, limit, limit, ranks=[0])


def check_vocabulary(tokenizer, hf_config, tokenizer_source: str, model_source: str) -> None:
    """A tokenizer with more token ids than the model has embedding rows would crash the first batch holding one
    (an ``IndexError`` deep in the embedding); refuse it before any weight is read."""
    rows = getattr(_text_config(hf_config), "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        own = "use the model's own tokenizer (leave model.tokenizer unset), or " if tokenizer_source != model_source \
            else ""
        raise ValueError(f"the tokenizer of {tokenizer_source!r} has {len(tokenizer)} tokens but {model_source!r} "
                         f"embeds {rows} (config.json vocab_size): ids ≥ {rows} would index past its embedding; "
                         f"{own}resize the model's embeddings to the tokenizer (model.resize_token_embeddings) and "
                         "save it first")


def has_moe_blocks(model: nn.Module) -> bool:
    """Whether loading adopts ``model``'s own MoE blocks (else it upcycles the dense FFNs); the same answer on the
    meta-device model the early checks build as on the loaded one."""
    return model.config.model_type in MOE_MODEL_TYPES or any(type(m).__name__ in SUPPORTED_BLOCKS
                                                            for m in model.modules())


def _load_and_patch(config: RunConfig, groups, source: str, hf_config):
    """The HF model, upcycled or adopted: the rank keeps its own experts and drops the rest."""
    import switchyard as sy

    model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype(config.train.precision))
    if has_moe_blocks(model):
        _refuse_unused_moe_settings(config, source, None)
        sy.patch_model(model, None, groups, overrides=config.moe.overrides or None, layers=config.moe.layers,
                       every_n=config.moe.every_n, targets=config.moe.targets, exclude=config.moe.exclude)
    else:
        sy.patch_model(model, config.moe_config(), groups, layers=config.moe.layers, every_n=config.moe.every_n,
                       targets=config.moe.targets, exclude=config.moe.exclude, adapter=config.moe.adapter,
                       seed=config.train.seed)
    return model


def load_footprint(config: RunConfig, source: str, world: int = 1, ep: int = 1, tp: int = 1, etp: int | None = None,
                   pp: int = 1) -> LoadFootprint:
    """``source``'s bytes at the load dtype as transformers loads it, and a rank's share once patched and cut (the
    dense part of its pipeline stage and its 1/ep of the stage's experts, tensor-parallel modules at 1/tp; the
    heaviest stage's), both counted on the meta device."""
    from switchyard.cli import plan_numbers

    precision = config.train.precision
    try:
        kept = plan_numbers(planned_run_model(config, source), world=world, ep=ep, precision=precision, tp=tp,
                            etp=etp, pp=pp, pp_layers=config.parallel.pp_layers)["params_per_rank"]
    except ValueError as err:  # a model the meta-device plan cannot build: size the load without it
        log.info("sizing the load without the patched model (%s): a rank's share counted as the whole model", err,
                 ranks=[0])
        kept = None
    return footprint_of(AutoConfig.from_pretrained(source), kept, precision)


def planned_run_model(config: RunConfig, source: str):
    """``source`` built on the meta device and patched as ``load_model`` patches it (no weight read)."""
    from argparse import Namespace

    from switchyard.cli import planned_model, quiet_log
    from switchyard.hf.checkpoint import empty_model

    hf_config = AutoConfig.from_pretrained(source)
    adopts = getattr(hf_config, "switchyard", None) or has_moe_blocks(empty_model(hf_config))
    moe = config.moe_config()
    plan = Namespace(model=source, num_experts=None if adopts else moe.num_experts, top_k=moe.top_k,
                     **{key: None if adopts else getattr(config.moe, key)
                        for key in ("layers", "every_n", "targets", "exclude", "adapter")})
    with quiet_log():  # the real load logs the patching
        return planned_model(plan)


def check_model_split(config: RunConfig, source: str, tp: int, etp: int, pp: int = 1,
                      planned: nn.Module | None = None) -> None:
    """At tp > 1 or pp > 1, the tensor-parallel checks (a plan at all, heads, widths) and the pipeline checks (a
    model type the stages split, enough decoder layers) on the model built on the meta device from ``source``'s
    config.json and patched as ``load_model`` would patch it: a refusal before any weight is read, not after a
    large model has loaded (``apply_tensor_parallel`` and ``split_model`` check again on the real model)."""
    if tp == 1 and pp == 1:
        return
    from switchyard.parallel.tensor_parallel import tensor_parallel_shards
    from switchyard.train.pipeline import check_pipeline_model

    model = planned if planned is not None else planned_run_model(config, source)  # ``planned``: built already
    check_pipeline_model(model, pp, config.parallel.pp_layers)
    if tp > 1:
        tensor_parallel_shards(model, tp, etp)


def _set_loss_coefficients(model: nn.Module, config: RunConfig) -> None:
    """The router-loss coefficients the run config sets, on a switchyard checkpoint's layers: they weigh the losses,
    not the weights, so a fine-tune may change what a checkpoint (e.g. ``switchyard upcycle``'s) was saved with."""
    from switchyard.moe.layer import MoELayer

    wanted = {key: config.moe.config[key] for key in config.moe_keys_set if key in LOSS_COEFFICIENT_KEYS}
    changed: dict[str, tuple[Any, Any]] = {}
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        for key, value in wanted.items():
            if getattr(layer.config, key) != value:
                changed.setdefault(key, (getattr(layer.config, key), value))
                setattr(layer.config, key, value)
    if changed:  # and in the record a save writes, which is what loading rebuilds the layers from
        record, new_values = model.config.switchyard, {key: new for key, (_, new) in changed.items()}
        record["moe"].update(new_values)
        if record["mode"] == "adopt":
            record["overrides"] = {**(record.get("overrides") or {}), **new_values}
        log.info("router-loss coefficients from the run config: %s", ", ".join(
            f"moe.{k} {old} → {new}" for k, (old, new) in changed.items()), ranks=[0])


def _refuse_unused_moe_settings(config: RunConfig, source: str, record: dict[str, Any] | None) -> None:
    """A source with its own MoE layers (a switchyard checkpoint: ``record``; an HF MoE model: None) would
    silently ignore the run config's ``moe`` settings: a setting that would not take effect is an error."""
    moe = config.moe
    if record is None:
        unused = {f"moe.{k}": moe.config[k] for k in config.moe_keys_set}
        unused.update({"moe.adapter": moe.adapter} if moe.adapter is not None else {})
        if unused:
            raise ValueError(f"{unused} set in the run config, but model.source={source!r} is an HF MoE model: its "
                             "blocks are adopted with their own settings. Leave these out; change routing with "
                             "moe.overrides (e.g. moe.overrides.top_k=1)")
        return
    recorded = record.get("moe") or {}
    unused = {f"moe.{k}": (moe.config[k], recorded.get(k)) for k in config.moe_keys_set
              if moe.config[k] != recorded.get(k) and k not in LOSS_COEFFICIENT_KEYS}
    unused.update({f"moe.{k}": (getattr(moe, k), None) for k in ("layers", "every_n", "targets", "exclude",
                                                                  "adapter", "overrides") if getattr(moe, k)})
    if unused:
        listed = ", ".join(f"{k}={mine!r} (checkpoint: {theirs!r})" for k, (mine, theirs) in unused.items())
        raise ValueError(f"model.source={source!r} is a switchyard checkpoint whose MoE layers were fixed when it was "
                         f"saved, so these run config settings would not take effect: {listed}. Leave them out "
                         "(or make them agree), or start from the dense model to upcycle it differently")
