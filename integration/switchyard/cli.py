"""`switchyard …` command line. Each subcommand is one entry in ``COMMANDS``.

    switchyard layout --world 8 --tp 2 --ep 2 --num-experts 8
    switchyard upcycle --model ./llama --num-experts 8 --top-k 2 --init drop_upcycle --out ./llama-moe
    switchyard export --model ./llama-moe --out ./llama-moe-hf
    switchyard plan --model ./llama --num-experts 8 --top-k 2 --world 8 --tp 2 --ep 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from switchyard.parallel.layout import local_expert_ids, rank_coordinates, rank_layout


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default where it has one (not for flags and required options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if all(action.default is not v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _count(text: str) -> int:
    """A degree or a count (``--world 0`` is refused naming the flag, before anything is read)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _coefficient(text: str) -> float:
    """A router-loss coefficient: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 turns the loss off), got {text!r}")
    return value


def _path(text: str) -> str:
    """A ``--model`` / ``--out`` path; an empty one (an unset ``$OUT`` in a script) would mean the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"the path is empty ({text!r}; an unset variable?): give a directory")
    return text


# what a Hugging Face hub id can look like ("name" or "org/name"); anything else is meant as a local path
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def check_local_model(model: str, flag: str = "--model") -> Path:
    """``model`` as a local path, refused where it is a file or cannot be a hub id and is not there: the hub client
    would read a missing ``./dir`` as a malformed repo id. Puts back a checkpoint a killed re-save left aside."""
    from switchyard.hf.checkpoint import recover_interrupted_save

    recover_interrupted_save(model)
    local = Path(model).expanduser()
    named = _named(model, flag)
    if local.exists() and not local.is_dir():
        raise ValueError(f"{named}: a file; pass the model's directory (the one holding config.json)")
    if not local.exists() and (not _HUB_ID.fullmatch(model) or ".." in model):
        raise ValueError(f"{named}: no such directory; pass a model directory or a hub id like org/name")
    return local


def _named(model: str, flag: str) -> str:
    """How an error names the value: ``--model x`` for a flag, ``model.source='x'`` for a config key."""
    return f"{flag} {model}" if flag.startswith("-") else f"{flag}={model!r}"


def check_model_dir(model: str, flag: str = "--model") -> Path:
    """``check_local_model``, and a local directory must hold config.json (transformers' own error, "Unrecognized
    model in …", names a key of a file that is not there)."""
    from switchyard.hf.checkpoint import inner_model_hint

    local = check_local_model(model, flag)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ValueError(f"{_named(model, flag)}: {local} has no config.json, so it is no transformers model directory: pass "
                         f"the model's directory (the one holding config.json){inner_model_hint(local)}")
    return local


def _json_object(path: Path) -> dict[str, Any]:
    """``path``'s JSON object, ``{}`` for one that is not (check_export then names what is wrong with it)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_config(model: str, flag: str = "--model") -> Any:
    """``config.json`` of a local model dir or hub id, or a one-line ``ValueError`` naming ``model``."""
    from transformers import AutoConfig

    local = check_model_dir(model, flag)
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else model)
    except (OSError, ValueError) as err:  # ValueError: a model_type this transformers does not know, or none
        what = "cannot read its config.json" if local.exists() else "no such directory, and as a hub id it failed"
        raise ValueError(f"{flag} {model}: {what}: {_one_line(err)}") from None


def _one_line(err: BaseException | str) -> str:
    """transformers' and the hub's messages span lines; an error here is one line."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


