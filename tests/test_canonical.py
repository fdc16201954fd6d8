"""Tests for hkstore.store._canonical: byte-stable JSON out, strict JSON in."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.errors import HkstoreError, LimitExceededError, ManifestError, SignatureError
from hkstore.store._canonical import (
    MAX_DEPTH,
    canonical_json,
    is_canonical,
    json_path,
    parse_json_strict,
)

NAN = "is not allowed (JSON has no NaN or infinity)"
NOT_JSON = "is not a JSON value (expected dict, list, str, int, float, bool or None)"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _parse(data: bytes | memoryview, **kw: Any) -> Any:
    return parse_json_strict(data, what="doc.json", max_bytes=kw.pop("max_bytes", 1 << 20), **kw)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth - 1):
        value = [value]
    return {"a": value}


# --- canonical bytes ------------------------------------------------------------------------


def test_canonical_json_known_answer() -> None:
    value = {
        "b": [1, 2.5, True, None, -0.0, 1e-05, 1e100, 10**20],
        "a": 'é\n"\\ \u2028 \x7f 𝄞',
        "c": {"z": {}, "y": [], "Z": "", "é": 1, "aa": 0.1},
    }
    assert canonical_json(value) == (
        '{"a":"é\\n\\"\\\\ \u2028 \x7f 𝄞",'
        '"b":[1,2.5,true,null,-0.0,1e-05,1e+100,100000000000000000000],'
        '"c":{"Z":"","aa":0.1,"y":[],"z":{},"é":1}}'
    ).encode("utf-8")


def test_canonical_json_ignores_insertion_order() -> None:
    items = [(f"k{i}", {"x": i, "y": [i, str(i)]}) for i in range(30)]
    shuffled = items[:]
    random.Random(4).shuffle(shuffled)
    assert canonical_json(dict(items)) == canonical_json(dict(shuffled))
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1}) == b'{"a":2,"b":1}'


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.randoms())
def test_canonical_json_round_trips_and_is_order_free(
    value: dict[str, Any], rnd: random.Random
) -> None:
    data = canonical_json(value)
    assert _parse(data) == value
    assert is_canonical(data)
    keys = list(value)
    rnd.shuffle(keys)
    assert canonical_json({k: value[k] for k in keys}) == data
    assert canonical_json(_parse(data)) == data


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"m": {"loss": float("nan")}}, f"doc: $.m.loss: nan {NAN}"),
        ({"m": [1, float("inf")]}, f"doc: $.m[1]: inf {NAN}"),
        ({"m": -float("inf")}, f"doc: $.m: -inf {NAN}"),
        ({"shape": (784,)}, f"doc: $.shape: a tuple {NOT_JSON}"),
        ({"x": np.float32(1.0)}, f"doc: $.x: a float32 {NOT_JSON}"),
        ({"x": {1: "a"}}, "doc: $.x: key 1 is not a string (JSON object keys must be)"),
        ({"k": ["\ud800"]}, "doc: $.k[0]: string is not valid Unicode (lone surrogate at index 0)"),
        ({"\udc00": 1}, "doc: $: string is not valid Unicode (lone surrogate at index 0)"),
        ({"s": {"x"}}, f"doc: $.s: a set {NOT_JSON}"),
    ],
)
def test_canonical_json_refuses_non_json_with_path(value: Any, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        canonical_json(value, what="doc")
    assert str(info.value) == message


def test_canonical_json_refuses_deep_nesting_at_the_same_depth_the_parser_does() -> None:
    ok = _nested(MAX_DEPTH)  # {"a": [[...0]]}: MAX_DEPTH levels of containers
    assert _parse(canonical_json(ok)) == ok
    too_deep = _nested(MAX_DEPTH + 1)
    with pytest.raises(ManifestError, match=rf"nested deeper than {MAX_DEPTH} levels"):
        canonical_json(too_deep)
    text = json.dumps(too_deep, separators=(",", ":")).encode()
    with pytest.raises(ManifestError, match=rf"nested deeper than {MAX_DEPTH} levels"):
        _parse(text)


def test_canonical_json_names_a_prefix_path() -> None:
    with pytest.raises(ManifestError) as info:
        canonical_json({"loss": float("nan")}, what="manifest.json", at=["metadata"])
    assert str(info.value) == f"manifest.json: $.metadata.loss: nan {NAN}"


def test_canonical_json_refuses_bool_and_int_subclasses_only_by_exact_type() -> None:
    class Weird(int):
        pass

    with pytest.raises(ManifestError, match=r"\$\.x: a Weird is not a JSON value"):
        canonical_json({"x": Weird(3)})
    assert canonical_json({"t": True, "f": False, "n": None}) == b'{"f":false,"n":null,"t":true}'


def test_json_path_formats_identifiers_indices_and_other_keys() -> None:
    assert json_path([]) == "$"
    assert json_path(["tensors", 3, "sha256"]) == "$.tensors[3].sha256"
    assert json_path(["metadata", "a b", "é", "x"]) == '$.metadata["a b"]["é"].x'


# --- strict parsing -------------------------------------------------------------------------


def test_parse_json_strict_accepts_an_object() -> None:
    assert _parse(b'{"a":[1,2.5,"x",null,true]}') == {"a": [1, 2.5, "x", None, True]}
    assert _parse(memoryview(b' { "a" : 1 } ')) == {"a": 1}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a":1,"a":2}', "doc.json: duplicate key 'a' in the object at $"),
        (
            b'{"t":[{"name":"x"},{"name":"y","name":"y"}]}',
            "doc.json: duplicate key 'name' in the object at $.t[1]",
        ),
        (
            b'{"m":{"a b":{"k":1,"k":1}}}',
            "doc.json: duplicate key 'k' in the object at $.m[\"a b\"]",
        ),
        (b'{"a":NaN}', f"doc.json: $.a: NaN {NAN}"),
        (b'{"a":[Infinity]}', f"doc.json: $.a[0]: Infinity {NAN}"),
        (b'{"a":-Infinity}', f"doc.json: $.a: -Infinity {NAN}"),
        (b'{"a":{"b":1e999}}', f"doc.json: $.a.b: 1e999 {NAN}"),
        (b"[1,2]", "doc.json: the top-level JSON value is an array; expected an object"),
        (b'"x"', "doc.json: the top-level JSON value is a string; expected an object"),
        (b"null", "doc.json: the top-level JSON value is null; expected an object"),
        (b"3", "doc.json: the top-level JSON value is a number; expected an object"),
        (
            b'\xef\xbb\xbf{"a":1}',
            "doc.json: starts with a UTF-8 byte-order mark; expected UTF-8 without one",
        ),
        (b'{"a":"\xff"}', "doc.json: not valid UTF-8 (byte 0xff at offset 6)"),
        (b'{"a":"\xed\xa0\x80"}', "doc.json: not valid UTF-8 (byte 0xed at offset 6)"),
        (
            b'{"a":1,}',
            "doc.json: invalid JSON: Expecting property name enclosed in double quotes "
            "(line 1, column 8)",
        ),
        (b'{"a":1}\n{"b":2}', "doc.json: invalid JSON: Extra data (line 2, column 1)"),
        (b"", "doc.json: invalid JSON: Expecting value (line 1, column 1)"),
        (
            b'{"a":"\x01"}',
            "doc.json: invalid JSON: Invalid control character at (line 1, column 7)",
        ),
    ],
)
def test_parse_json_strict_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        _parse(data)
    assert str(info.value) == message


def test_parse_json_strict_checks_size_before_decoding() -> None:
    with pytest.raises(LimitExceededError) as info:
        _parse(b"\xff" * 101, max_bytes=100)  # not even UTF-8: the size is checked first
    assert str(info.value) == "doc.json: 101 bytes, more than the limit of 100 bytes"
    assert _parse(b'{"a":"' + b"x" * 92 + b'"}', max_bytes=100) == {"a": "x" * 92}


def test_parse_json_strict_refuses_stack_exhausting_nesting() -> None:
    with pytest.raises(ManifestError, match=r"nested too deeply|nested deeper than"):
        _parse(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", max_bytes=1 << 20)


def test_parse_json_strict_refuses_huge_integer_literals() -> None:
    with pytest.raises(ManifestError, match=r"^doc\.json: invalid JSON: "):
        _parse(b'{"a":' + b"9" * 5000 + b"}")


def test_parse_json_strict_raises_the_callers_error_class() -> None:
    with pytest.raises(SignatureError, match=r"^signature\.json: duplicate key 'k'"):
        parse_json_strict(
            b'{"k":1,"k":2}', what="signature.json", max_bytes=100, error=SignatureError
        )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_json_strict_fuzz_random_bytes_raise_only_our_errors(data: bytes) -> None:
    try:
        value = _parse(data, max_bytes=150)
    except HkstoreError:
        return
    assert isinstance(value, dict)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4), st.data())
def test_parse_json_strict_fuzz_mutated_documents(
    value: dict[str, Any], data: st.DataObject
) -> None:
    raw = bytearray(canonical_json(value))
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    try:
        parsed = _parse(bytes(raw))
    except HkstoreError:
        return
    assert isinstance(parsed, dict)


# --- is_canonical ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"a":1,"b":[true,null]}', True),
        (b'{"b":1,"a":2}', False),
        (b'{"a": 1}', False),
        (b'{"a":1}\n', False),
        (b'{"a":"\\u00e9"}', False),
        ('{"a":"é"}'.encode(), True),
        (b'{"a":1E5}', False),
        (b'{"a":100000.0}', True),
        (b'{"a":1,"a":1}', False),
        (b"[1]", False),
        (b'\xef\xbb\xbf{"a":1}', False),
    ],
)
def test_is_canonical(data: bytes, expected: bool) -> None:
    assert is_canonical(data) is expected
