"""Integration settings: a YAML file validated at start, errors that name every bad field.

Structure (schema: ``schemas/integrations.schema.json``; example: ``deploy/integrations.example.yaml``)::

    cloudtalk:            # the CloudTalk account (company) every integration shares
      base_url, key_id, key_secret, rate_limit_per_minute, poller_reserve, poll intervals
    integrations:         # any number, one per team
      - name, custom_name, active, contact_tag,
        kustomer: {base_url, org_name, api_key, webhook_token},
        cloudtalk_webhook_secret,
        calls: {types: {incoming_answered|incoming_missed|voicemail|outgoing_answered|outgoing_unanswered:
                        {export, status}}, create_customers_for_unknown_numbers, connected_numbers,
                empty_means, note_template},
        sms: {enabled, types: {incoming|outgoing: {export, status}}, create_customers_for_unknown_numbers,
              connected_numbers, empty_means, note_template},
        contacts: {import, export, merge_key, skip_customer_if_shared_or_whatsapp,
                   reconcile_interval_seconds, external_url_name}

Secrets are never written in the file: each is ``{env: NAME}`` or ``{file: PATH}`` and is read
when a service needs it. A :class:`Secret` never shows its value in ``repr`` or logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.core.phones import normalize_e164
from pipeline.core.schemas import load_schema
from pipeline.core.templates import template_fields_problems

CALL_TYPES = ("incoming_answered", "incoming_missed", "voicemail", "outgoing_answered", "outgoing_unanswered")
SMS_TYPES = ("incoming", "outgoing")
MERGE_KEYS = ("phone", "email", "phone_and_email", "phone_or_name", "none")

# Defaults where the file is silent (reference 1.2; each an [ASSUMPTION] kept configurable).
DEFAULT_CALL_TYPES = {
    "incoming_answered": ("export", "done"),
    "incoming_missed": ("export", "open"),
    "voicemail": ("export", "open"),
    "outgoing_answered": ("export", "done"),
    "outgoing_unanswered": ("skip", "done"),
}
DEFAULT_SMS_TYPES = {"incoming": ("export", "open"), "outgoing": ("export", "done")}


class ConfigError(ValueError):
    """The integrations file is invalid; ``problems`` lists every bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Secret:
    """A reference to a secret (``env:NAME`` or ``file:PATH``); the value is read on demand."""

    field: str
    env: str | None = None
    file: str | None = None

    @property
    def reference(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"

    def value(self, environ: Mapping[str, str] | None = None) -> str:
        environ = os.environ if environ is None else environ
        if self.env:
            v = environ.get(self.env)
            if not v:
                raise ConfigError("secrets", [f"{self.field}: environment variable {self.env} is not set"])
            return v
        try:
            v = Path(self.file or "").read_text().strip()
        except OSError as exc:
            raise ConfigError("secrets", [f"{self.field}: cannot read secret file {self.file}: {exc.strerror}"]) from None
        if not v:
            raise ConfigError("secrets", [f"{self.field}: secret file {self.file} is empty"])
        return v

    def __repr__(self) -> str:
        return f"Secret({self.field} from {self.reference})"


@dataclass(frozen=True)
class TypeSetting:
    export: bool
    status: str  # "open" | "done"


@dataclass(frozen=True)
class ConversationFlowSettings:
    """Call or SMS workflow settings of one integration."""

    enabled: bool
    types: Mapping[str, TypeSetting]
    create_customers_for_unknown_numbers: bool
    connected_numbers: frozenset[str]
    empty_means_all: bool
    note_template: tuple[str, ...] | None

    def number_connected(self, e164: str) -> bool:
        if not self.connected_numbers:
            return self.empty_means_all
        return e164 in self.connected_numbers


@dataclass(frozen=True)
class ContactSettings:
    import_enabled: bool = True
    export_enabled: bool = True
    merge_key: str = "phone_or_name"
    skip_customer_if_shared_or_whatsapp: bool = False
    reconcile_interval_seconds: int = 900
    external_url_name: str = "Kustomer"


@dataclass(frozen=True)
class KustomerSettings:
    base_url: str
    org_name: str | None
    app_url: str | None
    api_key: Secret
    webhook_token: Secret | None
    rate_limit_reserve: int = 0

    def customer_link(self, customer_id: str) -> str:
        base = self.app_url or (f"https://{self.org_name}.kustomerapp.com" if self.org_name else self.base_url)
        return f"{base.rstrip('/')}/app/customers/{customer_id}"


@dataclass(frozen=True)
class Integration:
    name: str
    custom_name: str
    active: bool
    contact_tag: str | None
    kustomer: KustomerSettings
    cloudtalk_webhook_secret: Secret
    calls: ConversationFlowSettings
    sms: ConversationFlowSettings
    contacts: ContactSettings


@dataclass(frozen=True)
class CloudTalkAccount:
    base_url: str
    key_id: Secret
    key_secret: Secret
    rate_limit_per_minute: int = 60
    poller_reserve: int = 30
    calls_poll_interval_seconds: int = 300
    calls_poll_lag_seconds: int = 120
    contacts_poll_interval_seconds: int = 900


@dataclass(frozen=True)
class PipelineConfig:
    cloudtalk: CloudTalkAccount
    integrations: tuple[Integration, ...]
    source: str = "<memory>"
    _by_name: dict[str, Integration] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({i.name: i for i in self.integrations})

    def get(self, name: str) -> Integration | None:
        return self._by_name.get(name)

    @property
    def active(self) -> tuple[Integration, ...]:
        return tuple(i for i in self.integrations if i.active)

    def secrets(self) -> list[Secret]:
        out = [self.cloudtalk.key_id, self.cloudtalk.key_secret]
        for i in self.integrations:
            out += [i.kustomer.api_key, i.cloudtalk_webhook_secret]
            if i.kustomer.webhook_token is not None:
                out.append(i.kustomer.webhook_token)
        return out

    def check_secrets(self, environ: Mapping[str, str] | None = None) -> list[str]:
        problems = []
        for s in self.secrets():
            try:
                s.value(environ)
            except ConfigError as exc:
                problems.extend(exc.problems)
        return problems


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field(s) {', '.join(extra)} (rule: additionalProperties)"
    if error.validator == "required":
        return f"{error.message} (rule: required)"
    return f"{error.message} (rule: {error.validator})"


_SECRET_FIELDS = frozenset({"api_key", "webhook_token", "key_id", "key_secret", "cloudtalk_webhook_secret",
                            "password", "token", "secret"})


def _secret_literal_problems(data: Any, path: str = "") -> list[str]:
    """A secret written as a plain value (``api_key: abc``) is refused with a clear message."""
    problems: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            if isinstance(v, str) and str(k).lower() in _SECRET_FIELDS:
                problems.append(f"{p}: secrets may not be written in the file; use {{env: NAME}} or {{file: PATH}}")
            else:
                problems.extend(_secret_literal_problems(v, p))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            problems.extend(_secret_literal_problems(v, f"{path}[{i}]"))
    return problems


def parse_config(data: Any, source: str = "<memory>") -> PipelineConfig:
    """Validate a decoded YAML document; raise :class:`ConfigError` listing every problem."""
    problems = _secret_literal_problems(data)
    validator = jsonschema.Draft7Validator(load_schema("integrations"))
    schema_errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    literal_fields = {p.split(":")[0] for p in problems}
    problems += [f"{_path(e)}: {_message(e)}" for e in schema_errors
                 if not (e.validator == "type" and _path(e) in literal_fields)]
    if problems:
        raise ConfigError(source, problems)
    # semantic checks the schema cannot express
    seen: dict[str, int] = {}
    for idx, integ in enumerate(data["integrations"]):
        if integ["name"] in seen:
            problems.append(f"integrations[{idx}].name: '{integ['name']}' is already used by "
                            f"integrations[{seen[integ['name']]}] (rule: unique)")
        seen.setdefault(integ["name"], idx)
        for flow in ("calls", "sms"):
            template = (integ.get(flow) or {}).get("note_template")
            if template:
                problems += _template_problems(f"integrations[{idx}].{flow}.note_template", template, flow)
        for flow in ("calls", "sms"):
            for j, number in enumerate((integ.get(flow) or {}).get("connected_numbers") or []):
                if normalize_e164(number) is None:
                    problems.append(f"integrations[{idx}].{flow}.connected_numbers[{j}]: {number!r} is not a "
                                    "possible phone number (rule: e164)")
    if problems:
        raise ConfigError(source, problems)
    return _build(data, source)


def _template_problems(path: str, lines: list[str], flow: str) -> list[str]:
    return [f"{path}{p}" for p in template_fields_problems(lines, flow)]


def _flow(raw: Mapping[str, Any] | None, defaults: Mapping[str, tuple[str, str]], path: str,
          enabled_default: bool = True) -> ConversationFlowSettings:
    raw = raw or {}
    given = raw.get("types") or {}
    types = {}
    for name, (export, status) in defaults.items():
        t = given.get(name)
        types[name] = TypeSetting(t["export"], t["status"]) if t else TypeSetting(export == "export", status)
    return ConversationFlowSettings(
        enabled=raw.get("enabled", enabled_default),
        types=types,
        create_customers_for_unknown_numbers=raw.get("create_customers_for_unknown_numbers", False),
        connected_numbers=frozenset(raw.get("connected_numbers") or ()),
        empty_means_all=raw.get("empty_means", "all") == "all",
        note_template=tuple(raw["note_template"]) if raw.get("note_template") else None,
    )


def _secret(raw: Mapping[str, str], path: str) -> Secret:
    return Secret(path, env=raw.get("env"), file=raw.get("file"))


def _build(data: Mapping[str, Any], source: str) -> PipelineConfig:
    ct = data["cloudtalk"]
    account = CloudTalkAccount(
        base_url=ct["base_url"].rstrip("/"), key_id=_secret(ct["key_id"], "cloudtalk.key_id"),
        key_secret=_secret(ct["key_secret"], "cloudtalk.key_secret"),
        rate_limit_per_minute=ct.get("rate_limit_per_minute", 60), poller_reserve=ct.get("poller_reserve", 30),
        calls_poll_interval_seconds=ct.get("calls_poll_interval_seconds", 300),
        calls_poll_lag_seconds=ct.get("calls_poll_lag_seconds", 120),
        contacts_poll_interval_seconds=ct.get("contacts_poll_interval_seconds", 900),
    )
    integrations = []
    for idx, raw in enumerate(data["integrations"]):
        p = f"integrations[{idx}]"
        k = raw["kustomer"]
        c = raw.get("contacts") or {}
        integrations.append(Integration(
            name=raw["name"], custom_name=raw.get("custom_name") or raw["name"], active=raw["active"],
            contact_tag=raw.get("contact_tag"),
            kustomer=KustomerSettings(
                base_url=k["base_url"].rstrip("/"), org_name=k.get("org_name"), app_url=k.get("app_url"),
                api_key=_secret(k["api_key"], f"{p}.kustomer.api_key"),
                webhook_token=_secret(k["webhook_token"], f"{p}.kustomer.webhook_token") if k.get("webhook_token") else None,
                rate_limit_reserve=k.get("rate_limit_reserve", 0)),
            cloudtalk_webhook_secret=_secret(raw["cloudtalk_webhook_secret"], f"{p}.cloudtalk_webhook_secret"),
            calls=_flow(raw.get("calls"), DEFAULT_CALL_TYPES, f"{p}.calls"),
            sms=_flow({"create_customers_for_unknown_numbers":
                       (raw.get("calls") or {}).get("create_customers_for_unknown_numbers", False),
                       **(raw.get("sms") or {})}, DEFAULT_SMS_TYPES, f"{p}.sms"),
            contacts=ContactSettings(
                import_enabled=c.get("import", True), export_enabled=c.get("export", True),
                merge_key=c.get("merge_key", "phone_or_name"),
                skip_customer_if_shared_or_whatsapp=c.get("skip_customer_if_shared_or_whatsapp", False),
                reconcile_interval_seconds=c.get("reconcile_interval_seconds", 900),
                external_url_name=c.get("external_url_name", "Kustomer")),
        ))
    return PipelineConfig(cloudtalk=account, integrations=tuple(integrations), source=source)


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read the integrations file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(p), [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), ["(top level): expected a mapping with 'cloudtalk' and 'integrations'"])
    return parse_config(data, str(p))
