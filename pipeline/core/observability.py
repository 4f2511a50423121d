"""Logs, metrics and health endpoints shared by every service.

* :class:`Metrics` is the one metric catalogue of the product (documented in the README).
* :class:`HealthServer` serves ``/metrics``, ``/healthz`` and ``/readyz`` for a service.

Logs
====

Every line a service logs is one JSON object with ``timestamp``, ``level``, ``logger``, ``service``
and ``event`` (:func:`configure_logging`): structlog events and the standard library's records alike
(aiokafka, aiohttp, asyncio, tenacity, ``warnings``) go through one handler whose
``structlog.stdlib.ProcessorFormatter`` runs the same processors; a library record's message is its
``event`` and its ``extra`` fields are fields. An exception is an ``exception`` field holding the
traceback as text, masked like any other text. :func:`capture_uncaught` (services call it through
``start_logging``) sends uncaught exceptions and warnings there too.

Before rendering, every event passes :func:`mask_event`, at any depth (mappings, lists, mapping keys,
dataclasses; bytes are decoded, any other object is masked as the text it would be printed as):

* **Secrets**: the value of a key matching ``secret|token|password|passwd|api_key|authorization|
  signature`` is ``[redacted]``. In text, the value after such a name and ``:`` or ``=``
  (``Authorization: Bearer …``, ``X-Pipeline-Secret: …``, ``X-Kustomer-Webhook-Signature=…``,
  ``'api_key': '…'``) and the credentials after ``Bearer`` / ``Basic`` are ``[redacted]``.
* **Ids**: a key naming an id, a position or a time (``id``, ``*_id``, ``*Id``, ``*_ids``, ``offset``,
  ``partition``, ``epoch``, ``generation``, ``rev``, ``version``, ``seq``, ``timestamp``, ``*_at``,
  ``*_ms``, ``*_s``, ``*_seconds``, ``*_count``) is never phone-masked, nor anything under it whose
  own key names nothing else. E-mails in it are still masked.
* **Phones by key**: under a key naming a number (``phone``, ``number``, ``sender``, ``recipient``,
  ``msisdn``, ``e164``, ``caller``, ``callee``, ``whatsapp``, ``mobile``), and anywhere inside such a
  value, an integer or a digit sequence (digits with spaces ``( ) . - /``) of 7 digits or more is masked.
  Integers under any other key are left alone (counts, ids, offsets, durations).
* **E-mails** in any text, ``%40``-encoded too: ``jana@example.org`` → ``j***@example.org``.
* **Phones in free text** (any other string: messages, library records, tracebacks, mapping keys):
  a *phone-like token* is an optional ``+`` (or ``%2B``), then digit groups: the first of any length
  or in parentheses, each further one of 2 digits or more (optionally after a group in parentheses),
  joined by one of ``- . /`` (spaces around allowed) or by a space after a group of at most 5 digits
  (``+421905123456 200`` is a phone and a status): ``+421905123456``,
  ``421905123456``, ``00421 905 123 456``, ``(0905) 123-456``, ``tel:+44 (0)20 7946 0958``,
  ``whatsapp:+421…``. It stands alone: no letter, digit or one of ``_ . + - / \\ # @ %`` right before
  it, no letter, digit, ``_``, ``@`` or ``.digit`` right after it. It is masked when it has 7 to 15
  digits, except when it is one of these, which are not phones:

  - a number right after an id word, unless it starts with ``0`` or comes with ``+`` (ids never
    do): ``id``, ``*_id``, ``*Id``, ``offset``, ``partition``, ``epoch``, ``generation``, ``seq``,
    ``pid``, ``timestamp``, ``ts``, ``call``, ``sms``, ``contact``, ``event``, ``command``,
    ``record`` (``offset=1234567``, ``'call_id': 1002409191``, ``CloudTalk call 1002409191``);
  - part of an id ``word:word:…`` (``cloudtalk:call:1002409191``, ``cloudtalk:contact:12:…``), of a
    word (hex ids), a UUID, a URL path (``/calls/1002409191``), a decimal (``0.1234567``);
  - an ISO date or time (``2026-03-02T10:00:00.123+01:00``), a date (``02.03.2026``,
    ``2026/03/02``), an IPv4 address, a decimal ``1234567.25``, a Unix time in seconds or
    milliseconds (10 or 13 bare digits starting with 15–19, 2017–2033);
  - shorter (HTTP statuses, ports, partitions, durations, counts below a million) or longer (more
    than 15 digits: nanosecond times, long ids). A token longer than 15 digits made of several
    groups is split at its separators into the longest runs from the left that are phones
    (``+421905123456 1741000000123`` masks the first).

  Masking errs on the side of privacy: a bare count of a million or more in free text is masked.
* A masked phone keeps its punctuation, its last two digits and, when it has 9 digits or more, its
  first two after a ``00`` prefix: ``+447700900123`` → ``+44********23``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import re
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------

REDACTED = "[redacted]"

_SECRET_WORDS = r"secret|token|password|passwd|api[_-]?key|authorization|signature"
_SECRET_KEY = re.compile(rf"({_SECRET_WORDS})", re.I)
_PHONE_KEY = re.compile(r"(phone|number|sender|recipient|msisdn|e164|caller|callee|whatsapp|mobile)", re.I)
_ID_KEY = re.compile(
    r"(?:id|ids|ID|offsets?|partitions?|epoch|generation|rev|version|seq|sequence|timestamp|ts"
    r"|.*_(?:id|ids|ID|offsets?|partitions?|epoch|at|ms|s|seconds|count)|.*[a-z0-9]Ids?)"
)

# secrets in text: the value after a secret-looking name, and credentials after an auth scheme
_SECRET_TEXT = re.compile(
    rf"(?i)(\b[\w-]*(?:{_SECRET_WORDS})['\"]?\s*[:=]\s*['\"]?)"
    r"(?:(?:bearer|basic|token|digest)\s+)?[^\s'\",;&)}\]>]+"
)
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)\s+(?!\[redacted\])[A-Za-z0-9._~+/=-]{6,}")

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*(?:@|%40)([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_DIGITS = re.compile(r"\d")

# a phone-like token of free text (see the module docstring); the prefix is kept apart
_SP = r"[ \u00a0]"
_SEP = rf"(?:{_SP}?[-./]{_SP}?|{_SP})"
_GROUP = rf"(?:\(\d{{1,5}}\){_SP}?)?\d{{2,}}"
_PHONE_TOKEN = (
    r"(?<![\w.+/\\#@%-])(?P<pfx>\+|%2[Bb])?"
    r"(?P<body>(?>(?:\(\d{1,5}\)|\d+)"
    # further groups: after - . / (spaces around allowed); after a space when the group before has
    # at most 5 digits (``+421905123456 200`` is a number and a status) and the next one does not
    # start a decimal, an address or a time (``9092 192.168.0.10``); right after a group in parentheses
    rf"(?:{_SP}?[-./]{_SP}?{_GROUP}|(?<!\d{{6}}){_SP}{_GROUP}(?![.:]\d)|(?<=\))\d{{2,}})*))"
    r"(?![\w@]|\.\d)"
)
_ISO_TIME = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?"
_TEXT = re.compile(rf"(?P<keep>(?<!\d){_ISO_TIME})|{_PHONE_TOKEN}")
# what comes right before a bare number that is an id: an id ``word:word:…``, or an id word
_ID_BEFORE = re.compile(
    r"(?:\b[A-Za-z][\w-]*:[A-Za-z][\w-]*:[\w.:-]*"
    r"|\b(?:(?i:ids?|offsets?|partitions?|epoch|generation|seq|sequence|pid|timestamp|ts|calls?|sms"
    r"|contacts?|events?|commands?|records?)|[A-Za-z]\w*_(?i:ids?)|[a-z]\w*Ids?)\b['\"]?\s*[:=#]?\s*['\"]?)\Z"
)
_GROUP_SPLIT = re.compile(rf"({_SEP})")
_DECIMAL_OR_IP = re.compile(r"\d+(?:\.\d+)+")
_DATE = re.compile(r"\d{4}([-./])\d{2}\1\d{2}|\d{1,2}([-./])\d{2}\2\d{4}")
# under a phone key: any digit sequence
_DIGIT_SEQUENCE = re.compile(r"\d(?:[\d \u00a0().\-/]*\d)?")


def mask_phone(value: str | int) -> str:
    """Mask a phone number but its punctuation, its last two digits and, when it has 9 digits or
    more, its first two after a ``00`` prefix: ``+447700900123`` → ``+44********23``."""
    text = str(value)
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    if len(digits) < 5:
        return text
    skip = 2 if text[digits[0]] == text[digits[1]] == "0" else 0
    head = skip + 2 if len(digits) - skip >= 9 else skip
    keep = set(digits[:head] + digits[-2:])
    return "".join(ch if (not ch.isdigit() or i in keep) else "*" for i, ch in enumerate(text))


def mask_email(value: str) -> str:
    """``jana.novakova@example.org`` → ``j***@example.org`` (also ``%40``-encoded), in any text."""
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", value)


def _has_secret_word(value: str) -> bool:
    low = value.lower()
    return (
        "secret" in low
        or "token" in low
        or "passw" in low
        or "key" in low
        or "authoriz" in low
        or "signature" in low
        or "bearer" in low
        or "basic" in low
    )


def redact_secrets(value: str) -> str:
    """``Authorization: Bearer x`` → ``Authorization: [redacted]``; ``token=x`` → ``token=[redacted]``."""
    if not _has_secret_word(value):
        return value
    value = _SECRET_TEXT.sub(lambda m: m.group(1) + REDACTED, value)
    return _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", value)


def _is_phone(span: str, explicit: bool) -> bool:
    """Does a phone-like token (without its ``+``) have the digits of a phone and not the shape of
    a number that is something else (see the module docstring)?"""
    n = len(_DIGITS.findall(span))
    if not 7 <= n <= 15:
        return False
    if explicit:
        return True
    if span.isdigit():  # Unix time in seconds or milliseconds, 2017-2033
        return not (len(span) in (10, 13) and span[0] == "1" and span[1] in "56789")
    if _DATE.fullmatch(span):
        return False
    if _DECIMAL_OR_IP.fullmatch(span):
        groups = span.split(".")
        return not (len(groups) == 2 or (len(groups) == 4 and all(len(g) <= 3 for g in groups)))
    return True


def _mask_token(prefix: str, body: str) -> str:
    if _is_phone(body, bool(prefix)):
        return prefix + mask_phone(body)
    if len(_DIGITS.findall(body)) <= 15:
        return prefix + body
    # several groups past 15 digits: mask the longest runs of groups, from the left, that are phones
    parts = _GROUP_SPLIT.split(body)  # group, separator, group, …
    out, i, last = [prefix], 0, len(parts) // 2
    while i <= last:
        for j in range(last, i - 1, -1):
            span = "".join(parts[2 * i : 2 * j + 1])
            if _is_phone(span, bool(prefix) and i == 0):
                out.append(mask_phone(span))
                break
        else:
            j = i
            out.append(parts[2 * i])
        if j < last:
            out.append(parts[2 * j + 1])
        i = j + 1
    return "".join(out)


def _text_match(m: re.Match[str]) -> str:
    if m.group("keep") is not None:
        return m.group(0)
    prefix, body = m.group("pfx") or "", m.group("body")
    if len(body) < 7:  # too few digits, whatever else it is
        return m.group(0)
    if not prefix and body[0] != "0" and body.isdigit():
        start = m.start()
        if _ID_BEFORE.search(m.string, max(0, start - 64), start):
            return body  # an id, an offset, …
    return _mask_token(prefix, body)


def mask_text(value: str) -> str:
    """Redact secrets, mask e-mails and phone numbers inside free text (the rule: module docstring)."""
    value = redact_secrets(value)
    if "@" in value or "%40" in value:
        value = mask_email(value)
    if _DIGITS.search(value):
        value = _TEXT.sub(_text_match, value)
    return value


def _mask_phone_text(value: str) -> str:
    """A string under a phone key: every digit sequence of 7+ digits is a phone."""
    value = redact_secrets(value)
    if "@" in value or "%40" in value:
        value = mask_email(value)
    return _DIGIT_SEQUENCE.sub(
        lambda m: mask_phone(m.group(0)) if len(_DIGITS.findall(m.group(0))) >= 7 else m.group(0), value
    )


_PLAIN, _SECRET, _ID, _PHONE = range(4)
# fields the logging setup itself adds (module names, levels, times): nothing to mask
_OWN_FIELDS = frozenset({"timestamp", "level", "logger", "service"})


@functools.lru_cache(maxsize=4096)
def _key_kind(key: str) -> int:
    if _SECRET_KEY.search(key):
        return _SECRET
    if _ID_KEY.fullmatch(key):
        return _ID
    if _PHONE_KEY.search(key):
        return _PHONE
    return _PLAIN


def _mask_key(key: Any, kind: int) -> Any:
    """A mapping key under a value of ``kind`` (phone numbers as keys: counts per number, lanes)."""
    if isinstance(key, str):
        if kind == _ID or (key.isidentifier() and kind != _PHONE):  # a name: nothing to mask in it
            return key
        return _mask_phone_text(key) if kind == _PHONE else mask_text(key)
    if kind == _PHONE and isinstance(key, int) and not isinstance(key, bool) and abs(key) >= 1_000_000:
        return mask_phone(key)
    return key


def _mask_mapping(value: Mapping[Any, Any], kind: int) -> dict[Any, Any]:
    out = {}
    for k, v in value.items():
        own = _key_kind(str(k))
        # a plain key inside a phone or id value is read as its parent is
        out[_mask_key(k, kind)] = _mask_value(own if own != _PLAIN else kind, v)
    return out


def _mask_value(kind: int, value: Any) -> Any:
    if kind == _SECRET:
        return REDACTED
    if isinstance(value, str):
        if kind == _PHONE:
            return _mask_phone_text(value)
        if kind == _ID:
            return mask_email(value) if "@" in value or "%40" in value else value
        return mask_text(value)
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return mask_phone(value) if kind == _PHONE and abs(value) >= 1_000_000 else value
    if isinstance(value, Mapping):
        return _mask_mapping(value, kind)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_mask_value(kind, v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _mask_value(kind, bytes(value).decode("utf-8", "replace"))
    if isinstance(value, (datetime.date, datetime.time, uuid.UUID)):
        return value  # rendered by orjson in ISO form
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _mask_mapping({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, kind)
    try:  # exceptions, URLs, records, …: the text the renderer would print, masked
        text = str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
    return _mask_value(kind, text)


def mask_event(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact secrets, mask phones and e-mails everywhere (module docstring)."""
    return {
        _mask_key(k, _PLAIN): v if k in _OWN_FIELDS else _mask_value(_key_kind(str(k)), v)
        for k, v in event_dict.items()
    }


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    """Render a log event; logging never raises into the code that logs."""
    try:
        return orjson.dumps(obj, default=default or str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        return orjson.dumps(
            {
                "event": str(obj.get("event", "?")) if isinstance(obj, dict) else "?",
                "log_error": f"unrenderable event: {exc}",
            }
        ).decode()


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------

# attributes every LogRecord has; anything else on a library's record came with ``extra=``
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _add_service(service: str) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    def add_service(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    return add_service


def _add_record_extras(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A library record's ``extra=`` fields (aiohttp's access log has some) become fields."""
    record = event_dict.get("_record")
    if record is not None:
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                event_dict.setdefault(key, value)
    return event_dict


_FIRST_FIELDS = ("timestamp", "level", "service", "logger", "event")


def _fields_in_order(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """timestamp, level, service, logger and event first, then the rest as logged."""
    ordered = {k: event_dict[k] for k in _FIRST_FIELDS if k in event_dict}
    ordered.update(event_dict)
    return ordered


class _JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """A record that cannot be formatted (a library's bad ``%`` arguments) is still one JSON line."""

    def __init__(self, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception as exc:
            event = {
                "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%S.%fZ"
                ),
                "level": record.levelname.lower(),
                "service": self.service,
                "logger": record.name,
                "event": str(record.msg),
                "log_error": f"unformattable record: {type(exc).__name__}: {exc}",
            }
            return _orjson_dumps(mask_event(None, "error", event))


_HANDLER_MARK = "_pipeline_json_handler"


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stderr (or ``stream``), one per event, masked: structlog's events and the
    standard library's records (aiokafka, aiohttp, asyncio, …) alike.

    Calling it again replaces the previous configuration (the handler it installed on the root
    logger); other handlers of the root logger are left alone.
    """
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        threshold = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_service(service),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        _JsonFormatter(
            service,
            foreign_pre_chain=[*shared, _add_record_extras],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                mask_event,
                _fields_in_order,
                structlog.processors.JSONRenderer(serializer=_orjson_dumps),
            ],
        )
    )
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(threshold)
    # Library chatter (aiokafka, aiohttp access logs) stays at WARNING unless DEBUG is asked for.
    for noisy in ("aiokafka", "aiohttp.access", "kafka"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if threshold <= logging.DEBUG else logging.WARNING)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,  # while the exception is current
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _safe_repr(obj: Any) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<{type(obj).__name__}>"


def capture_uncaught() -> None:
    """Uncaught exceptions (of the main thread and of threads), exceptions Python can only report
    ("Exception ignored in …") and warnings become log lines too, instead of plain text on stderr."""
    log = structlog.get_logger("uncaught")

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        thread = args.thread.name if args.thread is not None else None
        log.critical(
            "uncaught_thread_exception", thread=thread, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
        )

    def unraisablehook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        log.error(
            "unraisable_exception",
            message=unraisable.err_msg or "Exception ignored in",
            object=_safe_repr(unraisable.object),
            exc_info=(type(exc), exc, unraisable.exc_traceback) if exc is not None else False,
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    logging.captureWarnings(True)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()


# --------------------------------------------------------------------------------------------
# Metric catalogue
# --------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """Every metric the product exports. One instance per process (see :func:`metrics`).

    Hot paths pre-bind label children (``.labels(...)`` once, then ``.inc()``). Label values are
    names (stages, targets, integrations, rules), never a secret or an API key id.

    The registry also carries the process's own metrics (``process_*``: CPU seconds, resident and
    virtual memory, open and maximum file descriptors, start time — read from ``/proc`` on Linux)
    and ``python_info``, so every service serves them on ``/metrics`` next to its own.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        for collector in (ProcessCollector, PlatformCollector):
            try:
                collector(registry=r)
            except ValueError:  # a registry that has them already (prometheus_client's default one)
                pass
        # ingest
        self.events_in = Counter(
            "pipeline_events_in_total",
            "Raw events accepted and stored in Kafka",
            ["source", "type", "path"],
            registry=r,
        )
        self.ingest_requests = Counter(
            "pipeline_ingest_requests_total",
            "Webhook requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ingest_ack_seconds = Histogram(
            "pipeline_ingest_ack_seconds",
            "Webhook receipt to broker acknowledgement",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.poller_pages = Counter("pipeline_poller_pages_total", "Pages fetched by pollers", ["poller"], registry=r)
        # processors
        self.events_filtered = Counter(
            "pipeline_events_filtered_total",
            "Events an integration dropped, by rule",
            ["integration", "rule"],
            registry=r,
        )
        self.commands_out = Counter(
            "pipeline_commands_emitted_total", "Commands emitted by processors", ["target", "op"], registry=r
        )
        self.import_commands = Counter(
            "pipeline_import_commands_total",
            "Bulk commands (initial import, reconciliation; priority bulk) by integration: emitted by the"
            " processor; done, skipped, dead_lettered or parked (each time, e.g. at the live reserve) by the sink",
            ["integration", "outcome"],
            registry=r,
        )
        # sinks
        self.commands = Counter(
            "pipeline_commands_total", "Commands finished by sinks, by outcome", ["target", "op", "outcome"], registry=r
        )
        self.bulk_commands = Counter(
            "pipeline_bulk_commands_total",
            "Writes a sink sent in bulk requests, by how each settled: done, rejected (dead letter), retry"
            " (parked, failed on its own), deferred (the request waited: parked), unknown (the answer was lost:"
            " looked up first)",
            ["target", "result"],
            registry=r,
        )
        self.kustomer_customers = Counter(
            "pipeline_kustomer_customers_total",
            "How the Kustomer sink found a number's customer: remembered, looked_up, refused (a remembered one gone)",
            ["result"],
            registry=r,
        )
        self.cloudtalk_index_decisions = Counter(
            "pipeline_cloudtalk_index_decisions_total",
            "How the CloudTalk sink's contacts index answered a lookup: hit, miss (create without asking),"
            " asked (CloudTalk searched), refreshed (the listing's tail or all of it read first), completed (a"
            " contact known only from the listing shown in full, for bulk work)",
            ["result"],
            registry=r,
        )
        self.cloudtalk_index_contacts = Gauge(
            "pipeline_cloudtalk_index_contacts",
            "CloudTalk contacts in the sink's contacts index: complete, or incomplete (first number and e-mail only)",
            ["state"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "pipeline_http_request_seconds",
            "Target API request latency",
            ["target", "op", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_retries = Counter(
            "pipeline_http_retries_total", "Target API retries by reason", ["target", "reason"], registry=r
        )
        self.ratelimit_remaining = Gauge(
            "pipeline_ratelimit_remaining",
            "Requests left in the target's current window",
            ["target", "account"],
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "pipeline_end_to_end_seconds",
            "occurred_at of the event to effect done",
            ["flow"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.ledger_entries = Gauge(
            "pipeline_ledger_entries", "Ledger entries held for assigned partitions", ["topic"], registry=r
        )
        # every stage
        self.deadletters = Counter(
            "pipeline_deadletters_total", "Records sent to the dead-letter topic", ["stage", "reason"], registry=r
        )
        self.loop_records = Counter(
            "pipeline_loop_records_total", "Records through the transactional loop", ["stage", "outcome"], registry=r
        )
        self.loop_transactions = Counter(
            "pipeline_loop_transactions_total", "Kafka transactions by outcome", ["stage", "outcome"], registry=r
        )
        self.loop_batch_seconds = Histogram(
            "pipeline_loop_batch_seconds", "Batch handle + commit time", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.consumer_lag = Gauge(
            "pipeline_consumer_lag",
            "Records of an owned partition not yet processed: last stable offset minus the consumer's position",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "pipeline_assigned_partitions", "Partitions assigned to this member", ["group"], registry=r
        )
        # the integrations file (every service)
        self.config_info = Gauge(
            "pipeline_config_info", "The integrations file in use: 1 for its version", ["version"], registry=r
        )
        self.config_loaded = Gauge(
            "pipeline_config_loaded_timestamp_seconds", "When the integrations file in use was loaded", registry=r
        )
        self.config_reloads = Counter(
            "pipeline_config_reloads_total",
            "Changed integrations files (or secrets) seen: applied, or refused (the old one stays)",
            ["result"],
            registry=r,
        )


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


# --------------------------------------------------------------------------------------------
# Health server
# --------------------------------------------------------------------------------------------

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def add_health_routes(
    app: web.Application, ready: ReadyCheck | None = None, registry: CollectorRegistry | None = None
) -> None:
    """Mount /metrics, /healthz and /readyz on an existing aiohttp app."""

    async def metrics_view(_request: web.Request) -> web.Response:
        body = generate_latest(registry or metrics().registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        ok, detail = (True, {}) if ready is None else await ready()
        return web.Response(
            status=200 if ok else 503,
            content_type="application/json",
            body=orjson.dumps({"ready": ok, **detail}, default=str),
        )

    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


class HealthServer:
    """A small aiohttp server with only the health routes (for services that serve no API)."""

    def __init__(self, host: str, port: int, ready: ReadyCheck | None = None) -> None:
        self.host, self.port = host, port
        self.app = web.Application()
        add_health_routes(self.app, ready)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # report the port actually bound
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
