"""Integration settings: a YAML file validated at start, errors that name every bad field.

The pydantic models below are the one source of truth for the integrations file: its fields,
types, rules and defaults are declared once, here. ``schemas/integrations.schema.json`` is
generated from them (``python -m pipeline.core.config > schemas/integrations.schema.json``;
a unit test fails when it is out of date); ``deploy/integrations.example.yaml`` is an example.
Structure::

    cloudtalk:            # the CloudTalk account (company) every integration shares
      base_url, key_id, key_secret, rate_limit_per_minute, poller_reserve, poll intervals
    integrations:         # any number, one per team
      - name, custom_name, active, contact_tag,
        kustomer: {base_url, org_name, app_url, api_key, webhook_token, rate_limit_reserve},
        cloudtalk_webhook_secret,
        calls: {types: {incoming_answered|incoming_missed|voicemail|outgoing_answered|outgoing_unanswered:
                        {export, status}}, create_customers_for_unknown_numbers, connected_numbers,
                empty_means, note_template, details_updates, conversation_intelligence},
        sms: {enabled, types: {incoming|outgoing: {export, status}}, create_customers_for_unknown_numbers,
              connected_numbers, empty_means, note_template},
        contacts: {import, export, merge_key, skip_customer_if_shared_or_whatsapp,
                   reconcile_interval_seconds, external_url_name}

Every problem of a file is reported at once: :func:`parse_config` raises one :class:`ConfigError`
listing the structural errors and the checks the models run on whatever parts did parse
(connected numbers are possible phone numbers, note templates use known placeholders, names are
unique), each as ``path: message (rule: name)``.

Secrets are never written in the file: each is ``{env: NAME}`` or ``{file: PATH}`` and is read
when a service needs it. A :class:`Secret` never shows its value in ``repr`` or logs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue

from pipeline.core.phones import normalize_e164
from pipeline.core.templates import template_fields_problems

SCHEMA_COMMAND = "python -m pipeline.core.config > schemas/integrations.schema.json"

Status = Literal["open", "done"]
EmptyMeans = Literal["all", "none"]
MergeKey = Literal["phone", "email", "phone_and_email", "phone_or_name", "none"]
MERGE_KEYS: tuple[str, ...] = get_args(MergeKey)


class ConfigError(ValueError):
    """The integrations file is invalid; ``problems`` lists every bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------------
# Field types and the checks the models run
# --------------------------------------------------------------------------------------------


class _Problem(ValueError):
    """A rule the models check beyond structure; the message is complete: ``... (rule: name)``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def at(self, loc: tuple[int | str, ...], value: Any) -> Any:
        """As one error of a :class:`ValidationError` (``loc`` relative to the value validated)."""
        return {"type": "value_error", "loc": loc, "input": value, "ctx": {"error": self}}


def _possible_phone_number(value: Any) -> Any:
    if isinstance(value, str) and normalize_e164(value) is None:
        raise _Problem(f"{value!r} is not a possible phone number (rule: e164)")
    return value


def _unique_items(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    duplicated = isinstance(value, list) and _has_duplicates(value)
    extra = [_Problem(f"{value!r} has non-unique elements (rule: uniqueItems)").at((), value)] if duplicated else []
    return _validate_with(handler, value, extra)


def _has_duplicates(items: list[Any]) -> bool:
    seen: list[Any] = []
    for item in items:
        if item in seen:
            return True
        seen.append(item)
    return False


def _strip_slash(url: str) -> str:
    return url.rstrip("/")


class _NotNull:
    """``Annotated[T | None, _NotNull()] = None``: the field may be left out, not written as ``null``."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        schema = handler(source)
        return schema["schema"] if schema["type"] == "nullable" else schema


