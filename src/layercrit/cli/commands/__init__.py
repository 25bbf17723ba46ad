"""One module per command (pip's `commands/` layout): each has `add_parser(sub)`, which adds its
subparser and arguments and sets `fn=run`, and `run(args) -> int`, which only calls the library
and prints. `COMMANDS` lists them in the order `layercrit --help` shows them."""

from __future__ import annotations

import argparse
import importlib

COMMANDS = [
    "layers",
    "measure",
    "train",
    "robustness",
    "distances",
    "modcrit",
    "rank",
    "sweep",
    "import_reference",
    "export",
    "summarize",
    "plot",
    "report",
    "proxies",
    "compare_proxies",
    "pruning_curve",
    "prune",
    "demo",
]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add every command's subparser to `sub`."""
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