@contextlib.contextmanager
def quiet_log() -> Iterator[None]:
    """Silence switchyard's log for a dry run whose messages the real run prints again."""
    logger = logging.getLogger("switchyard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=_count, required=True, help="number of ranks (GPUs) in the job")
    p.add_argument("--tp", type=_count, default=1, help="tensor parallel degree")
    p.add_argument("--pp", type=_count, default=1, help="pipeline parallel degree")
    p.add_argument("--ep", type=_count, default=1, help="expert parallel degree")
    p.add_argument("--etp", type=_count, default=None, help="expert tensor parallel degree (1 or tp; default tp)")
    p.add_argument("--num-experts", type=_count, default=None,
                   help="show which experts each rank holds (with --json: local_experts, one list per rank)")
    p.add_argument("--json", action="store_true", help="print the groups as JSON instead of a table")


def cmd_layout(args: argparse.Namespace) -> int:
    layout = rank_layout(args.world, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    coords = rank_coordinates(args.world, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    ep_size = len(layout["ep"][0])
    if args.num_experts is not None:
        local_expert_ids(args.num_experts, ep_size, 0)  # validates divisibility with a clear error
    if args.json:
        experts = {} if args.num_experts is None else {
            "local_experts": [local_expert_ids(args.num_experts, ep_size, c["ep"]) for c in coords]}
        print(json.dumps({**layout, **experts}))
        return 0
    from rich.console import Console
    from rich.table import Table

    sizes = {kind: len(groups[0]) for kind, groups in layout.items()}
    title = f"world {args.world}: " + "  ".join(f"{k}={v}" for k, v in sizes.items())
    table = Table(title=title)
    columns = ["rank", "tp", "pp", "dp", "ep", "edp", "etp"]
    for col in columns:
        table.add_column(col, justify="right")
    if args.num_experts is not None:
        table.add_column(f"experts (of {args.num_experts})", justify="left")
    for rank, c in enumerate(coords):
        row = [str(rank)] + [str(c[k]) for k in columns[1:]]
        if args.num_experts is not None:
            ids = local_expert_ids(args.num_experts, ep_size, c["ep"])
            row.append(f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]))
        table.add_row(*row)
    console = Console(width=120)
    console.print(table)
    for kind, groups in layout.items():
        console.print(f"{kind:>4} groups: {groups}")
    return 0


def _tokenizer_of(model_dir: str) -> Any:
    """The tokenizer stored beside a model, or None: a local dir without tokenizer files has none."""
    from transformers import AutoTokenizer

    from switchyard.hf.tokenizer import has_tokenizer_files

    local = Path(model_dir)
    if local.is_dir() and not has_tokenizer_files(local):
        print(f"switchyard: {model_dir} has no tokenizer files, so the output has none either; serving it needs "
              "one: save the source's tokenizer into the output (tokenizer.save_pretrained(out))", file=sys.stderr)
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        print(f"switchyard: no tokenizer copied from {model_dir}: {err}", file=sys.stderr)
        return None


def _int_list(text: str) -> list[int]:
    """Layer indices; an empty item (``1,,2``, a trailing comma) is refused: a lost index, not one to skip."""
    parts = [part.strip() for part in text.split(",")]
    try:
        indices = [int(part) for part in parts]
    except ValueError:
        indices = []
    if not indices or min(indices) < 0:
        empty = " (an empty item)" if "" in parts and len(parts) > 1 else ""
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,2,4, got {text!r}{empty}")
    return indices


def _module_name(text: str) -> str:
    """A ``--targets`` / ``--exclude`` name; a ``re:`` one must compile (refused naming the flag, not ``targets=``)."""
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({err})") from None
    return text


def _adapter_name(name: str) -> str:
    """An ``--adapter`` of the registry, checked when given: importing the registry to build the parser imported
    DeepSpeed, whose accelerator notice then opened ``switchyard layout --json``'s stdout."""
    from switchyard.hf.architectures import ADAPTERS

    if name not in ADAPTERS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(map(repr, sorted(ADAPTERS)))})")
    return name


def _add_selection_args(p: argparse.ArgumentParser, use: str) -> None:
    """``patch_model``'s name-based selection (docs/upcycling.md, "Which layers"), as the run config's ``moe.*``."""
    p.add_argument("--targets", type=_module_name, nargs="+", default=None, metavar="NAME",
                   help=f"FFN module names to make MoE ({use}), matched like peft: exact, .-suffix or re:<regex>")
    p.add_argument("--exclude", type=_module_name, nargs="+", default=None, metavar="NAME",
                   help="FFN module names to leave dense")
    p.add_argument("--adapter", type=_adapter_name, default=None,
                   help="how to read the FFNs named by --targets (an architecture outside the registry)")


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    return {"layers": args.layers, "every_n": args.every_n, "targets": getattr(args, "targets", None),
            "exclude": getattr(args, "exclude", None), "adapter": getattr(args, "adapter", None)}


