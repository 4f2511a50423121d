"""The README's demo command, small: every service as a process, both simulators, both parts
(calls and SMS; contacts both ways), the summaries' own checks against the model of the rules."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


async def test_the_demo_runs_and_every_count_matches_its_model(kafka_bootstrap: str, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devkit",
        "demo",
        "--calls",
        "60",
        "--sms",
        "20",
        "--customers",
        "150",
        "--contacts",
        "60",
        "--workdir",
        str(tmp_path),
        env={**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode()
    assert proc.returncode == 0, text[-4000:]
    assert "RESULT: OK" in text and "RESULT (contacts): OK" in text, text[-4000:]
    assert "duplicates found in the Kustomer simulators: 0" in text
    assert "non-zero exits" not in text
