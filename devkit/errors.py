"""The development kit's error for problems a person fixes: said in one line, never a traceback."""

from __future__ import annotations


class DevkitError(RuntimeError):
    """``python -m devkit`` prints it as ``python -m devkit <command>: <message>`` and exits 1."""