def _add_upcycle_args(p: argparse.ArgumentParser) -> None:
    from switchyard.config import INIT_METHODS, MoEConfig

    p.add_argument("--model", type=_path, required=True, help="dense transformers model: a local dir (or a hub id)")
    p.add_argument("--num-experts", type=_count, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=_count, required=True, help="experts each token is routed to")
    p.add_argument("--init", choices=INIT_METHODS, default="copy", help="how experts start from the dense FFN")
    p.add_argument("--every-n", type=_count, default=None, help="make layers 0, n, 2n, … MoE (others stay dense)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="comma-separated layer indices to make MoE (with --every-n: the layers both choose)")
    _add_selection_args(p, "with --layers / --every-n: the modules all choose")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initializers and the router")
    defaults = MoEConfig.__dataclass_fields__
    for name, what in (("aux_loss_coef", "load-balancing loss"), ("seq_aux_loss_coef", "per-sequence balancing loss"),
                       ("z_loss_coef", "router z-loss")):
        p.add_argument(f"--{name.replace('_', '-')}", type=_coefficient, default=defaults[name].default,
                       help=f"weight of the {what} saved with the model (moe.{name}; a fine-tune's run config "
                            "overrides it); default %(default)s")
    p.add_argument("--out", type=_path, required=True,
                   help="directory for the switchyard checkpoint (one holding a switchyard checkpoint is replaced)")


def cmd_upcycle(args: argparse.Namespace) -> int:
    import switchyard as sy
    from switchyard.hf.checkpoint import architecture_class, check_save_target, recover_interrupted_save

    moe_config = sy.MoEConfig(num_experts=args.num_experts, top_k=args.top_k, init=args.init,
                              aux_loss_coef=args.aux_loss_coef, seq_aux_loss_coef=args.seq_aux_loss_coef,
                              z_loss_coef=args.z_loss_coef)
    out = Path(args.out).resolve()
    recover_interrupted_save(out)  # as save_pretrained would, so that the notice below sees what it replaces
    check_save_target(out)  # what save_pretrained would refuse, before a long load
    _refuse_foreign_files(out, args.out)
    _check_writable(args.out, out.parent)  # the save's staging directory goes beside out
    config = model_config(args.model)
    _dry_run_upcycle(args, config, moe_config)
    _note_replaced(out)
    # the class config.json names, as the dry run built: a sequence classifier keeps its head (AutoModelForCausalLM
    # dropped its `score` and gave it a random lm_head)
    try:
        model = architecture_class(config).from_pretrained(args.model)
    except OSError as err:  # a config.json without weight files beside it
        raise ValueError(f"--model {args.model}: cannot load its weights: {_one_line(err)}") from None
    sy.patch_model(model, moe_config, seed=args.seed, **_selection(args))
    sy.save_pretrained(model, args.out, tokenizer=_tokenizer_of(args.model))
    print(f"wrote {args.out}")
    return 0


def _refuse_foreign_files(out: Path, typed: str) -> None:
    """``save_pretrained`` keeps the files it finds in ``out`` beside the checkpoint (an earlier save's README or
    tokenizer): a mistyped ``--out`` naming a directory of other files would get a checkpoint mixed into them.
    ``out`` holding config.json is a checkpoint (replaced) or another model (``check_save_target`` refuses it)."""
    if not out.is_dir() or (out / "config.json").is_file():
        return
    names = sorted(entry.name for entry in out.iterdir())
    if names:
        shown = ", ".join(names[:4]) + (" …" if len(names) > 4 else "")
        raise ValueError(f"--out {typed}: {out} is not empty ({shown}) and holds no switchyard checkpoint, so the "
                         "checkpoint's files would be mixed into it: upcycle into a new or empty directory")


def _check_writable(typed: str, where: Path) -> None:
    """The save creates its directories in ``where`` (or the nearest folder above it that exists): a path under a
    file, or in a folder this user cannot write to, failed there only after the whole model was loaded. A directory
    created and removed at once tells, for root and read-only mounts too."""
    base = where
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"--out {typed}: {base} is a file, so no directory can be created under it: choose a path "
                         "outside it")
    try:
        with tempfile.TemporaryDirectory(dir=base, prefix=".switchyard-write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"--out {typed}: cannot create a directory in {base} ({err.strerror or err}): choose a "
                         "directory you can write to") from None


def _note_replaced(out: Path) -> None:
    """Saving over a switchyard checkpoint replaces it (docs/checkpoints.md): say so before the long load, so that a
    mistyped ``--out`` can still be stopped."""
    from switchyard.hf.checkpoint import CONFIG_KEY, _read_json

    config_file = out / "config.json"
    if config_file.is_file() and _read_json(config_file).get(CONFIG_KEY):
        print(f"switchyard upcycle: replacing the switchyard checkpoint at {out} (its files this save does not write, "
              "like a README, are kept)", file=sys.stderr)


