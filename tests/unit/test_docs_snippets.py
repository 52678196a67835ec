"""The user docs say what the code does: worked layout tables, CLI / launcher flags, serve settings and
their defaults, and every repository path they name. Cheap (no model is run), so a drifting doc fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from switchyard.parallel import rank_layout

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/parallelism.md", "docs/upcycling.md", "docs/serve.md", "docs/finetune.md"]


def text(name: str) -> str:
    return (REPO / name).read_text()


def test_parallelism_worked_tables_equal_rank_layout():
    doc = text("docs/parallelism.md")
    tables = re.findall(r"\*\*world (\d+), ([^*]+)\*\*\n\n\| kind \| groups \|\n\|---\|---\|\n((?:\|.*\|\n)+)", doc)
    assert len(tables) == 4
    for world, degrees, rows in tables:
        kwargs = {k: int(v) for k, v in (d.strip().split("=") for d in degrees.split(","))}
        documented = {kind.strip(): ast.literal_eval(groups.strip())
                      for kind, groups in re.findall(r"^\| (\w+) \| (.+) \|$", rows, re.M)}
        assert documented == rank_layout(int(world), **kwargs), (world, degrees)


def test_readme_rank_layout_example():
    readme = text("README.md")
    block = readme[readme.index("sy.parallel.rank_layout(8, tp=2, ep=2)"):]
    block = block[:block.index("\n\n")]
    layout = rank_layout(8, tp=2, ep=2)
    full = re.findall(r"'(\w+)': (\[\[[^…]*?\]\])(?=,|\})", block)
    abridged = re.findall(r"'(\w+)': \[(\[[\d,]+\]),…\]", block)
    assert sorted(kind for kind, _ in full + abridged) == sorted(layout)
    for kind, groups in full:
        assert ast.literal_eval(groups) == layout[kind], kind
    for kind, first in abridged:
        assert ast.literal_eval(first) == layout[kind][0], kind


def _options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _documented_flags(pattern: str) -> set[str]:
    """``--flags`` on the doc lines that run ``pattern`` (up to a comment or the end of the code span)."""
    flags = set()
    for name in DOCS:
        for match in re.finditer(pattern + r"([^`|#\n]*)", text(name)):
            flags |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(1)))
    return flags


def test_every_documented_cli_flag_exists():
    import argparse

    from switchyard.cli import COMMANDS

    for name, (_, add_args, _) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        add_args(parser)
        documented = _documented_flags(rf"switchyard {name}\b")
        assert documented <= _options(parser), (name, documented - _options(parser))


def test_every_documented_launcher_flag_exists():
    for script in ("serve", "finetune", "moe_layer_demo"):
        source = (REPO / "launch" / f"{script}.py").read_text()
        known = set(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", source))
        documented = _documented_flags(rf"launch/{script}\.py")
        assert documented, script
        assert documented <= known, (script, documented - known)


def test_serve_options_table_matches_the_flags_the_config_and_its_defaults():
    from switchyard.serve.config import ServeConfig

    doc = text("docs/serve.md")
    table = doc[doc.index("| flag / key | default |"):doc.index("### What `--model` can be")]
    source = (REPO / "launch" / "serve.py").read_text()
    flags = set(re.findall(r"add_argument\(\"(--[a-z-]+)\"", source))
    defaults = ServeConfig()
    spelled = {"none": None, "1 MiB": 1 << 20}
    rows = re.findall(r"^\| (.+?) \| (.+?) \| .*\|$", table, re.M)[2:]  # after the header and the rule
    assert len(rows) >= 15
    for names, default in rows:
        keys = re.findall(r"`([a-z_-]+)`", names)
        for key in keys:
            if key.startswith("--"):
                assert key in flags, key
            else:
                assert hasattr(defaults, key), key
        plain = [k for k in keys if not k.startswith("--")]
        if len(plain) == 1 and not (default.startswith("—") or "name" in default or "model's" in default):
            want = getattr(defaults, plain[0])
            value = spelled.get(default, default.strip("`"))
            assert str(want) == str(value) or (isinstance(want, float) and want == float(value)), (plain, default)


@pytest.mark.parametrize("name", DOCS)
def test_every_repository_path_a_doc_names_exists(name):
    paths = re.findall(r"(?<![\w/])((?:configs|launch|tests|benchmarks|integration)/[\w./-]+\.(?:py|json|yaml|sh|md))"
                       r"(?:::(\w+))?", text(name))
    assert paths or name == "docs/upcycling.md"
    for path, test in paths:
        assert (REPO / path).is_file(), f"{name} names {path}, which does not exist"
        if test:
            assert f"def {test}(" in (REPO / path).read_text(), f"{name} names {path}::{test}"
