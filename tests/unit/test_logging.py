"""Every log line is JSON, library records too, and no phone, e-mail or secret gets through unmasked
(the rule is in the docstring of pipeline/core/observability.py)."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import structlog

from pipeline.core.observability import (
    capture_uncaught,
    configure_logging,
    get_logger,
    mask_event,
    mask_phone,
    mask_text,
)
from pipeline.core.settings import ServiceSettings
from pipeline.kafka.service import start_logging

# One number in every notation, and a second one; their middle digits must never be printed.
PHONE_INT = 421905123456
PHONE_FORMS = [
    "+421905123456",
    "421905123456",
    "00421 905 123 456",
    "+421 905 123 456",
    "+421-905-123-456",
    "(0905) 123-456",
    "0905/123 456",
    "tel:+421905123456",
    "whatsapp:+421905123456",
    "%2B421905123456",
]
OTHER_PHONE = "+447700900123"
SECRETS = ["k-live-0123456789", "s3cr3t-header", "Zm9vOmJhcg==", "sha256=deadbeef"]
NAMES = ["novakova", "peter.horvath"]
LIBRARY_LOGGERS = ("aiokafka", "aiokafka.consumer.group_coordinator", "aiohttp.server", "asyncio", "tenacity")


def leaks(text: str) -> list[str]:
    """What of the phones, e-mail local parts and secrets above appears in ``text``."""
    squeezed = re.sub(r"[\s()\-./+%]", "", text)
    found = [s for s in ("905123", "9051234", "7700900") if s in squeezed]
    found += [s for s in NAMES + SECRETS if s in text]
    return found


@pytest.fixture
def logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Logging configured into a StringIO; everything it changes is put back afterwards."""
    root = logging.getLogger()
    noisy = {name: logging.getLogger(name).level for name in ("aiokafka", "aiohttp.access", "kafka")}
    saved = (list(root.handlers), root.level, structlog.get_config())
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    stream = io.StringIO()
    configure_logging("test-service", "INFO", stream=stream)

    def lines() -> list[dict[str, Any]]:
        text = stream.getvalue()
        assert not leaks(text), f"unmasked: {leaks(text)}\n{text}"
        return [orjson.loads(line) for line in text.splitlines()]  # every line is JSON

    yield lines
    logging.captureWarnings(False)
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)
    structlog.configure(**saved[2])


def test_an_event_with_phones_emails_secrets_and_an_exception_and_a_library_record_are_all_masked_json(logs):
    log = get_logger("pipeline.test")
    log.info(
        "sms_received",
        sender=PHONE_INT,
        recipient=PHONE_FORMS[0],
        external_number="00421 905 123 456",
        phones=[{"phone": form, "type": "mobile"} for form in PHONE_FORMS],
        numbers={PHONE_INT: 2, OTHER_PHONE: 1},
        key=b"support|+421905123456",
        email="jana.novakova@example.org",
        customer={"emails": [{"email": "peter.horvath@example.net"}], "name": "Jana"},
        text=f"call me on {' or '.join(PHONE_FORMS)}, or write to jana.novakova@example.org",
        api_key=SECRETS[0],
        headers={"X-Pipeline-Secret": SECRETS[1], "Accept": "application/json"},
        request=f"POST /ingest Authorization: Basic {SECRETS[2]} X-Kustomer-Webhook-Signature: {SECRETS[3]}",
        event_id="cloudtalk:sms:1002409191",
        command_id="support|cloudtalk:call:1002409191",
        sms_id=1002409191,
        call_id=1002409191,
        contact_id=12345678,
        offset=123456789,
        partition=3,
        duration_s=0.1234567,
        status=503,
        port=8080,
        count=1234567,
        occurred_at="2026-03-02T10:00:00.123456+00:00",
    )
    try:
        raise ValueError(f"no customer for {PHONE_FORMS[0]} ({PHONE_INT}) / jana.novakova@example.org")
    except ValueError:
        log.exception("sink_failed", command_id="support|cloudtalk:call:1002409191")
    logging.getLogger("aiokafka").warning("Heartbeat to %s failed: %s", "coordinator 1", "+421905123456")

    event, failure, library = logs()
    assert event["event"] == "sms_received" and event["service"] == "test-service"
    assert event["level"] == "info" and event["logger"] == "pipeline.test" and event["timestamp"].endswith("Z")
    assert event["sender"] == mask_phone(PHONE_INT) == "42********56"
    assert event["recipient"] == "+42********56"
    assert event["external_number"] == "0042* *** *** *56"
    assert [p["phone"] for p in event["phones"]][:3] == ["+42********56", "42********56", "0042* *** *** *56"]
    assert all(p["type"] == "mobile" for p in event["phones"])
    assert sorted(event["numbers"]) == ["+44********23", "42********56"]
    assert event["key"] == "support|+42********56"
    assert event["email"] == "j***@example.org"
    assert event["customer"] == {"emails": [{"email": "p***@example.net"}], "name": "Jana"}
    assert "j***@example.org" in event["text"] and event["text"].count("*56") == len(PHONE_FORMS)
    assert event["api_key"] == "[redacted]"
    assert event["headers"] == {"X-Pipeline-Secret": "[redacted]", "Accept": "application/json"}
    assert event["request"] == "POST /ingest Authorization: [redacted] X-Kustomer-Webhook-Signature: [redacted]"
    # ids, offsets, durations, statuses, ports, counts and times are not phones
    assert event["event_id"] == "cloudtalk:sms:1002409191"
    assert event["command_id"] == "support|cloudtalk:call:1002409191"
    assert event["sms_id"] == event["call_id"] == 1002409191 and event["contact_id"] == 12345678
    assert event["offset"] == 123456789 and event["partition"] == 3 and event["duration_s"] == 0.1234567
    assert event["status"] == 503 and event["port"] == 8080 and event["count"] == 1234567
    assert event["occurred_at"] == "2026-03-02T10:00:00.123456+00:00"

    assert failure["level"] == "error" and failure["command_id"] == "support|cloudtalk:call:1002409191"
    assert failure["exception"].startswith("Traceback (most recent call last):")
    assert failure["exception"].endswith("ValueError: no customer for +42********56 (42********56) / j***@example.org")

    assert library == {
        "timestamp": library["timestamp"],
        "level": "warning",
        "service": "test-service",
        "logger": "aiokafka",
        "event": "Heartbeat to coordinator 1 failed: +42********56",
    }