def _dry_run_upcycle(args: argparse.Namespace, config: Any, moe_config: Any) -> None:
    """Patch the model on the meta device (config.json only) so that a wrong ``--layers``, a model that is
    already MoE or one switchyard cannot upcycle is an error before gigabytes of weights are read."""
    import dataclasses

    import switchyard as sy
    from switchyard.hf.checkpoint import CONFIG_KEY, empty_model
    from switchyard.hf.export import export_refusal

    if getattr(config, CONFIG_KEY, None):
        raise ValueError(f"--model {args.model} is a switchyard checkpoint, already MoE: upcycle its dense original "
                         "(fine-tune or serve this one as it is)")
    model = empty_model(config)
    blocks = _hf_moe_blocks(model)
    if blocks:
        raise ValueError(f"--model {args.model} is an HF MoE model ({blocks[0]}), and upcycle takes a dense one: "
                         "fine-tune or serve it as it is (its MoE blocks are adopted), or `switchyard plan` it")
    # drop_upcycle reads the weights' statistics, which the meta device lacks; the other inits need shapes only
    dry = dataclasses.replace(moe_config, init="copy") if moe_config.init == "drop_upcycle" else moe_config
    with quiet_log():
        sy.patch_model(model, dry, seed=args.seed, **_selection(args))
        refusal = export_refusal(model)
    if refusal is not None:  # a valid switchyard model (fine-tune, serve), but say now that export will refuse it
        print(f"switchyard upcycle: note: `switchyard export` will refuse this model: {_one_line(refusal)}",
              file=sys.stderr)


def _shard_size(text: str) -> int:
    """Bytes of a size like 5GB, checked before the model is loaded."""
    from switchyard.hf.checkpoint import _parse_size

    try:
        return _parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_path, required=True,
                   help="a switchyard checkpoint (switchyard upcycle / save_pretrained)")
    p.add_argument("--out", type=_path, required=True,
                   help="new or empty directory for the transformers MoE checkpoint (or an earlier export, replaced)")
    p.add_argument("--max-shard-size", type=_shard_size, default=None,
                   help="largest weight file, e.g. 5GB: more go in shards with an index (default: transformers')")


def cmd_export(args: argparse.Namespace) -> int:
    import io

    import switchyard as sy
    from switchyard.hf.checkpoint import CONFIG_KEY
    from switchyard.hf.export import check_export

    # a file or a missing directory, named as upcycle and plan name them; then the kind of model, from the local
    # config.json alone (a hub lookup of a mistyped path waited on the network)
    local = check_model_dir(args.model)
    config_file = local / "config.json"
    if config_file.is_file() and not _json_object(config_file).get(CONFIG_KEY):
        raise ValueError(f"--model {args.model} is not a switchyard checkpoint (its config.json has no {CONFIG_KEY!r} "
                         "record), and export turns one into a transformers MoE checkpoint: upcycle a dense model "
                         f"first (switchyard upcycle --model {args.model} --num-experts N --top-k K --out DIR) and "
                         "export DIR; an HF MoE model is a transformers checkpoint already")
    with quiet_log():  # its warnings (training-only settings) are logged again by the export itself
        check_export(args.model, args.out)  # every refusal, from config.json: before gigabytes of weights are read
    _check_writable(args.out, Path(args.out).resolve())  # the export's staging directory goes inside out
    model = sy.from_pretrained(args.model)
    with contextlib.redirect_stderr(io.StringIO()) as notes:  # "no tokenizer files" goes after the export, not
        tokenizer = _tokenizer_of(args.model)                 # before an error that makes it moot
    out = sy.export_hf(model, args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    sys.stderr.write(notes.getvalue())
    return 0


_PLAN_TOP_K = 2  # plan's --top-k when upcycling, as documented; None in args: an explicit --top-k is detectable


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_path, required=True,
                   help="dense or HF MoE transformers model, or a switchyard checkpoint: dir or hub id "
                        "(only config.json is read)")
    p.add_argument("--num-experts", type=_count, default=None, help="upcycle a dense model to this many experts")
    p.add_argument("--top-k", type=_count, default=None,
                   help=f"experts each token is routed to (with --num-experts; default {_PLAN_TOP_K})")
    p.add_argument("--every-n", type=_count, default=None, help="make layers 0, n, 2n, … MoE (with --num-experts)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="comma-separated layer indices to make MoE (with --num-experts; with --every-n: both)")
    _add_selection_args(p, "with --num-experts")
    p.add_argument("--world", type=_count, required=True, help="number of ranks (GPUs) in the job")
    p.add_argument("--tp", type=_count, default=1,
                   help="tensor parallel degree (parallel.tp; experts split over their FFN width, etp = tp)")
    p.add_argument("--etp", type=_count, default=None,
                   help="expert tensor parallel degree (parallel.etp): tp (default) or 1 (experts whole, tokens split)")
    p.add_argument("--pp", type=_count, default=1,
                   help="pipeline parallel degree (parallel.pp): each stage holds contiguous decoder layers; the "
                        "numbers per rank are the heaviest stage's")
    p.add_argument("--pp-layers", type=_count, nargs="+", default=None, metavar="N",
                   help="decoder layers per pipeline stage, first to last (parallel.pp_layers; default: as even as "
                        "the count allows)")
    p.add_argument("--ep", type=_count, default=1,
                   help="expert parallel degree (dp = world / (tp * pp); experts: edp = world / (pp * ep * etp))")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="training precision (train.precision)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of text")


