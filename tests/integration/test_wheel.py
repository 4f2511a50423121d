"""The wheel as a deploy installs it (.ci/wheel-check), with the session's broker for its service step.

Builds the wheel, installs it without extras from requirements.lock into a clean virtualenv and
runs it outside the repository: version, config check, schemas shipped, no devkit, and
``pipeline process calls`` ready on /readyz and exiting 0 on SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.kafka


def test_the_wheel_installs_from_the_lock_and_runs_outside_the_repository(kafka_bootstrap: str):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TOPIC_PREFIX")}
    env.update({"KAFKA_BOOTSTRAP": kafka_bootstrap, "PYTHON": sys.executable})
    result = subprocess.run(
        [str(REPO / ".ci" / "wheel-check")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "exit 0 after SIGTERM" in result.stdout and "wheel-check: OK (" in result.stdout, result.stdout
