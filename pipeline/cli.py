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

from pipeline.settings import SettingsError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("pipeline.commands.kafka", "start/stop a real local Apache Kafka broker (no Docker needed)"),
    "topics": ("pipeline.commands.topics", "create missing topics, report drift"),
    "sim": ("pipeline.sim.commands", "run a CloudTalk or Kustomer API simulator"),
    "copy": ("pipeline.commands.copy", "copy a topic into another exactly once"),
    "process": ("pipeline.process.runner", "run a processor: calls | sms | contacts-import | contacts-export"),
    "config": ("pipeline.commands.config", "check an integrations file"),
    "ingest": ("pipeline.ingest.app", "run the webhook ingest service"),
    "sink": ("pipeline.sink.runner", "run a sink: kustomer | cloudtalk"),
    "poll": ("pipeline.ingest.pollers", "run a poller: calls | contacts | customers"),
    "backfill": ("pipeline.commands.backfill", "publish a time window of a source API into its raw topic"),
    "webhooks": ("pipeline.commands.webhooks", "register the Kustomer outbound webhook of an integration"),
    "replay": ("pipeline.commands.replay", "re-publish a raw-topic window, or dead letters to their source"),
    "lag": ("pipeline.lag", "consumer-group lag in records"),
    "demo": ("pipeline.demo", "run everything locally with a scripted day and print a summary"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="CloudTalk <-> Kustomer event-streaming pipeline. Every service and tool is a subcommand.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
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