def planned_model(args: argparse.Namespace) -> Any:
    """The model on the meta device (no weights read), patched as the job would patch it. ``args.top_k`` None is
    the documented default for upcycling (``_PLAN_TOP_K``); a model with its own MoE layers ignores it (the fine-tune
    passes its run config's ``moe.top_k`` here, so ``cmd_plan`` refuses an explicit ``--top-k``, not this)."""
    import switchyard as sy
    from switchyard.hf.checkpoint import CONFIG_KEY, _repatch, empty_model

    config = model_config(args.model)
    record = getattr(config, CONFIG_KEY, None)
    if record:
        if args.num_experts is not None or any(value is not None for value in _selection(args).values()):
            raise ValueError(f"{args.model} is a switchyard checkpoint (already MoE, its layers chosen): leave out "
                             "--num-experts and the layer selection (--layers, --every-n, --targets, --exclude, "
                             "--adapter)")
        delattr(config, CONFIG_KEY)
        model = empty_model(config)
        _repatch(model, record, None)
        return model
    model = empty_model(config)
    blocks = _hf_moe_blocks(model)
    if blocks:
        given = ["--num-experts"] * (args.num_experts is not None) + _flags(args)
        if given:
            raise ValueError(f"{args.model} is an HF MoE model ({blocks[0]}), which keeps its own experts and routing "
                             f"(every MoE block is adopted as it is): drop {' / '.join(given)}")
        return sy.patch_model(model)  # adopt its blocks
    if args.num_experts is None:  # with it, patch_model refuses an MoE model it cannot adopt, naming the block
        _refuse_unadoptable(model, args.model)
        if _flags(args):
            raise ValueError(f"{' / '.join(_flags(args))} choose the layers to upcycle: pass --num-experts with them")
        raise ValueError(f"{args.model} has no MoE blocks to adopt: to plan a dense model upcycled, pass --num-experts "
                         "(and --top-k)")
    top_k = _PLAN_TOP_K if args.top_k is None else args.top_k
    moe = sy.MoEConfig(num_experts=args.num_experts, top_k=top_k, init="copy")  # copy: shapes suffice
    return sy.patch_model(model, moe, **_selection(args))


def _flags(args: argparse.Namespace) -> list[str]:
    """The layer-selection flags given (``--layers``, ``--every-n``, …)."""
    return [f"--{key.replace('_', '-')}" for key, value in _selection(args).items() if value is not None]


def _hf_moe_blocks(model: Any) -> list[str]:
    """The class names of the HF MoE blocks switchyard adopts that ``model`` holds (none: a dense model)."""
    from switchyard.hf.adopt import SUPPORTED_BLOCKS

    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in SUPPORTED_BLOCKS})


def _refuse_unadoptable(model: Any, name: str) -> None:
    """An MoE model whose blocks switchyard cannot adopt (GPT-OSS) is neither adopted nor dense: say that, with
    adopt's reason, rather than "no MoE blocks" or "pass --num-experts"."""
    from switchyard.hf.adopt import refuse_unadoptable
    from switchyard.hf.patch import _refuse_unsupported_moe

    try:
        refuse_unadoptable(model)
        if not _hf_moe_blocks(model):
            _refuse_unsupported_moe(model)
    except ValueError as err:
        raise ValueError(f"{name} has MoE blocks that switchyard cannot adopt, and it is no dense model to upcycle: "
                         f"{err}") from None


def _refuse_unused_top_k(args: argparse.Namespace, model: Any) -> None:
    """``--top-k`` sets the routing of a dense model upcycled with ``--num-experts``; a model with its own MoE layers
    (an HF MoE model, a switchyard checkpoint) keeps its routing, so the numbers would silently ignore it."""
    from switchyard.hf.patch import moe_layers

    if args.top_k is None or args.num_experts is not None:
        return
    layers = moe_layers(model)
    own = f" (top-{layers[0].config.top_k} from its config.json)" if layers else ""
    raise ValueError(f"--top-k {args.top_k}: {args.model} has its own MoE layers and keeps their routing{own}; "
                     "drop --top-k (it applies with --num-experts, to a dense model upcycled)")


