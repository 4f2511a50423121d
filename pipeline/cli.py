"""One entry point: ``pipeline <command>`` (also ``python -m pipeline``).

Each command lives with the code it runs; this module only wires the parsers. A command module
exposes ``register(subparsers)`` that adds its parser and sets ``func`` (sync, returns an exit
code). Only the chosen command's module is imported, so a service starts without loading the
others; ``pipeline --help`` lists every command from the table below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline import version
from pipeline.core.settings import SettingsError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("pipeline.ingest.app", "run the webhook ingest service"),
    "poll": ("pipeline.ingest.pollers", "run a poller: calls | contacts | customers"),
    "backfill": ("pipeline.ingest.backfill", "publish a time window of a source API into its raw topic"),
    "process": ("pipeline.process.runner", "run a processor: calls | sms | contacts-import | contacts-export"),
    "sink": ("pipeline.sink.runner", "run a sink: kustomer | cloudtalk"),
    "config": ("pipeline.ops.config", "check an integrations file"),
    "topics": ("pipeline.ops.topics", "create missing topics, report drift"),
    "webhooks": ("pipeline.ops.webhooks", "register the Kustomer outbound webhook of an integration"),
    "replay": ("pipeline.ops.replay", "re-publish a raw-topic window, or dead letters to their source"),
    "lag": ("pipeline.ops.lag", "consumer-group lag in records"),
    "copy": ("pipeline.ops.copy", "copy a topic into another exactly once"),
}

# the development kit's commands: not part of the product, they live in devkit/ of a clone
DEVKIT_COMMANDS = {
    "kafka": "a local Apache Kafka broker",
    "sim": "the CloudTalk and Kustomer simulators",
    "demo": "the demo",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="CloudTalk <-> Kustomer event-streaming pipeline. Every service and tool is a subcommand.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"pipeline {version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"pipeline {version()}")
        return 0
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in DEVKIT_COMMANDS:
        print(
            f"pipeline {command}: {DEVKIT_COMMANDS[command]} belongs to the development kit, not the product; "
            f"from a clone run `python -m devkit {command}` (after `make install`)",
            file=sys.stderr,
        )
        return 2
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"pipeline: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