HttpUrl = Annotated[StrictStr, Field(pattern=r"^https?://"), AfterValidator(_strip_slash)]
PhoneNumber = Annotated[StrictStr, Field(pattern=r"^\+[1-9][0-9]{6,14}$"), BeforeValidator(_possible_phone_number)]
ConnectedNumbers = Annotated[
    frozenset[PhoneNumber],
    WrapValidator(_unique_items),
    Field(description="CloudTalk numbers whose calls/SMS are logged; [] = all (see empty_means)"),
]
CustomName = Annotated[StrictStr, Field(max_length=200, description="defaults to name")]
NoteTemplate = Annotated[tuple[Annotated[StrictStr, Field(max_length=500)], ...], Field(min_length=1, max_length=60)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


# --------------------------------------------------------------------------------------------
# The models (the file's structure; every default of the file is declared here, once)
# --------------------------------------------------------------------------------------------


class Secret(_Model):
    """Where a secret comes from: an environment variable or a file; never the value itself."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    env: Annotated[Annotated[StrictStr, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None, _NotNull()] = None
    file: Annotated[Annotated[StrictStr, Field(min_length=1)] | None, _NotNull()] = None
    _field: str = PrivateAttr("")  # where the reference is in the file, e.g. integrations[0].kustomer.api_key

    @model_validator(mode="before")
    @classmethod
    def _no_literal(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise _Problem(_SECRET_LITERAL)
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> Secret:
        if self.env is None and self.file is None:
            raise _Problem("give {env: NAME} or {file: PATH} (rule: minProperties)")
        if self.env is not None and self.file is not None:
            raise _Problem("give either env or file, not both (rule: maxProperties)")
        return self

    @property
    def field(self) -> str:
        return self._field

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
            raise ConfigError(
                "secrets", [f"{self.field}: cannot read secret file {self.file}: {exc.strerror}"]
            ) from None
        if not v:
            raise ConfigError("secrets", [f"{self.field}: secret file {self.file} is empty"])
        return v

    def __repr__(self) -> str:
        return f"Secret({self.field} from {self.reference})"

    __str__ = __repr__


class TypeSetting(_Model):
    """Whether events of this type are logged in Kustomer, and the status of their conversation."""

    export: StrictBool
    status: Status


class _TypeSettings(_Model, Mapping[str, TypeSetting]):
    """The settings per event type; read like a mapping: ``types["voicemail"].status``."""

    # a model's __dict__ holds its fields, in order, and nothing else

    def __getitem__(self, key: str) -> TypeSetting:
        value: TypeSetting = self.__dict__[key]
        return value

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # the keys, as a mapping's
        return iter(self.__dict__)

    def __len__(self) -> int:
        return len(self.__dict__)


# Defaults where the file is silent (reference 1.2; each an [ASSUMPTION] kept configurable).
class CallTypes(_TypeSettings):
    """Per call type: logged or not, and the status of its conversation."""

    incoming_answered: TypeSetting = TypeSetting(export=True, status="done")
    incoming_missed: TypeSetting = TypeSetting(export=True, status="open")
    voicemail: TypeSetting = TypeSetting(export=True, status="open")
    outgoing_answered: TypeSetting = TypeSetting(export=True, status="done")
    outgoing_unanswered: TypeSetting = TypeSetting(export=False, status="done")


class SmsTypes(_TypeSettings):
    """Per SMS direction: logged or not, and the status of its conversation."""

    incoming: TypeSetting = TypeSetting(export=True, status="open")
    outgoing: TypeSetting = TypeSetting(export=True, status="done")


CALL_TYPES: tuple[str, ...] = tuple(CallTypes.model_fields)
SMS_TYPES: tuple[str, ...] = tuple(SmsTypes.model_fields)


class ConversationFlowSettings(_Model):
    """Call or SMS workflow settings of one integration."""

    FLOW: ClassVar[str]
    if TYPE_CHECKING:  # declared by each flow: ``types`` its event types, ``enabled`` a switch of SMS only

        @property
        def enabled(self) -> bool: ...

        @property
        def types(self) -> Mapping[str, TypeSetting]: ...

    create_customers_for_unknown_numbers: StrictBool = Field(
        default=False,
        description="create a Kustomer customer for a number no customer has (sms: as calls when left out)",
    )
    connected_numbers: ConnectedNumbers = frozenset()
    empty_means: EmptyMeans = "all"
    note_template: Annotated[NoteTemplate | None, _NotNull()] = None

    @field_validator("note_template")
    @classmethod
    def _known_placeholders(cls, lines: tuple[str, ...] | None) -> tuple[str, ...] | None:
        problems = []
        for p in template_fields_problems(lines or (), cls.FLOW):
            m = re.fullmatch(r"\[(\d+)\]: (.*)", p, re.S)
            loc, message = ((int(m[1]),), m[2]) if m else ((), p)
            problems.append(_Problem(message).at(loc, lines[loc[0]] if lines and loc else lines))
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return lines

    @property
    def empty_means_all(self) -> bool:
        return self.empty_means == "all"

    def number_connected(self, e164: str) -> bool:
        if not self.connected_numbers:
            return self.empty_means_all
        return e164 in self.connected_numbers


class CallSettings(ConversationFlowSettings):
    """Which calls are logged in Kustomer, and how."""

    FLOW: ClassVar[str] = "calls"
    types: CallTypes = CallTypes()
    details_updates: StrictBool = Field(
        default=True,
        description="details that change after a call was logged (tags, notes, rating, recording, "
        "conversation intelligence) add one 'details updated' note to its conversation",
    )
    conversation_intelligence: StrictBool = Field(
        default=False,
        description="add CloudTalk's summary, smart notes and transcription link of answered calls "
        "(fetched by the calls poller) as a 'details updated' note",
    )

    @property
    def enabled(self) -> bool:
        return True


class SmsSettings(ConversationFlowSettings):
    """Which SMS are logged in Kustomer, and how."""

    FLOW: ClassVar[str] = "sms"
    enabled: StrictBool = True
    types: SmsTypes = SmsTypes()


class ContactSettings(_Model):
    """Contact synchronisation between the Kustomer organisation and CloudTalk."""

    import_enabled: StrictBool = Field(
        default=True, alias="import", description="Kustomer customers -> CloudTalk contacts"
    )
    export_enabled: StrictBool = Field(
        default=True, alias="export", description="CloudTalk contacts -> Kustomer customers"
    )
    merge_key: MergeKey = "phone_or_name"
    skip_customer_if_shared_or_whatsapp: StrictBool = False
    reconcile_interval_seconds: Annotated[StrictInt, Field(ge=60)] = 900
    external_url_name: Annotated[StrictStr, Field(max_length=30)] = "Kustomer"


class KustomerSettings(_Model):
    """The Kustomer organisation of an integration."""

    base_url: Annotated[HttpUrl, Field(description="API base, e.g. https://acme.api.kustomerapp.com")]
    org_name: Annotated[
        Annotated[StrictStr, Field(pattern=r"^[a-z0-9-]+$")] | None,
        _NotNull(),
        Field(description="for customer links https://{org_name}.kustomerapp.com"),
    ] = None
    app_url: Annotated[
        Annotated[StrictStr, Field(pattern=r"^https?://")] | None,
        _NotNull(),
        Field(description="agent desktop base URL when it is not https://{org_name}.kustomerapp.com"),
    ] = None
    api_key: Secret
    webhook_token: Annotated[Secret | None, _NotNull()] = None
    rate_limit_reserve: Annotated[StrictInt, Field(ge=0)] = 0

    def customer_link(self, customer_id: str) -> str:
        base = self.app_url or (f"https://{self.org_name}.kustomerapp.com" if self.org_name else self.base_url)
        return f"{base.rstrip('/')}/app/customers/{customer_id}"


class Integration(_Model):
    """One Kustomer integration (one team)."""

    name: Annotated[
        StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="stable id used in URLs, keys and topics")
    ]
    custom_name: CustomName = None  # type: ignore[assignment]  # left out: the name (see _derived_defaults)
    active: StrictBool
    contact_tag: Annotated[StrictStr, Field(max_length=100)] | None = None
    kustomer: KustomerSettings
    cloudtalk_webhook_secret: Secret
    calls: CallSettings = CallSettings()
    sms: SmsSettings = SmsSettings()
    contacts: ContactSettings = ContactSettings()

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """``custom_name`` defaults to ``name``; SMS create customers as calls do unless told."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "custom_name" not in data and isinstance(data.get("name"), str):
            data["custom_name"] = data["name"]
        calls, sms = data.get("calls"), data.get("sms", {})
        inherited = calls.get("create_customers_for_unknown_numbers") if isinstance(calls, dict) else None
        if isinstance(inherited, bool) and isinstance(sms, dict) and "create_customers_for_unknown_numbers" not in sms:
            data["sms"] = {**sms, "create_customers_for_unknown_numbers": inherited}
        return data


class CloudTalkAccount(_Model):
    """The CloudTalk account (company) every integration shares."""

    base_url: HttpUrl
    key_id: Secret
    key_secret: Secret
    rate_limit_per_minute: Annotated[StrictInt, Field(ge=1)] = 60
    poller_reserve: Annotated[
        StrictInt, Field(ge=0, description="requests a poller leaves in each window for the CloudTalk sink")
    ] = 30
    calls_poll_interval_seconds: Annotated[StrictInt, Field(ge=5)] = 300
    calls_poll_lag_seconds: Annotated[StrictInt, Field(ge=0)] = 120
    contacts_poll_interval_seconds: Annotated[StrictInt, Field(ge=60)] = 900


def _unique_names(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    extra: list[Any] = []
    first: dict[str, int] = {}
    for idx, item in enumerate(value if isinstance(value, list | tuple) else ()):
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
        if not isinstance(name, str):
            continue
        if name in first:
            extra.append(
                _Problem(f"{name!r} is already used by integrations[{first[name]}] (rule: unique)").at(
                    (idx, "name"), name
                )
            )
        first.setdefault(name, idx)
    return _validate_with(handler, value, extra)


class PipelineConfig(_Model):
    """The integrations file: the CloudTalk account and one entry per Kustomer integration."""

    model_config = ConfigDict(
        title="Integrations file (YAML): the CloudTalk account and one entry per Kustomer integration"
    )

    cloudtalk: CloudTalkAccount
    integrations: Annotated[tuple[Integration, ...], Field(min_length=1), WrapValidator(_unique_names)]
    _source: str = PrivateAttr("<memory>")
    _by_name: dict[str, Integration] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._by_name = {i.name: i for i in self.integrations}
        _name_secrets(self, "")

    @property
    def source(self) -> str:
        return self._source

    def only(self, name: str) -> PipelineConfig | None:
        """The configuration with integration ``name`` alone (a backfill for one integration), or
        None when there is no such integration."""
        chosen = tuple(i for i in self.integrations if i.name == name)
        return self.model_copy(update={"integrations": chosen}) if chosen else None

    def get(self, name: str) -> Integration | None:
        return self._by_name.get(name)

    @property
    def active(self) -> tuple[Integration, ...]:
        return tuple(i for i in self.integrations if i.active)

    # the secrets each kind of service reads (a service mounts only those)
    def cloudtalk_keys(self) -> list[Secret]:
        return [self.cloudtalk.key_id, self.cloudtalk.key_secret]

    def kustomer_keys(self) -> list[Secret]:
        return [i.kustomer.api_key for i in self.integrations]

    def webhook_secrets(self) -> list[Secret]:
        return [i.cloudtalk_webhook_secret for i in self.integrations]

    def webhook_tokens(self) -> list[Secret]:
        return [i.kustomer.webhook_token for i in self.integrations if i.kustomer.webhook_token is not None]

    def secrets(self) -> list[Secret]:
        out = [self.cloudtalk.key_id, self.cloudtalk.key_secret]
        for i in self.integrations:
            out += [i.kustomer.api_key, i.cloudtalk_webhook_secret]
            if i.kustomer.webhook_token is not None:
                out.append(i.kustomer.webhook_token)
        return out

    def check_secrets(
        self, environ: Mapping[str, str] | None = None, secrets: Sequence[Secret] | None = None
    ) -> list[str]:
        """A problem per secret (``secrets``, by default all of them) that cannot be read now."""
        problems = []
        for s in self.secrets() if secrets is None else secrets:
            try:
                s.value(environ)
            except ConfigError as exc:
                problems.extend(exc.problems)
        return problems


PipelineConfigFile = PipelineConfig  # the model of the file (the JSON Schema's source)


def _name_secrets(value: Any, path: str) -> None:
    """Tell every :class:`Secret` where it is in the file (for messages about it)."""
    if isinstance(value, Secret):
        value._field = path
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            key = info.alias or name
            _name_secrets(getattr(value, name), f"{path}.{key}" if path else key)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            _name_secrets(item, f"{path}[{i}]")


def _validate_with(handler: Callable[[Any], Any], value: Any, extra: list[Any]) -> Any:
    """Run ``handler`` and report its errors together with ``extra`` (problems found beside it)."""
    try:
        result = handler(value)
    except ValidationError as exc:
        if not extra:
            raise
        errors: list[Any] = [{k: e[k] for k in ("type", "loc", "input", "ctx") if k in e} for e in exc.errors()]
        raise ValidationError.from_exception_data(exc.title, errors + extra) from None
    if extra:
        raise ValidationError.from_exception_data("PipelineConfig", extra)
    return result


# --------------------------------------------------------------------------------------------
# Problems as ``path: message (rule: name)``
# --------------------------------------------------------------------------------------------

_SECRET_LITERAL = "secrets may not be written in the file; use {env: NAME} or {file: PATH}"
_SECRET_FIELDS = frozenset(
    {"api_key", "webhook_token", "key_id", "key_secret", "cloudtalk_webhook_secret", "password", "token", "secret"}
)
_JSON_TYPES = {
    "bool_type": "boolean",
    "int_type": "integer",
    "float_type": "number",
    "string_type": "string",
    "list_type": "array",
    "tuple_type": "array",
    "set_type": "array",
    "frozen_set_type": "array",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
}


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _secret_literal_problems(data: Any, path: str = "") -> list[str]:
    """A secret written as a plain value (``password: abc``) anywhere is refused with a clear message."""
    problems: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            if isinstance(v, str) and str(k).lower() in _SECRET_FIELDS:
                problems.append(f"{p}: {_SECRET_LITERAL}")
            else:
                problems.extend(_secret_literal_problems(v, p))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            problems.extend(_secret_literal_problems(v, f"{path}[{i}]"))
    return problems


class _Hidden:
    def __repr__(self) -> str:
        return "<secret>"


_HIDDEN = _Hidden()


def _is_secret_literal(key: Any, value: Any) -> bool:
    return str(key).lower() in _SECRET_FIELDS and value is not None and not isinstance(value, dict | list | bool)


def _show(value: Any, key: Any = None) -> str:
    """``repr`` of the value of ``key`` for a message: a secret written in it hidden, a long one shortened."""

    def scrub(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: _HIDDEN if _is_secret_literal(k, x) else scrub(x) for k, x in v.items()}
        return [scrub(x) for x in v] if isinstance(v, list) else v

    text = repr(scrub({key: value})[key])
    return text if len(text) <= 120 else text[:116] + " ..."


def _message(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    value = _show(error.get("input"), error["loc"][-1] if error["loc"] else None)
    if kind in _JSON_TYPES:
        return f"{value} is not of type {_JSON_TYPES[kind]!r} (rule: type)"
    if kind == "literal_error":  # expected: "'a', 'b' or 'c'"
        return f"{value} is not one of [{ctx['expected'].replace(' or ', ', ')}] (rule: enum)"
    if kind == "string_pattern_mismatch":
        return f"{value} does not match {ctx['pattern']!r} (rule: pattern)"
    if kind in ("string_too_short", "too_short"):
        rule = "minLength" if kind == "string_too_short" else "minItems"
        return f"{value} {'should be non-empty' if ctx.get('min_length') == 1 else 'is too short'} (rule: {rule})"
    if kind in ("string_too_long", "too_long"):
        return f"{value} is too long (rule: {'maxLength' if kind == 'string_too_long' else 'maxItems'})"
    if kind == "greater_than_equal":
        return f"{value} is less than the minimum of {ctx['ge']!r} (rule: minimum)"
    if kind == "value_error" and isinstance(ctx.get("error"), _Problem):  # ours: the message is complete
        return ctx["error"].message
    return f"{error['msg']} (rule: {kind})"


def _problems(exc: ValidationError) -> list[str]:
    """Every error of a validation as ``path: message (rule: name)``, unknown fields grouped per object."""
    problems: list[str] = []
    unknown: dict[tuple[int | str, ...], tuple[int, list[str]]] = {}  # object -> (its problem's index, fields)
    for error in exc.errors(include_url=False):
        loc, kind = tuple(error["loc"]), error["type"]
        if kind == "missing":
            problems.append(f"{_path(loc[:-1])}: {loc[-1]!r} is a required property (rule: required)")
        elif kind == "too_short" and len(error["input"]) >= error["ctx"]["min_length"]:
            continue  # too few items *after* validation: the bad items are reported themselves
        elif kind == "extra_forbidden":
            parent = loc[:-1]
            if parent not in unknown:
                unknown[parent] = (len(problems), [])
                problems.append("")
            unknown[parent][1].append(str(loc[-1]))
            problems.extend(_secret_literal_problems({loc[-1]: error["input"]}, _path(parent) if parent else ""))
        else:
            problems.append(f"{_path(loc)}: {_message(error)}")
    for parent, (index, names) in unknown.items():
        problems[index] = f"{_path(parent)}: unknown field(s) {', '.join(sorted(names))} (rule: additionalProperties)"
    return problems


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def parse_config(data: Any, source: str = "<memory>") -> PipelineConfig:
    """Validate a decoded YAML document; raise :class:`ConfigError` listing every problem."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None
    config._source = source
    return config


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


# --------------------------------------------------------------------------------------------
# The JSON Schema of the file (schemas/integrations.schema.json), generated from the models
# --------------------------------------------------------------------------------------------


class _FileSchema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: Any) -> JsonSchemaValue:
        out = super().default_schema(schema)
        default = schema.get("default")
        nullable = out.get("type") == "null" or any(s.get("type") == "null" for s in out.get("anyOf", ()))
        if default is None and not nullable:
            out.pop("default", None)  # left out means "not set"; null itself is not allowed
        elif isinstance(default, BaseModel) and _is_all_defaults(default):
            out.pop("default", None)  # the defaults of its fields say it
        return out


def _is_all_defaults(model: BaseModel) -> bool:
    try:
        return model == type(model)()
    except ValidationError:
        return False


def integrations_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 7) of the integrations file, from :class:`PipelineConfig`."""
    schema = PipelineConfig.model_json_schema(ref_template="#/definitions/{model}", schema_generator=_FileSchema)
    definitions = schema.pop("$defs", {})
    return _draft7(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "$id": "integrations",
            **schema,
            "definitions": definitions,
        }
    )


def _draft7(schema: Any) -> Any:
    """Draft 7 ignores the siblings of ``$ref`` (a default, a description): such a ``$ref`` goes into ``allOf``
    (as older pydantic versions write it, so every version writes the same file)."""
    if isinstance(schema, list):
        return [_draft7(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("default", "enum", "const", "examples") else _draft7(v) for k, v in schema.items()}
    if "$ref" in out and len(out) > 1:
        out = {"allOf": [{"$ref": out.pop("$ref")}], **out}
    elif list(out) == ["allOf"] and len(out["allOf"]) == 1:
        out = out["allOf"][0]
    return out


def integrations_json_schema_text() -> str:
    """The file ``schemas/integrations.schema.json`` as it must be (see :data:`SCHEMA_COMMAND`)."""
    return json.dumps(integrations_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(integrations_json_schema_text())
