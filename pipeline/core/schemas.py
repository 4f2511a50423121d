"""JSON Schemas compiled once (fastjsonschema) and validated at the edges.

The schemas are the repository's ``schemas/``, shipped in the package as ``pipeline/schemas/``.

``validate(name, data)`` raises :class:`SchemaError` whose message names the field (dotted path)
and the rule that failed, e.g. ``payload.call_id: must be integer (rule: type)``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


class SchemaError(ValueError):
    """Validation failed; ``field`` is the dotted path, ``rule`` the schema keyword."""

    def __init__(self, message: str, field: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.field, self.rule = field, rule


def schema_names() -> list[str]:
    return sorted(p.name[: -len(".schema.json")] for p in SCHEMA_DIR.glob("*.schema.json"))


def load_schema(name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{name}.schema.json"
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise SchemaError(f"no schema named {name!r} in {SCHEMA_DIR}", "", "schema") from None


@cache
def _validator(name: str) -> Any:
    return fastjsonschema.compile(load_schema(name))


def validate(name: str, data: Any, prefix: str = "") -> Any:
    try:
        return _validator(name)(data)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = [str(p) for p in (exc.path or [])][1:]  # drop the leading "data"
        field = ".".join(([prefix] if prefix else []) + path) or (prefix or "(root)")
        message = exc.message
        # fastjsonschema says "data.payload.x must be ..."; say it with our field name instead
        name = exc.name or ""
        if name and message.startswith(name):
            message = message[len(name) :].strip()
        raise SchemaError(f"{field}: {message} (rule: {exc.rule})", field, exc.rule or "") from None
