"""`switchyard …` command line. Each subcommand is one entry in ``COMMANDS``.

    switchyard layout --world 8 --tp 2 --ep 2 --num-experts 8
    switchyard upcycle --model ./llama --num-experts 8 --top-k 2 --init drop_upcycle --out ./llama-moe
    switchyard export --model ./llama-moe --out ./llama-moe-hf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from switchyard.parallel.layout import local_expert_ids, rank_coordinates, rank_layout


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, required=True, help="number of ranks (GPUs) in the job")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel degree")
    p.add_argument("--ep", type=int, default=1, help="expert parallel degree")
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel degree (1 or tp; default tp)")
    p.add_argument("--num-experts", type=int, default=None, help="show which experts each rank holds")
    p.add_argument("--json", action="store_true", help="print the groups as JSON instead of a table")


def cmd_layout(args: argparse.Namespace) -> int:
    layout = rank_layout(args.world, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    coords = rank_coordinates(args.world, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    ep_size = len(layout["ep"][0])
    if args.num_experts is not None:
        local_expert_ids(args.num_experts, ep_size, 0)  # validates divisibility with a clear error
    if args.json:
        print(json.dumps(layout))
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _tokenizer_of(model_dir: str) -> Any:
    """The tokenizer stored beside a model, or None: a local dir without tokenizer files has none."""
    from transformers import AutoTokenizer

    local = Path(model_dir)
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        print(f"switchyard: no tokenizer copied from {model_dir}: {err}", file=sys.stderr)
        return None


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,2,4, got {text!r}") from None


def _add_upcycle_args(p: argparse.ArgumentParser) -> None:
    from switchyard.config import INIT_METHODS

    p.add_argument("--model", required=True, help="dense transformers model: a local dir (or a hub id)")
    p.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts each token is routed to")
    p.add_argument("--init", choices=INIT_METHODS, default="copy", help="how experts start from the dense FFN")
    p.add_argument("--every-n", type=int, default=None, help="make layers 0, n, 2n, … MoE (others stay dense)")
    p.add_argument("--layers", type=_int_list, default=None, help="comma-separated layer indices to make MoE")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initializers and the router")
    p.add_argument("--out", required=True, help="directory for the switchyard checkpoint")


def cmd_upcycle(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    import switchyard as sy

    moe_config = sy.MoEConfig(num_experts=args.num_experts, top_k=args.top_k, init=args.init)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    sy.patch_model(model, moe_config, layers=args.layers, every_n=args.every_n, seed=args.seed)
    sy.save_pretrained(model, args.out, tokenizer=_tokenizer_of(args.model))
    print(f"wrote {args.out}")
    return 0


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a switchyard checkpoint (switchyard upcycle / save_pretrained)")
    p.add_argument("--out", required=True, help="directory for the transformers MoE checkpoint")


def cmd_export(args: argparse.Namespace) -> int:
    import switchyard as sy

    model = sy.from_pretrained(args.model)
    out = sy.export_hf(model, args.out, tokenizer=_tokenizer_of(args.model))
    print(f"wrote {out}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "layout": ("print every rank's coordinates, groups and experts", _add_layout_args, cmd_layout),
    "upcycle": ("turn a dense transformers model into a switchyard MoE checkpoint", _add_upcycle_args, cmd_upcycle),
    "export": ("write a switchyard checkpoint as a standard transformers MoE checkpoint", _add_export_args, cmd_export),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard", description="expert-parallel MoE for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, OSError) as err:  # user mistakes: bad settings, missing or unreadable files
        print(f"switchyard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
