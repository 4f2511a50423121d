"""How the kit connects the simulators and the pipeline (the demo and ``python -m devkit up``).

* CloudTalk's workflow automations: one per trigger, each posting to its ingest endpoint with the
  integration's shared secret in ``X-Pipeline-Secret``;
* the Kustomer outbound webhook: registered the way an operator does it, with
  ``pipeline webhooks register --write-secret-file`` (the simulator makes the signing token; the
  command writes it where the integrations file's ``webhook_token`` points);
* :func:`sim`: one request to a simulator (its API or its ``/_sim/`` inspection routes).
"""

from __future__ import annotations

from typing import Any

import orjson

from devkit.stack import Stack

# CloudTalk workflow trigger -> the ingest endpoint it posts to (/ingest/cloudtalk/{integration}/…)
WORKFLOW_ENDPOINTS = {
    "call.ended": "call-ended",
    "call.modified": "call-modified",
    "recording.uploaded": "recording-uploaded",
    "sms.received": "sms",
    "sms.sent": "sms",
    "contact.created": "contact",
    "contact.updated": "contact",
    "contact.deleted": "contact",
}


def cloudtalk_workflows(
    ingest_url: str, integration: str, secret: str, *, contacts: bool = True
) -> list[dict[str, Any]]:
    """The CloudTalk simulator's workflows (``/_sim/seed`` ``workflows``) for one integration."""
    return [
        {
            "trigger": trigger,
            "url": f"{ingest_url}/ingest/cloudtalk/{integration}/{endpoint}",
            "headers": {"X-Pipeline-Secret": secret},
        }
        for trigger, endpoint in WORKFLOW_ENDPOINTS.items()
        if contacts or endpoint != "contact"
    ]


async def register_kustomer_webhook(stack: Stack, ingest_url: str, integration: str) -> str:
    """``pipeline webhooks register`` for ``integration`` (before ingest starts: ingest reads the
    token at start). Returns the line the command printed about it."""
    _out, err = await stack.run_once(
        [
            "webhooks",
            "register",
            "--integration",
            integration,
            "--url",
            f"{ingest_url}/ingest/kustomer/{integration}",
            "--write-secret-file",
        ]
    )
    return err.strip().splitlines()[0] if err.strip() else ""


async def sim(http: Any, method: str, url: str, body: Any = None) -> Any:
    """A request to a simulator (its API or ``/_sim/``): the decoded answer, or an error naming it."""
    data = orjson.dumps(body) if body is not None else None
    async with http.request(method, url, data=data, headers={"Content-Type": "application/json"}) as r:
        text = await r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {url} -> {r.status}: {text[:300]!r}")
        return orjson.loads(text) if text else None