@pytest.mark.parametrize("name", LIBRARY_LOGGERS)
def test_library_records_are_the_same_json_with_exceptions_as_a_masked_field(logs, name):
    try:
        raise ConnectionError("peer +421905123456 (jana.novakova@example.org) reset")
    except ConnectionError:
        logging.getLogger(name).error("request from %s failed", "0905 123 456", exc_info=True)
    (line,) = logs()
    assert line["logger"] == name and line["level"] == "error" and line["service"] == "test-service"
    assert line["event"] == "request from 09** *** *56 failed"
    assert line["exception"].endswith("ConnectionError: peer +42********56 (j***@example.org) reset")
    assert "timestamp" in line


def test_library_chatter_below_warning_and_events_below_the_level_are_not_written(logs):
    logging.getLogger("aiokafka").info("Discovered coordinator 1 for group g")
    logging.getLogger("aiohttp.access").info("GET / 200")
    get_logger("x").debug("detail")
    logging.getLogger("asyncio").info("poll took 1.2 ms")
    assert [line["event"] for line in logs()] == ["poll took 1.2 ms"]


def test_a_library_record_with_extra_fields_and_bad_arguments_is_still_one_json_line(logs, monkeypatch):
    root = logging.getLogger()  # only the handler under test (pytest's own raises on bad arguments)
    monkeypatch.setattr(
        root, "handlers", [h for h in root.handlers if isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)]
    )
    logging.getLogger("aiohttp.access").warning(
        "%s", "GET /x?phone=%2B421905123456", extra={"remote_address": "127.0.0.1", "response_status": 200}
    )
    logging.getLogger("asyncio").error("two %s %s, one given: +421905123456", "x")
    access, broken = logs()
    assert access["event"] == "GET /x?phone=%2B42********56"
    assert access["remote_address"] == "127.0.0.1" and access["response_status"] == 200
    assert broken["logger"] == "asyncio" and broken["service"] == "test-service"
    assert broken["event"] == "two %s %s, one given: +42********56" and "unformattable" in broken["log_error"]


def test_uncaught_exceptions_and_warnings_are_log_lines(logs):
    capture_uncaught()
    try:
        raise RuntimeError("lost +421905123456")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        threading.excepthook(threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, None)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("number 421905123456 deprecated", DeprecationWarning, stacklevel=1)
    main, thread, warning = logs()
    assert main["event"] == "uncaught_exception" and main["level"] == "critical"
    assert main["exception"].endswith("RuntimeError: lost +42********56")
    assert thread["event"] == "uncaught_thread_exception"
    assert warning["logger"] == "py.warnings" and "42********56 deprecated" in warning["event"]


