"""`switchyard …` command line. Each subcommand is one entry in ``COMMANDS``.

    switchyard layout --world 8 --tp 2 --ep 2 --num-experts 8
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

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


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "layout": ("print every rank's coordinates, groups and experts", _add_layout_args, cmd_layout),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard", description="expert-parallel MoE for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except ValueError as err:
        print(f"switchyard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
