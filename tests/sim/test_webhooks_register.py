"""``pipeline webhooks register|list`` against the Kustomer simulator, as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

from devkit.sim.kustomer import ALL_ROLES, KustomerSimSettings, running_kustomer_sim

REPO = Path(__file__).resolve().parents[2]
URL = "https://pipeline.example.com/ingest/kustomer/support"


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_register_writes_the_token_file_once_and_is_idempotent(tmp_path: Path):
    async with running_kustomer_sim(KustomerSimSettings(), keys={"admin-key": ALL_ROLES}) as (sim, url):
        token_file = tmp_path / "secrets" / "support-token"
        config = tmp_path / "integrations.yaml"
        config.write_text(f"""
cloudtalk: {{base_url: "http://127.0.0.1:9/api", key_id: {{env: K}}, key_secret: {{env: K}}}}
integrations:
  - name: support
    active: true
    kustomer: {{base_url: "{url}", api_key: {{env: K}}, webhook_token: {{file: "{token_file}"}}}}
    cloudtalk_webhook_secret: {{env: K}}
""")
        env = {**os.environ, "K": "admin-key", "PIPELINE_CONFIG": str(config)}
        rc, out, err = await cli(
            "webhooks", "register", "--integration", "support", "--url", URL, "--write-secret-file", env=env
        )
        assert rc == 0, err
        (hook,) = sim.webhooks.values()
        assert hook.url == URL and set(hook.events) == {"kustomer.customer.create", "kustomer.customer.update"}
        token = hook.token
        assert token_file.read_text().strip() == token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token not in out + err, "the token is written to the file, never printed"
        assert "registered for support" in err

        rc, out, err = await cli("webhooks", "register", "--integration", "support", "--url", URL, env=env)
        assert rc == 0 and "already registered" in err
        assert len(sim.webhooks) == 1, "a second run creates no second webhook"
        assert out.strip() == token, "without --write-secret-file the token is printed once, on stdout"

        rc, out, _ = await cli("webhooks", "list", "--integration", "support", env=env)
        assert rc == 0 and URL in out and "kustomer.customer.create" in out

        rc, _, err = await cli("webhooks", "register", "--integration", "nope", "--url", URL, env=env)
        assert rc != 0 and "--integration: 'nope'" in err
        rc, _, err = await cli("webhooks", "register", "--integration", "support", env=env)
        assert rc != 0 and "--url: required" in err
