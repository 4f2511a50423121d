"""Masking of phones, e-mails and secrets in logs (pure)."""

from __future__ import annotations

import io

import orjson

from pipeline.core.observability import configure_logging, get_logger, mask_event, mask_phone


def test_phone_numbers_are_masked_under_number_keys_and_in_text():
    out = mask_event(
        None,
        "info",
        {
            "event": "call from +447700900123 reached agent",
            "external_number": 447700900123,
            "customer_phone": "+421905123456",
            "call_id": 1002409191,
            "count": 12,
        },
    )
    assert "7700900" not in out["event"] and out["event"].startswith("call from +44")
    assert out["external_number"] == mask_phone(447700900123) and "77009" not in out["external_number"]
    assert out["customer_phone"].startswith("+42") and out["customer_phone"].endswith("56")
    assert "*" in out["customer_phone"]
    assert out["call_id"] == 1002409191, "ids are not phone numbers"
    assert out["count"] == 12


def test_emails_are_masked_and_secrets_redacted_at_any_depth():
    out = mask_event(
        None,
        "info",
        {
            "event": "customer jana.novakova@example.org updated",
            "api_key": "k-123",
            "headers": {"Authorization": "Bearer abc", "X-Pipeline-Secret": "s"},
            "body": {"emails": [{"email": "peter@example.net"}], "token": "t"},
        },
    )
    assert "novakova" not in out["event"] and "@example.org" in out["event"]
    assert out["api_key"] == "[redacted]"
    assert out["headers"]["Authorization"] == "[redacted]"
    assert out["headers"]["X-Pipeline-Secret"] == "[redacted]"
    assert out["body"]["token"] == "[redacted]"
    assert "peter" not in orjson.dumps(out["body"]).decode()


def test_log_lines_are_json_and_masked():
    stream = io.StringIO()
    configure_logging("test-service", "INFO", stream=stream)
    get_logger("x").info("sms_received", sender=447700900123, api_key="supersecret", event_id="cloudtalk:sms:1")
    line = orjson.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "sms_received" and line["service"] == "test-service"
    assert line["api_key"] == "[redacted]"
    assert "7700900" not in line["sender"]
    assert line["event_id"] == "cloudtalk:sms:1"
    assert "supersecret" not in stream.getvalue()


def test_an_event_orjson_cannot_render_as_is_still_logs_and_never_raises():
    stream = io.StringIO()
    configure_logging("test-service", "INFO", stream=stream)
    get_logger("x").info("ledger_loaded", entries={0: 3, 1: 5})
    line = orjson.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["entries"] == {"0": 3, "1": 5}
