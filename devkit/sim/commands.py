"""``python -m devkit sim kustomer|cloudtalk``: run a platform simulator until SIGTERM/SIGINT.

Each simulator module exposes ``HELP`` (one line), ``DEFAULT_PORT``,
``add_arguments(parser)`` and ``app_from_args(args) -> aiohttp.web.Application``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys

from devkit.sim.base import SimServer, configure_logging, get_logger

SIMULATORS = {"kustomer": "devkit.sim.kustomer", "cloudtalk": "devkit.sim.cloudtalk"}


HELP = {"kustomer": "Kustomer REST API simulator", "cloudtalk": "CloudTalk REST API simulator"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="run a CloudTalk or Kustomer API simulator")
    platforms = p.add_subparsers(dest="platform", metavar="<platform>", required=True)
    chosen = (
        next((a for a in sys.argv[sys.argv.index("sim") + 1 :] if a in SIMULATORS), None) if "sim" in sys.argv else None
    )
    for name, module_name in SIMULATORS.items():
        if chosen is not None and name != chosen:  # only the chosen simulator is imported
            platforms.add_parser(name, help=HELP[name], add_help=False)
            continue
        module = importlib.import_module(module_name)
        sp = platforms.add_parser(name, help=module.HELP)
        sp.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
        sp.add_argument(
            "--port",
            type=int,
            default=module.DEFAULT_PORT,
            help=f"listen port (default {module.DEFAULT_PORT}; 0 = any free port)",
        )
        sp.add_argument("--log-level", default="INFO")
        module.add_arguments(sp)
        sp.set_defaults(func=lambda args, module=module, name=name: _run(name, module, args))


def _run(name: str, module, args: argparse.Namespace) -> int:
    configure_logging(f"sim-{name}", args.log_level)
    log = get_logger("sim")

    async def main() -> None:
        app = module.app_from_args(args)
        server = SimServer(app, args.host, args.port)
        await server.start()
        log.info("simulator_listening", platform=name, url=server.base_url)
        print(f"{name} simulator listening on {server.base_url}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()
        log.info("simulator_stopped", platform=name)

    asyncio.run(main())
    return 0
