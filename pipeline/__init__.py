"""CloudTalk <-> Kustomer event-streaming pipeline (the product package)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

DISTRIBUTION = "ctk-kustomer-pipeline"


def version() -> str:
    """The installed distribution's version."""
    try:
        return _distribution_version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"
