"""The development kit's entry point: ``python -m devkit <command>`` from a clone.

Test equipment and the demo, never part of the product's wheel: a real local Kafka broker, the
CloudTalk and Kustomer API simulators, the demo that runs every service against them, and the
local profile (``up``/``down``/``status``) that leaves them running for a person to use.
A command's module registers it with ``register_<command>(sub)``, or ``register(sub)``; a
:class:`~devkit.errors.DevkitError` ends the command with its one-line message (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from devkit.errors import DevkitError

COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("devkit.kafka_command", "start/stop a real local Apache Kafka broker (no Docker needed)"),
    "sim": ("devkit.sim.commands", "run a CloudTalk or Kustomer API simulator"),
    "demo": ("devkit.demo", "run everything locally with a scripted day and print a summary"),
    "up": ("devkit.local", "start the local profile: broker, both simulators, every service in the background"),
    "down": ("devkit.local", "stop what `python -m devkit up` started"),
    "status": ("devkit.local", "show what `python -m devkit up` started and whether it is ready"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m devkit", description="Development kit: local broker, simulators, demo, local profile."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    command = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            module = importlib.import_module(module_name)
            (getattr(module, f"register_{name}", None) or module.register)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DevkitError as exc:
        print(f"python -m devkit {args.command}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