def plan_numbers(model: Any, world: int, ep: int, precision: str, tp: int = 1, etp: int | None = None,
                 pp: int = 1, pp_layers: list[int] | None = None) -> dict[str, Any]:
    """Parameters and model-state memory per rank of an EP (TP, PP) job (ZeRO paper's estimate, activations
    excluded, steady state after a step): dense parameters are replicated over dp = world / (tp·pp) ranks, each expert
    over edp = world / (pp·ep·etp) ranks; what ``apply_tensor_parallel`` shards, each rank holds 1/tp of (experts:
    1/etp, etp = tp). With pp > 1 each stage is cut from a copy by ``split_model``, as the launcher cuts it, and the
    numbers per rank are the heaviest stage's (most parameters per rank, a tied LM head's copy on the last stage
    counted: it is no parameter there, but a tensor with a gradient); ``stages`` lists every stage's."""
    from switchyard.hf.patch import moe_layers
    from switchyard.parallel.tensor_parallel import tensor_parallel_shards
    from switchyard.train.pipeline import check_pipeline_model

    etp = tp if etp is None else etp
    sizes = rank_layout(world, tp=tp, pp=pp, ep=ep, etp=etp)
    dp, edp = len(sizes["dp"][0]), len(sizes["edp"][0])
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers to plan")
    num_experts = layers[0].config.num_experts
    local_expert_ids(num_experts, ep, 0)  # ep must divide the experts: the error says so
    check_pipeline_model(model, pp, pp_layers)  # the launcher's checks: a model type the stages split, enough layers
    tensor_parallel_shards(model, tp, etp)  # and heads, widths, a plan at all: on the whole model, as it checks
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is False)
    dense = total - expert
    active = dense + sum(sum(p.numel() for p in layer.experts.parameters()) * layer.config.top_k
                         // layer.config.num_experts for layer in layers)
    # bytes per parameter: weights, gradients, optimizer state (Adam: fp32 moments, plus a fp32 master in bf16)
    weight_b, grad_b, optim_b = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    gib = 1 << 30

    def states(dense_rank: int, expert_rank: int, shard_grads: bool, shard_optim: bool) -> float:
        per = 0.0
        for count, replicas in ((dense_rank, dp), (expert_rank, edp)):
            per += count * (weight_b + grad_b / (replicas if shard_grads else 1)
                            + optim_b / (replicas if shard_optim else 1))
        return round(per / gib, 3)

    stages = []
    for held, stage_model in _pipeline_stages(model, pp, pp_layers):
        shards = tensor_parallel_shards(stage_model, tp, etp)
        dense_rank, expert_rank = _held_per_rank(stage_model, shards, tp, ep)
        tied_rank = _tied_head_copy_per_rank(stage_model, shards, tp)
        copy_gib = tied_rank * (weight_b + grad_b) / gib  # the copy and its gradient, never sharded by ZeRO
        stages.append({"stage": len(stages), "layers": list(held), "params_per_rank": dense_rank + expert_rank,
                       **({"tied_head_copy_per_rank": tied_rank} if tied_rank else {}),
                       "model_states_gib_per_rank": {
                           "zero0": round(states(dense_rank, expert_rank, False, False) + copy_gib, 3),
                           "zero1": round(states(dense_rank, expert_rank, False, True) + copy_gib, 3),
                           "zero2": round(states(dense_rank, expert_rank, True, True) + copy_gib, 3)}})
    heaviest = max(stages, key=lambda stage: stage["params_per_rank"] + stage.get("tied_head_copy_per_rank", 0))
    numbers = {
        "world": world, "tp": tp, **({"pp": pp} if pp > 1 else {}), "etp": etp, "ep": ep, "dp": dp, "edp": edp,
        "moe_layers": len(layers), "num_experts": num_experts,
        "experts_per_rank": num_experts // ep, "params_total": total, "params_dense": dense,
        "params_experts": expert, "params_active_per_token": active, "params_per_rank": heaviest["params_per_rank"],
        "precision": precision, "model_states_gib_per_rank": heaviest["model_states_gib_per_rank"],
    }
    if pp > 1:
        numbers.update(heaviest_stage=heaviest["stage"], stages=stages)
    return numbers


def _pipeline_stages(model: Any, pp: int, pp_layers: list[int] | None = None) -> Iterator[tuple[range, Any]]:
    """Each pipeline stage's decoder layers and its model (at pp = 1 the model itself, layers left empty: the
    plan does not list them)."""
    import copy

    from switchyard.train.pipeline import split_model

    if pp == 1:
        yield range(0), model
        return
    for stage in range(pp):
        # meta tensors: a copy costs no memory; the MoE layers' copies keep their experts' allreduce=False
        stage_model = copy.deepcopy(model)
        held, _ = split_model(stage_model, stage, pp, pp_layers)
        yield held, stage_model


def _held_per_rank(model: Any, shards: dict[str, Any], tp: int, ep: int) -> tuple[int, int]:
    """Dense and expert parameter elements one rank holds of ``model``: 1/tp of what tensor parallelism shards
    (``shards``: ``tensor_parallel_shards``; experts split only at etp = tp), 1/ep of the experts."""
    dense_rank = expert_rank = 0
    for name, p in model.named_parameters():
        held = p.numel() // (tp if name in shards else 1)
        if getattr(p, "allreduce", True) is False:
            expert_rank += held // ep
        else:
            dense_rank += held
    return dense_rank, expert_rank


def _tied_head_copy_per_rank(stage_model: Any, shards: dict[str, Any], tp: int) -> int:
    """Elements of the tied LM head's copy one rank of the last pipeline stage holds (0 elsewhere): ``split_model``
    keeps it as a buffer, which the pipeline fills from the first stage and gives a gradient."""
    from switchyard.train.pipeline import SPLIT_ATTR

    split = getattr(stage_model, SPLIT_ATTR, None)
    head = stage_model.get_output_embeddings()
    if split is None or not split[3] or head is None or "weight" not in head._buffers:
        return 0
    name = next(name for name, buffer in stage_model.named_buffers() if buffer is head.weight)
    return head.weight.numel() // (tp if name in shards else 1)


def _billions(count: int) -> str:
    """A parameter count as people write it: 46.70B, 8.47M."""
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def _stage_text(stage: dict[str, Any], pp: int) -> str:
    """What a pipeline stage holds, as pipeline.py logs it: its decoder layers, the embedding or the head."""
    layers = stage["layers"]
    ends = [", input embedding"] * (stage["stage"] == 0) + [", final norm and LM head"] * (stage["stage"] == pp - 1)
    return f"stage {stage['stage']} (decoder layers {layers[0]}–{layers[-1]}{''.join(ends)})"


def cmd_plan(args: argparse.Namespace) -> int:
    # the degrees first, before any config is read
    rank_layout(args.world, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    if args.pp_layers is not None and len(args.pp_layers) != args.pp:
        raise ValueError(f"--pp-layers {' '.join(map(str, args.pp_layers))} gives {len(args.pp_layers)} stages' layer "
                         f"counts for --pp {args.pp}: give one per stage")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import: keep --json parseable
        model = planned_model(args)
    _refuse_unused_top_k(args, model)
    numbers = plan_numbers(model, args.world, args.ep, args.precision, tp=args.tp, etp=args.etp, pp=args.pp,
                           pp_layers=args.pp_layers)
    numbers.update(_host_load(args, numbers))
    if args.json:
        print(json.dumps(numbers))
        return 0
    n, count = numbers, _billions
    states = n["model_states_gib_per_rank"]
    print(f"{args.model}: {n['moe_layers']} MoE layers of {n['num_experts']} experts; parameters "
          f"{count(n['params_total'])} (dense {count(n['params_dense'])}, experts {count(n['params_experts'])}), "
          f"active per token {count(n['params_active_per_token'])}")
    split = f" (1/{n['etp']} of each one's FFN width)" if n["etp"] > 1 else ""
    pp = n.get("pp", 1)
    degrees = f"tp={n['tp']}, " + (f"pp={pp}, " if pp > 1 else "") + f"ep={n['ep']}"
    copy = n["stages"][n["heaviest_stage"]].get("tied_head_copy_per_rank") if pp > 1 else None
    heaviest = ((f" (+ a tied LM head's copy of {count(copy)})" if copy else "")
                + (f" in the heaviest pipeline stage, stage {n['heaviest_stage']}" if pp > 1 else ""))
    print(f"world {n['world']}, {degrees}: dp={n['dp']} for the dense weights, edp={n['edp']} for "
          f"each expert; each rank holds {n['experts_per_rank']} experts per layer{split} and "
          f"{count(n['params_per_rank'])} parameters{heaviest}")
    if pp > 1:
        print("pipeline stages, parameters per rank: " + "; ".join(
            f"{_stage_text(stage, pp)} {count(stage['params_per_rank'])}"
            + (f" + a tied LM head's copy of {count(stage['tied_head_copy_per_rank'])}"
               if "tied_head_copy_per_rank" in stage else "") for stage in n["stages"]))
    of_stage = f" of stage {n['heaviest_stage']}" if pp > 1 else ""
    print(f"model states per rank{of_stage} ({n['precision']}, Adam; the ZeRO paper's steady state, activations and "
          "the step's fp32 gradient partition and buckets not included: a lower bound): ZeRO-0 "
          f"{states['zero0']} GiB, ZeRO-1 {states['zero1']} GiB, ZeRO-2 {states['zero2']} GiB")
    if "host_load_gib" in n:
        load = n["host_load_gib"]
        print(f"host memory to load this HF model ({n['precision']}): {load['loaded']} GiB on each loading rank, "
              f"then {load['kept_per_rank']} GiB kept per rank until the engine moves it to its device; the "
              "fine-tune's ranks load in waves that fit the free memory (model.load_ranks_at_once)")
    return 0


def _host_load(args: argparse.Namespace, numbers: dict[str, Any]) -> dict[str, Any]:
    """An HF source's host memory at load (docs/finetune.md, "Loading the model"): every loading rank holds the whole
    model as transformers loads it, at the training precision, then keeps its share (``params_per_rank``). A
    switchyard checkpoint is read by share: nothing to add."""
    from switchyard.hf.checkpoint import CONFIG_KEY
    from switchyard.train.load_waves import footprint_of

    config = model_config(args.model)
    if getattr(config, CONFIG_KEY, None):
        return {}
    size, gib = footprint_of(config, numbers["params_per_rank"], args.precision), 1 << 30
    return {"host_load_gib": {"loaded": round(size.loaded_bytes / gib, 3),
                              "kept_per_rank": round(size.kept_bytes / gib, 3)}}


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "layout": ("print every rank's coordinates, groups and experts", _add_layout_args, cmd_layout),
    "upcycle": ("turn a dense transformers model into a switchyard MoE checkpoint", _add_upcycle_args, cmd_upcycle),
    "export": ("write a switchyard checkpoint as a standard transformers MoE checkpoint", _add_export_args, cmd_export),
    "plan": ("parameters and memory per rank of an expert- (tensor-, pipeline-) parallel job (reads only config.json)",
             _add_plan_args, cmd_plan),
}


# the settings library errors name in their API's terms (patch_model's arguments, MoEConfig's and the run config's
# fields); a mention is the name before "=", "*" (``ep*etp``), " must " or " matched ", not a value of None or empty
_SETTINGS = ("num_experts", "top_k", "layers", "every_n", "targets", "exclude", "adapter", "seed", "tp", "pp", "ep",
             "etp", "parallel.pp", "parallel.pp_layers")
_SETTING = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(_SETTINGS, key=len, reverse=True)))
                      + r")(?=\s*[=*]| must | matched )(?!=None\b|=\[\]|=\(\))")


