"""An integration without a readable Kustomer webhook token still starts ingest: its Kustomer
endpoint answers 401 and one start-up line says why (the token exists only after
``pipeline webhooks register``)."""

from __future__ import annotations

import io

import orjson

from pipeline.core.config import load_config
from pipeline.core.observability import configure_logging
from pipeline.ingest.app import kustomer_tokens
from tests.conftest import REPO


def test_a_missing_webhook_token_leaves_that_integration_out_with_one_line(monkeypatch):
    config = load_config(REPO / "deploy" / "integrations.example.yaml")
    names = [i.name for i in config.integrations]
    monkeypatch.setenv("KUSTOMER_SUPPORT_WEBHOOK_TOKEN", "signing-token-of-support")
    for name in names:
        if name != "support":
            monkeypatch.delenv(f"KUSTOMER_{name.upper()}_WEBHOOK_TOKEN", raising=False)
    stream = io.StringIO()
    configure_logging("ingest", "INFO", stream=stream)

    tokens = kustomer_tokens(config)

    assert tokens == {"support": "signing-token-of-support"}
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    missing = [line for line in lines if line["event"] == "kustomer_webhook_token_missing"]
    assert {line["integration"] for line in missing} == set(names) - {"support"}
    assert all("401" in line["answer"] for line in missing)
    assert "signing-token-of-support" not in stream.getvalue()