def test_start_logging_writes_json_on_stderr(logs, capsys):
    start_logging("process-calls", ServiceSettings(log_level="INFO"))
    get_logger("pipeline.kafka.loop").info("loop_started", recipient="+421905123456")
    logging.getLogger("aiokafka").error("Unable to connect to node with id 1: %s", "+421905123456")
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["service"], line["logger"]) for line in lines] == [
        ("process-calls", "pipeline.kafka.loop"),
        ("process-calls", "aiokafka"),
    ]
    assert not leaks(orjson.dumps(lines).decode())


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("from +421905123456 to 421905123456", "from +42********56 to 42********56"),
        ("00421 905 123 456", "0042* *** *** *56"),
        ("(0905) 123-456", "(09**) ***-*56"),
        ("+44 (0)20 7946 0958", "+44 (*)** **** **58"),
        ("tel:+421905123456; whatsapp:+421905123456", "tel:+42********56; whatsapp:+42********56"),
        ("phone=%2B421905123456&email=jana%40example.org", "phone=%2B42********56&email=j***@example.org"),
        ("lane support|421905123456.", "lane support|42********56."),
        ("GET /v1/customers/phone=+421905123456 404", "GET /v1/customers/phone=+42********56 404"),
        (
            '{"external_number": 421905123456, "call_id": 1002409191}',
            '{"external_number": 42********56, "call_id": 1002409191}',
        ),
        ("+421905123456@s.whatsapp.net", "+***@s.whatsapp.net"),
        ("call 0905123456", "call 09******56"),  # ids never start with 0
        ("offset +421905123456", "offset +42********56"),  # nor with +
        ("+421905123456 1741000000123", "+42********56 1741000000123"),
        ("+421 905 123 456 1741 000 000", "+42* *** *** *56 17** *** *00"),  # split past 15 digits
        ("processed 1234567 records", "processed *****67 records"),  # errs on the side of privacy
    ],
)
def test_phones_in_free_text_are_masked_in_any_notation(text, masked):
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "cloudtalk:call:1002409191",
        "support|cloudtalk:sms:1002409191",
        "cloudtalk:contact:12345678:2026-03-02T10:00:00.123456+01:00",
        "CloudTalk call 1002409191",
        "CloudTalk SMS 1002409191",
        "Fetch offset 123456789 is out of range for partition TopicPartition(topic='audit', partition=0)",
        "{TopicPartition(topic='x', partition=0): OffsetAndMetadata(offset=1234567, metadata='')}",
        "'call_id': 1002409191, producer_id=123456789, producer_epoch=0, memberId 12345678",
        "at 2026-03-02 10:00:00,123 took 0.1234567 s, 12.3456789 s, 1234567.25 ms",
        "dates 02.03.2026 and 2026/03/02",
        "GET /api/calls/1002409191.json 200 from 127.0.0.1:9092 and 192.168.100.200",
        "member aiokafka-0.14.0-12345678-1234 550e8400-e29b-41d4-a716-446655440000 at 0x7f0012345678",
        "timestamps 1741000000 1741000000123 1741000000123456789",
        'File "pipeline/app/module.py", line 1234, in handle',
        "status 503, port 8080, 42 records, partition 3",
    ],
)
def test_what_is_not_a_phone_is_left_alone(text):
    assert mask_text(text) == text


def test_keys_naming_ids_are_never_phone_masked_and_ints_elsewhere_are_left_alone():
    out = mask_event(
        None,
        "info",
        {
            "call_id": 1002409191,
            "sms_ids": [1002409191, 1002409192],
            "externalId": "1002409191",
            "offsets": {"cloudtalk.calls.raw-0": "12345678"},
            "ledger": {"entries": 12345678},
            "created_at": 1741000000123,
            "elapsed_ms": 12345678,
            "contact": {"id": 12345678, "public_number": 421905123456, "ContactNumber": "0905123456"},
            "external_number": {"value": 421905123456, "id": 7},
        },
    )
    assert out["call_id"] == 1002409191 and out["sms_ids"] == [1002409191, 1002409192]
    assert out["externalId"] == "1002409191" and out["offsets"] == {"cloudtalk.calls.raw-0": "12345678"}
    assert out["ledger"] == {"entries": 12345678} and out["created_at"] == 1741000000123
    assert out["elapsed_ms"] == 12345678
    assert out["contact"] == {"id": 12345678, "public_number": "42********56", "ContactNumber": "09******56"}
    assert out["external_number"] == {"value": "42********56", "id": 7}, "inside a phone value, a phone"


def test_secrets_in_text_are_redacted():
    text = (
        "headers <CIMultiDictProxy('Authorization': 'Bearer abc.def', 'X-Pipeline-Secret': 's3cr3t'), "
        'body {"api_key": "k-123", "webhook_token": "t"} X-Kustomer-Webhook-Signature=sha256=ab12 '
        "?token=xyz&page=2 then bearer abcdefghij"
    )
    assert mask_text(text) == (
        "headers <CIMultiDictProxy('Authorization': '[redacted]', 'X-Pipeline-Secret': '[redacted]'), "
        'body {"api_key": "[redacted]", "webhook_token": "[redacted]"} X-Kustomer-Webhook-Signature=[redacted] '
        "?token=[redacted]&page=2 then bearer [redacted]"
    )


@dataclass
class _Command:
    command_id: str
    phone: str


def test_objects_are_masked_as_the_text_they_print():
    error = RuntimeError("409 phone +421905123456 exists")
    out = mask_event(
        None,
        "info",
        {
            "error": error,
            "command": _Command("support|cloudtalk:call:1", "+421905123456"),
            "pair": ("+421905123456", 3),
            "tags": {"vip"},
        },
    )
    assert out["error"] == "409 phone +42********56 exists"
    assert out["command"] == {"command_id": "support|cloudtalk:call:1", "phone": "+42********56"}
    assert out["pair"] == ["+42********56", 3] and out["tags"] == ["vip"]


def test_mask_phone_keeps_the_ends_of_long_numbers_only():
    assert mask_phone(447700900123) == "44********23"
    assert mask_phone("+447700900123") == "+44********23"
    assert mask_phone("00421905123456") == "0042********56"
    assert mask_phone(1234567) == "*****67"
    assert mask_phone("1234") == "1234"
