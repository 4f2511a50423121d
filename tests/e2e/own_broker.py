"""Fixtures for a module whose tests stop and start the broker: import ``broker`` and
``kafka_bootstrap`` from here, and ``topics`` and ``flow`` use that module's own broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.localkafka import LocalKafka


@pytest.fixture
def broker(tmp_path: Path):
    """A broker of this test alone, on its own free ports (it will be stopped and started)."""
    b = LocalKafka.ephemeral(tmp_path / "kafka")
    b.up(quiet=True)
    try:
        yield b
    finally:
        b.down(quiet=True)


@pytest.fixture
def kafka_bootstrap(broker: LocalKafka) -> str:
    """Overrides the session broker for this module: ``topics`` and ``flow`` use this one."""
    return broker.bootstrap
