"""Canonical JSON: the one byte-stable encoding hkstore writes, and the strict parser it reads with.

Canonical bytes are what ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` writes, encoded as UTF-8 without a byte-order mark:
object keys sorted by code point, no insignificant whitespace, non-ASCII characters written
as themselves (only ``"``, ``\\`` and control characters are escaped), integers in decimal,
floats as Python's shortest round-trip ``repr`` (``0.1``, ``1e-05``, ``1.0``), and no NaN or
infinities. The same value always gives the same bytes, so signatures over them are stable.

Example:
    >>> canonical_json({"b": [1, 2.5], "a": "é"})
    b'{"a":"\\xc3\\xa9","b":[1,2.5]}'
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hkstore.errors import HkstoreError, LimitExceededError, ManifestError

__all__ = [
    "DEFAULT_MAX_VALUES",
    "MAX_DEPTH",
    "canonical_json",
    "count_values_bound",
    "encode_parsed",
    "is_canonical",
    "json_path",
    "json_safe",
    "parse_json_strict",
]

#: Deepest nesting of arrays and objects written or read (the top-level object is depth 1).
#: Manifests are shallow; the cap keeps a hostile ``[[[[...`` from exhausting the stack.
MAX_DEPTH = 64


def json_path(parts: Iterable[str | int]) -> str:
    """Format a location inside a JSON document the one way every hkstore message does.

    Example:
        >>> json_path(["tensors", 3, "sha256"])
        '$.tensors[3].sha256'
        >>> json_path(["metadata", "a b"])
        '$.metadata["a b"]'
    """
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part.isascii() and part.isidentifier():
            out.append(f".{part}")
        else:
            out.append(f"[{json.dumps(part, ensure_ascii=False)}]")
    return "".join(out)


# --- writing ----------------------------------------------------------------------------------


def canonical_json(obj: Any, *, what: str = "JSON value", at: Sequence[str | int] = ()) -> bytes:
    """Encode ``obj`` as canonical JSON bytes (see the module docstring for the rules).

    Only ``dict`` (with ``str`` keys), ``list``, ``str``, ``int``, ``float``, ``bool`` and
    ``None`` are accepted, by exact type: tuples, numpy scalars and other look-alikes are
    refused rather than silently converted, so that what is read back equals what was written.

    Args:
        obj: the value to encode.
        what: names the document in error messages (e.g. ``"manifest.json"``).
        at: where ``obj`` sits in that document, for error messages (e.g. ``["metadata"]``).

    Returns:
        The UTF-8 bytes.

    Raises:
        ManifestError: a value is not JSON (the message gives its path, e.g.
            ``$.metadata.loss``): NaN or an infinity, a non-``str`` key, a string that is not
            valid Unicode (lone surrogate), nesting deeper than :data:`MAX_DEPTH`, or an
            unsupported type.
    """
    _check_value(obj, list(at), len(at), what)
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except ValueError as exc:  # e.g. an int with more digits than int->str conversion allows
        raise ManifestError(f"{what}: cannot encode as JSON: {exc}") from None
    return text.encode("utf-8")


def _check_value(value: Any, path: list[str | int], depth: int, what: str) -> None:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ManifestError(
                    f"{what}: {json_path(path)}: string is not valid Unicode "
                    f"(lone surrogate at index {exc.start})"
                ) from None
    elif value is None or kind is bool or kind is int:
        return
    elif kind is float:
        if not math.isfinite(value):
            raise ManifestError(
                f"{what}: {json_path(path)}: {value!r} is not allowed (JSON has no NaN or infinity)"
            )
    elif kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            raise ManifestError(f"{what}: {json_path(path)}: nested deeper than {MAX_DEPTH} levels")
        if kind is list:
            for index, item in enumerate(value):
                _check_value(item, [*path, index], depth + 1, what)
            return
        for key, item in value.items():
            if type(key) is not str:
                raise ManifestError(
                    f"{what}: {json_path(path)}: key {key!r} is not a string (JSON object "
                    "keys must be)"
                )
            _check_value(key, path, depth, what)
            _check_value(item, [*path, key], depth + 1, what)
    else:
        raise ManifestError(
            f"{what}: {json_path(path)}: {_article(kind.__name__)} {kind.__name__} is not a JSON "
            "value (expected dict, list, str, int, float, bool or None)"
        )


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in ("a", "e", "i", "o", "u") else "a"


# --- reading ----------------------------------------------------------------------------------

#: Default cap on the JSON values of one untrusted document (see :func:`count_values_bound`);
#: ``Limits.max_json_values`` has the same default.
DEFAULT_MAX_VALUES = 2_000_000


class _Pairs(list[tuple[str, Any]]):
    """An object's (key, value) pairs as parsed, before duplicate keys are checked."""


