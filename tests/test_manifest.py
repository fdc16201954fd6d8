"""Tests for hkstore.store._manifest, _records and _schema: the v1 manifest, read and written."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.errors import (
    HkstoreError,
    LimitExceededError,
    ManifestError,
    UnsupportedVersionError,
)
from hkstore.store._canonical import canonical_json, is_canonical
from hkstore.store._dtypes import DTYPES
from hkstore.store._limits import Limits
from hkstore.store._manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FunctionSpec,
    Manifest,
    PickleRecord,
    TensorRecord,
    decode_manifest,
    encode_manifest,
    manifest_schema,
    writer_versions,
)

H0, H1, H2, H3 = ("0" * 64, "1" * 64, "2" * 64, "3" * 64)


def _document() -> dict[str, Any]:
    """A valid v1 manifest document (weights by zstd, model pickled, loss by reference)."""
    return {
        "format": "hkstore",
        "format_version": 1,
        "writer": {
            "hkstore": "0.1.0",
            "python": "3.11",
            "python_implementation": "cpython",
            "numpy": "2.4.0",
            "jax": "0.10.2",
            "cloudpickle": "3.1.3",
        },
        "data_info": {"data_type": "float32", "features_shape": [784], "classes": [0, 1]},
        "seed": 0,
        "tensors": [
            {"name": "mlp/~/linear_0:w", "dtype": "F32", "shape": [784, 32], "sha256": H0},
            {"name": "mlp/~/linear_0:b", "dtype": "BF16", "shape": [32], "sha256": H1},
            {"name": "step", "dtype": "I64", "shape": [], "sha256": H2},
        ],
        "trainable": ["mlp/~/linear_0:w", "step"],
        "functions": {
            "model": {"kind": "pickle"},
            "loss": {"kind": "reference", "ref": "mypkg.losses:mse", "kwargs": {"scale": 0.5}},
        },
        "weights": {
            "member": "weights.safetensors.zst",
            "size": 1234,
            "header_sha256": H3,
            "compression": "zstd",
            "sha256": H0,
            "raw_size": 100_000,
        },
        "pickle": {
            "member": "functions.pkl.zst",
            "size": 300,
            "sha256": H1,
            "raw_size": 900,
            "python": "3.11",
            "python_implementation": "cpython",
            "cloudpickle": "3.1.3",
        },
        "metadata": {"round": 3, "metrics": {"loss": 0.25}},
    }


def _parts(**changes: Any) -> dict[str, Any]:
    """The keyword arguments of Manifest.build for _document(), with ``changes``."""
    doc = _document()
    del doc["format"], doc["format_version"]
    return {**doc, **changes}


def _edited(edit: Callable[[dict[str, Any]], object]) -> bytes:
    doc = copy.deepcopy(_document())
    edit(doc)
    return canonical_json(doc)


def _refusal(data: bytes, cls: type[HkstoreError] = ManifestError, **kw: Any) -> str:
    with pytest.raises(cls) as info:
        decode_manifest(data, **kw)
    assert type(info.value) is cls
    return str(info.value)


# --- round trips and canonical bytes --------------------------------------------------------


def test_decode_encode_round_trip_is_byte_exact() -> None:
    data = canonical_json(_document())
    manifest = decode_manifest(data)
    assert encode_manifest(manifest) == data
    assert manifest.to_dict() == _document()
    assert Manifest.from_dict(_document()) == manifest
    assert manifest.names == ("mlp/~/linear_0:w", "mlp/~/linear_0:b", "step")
    assert manifest.digests["step"] == H2
    assert manifest.tensors[0] == TensorRecord("mlp/~/linear_0:w", "F32", (784, 32), H0)
    assert manifest.functions.loss == FunctionSpec.reference("mypkg.losses:mse", {"scale": 0.5})
    assert manifest.functions.model == FunctionSpec.pickled()
    assert manifest.format == FORMAT_NAME and manifest.format_version == FORMAT_VERSION == 1


def test_build_from_json_parts_in_any_insertion_order() -> None:
    doc = _document()
    parts = _parts()
    reordered = {k: parts[k] for k in reversed(list(parts))}
    reordered["writer"] = dict(reversed(list(doc["writer"].items())))
    first = encode_manifest(Manifest.build(**parts))
    second = encode_manifest(Manifest.build(**reordered))
    assert first == second == canonical_json(doc)
    assert is_canonical(first)


def test_manifest_is_immutable_and_owns_its_containers() -> None:
    data_info = {"features_shape": [784]}
    m = Manifest.build(**_parts(data_info=data_info))
    data_info["features_shape"].append(1)
    assert m.data_info == {"features_shape": [784]}
    m.to_dict()["metadata"]["round"] = 99
    assert m.metadata["round"] == 3
    with pytest.raises(AttributeError):
        m.seed = 1  # type: ignore[misc]


def test_encode_known_answer_for_a_minimal_manifest() -> None:
    doc = _document()
    doc.update(data_info={}, seed=None, tensors=[], trainable=[], pickle=None, metadata={})
    doc["functions"] = {"model": {"kind": "none"}, "loss": {"kind": "none"}}
    doc["weights"] = {
        "member": "weights.safetensors",
        "size": 8,
        "header_sha256": H3,
        "compression": None,
    }
    doc["writer"] = {
        "hkstore": "0.1.0",
        "python": "3.11",
        "python_implementation": "cpython",
        "numpy": "2.4.0",
    }
    assert encode_manifest(Manifest.from_dict(doc)) == (
        b'{"data_info":{},"format":"hkstore","format_version":1,"functions":{"loss":'
        b'{"kind":"none"},"model":{"kind":"none"}},"metadata":{},"pickle":null,"seed":null,'
        b'"tensors":[],"trainable":[],"weights":{"compression":null,"header_sha256":"'
        + H3.encode()
        + b'","member":"weights.safetensors","size":8},"writer":{"hkstore":"0.1.0","numpy":'
        b'"2.4.0","python":"3.11","python_implementation":"cpython"}}'
    )


# --- format and version ---------------------------------------------------------------------


def test_decode_rejects_v2_archive_without_reading_it() -> None:
    doc = {"format": "hkstore", "format_version": 2, "tensors": "whatever v2 says", "new": [1]}
    assert _refusal(json.dumps(doc, indent=2).encode(), UnsupportedVersionError) == (
        "manifest.json: format version 2 is not supported: this hkstore reader implements "
        "format version 1 only; a newer hkstore may read it"
    )
    assert _refusal(_edited(lambda d: d.update(format_version=0)), UnsupportedVersionError) == (
        "manifest.json: format version 0 is not supported: this hkstore reader implements "
        "format version 1 only"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d.update(format="declearn"),
            "manifest.json: $.format is 'declearn'; expected 'hkstore' (this is not an hkstore "
            "manifest)",
        ),
        (
            lambda d: d.pop("format"),
            "manifest.json: $.format is None; expected 'hkstore' (this is not an hkstore manifest)",
        ),
        (
            lambda d: d.update(format_version="1"),
            "manifest.json: $.format_version is '1'; expected an integer",
        ),
        (
            lambda d: d.update(format_version=True),
            "manifest.json: $.format_version is True; expected an integer",
        ),
        (
            lambda d: d.update(format_version=1.0),
            "manifest.json: $.format_version is 1.0; expected an integer",
        ),
    ],
)
def test_decode_rejects_other_formats(
    edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    assert _refusal(_edited(edit)) == message


# --- bytes and limits -----------------------------------------------------------------------


def test_decode_rejects_non_canonical_bytes() -> None:
    pretty = json.dumps(_document(), indent=1, sort_keys=True).encode()
    assert _refusal(pretty) == (
        "manifest.json: not canonical JSON (first difference at byte 1; expected UTF-8, "
        "sorted keys, no whitespace between tokens, shortest number forms)"
    )
    unsorted = json.dumps(_document(), separators=(",", ":")).encode()
    assert "not canonical JSON" in _refusal(unsorted)
    escaped = canonical_json(_document()).replace(b'"round":3', b'"round":3.0e0')
    assert "not canonical JSON" in _refusal(escaped)
    assert "not canonical JSON" in _refusal(canonical_json(_document()) + b"\n")


def test_decode_rejects_duplicate_keys_nested() -> None:
    data = canonical_json(_document()).replace(b'"dtype":"BF16",', b'"dtype":"BF16","dtype":"F32",')
    assert _refusal(data) == "manifest.json: duplicate key 'dtype' in the object at $.tensors[1]"


def test_decode_rejects_oversized_manifest_before_parsing() -> None:
    data = canonical_json(_document())
    message = _refusal(data, LimitExceededError, limits=Limits(max_manifest_bytes=len(data) - 1))
    assert message == (
        f"manifest.json: {len(data)} bytes, more than the limit of {len(data) - 1} bytes"
    )


def test_decode_rejects_too_many_tensors() -> None:
    data = canonical_json(_document())
    assert _refusal(data, LimitExceededError, limits=Limits(max_tensors=2)) == (
        "manifest.json: 3 tensors, more than the limit of 2"
    )


# --- schema ---------------------------------------------------------------------------------

SCHEMA_CASES: list[tuple[Callable[[dict[str, Any]], object], str]] = [
    (lambda d: d.pop("seed"), "$: 'seed' is a required property"),
    (
        lambda d: d.update(extra=1),
        "$: Additional properties are not allowed ('extra' was unexpected)",
    ),
    (
        lambda d: d["writer"].update(python="3"),
        "$.writer.python: '3' does not match '^[0-9]+\\\\.[0-9]+$'",
    ),
    (
        lambda d: d["writer"].update(torch="2"),
        "$.writer: Additional properties are not allowed ('torch' was unexpected)",
    ),
    (
        lambda d: d["writer"].update(python_implementation="CPython"),
        "$.writer.python_implementation: 'CPython' does not match '^[a-z][a-z0-9_]*$'",
    ),
    (lambda d: d.update(seed=True), "$.seed: True is not of type 'integer', 'null'"),
    (
        lambda d: d.update(seed=2**64),
        "$.seed: 18446744073709551616 is greater than the maximum of 18446744073709551615",
    ),
    (lambda d: d.update(data_info=[]), "$.data_info: [] is not of type 'object'"),
    (
        lambda d: d["tensors"][0].update(dtype="F4"),
        "$.tensors[0].dtype: 'F4' is not one of " + repr(list(DTYPES)),
    ),
    (
        lambda d: d["tensors"][0].update(sha256="AB" * 32),
        f"$.tensors[0].sha256: '{'AB' * 32}' does not match '^[0-9a-f]{{64}}$'",
    ),
    (
        lambda d: d["tensors"][0].update(sha256=H0 + "0"),
        f"schema: 2 problems:\n  - $.tensors[0].sha256: '{H0}0' does not match "
        f"'^[0-9a-f]{{64}}$'\n  - $.tensors[0].sha256: '{H0}0' is too long",
    ),
    (
        lambda d: d["tensors"][1].update(shape=[-1]),
        "$.tensors[1].shape[0]: -1 is less than the minimum of 0",
    ),
    (lambda d: d["tensors"][2].update(name=""), "$.tensors[2].name: '' should be non-empty"),
    (
        lambda d: d["tensors"][2].update(extra=0),
        "$.tensors[2]: Additional properties are not allowed ('extra' was unexpected)",
    ),
    (
        lambda d: d["tensors"][2].pop("sha256"),
        "$.tensors[2]: no alternative matches: 'blake3' is a required property; or 'sha256' "
        "is a required property",
    ),
    (
        lambda d: d.update(trainable=["step", "step"]),
        "$.trainable: ['step', 'step'] has non-unique elements",
    ),
    (
        lambda d: d["functions"].update(model={"kind": "eval"}),
        "$.functions.model.kind: 'eval' is not one of ['reference', 'pickle', 'none']",
    ),
    (
        lambda d: d["functions"]["loss"].pop("kwargs"),
        "$.functions.loss: 'kwargs' is a required property",
    ),
    (
        lambda d: d["functions"]["loss"].update(ref="os.system"),
        "$.functions.loss.ref: 'os.system' does not match "
        + repr(manifest_schema()["$defs"]["function"]["then"]["properties"]["ref"]["pattern"]),
    ),
    (
        lambda d: d["functions"]["model"].update(ref="x:y"),
        "$.functions.model: Additional properties are not allowed ('ref' was unexpected)",
    ),
    (
        lambda d: d["functions"].update(optimizer={"kind": "none"}),
        "$.functions: Additional properties are not allowed ('optimizer' was unexpected)",
    ),
    (
        lambda d: d["weights"].update(compression="gzip"),
        "$.weights.compression: 'gzip' is not one of [None, 'zstd']",
    ),
    (
        lambda d: d["weights"].update(member="../weights"),
        "$.weights.member: '../weights' is not one of "
        "['weights.safetensors', 'weights.safetensors.zst']",
    ),
    (lambda d: d["weights"].update(size=-5), "$.weights.size: -5 is less than the minimum of 0"),
    (
        lambda d: d["pickle"].update(member="evil.pkl"),
        "$.pickle.member: 'functions.pkl.zst' was expected",
    ),
    (lambda d: d["pickle"].pop("python"), "$.pickle: 'python' is a required property"),
    (lambda d: d.update(metadata=None), "$.metadata: None is not of type 'object'"),
]


@pytest.mark.parametrize(("edit", "problem"), SCHEMA_CASES)
def test_decode_rejects_schema_violations(
    edit: Callable[[dict[str, Any]], object], problem: str
) -> None:
    prefix = "manifest.json: " if problem.startswith("schema: ") else "manifest.json: schema: "
    assert _refusal(_edited(edit)) == prefix + problem


def test_decode_lists_every_schema_violation_at_once() -> None:
    def edit(d: dict[str, Any]) -> None:
        d.pop("seed")
        d["tensors"][1]["shape"] = [-1]
        d["weights"]["compression"] = "gzip"

    assert _refusal(_edited(edit)) == (
        "manifest.json: schema: 3 problems:\n"
        "  - $: 'seed' is a required property\n"
        "  - $.tensors[1].shape[0]: -1 is less than the minimum of 0\n"
        "  - $.weights.compression: 'gzip' is not one of [None, 'zstd']"
    )


def test_decode_caps_the_listed_violations_and_their_length() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tensors"] = [{"name": "t", "dtype": "x" * 10_000, "shape": [], "sha256": H0}] * 25
        d["trainable"] = []

    message = _refusal(_edited(edit))
    assert message.startswith("manifest.json: schema: 25 problems:\n  - $.tensors[0].dtype: 'xxx")
    assert message.endswith("\n  - ... and 5 more")
    assert message.count("\n") == 21
    assert all(len(line) <= 340 for line in message.splitlines())


def test_decode_refuses_what_the_schema_regex_lets_through() -> None:
    # jsonschema uses Python's re.search, where "$" also matches before a final newline.
    message = _refusal(_edited(lambda d: d["writer"].update(python="3.11\n")))
    assert message == "manifest.json: $.writer.python: '3.11\\n' is not a Python major.minor"
    # JSON Schema counts 2.0 as an integer; the format writes integers without a fraction.
    message = _refusal(_edited(lambda d: d["tensors"][1].update(shape=[2.0])))
    assert message == "manifest.json: $.tensors[1].shape[0]: expected an integer, got float"


# --- cross-field rules ----------------------------------------------------------------------

SEMANTIC_CASES: list[tuple[Callable[[dict[str, Any]], object], str]] = [
    (
        lambda d: d["tensors"].append(dict(d["tensors"][0])),
        "$.tensors[3].name: duplicate tensor name 'mlp/~/linear_0:w' (also $.tensors[0])",
    ),
    (
        lambda d: d["tensors"][1].update(name="__metadata__"),
        "$.tensors[1].name: '__metadata__' is reserved by safetensors",
    ),
    (
        lambda d: d.update(trainable=["mlp/~/linear_0:w", "nope"]),
        "$.trainable[1]: 'nope' is not a tensor name",
    ),
    (
        lambda d: d.update(trainable=["step", "mlp/~/linear_0:w"]),
        "$.trainable[1]: 'mlp/~/linear_0:w' is out of order (trainable names follow the order of "
        "tensors)",
    ),
    (lambda d: d.update(pickle=None), "$.pickle: is null but $.functions.model has kind 'pickle'"),
    (
        lambda d: d["functions"].update(model={"kind": "none"}),
        "$.pickle: is set but no function has kind 'pickle'",
    ),
    (
        lambda d: d["weights"].update(member="weights.safetensors"),
        "$.weights.member: 'weights.safetensors' with compression 'zstd'; expected "
        "'weights.safetensors.zst'",
    ),
    (
        lambda d: d["weights"].pop("raw_size"),
        "$.weights.raw_size: required with compression 'zstd'",
    ),
]


@pytest.mark.parametrize(("edit", "problem"), SEMANTIC_CASES)
def test_decode_rejects_broken_cross_field_rules(
    edit: Callable[[dict[str, Any]], object], problem: str
) -> None:
    assert _refusal(_edited(edit)) == f"manifest.json: {problem}"


def test_decode_lists_every_broken_rule_at_once() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tensors"][2]["name"] = "mlp/~/linear_0:b"
        d["trainable"] = ["zz", "mlp/~/linear_0:w"]
        d["functions"]["model"] = {"kind": "none"}
        d["weights"].update(member="weights.safetensors", compression=None)

    assert _refusal(_edited(edit)) == (
        "manifest.json: 5 problems:\n"
        "  - $.tensors[2].name: duplicate tensor name 'mlp/~/linear_0:b' (also $.tensors[1])\n"
        "  - $.trainable[0]: 'zz' is not a tensor name\n"
        "  - $.pickle: is set but no function has kind 'pickle'\n"
        "  - $.weights.sha256: only allowed with compression 'zstd'\n"
        "  - $.weights.raw_size: only allowed with compression 'zstd'"
    )


# --- writing --------------------------------------------------------------------------------


def test_encode_rejects_non_json_values_with_their_path() -> None:
    m = Manifest.from_dict(_document())
    bad = Manifest(**{**m.__dict__, "metadata": {"metrics": {"loss": float("nan")}}})
    with pytest.raises(ManifestError) as info:
        encode_manifest(bad)
    assert str(info.value) == (
        "manifest.json: $.metadata.metrics.loss: nan is not allowed (JSON has no NaN or infinity)"
    )
    with pytest.raises(
        ManifestError,
        match=r"^manifest.json: \$\.data_info\.features_shape: a "
        r"tuple is not a JSON value",
    ):
        Manifest.build(**_parts(data_info={"features_shape": (784,)}))


def test_constructing_an_inconsistent_manifest_fails() -> None:
    m = Manifest.from_dict(_document())
    with pytest.raises(ManifestError, match=r"^manifest.json: \$\.pickle: is null but"):
        Manifest(**{**m.__dict__, "pickle": None})
    with pytest.raises(ManifestError, match=r"\$\.trainable\[0\]: 'x' is not a tensor name"):
        Manifest(**{**m.__dict__, "trainable": ["x"]})


def test_encode_validates_against_the_schema() -> None:
    m = Manifest.from_dict(_document())
    assert m.pickle is not None
    pickle = PickleRecord(**{**m.pickle.__dict__, "python": "three"})
    with pytest.raises(ManifestError) as info:
        encode_manifest(Manifest(**{**m.__dict__, "pickle": pickle}))
    assert str(info.value) == (
        r"manifest.json: schema: $.pickle.python: 'three' does not match '^[0-9]+\\.[0-9]+$'"
    )


def test_writer_versions() -> None:
    versions = writer_versions({"jax": "0.10.2"})
    assert versions["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert versions["python_implementation"] == sys.implementation.name
    assert set(versions) == {"hkstore", "python", "python_implementation", "numpy", "jax"}
    with pytest.raises(ManifestError, match=r"\$\.writer\.torch: cannot record '2'"):
        writer_versions({"torch": "2"})


# --- the schema file ------------------------------------------------------------------------


def test_schema_dtype_enum_equals_the_dtype_table() -> None:
    schema = manifest_schema()
    assert schema["properties"]["tensors"]["items"]["properties"]["dtype"]["enum"] == list(DTYPES)


def test_schema_is_valid_and_strict_everywhere_but_free_json() -> None:
    from jsonschema import Draft202012Validator

    schema = manifest_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$id"] == "urn:hkstore:schema:manifest:v1"
    assert schema["title"] and schema["description"]
    free = {"data_info", "metadata", "kwargs"}

    def walk(node: Any, name: str) -> None:
        if not isinstance(node, dict):
            return
        if "if" in node:  # the function object: strict in both branches
            assert node["then"]["additionalProperties"] is False
            assert node["else"]["additionalProperties"] is False
        elif "properties" in node and name not in free:
            assert node.get("additionalProperties") is False, name
        for key, child in node.get("properties", {}).items():
            if isinstance(child, dict):
                assert child.get("description") or "$ref" in child or child == {}, key
            walk(child, key)
        for key in ("items", "then", "else"):
            walk(node.get(key), name)
        for key, child in node.get("$defs", {}).items():
            walk(child, key)

    walk(schema, "$")
    for key in ("data_info", "metadata"):
        assert "additionalProperties" not in schema["properties"][key]


def test_importing_the_manifest_module_imports_neither_jsonschema_nor_jax() -> None:
    code = (
        "import sys; import hkstore.store._manifest, hkstore.store._functions; "
        "print(sorted(m for m in ('jsonschema', 'jax', 'haiku', 'cloudpickle') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- fuzz -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_fuzz_mutated_manifests_raise_only_our_errors(data: st.DataObject) -> None:
    raw = bytearray(canonical_json(_document()))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        manifest = decode_manifest(bytes(raw))
    except HkstoreError:
        return
    assert encode_manifest(manifest) == bytes(raw)
