"""One entry point: ``pipeline <command>`` (also ``python -m pipeline``).

Each command lives with the code it runs; this module only wires the parsers. A command module
exposes ``register(subparsers)`` that adds its parser(s) and sets ``func`` (sync, returns an exit
code) on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline.settings import SettingsError

# (module, help) — every module exposes register(subparsers)
COMMAND_MODULES: tuple[str, ...] = (
    "pipeline.commands.kafka",
    "pipeline.commands.topics",
    "pipeline.commands.copy",
    "pipeline.sim.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="CloudTalk <-> Kustomer event-streaming pipeline. Every service and tool is a subcommand.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"pipeline: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