class _Refused:
    """Stands in for a number the parser must refuse, so the walk can say where it was."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


class _Reject(Exception):
    """Raised by a parse hook: the fast parse stops and the slow one says where and why."""


def _parse_float(literal: str) -> float | _Refused:
    value = float(literal)
    return value if math.isfinite(value) else _Refused(literal)


def _fast_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Reject
    return value


def _fast_constant(literal: str) -> Any:
    raise _Reject


def _fast_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Reject
    return out


def count_values_bound(raw: bytes) -> int:
    """An upper bound on the number of JSON values in ``raw``, counted without parsing.

    Every value of a JSON document but the first is preceded by a ``,`` or opens a container
    (``[`` or ``{``) inside which the first value sits, so the count of those three bytes
    plus one bounds the values (bytes inside strings only make the bound looser). Three C-speed
    ``bytes.count`` passes: the parser's memory (about 50 to 200 bytes per value on top of the
    text) is bounded before a single object is built.

    Example:
        >>> count_values_bound(b'{"a":[1,2],"b":{}}')
        6
    """
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1


_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the four brackets
_DELTA = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _too_deep(raw: bytes, parsed: Any) -> bool:
    """Tell whether a *valid* JSON text nests deeper than :data:`MAX_DEPTH`.

    First a bound counted in C over the bracket bytes (brackets inside strings can only make
    it larger); only when the bound passes the limit is the parsed document walked.
    """
    structure = raw.translate(None, _BRACKETS)
    if len(structure) <= 2 * MAX_DEPTH:
        return False
    if max(itertools.accumulate(map(_DELTA.__getitem__, structure))) <= MAX_DEPTH:
        return False
    stack: list[tuple[Any, int]] = [(parsed, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        items = value.values() if type(value) is dict else value
        stack.extend((item, depth + 1) for item in items if type(item) in (dict, list))
    return False


def parse_json_strict(
    data: bytes | bytearray | memoryview,
    *,
    what: str,
    max_bytes: int,
    error: type[HkstoreError] = ManifestError,
    max_values: int = DEFAULT_MAX_VALUES,
) -> Any:
    """Parse untrusted JSON bytes strictly into a ``dict``, once, in bounded time and memory.

    Checks, in this order: size (before anything is decoded), no byte-order mark, an upper
    bound on the number of values (:func:`count_values_bound`, before anything is decoded or
    built), valid UTF-8, JSON syntax, every object for duplicate keys (Python's ``json``
    would silently keep the last one), no ``NaN``/``Infinity`` constants or numbers that
    overflow to infinity, nesting at most :data:`MAX_DEPTH`, and a top-level object.

    The document is parsed once, straight into the objects returned (duplicate keys and bad
    numbers are caught by the parser's hooks as they are met); only a refused document is
    parsed a second time, to say where the fault is.

    Args:
        data: the document's bytes.
        what: names the document in error messages (e.g. ``"manifest.json"``).
        max_bytes: the largest accepted size.
        error: the class raised for malformed input (``ManifestError`` unless the caller
            parses another document, e.g. a signature).
        max_values: the largest accepted value count bound (``Limits.max_json_values``).

    Returns:
        The parsed object, made of ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``
        and ``None``.

    Raises:
        LimitExceededError: ``data`` is longer than ``max_bytes``, or may hold more than
            ``max_values`` values.
        ManifestError: (or ``error``) anything else above; the message names ``what`` and,
            where there is one, the JSON path at fault.
    """
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise LimitExceededError(f"{what}: {size} bytes, more than the limit of {max_bytes} bytes")
    raw = data if isinstance(data, bytes) else bytes(data)
    if raw.startswith(codecs.BOM_UTF8):
        raise error(f"{what}: starts with a UTF-8 byte-order mark; expected UTF-8 without one")
    bound = count_values_bound(raw)  # before decoding: nothing allocated yet
    if bound > max_values:
        raise LimitExceededError(
            f"{what}: may hold up to {bound} JSON values (counted from its ',', '[' and "
            f"'{{' bytes), more than the limit of {max_values} (Limits.max_json_values)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        parsed = _loads(text, what, error, fast=True)
    except _Reject:
        return _slow_parse(text, what, error)
    if not isinstance(parsed, dict):
        raise error(f"{what}: the top-level JSON value is {_kind(parsed)}; expected an object")
    if _too_deep(raw, parsed):
        return _slow_parse(text, what, error)
    return parsed


def _loads(text: str, what: str, error: type[HkstoreError], *, fast: bool) -> Any:
    """``json.loads`` with the strict hooks (fast: raising; slow: recording), errors mapped."""
    try:
        if fast:
            return json.loads(
                text,
                object_pairs_hook=_fast_object,
                parse_constant=_fast_constant,
                parse_float=_fast_float,
            )
        return json.loads(
            text, object_pairs_hook=_Pairs, parse_constant=_Refused, parse_float=_parse_float
        )
    except json.JSONDecodeError as exc:
        raise error(
            f"{what}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise error(f"{what}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # int literal longer than Python's int-from-str limit
        raise error(f"{what}: invalid JSON: {exc}") from None


def _slow_parse(text: str, what: str, error: type[HkstoreError]) -> Any:
    """Parse again keeping pairs and refused numbers, to name the path of the first fault."""
    parsed = _loads(text, what, error, fast=False)
    if not isinstance(parsed, _Pairs):
        raise error(f"{what}: the top-level JSON value is {_kind(parsed)}; expected an object")
    _finish(parsed, [], 1, what, error)
    raise AssertionError(f"{what}: refused by the fast parse but not by the slow one")


def _finish(
    value: Any, path: list[str | int], depth: int, what: str, error: type[HkstoreError]
) -> Any:
    """Turn parsed pairs into dicts, refusing duplicates, bad numbers and deep nesting."""
    if isinstance(value, _Refused):
        raise error(
            f"{what}: {json_path(path)}: {value.literal} is not allowed (JSON has no NaN or "
            "infinity)"
        )
    if not isinstance(value, list):
        return value
    if depth > MAX_DEPTH:
        raise error(f"{what}: {json_path(path)}: nested deeper than {MAX_DEPTH} levels")
    if not isinstance(value, _Pairs):
        return [_finish(item, [*path, i], depth + 1, what, error) for i, item in enumerate(value)]
    out: dict[str, Any] = {}
    for key, item in value:
        if key in out:
            raise error(f"{what}: duplicate key {key!r} in the object at {json_path(path)}")
        out[key] = _finish(item, [*path, key], depth + 1, what, error)
    return out


def encode_parsed(document: Any, *, what: str, error: type[HkstoreError] = ManifestError) -> bytes:
    """Canonical bytes of a document :func:`parse_json_strict` returned (C speed, no walk).

    Parsed documents hold only JSON types, so the type walk of :func:`canonical_json` is not
    needed; a lone surrogate (``"\\ud800"`` parses, but has no UTF-8 form) is the one thing
    left to refuse.

    Raises:
        ManifestError: (or ``error``) a string with a lone surrogate.
    """
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{what}: a string holds a lone surrogate (index {exc.start} of the canonical "
            "text), which has no UTF-8 form"
        ) from None


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def is_canonical(data: bytes | bytearray | memoryview) -> bool:
    """Tell whether ``data`` is exactly the canonical encoding of a JSON object.

    Example:
        >>> is_canonical(b'{"a":1}'), is_canonical(b'{"a": 1}')
        (True, False)
    """
    try:
        parsed = parse_json_strict(data, what="JSON", max_bytes=len(bytes(data)))
        return canonical_json(parsed) == bytes(data)
    except HkstoreError:
        return False


def json_safe(value: Any, *, where: str) -> Any:
    """Return ``value`` as plain JSON types, for the free JSON fields a writer records.

    Tuples and sets become lists (sets sorted), numpy scalars and arrays become numbers and
    lists, a numpy dtype becomes its name; everything else must already be JSON.

    Args:
        value: data info, metadata, metrics...
        where: names the value in error messages (``"metadata"``).

    Returns:
        A value :func:`canonical_json` accepts.

    Raises:
        ManifestError: something that has no exact JSON form (named by its path), NaN or
            infinity included.

    Example:
        >>> json_safe({"shape": (3, 4), "tags": {"b", "a"}}, where="data_info")
        {'shape': [3, 4], 'tags': ['a', 'b']}
    """
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestError(f"{where}: key {key!r} is not a string")
            out[key] = json_safe(item, where=f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [json_safe(item, where=f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, set | frozenset):
        return [json_safe(item, where=f"{where}[]") for item in sorted(value, key=repr)]
    numpy = sys.modules.get("numpy")  # a numpy value implies numpy was imported: no import here
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return json_safe(value.tolist(), where=where)
        if isinstance(value, numpy.generic):
            return json_safe(value.item(), where=where)
        if isinstance(value, numpy.dtype):
            return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        canonical_json(value, what=where)  # refuses NaN/Inf
        return value
    raise ManifestError(f"{where}: {type(value).__name__} is not JSON-safe")
