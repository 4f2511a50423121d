"""``pipeline config check FILE``: validate an integrations file and name every bad field.

Every secret the file references is read too (``{env: NAME}``, ``{file: PATH}``), so a file
written for another machine fails here; the message says so and names ``--skip-secrets``, which
checks everything else.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import ConfigError, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check an integrations file")
    p.add_argument("action", choices=["check"])
    p.add_argument("file")
    p.add_argument(
        "--skip-secrets",
        action="store_true",
        help="check the structure only, not that every referenced secret is readable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if not args.skip_secrets:
        problems = config.check_secrets()
        if problems:
            print(
                f"{args.file}: the file is valid, but {len(problems)} secret(s) it references cannot be read on "
                f"this machine (`pipeline config check {args.file} --skip-secrets` checks the file alone):",
                file=sys.stderr,
            )
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
    active = ", ".join(i.name for i in config.active) or "none"
    print(f"{args.file}: OK — {len(config.integrations)} integration(s), active: {active}")
    return 0