def _with_flags(message: str, args: argparse.Namespace, argv: list[str]) -> str:
    """``message`` and the flags the user typed (``argv``) behind the settings it names (``top_k=8`` was
    ``--top-k 8``): the library's messages speak its API, which Python users rely on; the command's user typed
    flags. A default the user did not type (``--tp 1``) is not credited to them."""
    typed_flags = {word.split("=", 1)[0] for word in argv if word.startswith("--")}
    parts = {}
    for name in _SETTING.findall(message):
        dest = name.removeprefix("parallel.")
        value = getattr(args, dest, None)
        if dest in parts or value is None or f"--{dest.replace('_', '-')}" not in typed_flags:
            continue
        sep = "," if dest == "layers" else " "  # --layers is one comma-separated word; nargs flags are words
        typed = sep.join(shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value]))
        parts[dest] = f"{name} is --{dest.replace('_', '-')} {typed}"
    return f"{message} (on the command line: {', '.join(parts.values())})" if parts else message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard", description="expert-parallel MoE for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, OSError) as err:  # user mistakes: bad settings, missing or unreadable files
        print(f"switchyard {args.command}: error: {_with_flags(_one_line(err), args, argv)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a save or an export interrupted keeps what was there (docs/checkpoints.md)
        print(f"switchyard {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
