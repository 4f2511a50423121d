"""``pipeline webhooks register|list``: the Kustomer outbound webhook of an integration.

``register --integration NAME --url https://…/ingest/kustomer/NAME`` creates the webhook for
``kustomer.customer.create`` and ``kustomer.customer.update`` (or finds the one already pointing at
that URL) and says where its signing token goes: the secret that the integrations file references
as ``kustomer.webhook_token``. With a file reference and ``--write-secret-file`` the token is
written there (mode 0600); otherwise it is printed once on stdout — never to the logs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import aiohttp

from pipeline.clients.kustomer import KustomerClient
from pipeline.core.config import load_config
from pipeline.core.settings import ServiceSettings, SettingsError

EVENTS = ["kustomer.customer.create", "kustomer.customer.update"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhooks", help="register the Kustomer outbound webhook of an integration")
    p.add_argument("action", choices=["register", "list"])
    p.add_argument("--integration", required=True, help="integration name in the integrations file")
    p.add_argument("--url", help="public URL of this pipeline's endpoint, …/ingest/kustomer/<integration>")
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.add_argument(
        "--write-secret-file",
        action="store_true",
        help="write the token to the file the integration's webhook_token references",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    config = load_config(args.config or settings.config_path)
    integration = config.get(args.integration)
    if integration is None:
        raise SettingsError(f"--integration: {args.integration!r} is not in {config.source}")
    if args.action == "register" and not args.url:
        raise SettingsError("--url: required to register (the pipeline's public …/ingest/kustomer/<name> URL)")
    if args.action == "register" and not args.url.rstrip("/").endswith(f"/ingest/kustomer/{integration.name}"):
        print(f"warning: --url does not end with /ingest/kustomer/{integration.name}", file=sys.stderr)

    async def main() -> int:
        async with aiohttp.ClientSession() as session:
            client = KustomerClient.from_credentials(
                session, integration.kustomer.base_url, integration.kustomer.api_key.value()
            )
            hooks = await client.list_outbound_webhooks()
            if args.action == "list":
                for h in hooks:
                    a = h["attributes"]
                    print(
                        f"{h['id']}  {'enabled ' if a.get('enabled') else 'disabled'}  {a['url']}  "
                        f"{','.join(a['events'])}"
                    )
                return 0
            existing = next((h for h in hooks if h["attributes"]["url"] == args.url), None)
            if existing is not None:
                hook, verb = existing, "already registered"
                missing = set(EVENTS) - set(hook["attributes"]["events"])
                if missing:
                    print(
                        f"warning: the existing webhook lacks {sorted(missing)}; delete it in Kustomer and "
                        "register again",
                        file=sys.stderr,
                    )
            else:
                hook, verb = (
                    await client.create_outbound_webhook(f"CloudTalk sync ({integration.name})", args.url, EVENTS),
                    "registered",
                )
            token = hook["attributes"]["token"]
            ref = integration.kustomer.webhook_token
            print(f"Kustomer webhook {hook['id']} {verb} for {integration.name}: {args.url}", file=sys.stderr)
            if ref is None:
                print(
                    f"integrations: {integration.name}: add kustomer.webhook_token (an {{env: NAME}} or "
                    "{file: PATH} reference) and store the token below there",
                    file=sys.stderr,
                )
            elif ref.file and args.write_secret_file:
                path = Path(ref.file)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(token + "\n")
                print(
                    f"the signing token was written to {path} ({ref.field}); restart ingest to use it", file=sys.stderr
                )
                return 0
            else:
                print(f"store the token below as {ref.field} ({ref.reference}) and restart ingest:", file=sys.stderr)
            print(token)
            return 0

    return asyncio.run(main())
