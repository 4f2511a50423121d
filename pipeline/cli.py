"""One entry point: ``pipeline <command>`` (also ``python -m pipeline``).

Each command lives with the code it runs; this module only wires the parsers. A command module
exposes ``register(subparsers)`` that adds its parser and sets ``func`` (sync, returns an exit
code). Only the chosen command's module is imported, so a service starts without loading the
others; ``pipeline --help`` lists every command from the table below.

A command that cannot start — a bad setting, a missing or invalid integrations file, a secret it
cannot read, a port it cannot listen on, a file it cannot open, a broker it cannot reach — ends
with one line on stderr naming the thing, never a traceback: exit 2 for what the operator must
correct (settings, the integrations file, secrets), 1 for what the environment refused.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
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
    "trace": ("pipeline.ops.trace", "the whole path of an event, call, SMS, customer or phone number"),
    "deadletters": ("pipeline.ops.deadletters", "list and inspect dead letters"),
    "status": ("pipeline.ops.status", "per integration: last event in, last effect out; lag, members, dead letters"),
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
    # aiokafka's records reach stderr only through the logging a service sets up (JSON lines), not
    # through Python's last-resort handler in a one-shot command
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
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
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - start-up failures become one line
        line, code = failure_line(exc)
        if line is None:
            raise
        print(f"pipeline {args.command}: {line}", file=sys.stderr)
        return code


def failure_line(exc: BaseException) -> tuple[str | None, int]:
    """The one line (and exit code) for a failure an operator can act on; (None, 0) for a bug."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from pipeline.core.config import ConfigError

    if isinstance(exc, SettingsError):
        return f"configuration error: {exc}", 2
    if isinstance(exc, ConfigError):
        problems = exc.problems or [str(exc)]
        if exc.source == "secrets":
            return f"secret: {problems[0]}", 2
        more = (
            f" (and {len(problems) - 1} more problem(s): `pipeline config check {exc.source}` lists them)"
            if len(problems) > 1
            else ""
        )
        return f"integrations file {exc.source}: {problems[0]}{more}", 2
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen: {_strip_errno(exc)} (another process holds the port; set another one)", 1
        if exc.errno in (errno.EACCES, errno.EADDRNOTAVAIL) and "bind" in str(exc):
            return f"cannot listen: {_strip_errno(exc)}", 1
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}", 1
        return None, 0  # anything else is not a start-up problem: its traceback helps
    if isinstance(exc, KafkaError):
        name, text = type(exc).__name__, str(exc)
        text = text if text.startswith(name) else f"{name}: {text}"
        what = "cannot reach the Kafka broker" if isinstance(exc, KafkaConnectionError) else "Kafka"
        return f"{what}: {text}", 1
    return None, 0


def _strip_errno(exc: OSError) -> str:
    text = str(exc)
    return text.split("] ", 1)[1] if text.startswith("[Errno") and "] " in text else text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
