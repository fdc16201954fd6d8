"""The JSON Schemas in ``schemas/`` (shipped in the package): loading and validating.

jsonschema costs ~150 ms to import, so it is imported on the first validation only, and each
schema's validator is built once and cached. Commands that never read a document (``--help``,
``keygen``) never pay for it.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from hkstore.errors import HkstoreError, ManifestError

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

__all__ = [
    "MAX_LISTED_ERRORS",
    "Problem",
    "load_schema",
    "raise_problems",
    "schema_problems",
    "validate",
]

#: Schema violations listed in one error message (the rest are counted).
MAX_LISTED_ERRORS = 20


@functools.cache
def _schema_text(name: str) -> str:
    return resources.files("hkstore").joinpath("schemas", name).read_text("utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """Return a fresh copy of the schema ``schemas/<name>``, e.g. ``"manifest.v1.json"``."""
    schema: dict[str, Any] = json.loads(_schema_text(name))
    return schema


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    # every shipped schema, by its $id, so that one may refer to another's definitions
    folder = resources.files("hkstore").joinpath("schemas")
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema))
        for schema in (json.loads(entry.read_text("utf-8")) for entry in folder.iterdir()
                       if entry.name.endswith(".json"))
    )
    return Draft202012Validator(load_schema(name), registry=registry)


#: A problem: its JSON path as a sort key, and the message ``"<path>: <reason>"``.
Problem = tuple[list[tuple[bool, Any]], str]


def schema_problems(document: Any, *, schema: str) -> list[Problem]:
    """Every violation of ``schemas/<schema>`` by ``document`` (JSON Schema draft 2020-12)."""
    return [
        (
            [(isinstance(p, str), p) for p in e.absolute_path],
            f"{e.json_path}: {_shorten(_reason(e))}",
        )
        for e in _validator(schema).iter_errors(document)
    ]


def raise_problems(
    problems: list[Problem], *, what: str, error: type[HkstoreError] = ManifestError
) -> None:
    """Raise one error listing ``problems`` sorted by path (nothing when there are none).

    Raises:
        ManifestError: (or ``error``) ``"<what>: schema: <problem>"`` for one problem, or a
            counted list of at most :data:`MAX_LISTED_ERRORS` for several.
    """
    if not problems:
        return
    found = sorted(problems, key=lambda item: (item[0], item[1]))
    lines = [message for _, message in found[:MAX_LISTED_ERRORS]]
    if len(found) > MAX_LISTED_ERRORS:
        lines.append(f"... and {len(found) - MAX_LISTED_ERRORS} more")
    if len(lines) == 1:
        raise error(f"{what}: schema: {lines[0]}")
    listed = "".join(f"\n  - {p}" for p in lines)
    raise error(f"{what}: schema: {len(found)} problems:{listed}")


def validate(
    document: Any, *, schema: str, what: str, error: type[HkstoreError] = ManifestError
) -> None:
    """Validate ``document`` against ``schemas/<schema>`` (JSON Schema draft 2020-12).

    Args:
        document: the parsed JSON document.
        schema: the schema's file name, e.g. ``"manifest.v1.json"``.
        what: names the document in the error message.
        error: the class raised.

    Raises:
        ManifestError: (or ``error``) listing every violation, sorted by JSON path, as
            ``"<what>: schema: <path>: <reason>"`` (one) or a counted list (several).
    """
    raise_problems(schema_problems(document, schema=schema), what=what, error=error)


def _reason(e: Any) -> str:
    """jsonschema's message; for a failed ``oneOf``/``anyOf``, why each alternative failed."""
    if e.validator in ("oneOf", "anyOf") and e.context:
        return "no alternative matches: " + "; or ".join(sorted({c.message for c in e.context}))
    return str(e.message)


def _shorten(text: str, limit: int = 300) -> str:
    # jsonschema quotes the offending value; a hostile document could make that megabytes.
    return text if len(text) <= limit else text[: limit - 3] + "..."
