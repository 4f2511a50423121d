"""Ports on this machine for the broker, the simulators and the services the kit starts."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from devkit.errors import DevkitError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """True when a server could listen on 127.0.0.1:``port`` now (nothing else listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def choose_port(
    var: str,
    default: int,
    what: str,
    say: Callable[[str], None],
    given: int | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The port for ``what``: ``given`` (else the one the variable ``var`` names; 0 = any free
    port), else ``default``.

    A default that another process holds is replaced by a free port, and ``say`` tells which; a
    port the person chose that is taken stops the command with one line naming the port and
    the variable (:class:`DevkitError`).
    """
    environ = os.environ if environ is None else environ
    raw = str(given if given is not None else environ.get(var, "")).strip()
    if raw:
        try:
            port = int(raw)
        except ValueError:
            raise DevkitError(f"{var}={raw!r}: expected a port number") from None
        if not 0 <= port <= 65535:
            raise DevkitError(f"{var}={raw!r}: expected a port number (0-65535)")
        if port == 0:
            return free_port()
        if not port_free(port):
            raise DevkitError(f"port {port} ({var}, {what}) is taken by another process; set {var} to a free port")
        return port
    if port_free(default):
        return default
    port = free_port()
    say(f"port {default} ({what}) is taken by another process; using {port} instead (set {var} to choose)")
    return port
