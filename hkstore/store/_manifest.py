"""The v1 manifest: the Manifest record, its cross-field rules, and its canonical bytes.

``schemas/manifest.v1.json`` specifies the document; :class:`ManifestJSON` mirrors it and the
records of its parts live in ``_records``. :func:`decode_manifest` is the one way an archive's
manifest is read: size cap, strict parse, format and version, canonical bytes, schema, then
the cross-field rules, all before anything else in the archive is trusted.

Example:
    >>> m = Manifest(writer=WriterInfo(hkstore="0.1.0", python="3.11",
    ...              python_implementation="cpython", numpy="2.0.0"),
    ...              data_info={}, seed=None, tensors=(), trainable=(),
    ...              functions=Functions(FunctionSpec.none(), FunctionSpec.none()),
    ...              weights=WeightsRecord("weights.safetensors", 16, "0" * 64, None),
    ...              pickle=None, metadata={"round": 3})
    >>> decode_manifest(encode_manifest(m)) == m
    True
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from hkstore._version import __version__
from hkstore.errors import LimitExceededError, ManifestError, UnsupportedVersionError
from hkstore.store._canonical import canonical_json, encode_parsed, json_path, parse_json_strict
from hkstore.store._digests import ALGORITHMS as DIGEST_ALGORITHMS
from hkstore.store._functions import current_runtime
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._records import (
    MANIFEST_MEMBER,
    PICKLE_MEMBER,
    SCHEMA,
    WEIGHTS_MEMBER,
    WEIGHTS_MEMBER_ZSTD,
    Functions,
    FunctionsJSON,
    FunctionSpec,
    PickleJSON,
    PickleRecord,
    RngJSON,
    RngRecord,
    TensorJSON,
    TensorRecord,
    WeightsJSON,
    WeightsRecord,
    WriterInfo,
    WriterJSON,
    dtype_codes,
    expect_int,
    expect_json_object,
    expect_object,
    expect_str,
    field_error,
    optional,
)
from hkstore.store._schema import (
    MAX_LISTED_ERRORS,
    Problem,
    _shorten,
    load_schema,
    raise_problems,
    schema_problems,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_MEMBER",
    "PICKLE_MEMBER",
    "WEIGHTS_MEMBER",
    "WEIGHTS_MEMBER_ZSTD",
    "FunctionSpec",
    "Functions",
    "Manifest",
    "ManifestJSON",
    "PickleRecord",
    "TensorRecord",
    "WeightsRecord",
    "WriterInfo",
    "decode_manifest",
    "encode_manifest",
    "manifest_schema",
    "writer_versions",
]

FORMAT_NAME = "hkstore"
FORMAT_VERSION = 1
_WHAT = MANIFEST_MEMBER
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class ManifestJSON(TypedDict):
    format: str
    format_version: int
    writer: WriterJSON
    data_info: dict[str, Any]
    seed: int | None
    tensors: list[TensorJSON]
    trainable: list[str]
    functions: FunctionsJSON
    weights: WeightsJSON
    pickle: PickleJSON | None
    metadata: dict[str, Any]
    rng: NotRequired[RngJSON]


@dataclass(frozen=True)
class Manifest:
    """A v1 manifest. Constructing one checks the cross-field rules (see :meth:`problems`).

    Attributes:
        writer: software versions of the writer.
        data_info: the model's data specifications (free JSON).
        seed: the model's seed, or None.
        tensors: every tensor, in model order.
        trainable: names of the trainable tensors, in model order.
        functions: how to get the model and loss functions.
        weights: the weights member.
        pickle: the pickle member, or None.
        metadata: free user metadata.
        rng: the model's random state when it was written, or None (archives written before
            hkstore 0.2.0, whose loaders restart the random stream from ``seed``).

    Raises:
        ManifestError: on construction, listing every broken cross-field rule.
    """

    writer: WriterInfo
    data_info: Mapping[str, Any]
    seed: int | None
    tensors: tuple[TensorRecord, ...]
    trainable: tuple[str, ...]
    functions: Functions
    weights: WeightsRecord
    pickle: PickleRecord | None
    metadata: Mapping[str, Any]
    rng: RngRecord | None = None

    def __post_init__(self) -> None:
        # Own copies: a Manifest never changes when the caller's lists or dicts do.
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "trainable", tuple(self.trainable))
        object.__setattr__(self, "data_info", copy.deepcopy(dict(self.data_info)))
        object.__setattr__(self, "metadata", copy.deepcopy(dict(self.metadata)))
        self._check()

    def _check(self) -> None:
        problems = self.problems()
        if problems:
            raise _many(problems)

    @classmethod
    def _owned(cls, **fields: Any) -> Manifest:
        """Build from parts the strict parser handed over: checked, not copied."""
        manifest = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(manifest, name, value)
        manifest._check()
        return manifest

    @property
    def format(self) -> str:
        """Always ``"hkstore"``."""
        return FORMAT_NAME

    @property
    def format_version(self) -> int:
        """Always 1."""
        return FORMAT_VERSION

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in model order."""
        return tuple(t.name for t in self.tensors)

    @property
    def digests(self) -> dict[str, str]:
        """Tensor name -> hex digest of its data (with :attr:`digest_algorithm`)."""
        return {t.name: t.digest for t in self.tensors}

    @property
    def digest_algorithm(self) -> str:
        """The tensors' digest algorithm (``"sha256"`` or ``"blake3"``; one per manifest).

        ``"sha256"`` when there are no tensors (nothing is hashed then).
        """
        return self.tensors[0].algorithm if self.tensors else "sha256"

    def problems(self) -> list[str]:
        """Every broken cross-field rule, as messages ``"<json path>: <what is wrong>"``."""
        out: list[str] = []
        first: dict[str, int] = {}
        for i, tensor in enumerate(self.tensors):
            name = tensor.name
            if name and name != "__metadata__" and name not in first:
                first[name] = i
                continue
            where = json_path(["tensors", i, "name"])
            if not name:
                out.append(f"{where}: tensor name is empty")
            elif name == "__metadata__":
                out.append(f"{where}: '__metadata__' is reserved by safetensors")
            else:
                out.append(
                    f"{where}: duplicate tensor name {name!r} "
                    f"(also {json_path(['tensors', first[name]])})"
                )
        for i, tensor in enumerate(self.tensors):
            if tensor.algorithm not in DIGEST_ALGORITHMS:
                out.append(
                    f"{json_path(['tensors', i])}: digest algorithm {tensor.algorithm!r} is not "
                    f"one of {', '.join(DIGEST_ALGORITHMS)}"
                )
        algorithms = sorted({t.algorithm for t in self.tensors})
        if len(algorithms) > 1:
            uses = {a: next(i for i, t in enumerate(self.tensors) if t.algorithm == a)
                    for a in algorithms}
            out.append(
                "$.tensors: every tensor must use the same digest algorithm, found "
                + " and ".join(f"{a!r} (first at {json_path(['tensors', i])})"
                               for a, i in uses.items())
            )
        last = -1
        seen: set[str] = set()
        for i, name in enumerate(self.trainable):
            index = first.get(name)
            if index is not None and index > last and name not in seen:
                last = index
                seen.add(name)
                continue
            where = json_path(["trainable", i])
            if name in seen:
                out.append(f"{where}: {name!r} is listed twice")
            elif name not in first:
                out.append(f"{where}: {name!r} is not a tensor name")
            elif first[name] < last:
                out.append(
                    f"{where}: {name!r} is out of order (trainable names follow the "
                    "order of tensors)"
                )
            else:
                last = first[name]
            seen.add(name)
        pickled = [key for key, spec in self.functions.items() if spec.kind == "pickle"]
        if pickled and self.pickle is None:
            out.append(
                f"$.pickle: is null but {' and '.join(f'$.functions.{k}' for k in pickled)}"
                " has kind 'pickle'"
            )
        if not pickled and self.pickle is not None:
            out.append("$.pickle: is set but no function has kind 'pickle'")
        w = self.weights
        if w.compression is None:
            if w.member != WEIGHTS_MEMBER:
                out.append(
                    f"$.weights.member: {w.member!r} with compression null; expected "
                    f"{WEIGHTS_MEMBER!r}"
                )
            for key in ("sha256", "raw_size"):
                if getattr(w, key) is not None:
                    out.append(f"$.weights.{key}: only allowed with compression 'zstd'")
        else:
            if w.member != WEIGHTS_MEMBER_ZSTD:
                out.append(
                    f"$.weights.member: {w.member!r} with compression 'zstd'; expected "
                    f"{WEIGHTS_MEMBER_ZSTD!r}"
                )
            for key in ("sha256", "raw_size"):
                if getattr(w, key) is None:
                    out.append(f"$.weights.{key}: required with compression 'zstd'")
        return out

    @classmethod
    def from_dict(
        cls,
        value: Any,
        *,
        owned: bool = False,
        tensors: tuple[TensorRecord, ...] | None = None,
    ) -> Manifest:
        """Build a Manifest from the parsed JSON document, field by field.

        Args:
            value: the document.
            owned: the document comes from the strict parser and is handed over: its
                free-form objects (``data_info``, ``metadata``, ``kwargs``) are kept, not
                copied (they are JSON by construction).
            tensors: the records of ``$.tensors`` when the caller already built them from
                this very document (:func:`decode_manifest` does, in its validation pass).

        Raises:
            ManifestError: a field is missing, unexpected or of the wrong type (the message
                gives its JSON path), or cross-field rules are broken (all listed).
            UnsupportedVersionError: ``format_version`` is not 1.
        """
        _check_format(value)
        d = expect_object(
            value,
            [],
            (
                "format",
                "format_version",
                "writer",
                "data_info",
                "seed",
                "tensors",
                "trainable",
                "functions",
                "weights",
                "pickle",
                "metadata",
            ),
            optional=("rng",),
        )
        for key in ("tensors", "trainable"):
            if not isinstance(d[key], list):
                raise field_error([key], f"expected an array, got {type(d[key]).__name__}")
        seed = optional(d["seed"], functools.partial(expect_int, minimum=None), ["seed"])
        if seed is not None and not _SEED_MIN <= seed <= _SEED_MAX:
            raise field_error(["seed"], f"{seed} is outside [{_SEED_MIN}, {_SEED_MAX}]")
        fields: dict[str, Any] = {
            "writer": WriterInfo.from_dict(d["writer"]),
            "data_info": expect_json_object(d["data_info"], ["data_info"], owned=owned),
            "seed": seed,
            "tensors": tensors
            if tensors is not None
            else tuple(
                TensorRecord.from_dict(t, ["tensors", i]) for i, t in enumerate(d["tensors"])
            ),
            "trainable": tuple(
                expect_str(n, ["trainable", i]) for i, n in enumerate(d["trainable"])
            ),
            "functions": Functions.from_dict(d["functions"], owned=owned),
            "weights": WeightsRecord.from_dict(d["weights"]),
            "pickle": optional(d["pickle"], PickleRecord.from_dict, ["pickle"]),
            "metadata": expect_json_object(d["metadata"], ["metadata"], owned=owned),
            "rng": RngRecord.from_dict(d["rng"], ["rng"]) if "rng" in d else None,
        }
        return cls._owned(**fields) if owned else cls(**fields)

    @classmethod
    def build(
        cls,
        *,
        writer: Mapping[str, str],
        data_info: Mapping[str, Any],
        seed: int | None,
        tensors: Sequence[Mapping[str, Any]],
        trainable: Sequence[str],
        functions: Mapping[str, Mapping[str, Any]],
        weights: Mapping[str, Any],
        pickle: Mapping[str, Any] | None,
        metadata: Mapping[str, Any],
        rng: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Build a Manifest to write from JSON-shaped parts (as :meth:`to_dict` gives them).

        Args:
            writer: versions to record; ``hkstore``, ``python``, ``python_implementation`` and
                ``numpy`` default to this process's (:func:`writer_versions`), so passing only
                ``{"jax": ..., "haiku": ..., "cloudpickle": ...}`` is enough.
            data_info, seed, tensors, trainable, functions, weights, pickle, metadata, rng:
                the fields of the same names (see ``schemas/manifest.v1.json``); ``rng=None``
                leaves the optional ``rng`` field out.

        Raises:
            ManifestError: as :meth:`from_dict`.
        """
        base = {k: v for k, v in writer_versions().items() if k not in WriterInfo.OPTIONAL}
        document: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "writer": {**base, **writer},
            "data_info": dict(data_info),
            "seed": seed,
            "tensors": [dict(t) for t in tensors],
            "trainable": list(trainable),
            "functions": {k: dict(v) for k, v in functions.items()},
            "weights": dict(weights),
            "pickle": None if pickle is None else dict(pickle),
            "metadata": dict(metadata),
        }
        if rng is not None:
            document["rng"] = dict(rng)
        return cls.from_dict(document)

    def to_dict(self) -> ManifestJSON:
        """Return the JSON document (fresh containers; mutating them does not change ``self``)."""
        out = ManifestJSON(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            writer=self.writer.to_dict(),
            data_info=copy.deepcopy(dict(self.data_info)),
            seed=self.seed,
            tensors=[t.to_dict() for t in self.tensors],
            trainable=list(self.trainable),
            functions=self.functions.to_dict(),
            weights=self.weights.to_dict(),
            pickle=None if self.pickle is None else self.pickle.to_dict(),
            metadata=copy.deepcopy(dict(self.metadata)),
        )
        if self.rng is not None:
            out["rng"] = self.rng.to_dict()
        return out


def _many(problems: Sequence[str]) -> ManifestError:
    if len(problems) == 1:
        return ManifestError(f"{_WHAT}: {problems[0]}")
    listed = "".join(f"\n  - {p}" for p in problems)
    return ManifestError(f"{_WHAT}: {len(problems)} problems:{listed}")


def _check_format(value: Any) -> None:
    """Refuse another format or another version before looking at any other field."""
    if not isinstance(value, dict):
        raise ManifestError(f"{_WHAT}: expected a JSON object, got {type(value).__name__}")
    name = value.get("format")
    if name != FORMAT_NAME or type(name) is not str:
        raise ManifestError(
            f"{_WHAT}: $.format is {name!r}; expected {FORMAT_NAME!r} "
            "(this is not an hkstore manifest)"
        )
    version = value.get("format_version")
    if type(version) is not int:
        raise ManifestError(f"{_WHAT}: $.format_version is {version!r}; expected an integer")
    if version != FORMAT_VERSION:
        hint = "; a newer hkstore may read it" if version > FORMAT_VERSION else ""
        raise UnsupportedVersionError(
            f"{_WHAT}: format version {version} is not supported: this hkstore reader "
            f"implements format version {FORMAT_VERSION} only{hint}"
        )


def manifest_schema() -> dict[str, Any]:
    """Return (a fresh copy of) the v1 manifest JSON Schema, ``schemas/manifest.v1.json``."""
    return load_schema(SCHEMA)


# --- encoding and decoding ----------------------------------------------------------------------


def encode_manifest(manifest: Manifest) -> bytes:
    """Encode a manifest as the canonical bytes of ``manifest.json``.

    Args:
        manifest: the manifest (its cross-field rules were checked when it was built).

    Returns:
        Canonical JSON bytes, valid against ``schemas/manifest.v1.json``.

    Raises:
        ManifestError: a value is not JSON (e.g. NaN in metadata, a tuple in data_info) or
            breaks the schema; the message gives the JSON path.
    """
    document = manifest.to_dict()
    data = canonical_json(document, what=_WHAT)
    _validate(dict(document))
    return data


def decode_manifest(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> Manifest:
    """Read ``manifest.json`` bytes from an untrusted archive.

    Checks in this order, each failing closed: size, UTF-8 strict JSON (duplicate keys, NaN,
    nesting), ``format`` and ``format_version`` (checked before the rest so that a newer
    archive is refused as such, never half-read), tensor count, canonical bytes, schema (every
    violation listed with its JSON path), then the cross-field rules (all listed).

    Args:
        data: the member's bytes.
        limits: ``max_manifest_bytes`` and ``max_tensors`` apply.

    Returns:
        The manifest.

    Raises:
        LimitExceededError: the manifest is larger than ``limits.max_manifest_bytes`` or lists
            more than ``limits.max_tensors`` tensors.
        UnsupportedVersionError: ``format_version`` is not 1 (the message says which version
            was found and which this reader implements).
        ManifestError: anything else.
    """
    raw = data if isinstance(data, bytes) else bytes(data)
    document = parse_json_strict(
        raw,
        what=_WHAT,
        max_bytes=limits.max_manifest_bytes,
        max_values=limits.max_json_values,
    )
    _check_format(document)
    tensors = document.get("tensors")
    if isinstance(tensors, list) and len(tensors) > limits.max_tensors:
        raise LimitExceededError(
            f"{_WHAT}: {len(tensors)} tensors, more than the limit of {limits.max_tensors}"
        )
    expected = encode_parsed(document, what=_WHAT)
    if expected != raw:
        at = next(
            (i for i, (a, b) in enumerate(zip(expected, raw, strict=False)) if a != b),
            min(len(expected), len(raw)),
        )
        raise ManifestError(
            f"{_WHAT}: not canonical JSON (first difference at byte {at}; expected UTF-8, "
            "sorted keys, no whitespace between tokens, shortest number forms)"
        )
    tensor_records = _validate(document)
    return Manifest.from_dict(document, owned=True, tensors=tensor_records)


def _validate(document: dict[str, Any]) -> tuple[TensorRecord, ...] | None:
    """The schema, in linear time: jsonschema for the fixed-size part, one pass for the lists.

    JSON Schema's per-item validation of ``$.tensors`` costs seconds at 100,000 tensors, and
    its ``uniqueItems`` on ``$.trainable`` is quadratic when the items are not hashable (a
    110 KB manifest took 85 s). Those two arrays are checked here instead, by
    :func:`_list_problems`, with the same rules; ``tests/test_manifest.py`` checks that both
    paths agree on every case.

    Returns:
        The tensor records, built in the same pass when every entry is well-formed (else
        ``None``, and :meth:`Manifest.from_dict` says what is wrong).
    """
    skeleton = dict(document)
    for key in ("tensors", "trainable"):
        if isinstance(skeleton.get(key), list):
            skeleton[key] = []
    problems = schema_problems(skeleton, schema=SCHEMA)
    records, list_problems = _list_problems(document)
    raise_problems(problems + list_problems, what=_WHAT)
    return records


def _list_problems(
    document: dict[str, Any],
) -> tuple[tuple[TensorRecord, ...] | None, list[Problem]]:
    """The schema rules of ``$.tensors`` items and ``$.trainable``, in one pass each.

    Messages are worded as JSON Schema's (``jsonschema``) are, so a problem reads the same
    whichever check found it. Well-formed tensor entries (the common case, tested first in a
    few operations) become their records in the same pass.

    Returns:
        ``(tensor records or None, problems)``.
    """
    records, problems = tensor_list_problems(document.get("tensors"), ["tensors"])
    formatting = len(problems) <= MAX_LISTED_ERRORS  # past that, problems are only counted

    def add(path: list[str | int], message: str) -> None:
        key = [(isinstance(p, str), p) for p in path]
        problems.append((key, f"{json_path(path)}: {_shorten(message)}" if formatting else ""))

    trainable = document.get("trainable")
    seen: set[str] = set()
    duplicate = False
    for i, name in enumerate(trainable if isinstance(trainable, list) else ()):
        formatting = len(problems) <= MAX_LISTED_ERRORS
        if not isinstance(name, str):
            add(["trainable", i], f"{_brief(name)} is not of type 'string'")
        elif not name:
            add(["trainable", i], "'' should be non-empty")
        elif name in seen:
            duplicate = True
        else:
            seen.add(name)
    if duplicate:
        formatting = True
        add(["trainable"], f"{_brief(trainable)} has non-unique elements")
    return records, problems


def tensor_list_problems(
    tensors: Any, path: list[str | int], algorithms: tuple[str, ...] = DIGEST_ALGORITHMS
) -> tuple[tuple[TensorRecord, ...] | None, list[Problem]]:
    """The schema rules of a list of tensor entries (``TensorJSON``), in one pass.

    Used for the manifest's ``$.tensors`` and for every other document that lists tensors
    the same way (a checkpoint round's ``$.state.tensors``): JSON Schema's per-item validation
    costs about 100 us an entry, seconds for 100,000 of them. A value that is not a list is
    left to the schema (checked with the list emptied).

    Args:
        tensors: the list, as parsed.
        path: where it is in its document (for messages), e.g. ``["tensors"]``.
        algorithms: the digest keys an entry may use (exactly one of them): the manifest's
            digest table, or only ``("sha256",)`` for a checkpoint round's state.

    Returns:
        ``(records, problems)``: the records when every entry is well-formed (else ``None``),
        and every problem, worded as ``jsonschema`` words them.

    Example:
        >>> records, problems = tensor_list_problems(
        ...     [{"name": "w", "dtype": "F32", "shape": [2], "sha256": "0" * 64}], ["tensors"])
        >>> records[0].shape, problems
        ((2,), [])
    """
    problems: list[Problem] = []
    records: list[TensorRecord] | None = []
    formatting = True  # once enough problems are worded, the rest are only counted

    def add(where: list[str | int], message: str) -> None:
        key = [(isinstance(p, str), p) for p in where]
        problems.append((key, f"{json_path(where)}: {_shorten(message)}" if formatting else ""))

    codes = dtype_codes()
    code_set = frozenset(codes)
    make = TensorRecord._trusted
    for i, item in enumerate(tensors if isinstance(tensors, list) else ()):
        if (
            type(item) is dict
            and len(item) == 4
            and type(name := item.get("name")) is str
            and name
            and type(dtype := item.get("dtype")) is str
            and dtype in code_set
            and type(shape := item.get("shape")) is list
            and all(type(d) is int and d >= 0 for d in shape)
            and (algorithm := "sha256" if "sha256" in item else "blake3") in algorithms
            and type(digest := item.get(algorithm)) is str
            and _SHA256_PATTERN.fullmatch(digest)
        ):
            if records is not None:
                records.append(make(name, item["dtype"], tuple(shape), digest, algorithm))
            continue
        records = None
        formatting = len(problems) <= MAX_LISTED_ERRORS
        where: list[str | int] = [*path, i]
        if not isinstance(item, dict):
            add(where, f"{_brief(item)} is not of type 'object'")
            continue
        for key in _TENSOR_KEYS:
            if key not in item:
                add(where, f"{key!r} is a required property")
        digests = [key for key in algorithms if key in item]
        if not digests and len(algorithms) == 1:
            add(where, f"{algorithms[0]!r} is a required property")
        elif not digests:  # the schema's oneOf, worded as _schema words it
            add(where, "no alternative matches: "
                + "; or ".join(f"{key!r} is a required property" for key in sorted(algorithms)))
        elif len(digests) > 1:
            add(where, f"{_brief(item)} is valid under each of "
                + ", ".join(f"{{'required': [{key!r}]}}" for key in algorithms))
        extra = [key for key in item if key not in _TENSOR_KEYS and key not in algorithms]
        if extra:
            add(where, f"Additional properties are not allowed ({_unexpected(extra)})")
        if "name" in item:
            name = item["name"]
            if not isinstance(name, str):
                add([*where, "name"], f"{_brief(name)} is not of type 'string'")
            elif not name:
                add([*where, "name"], "'' should be non-empty")
        if "dtype" in item and (not isinstance(item["dtype"], str) or item["dtype"] not in codes):
            add([*where, "dtype"], f"{_brief(item['dtype'])} is not one of {list(codes)!r}")
        shape = item.get("shape", [])
        if not isinstance(shape, list):
            add([*where, "shape"], f"{_brief(shape)} is not of type 'array'")
        else:
            for j, dim in enumerate(shape):
                if not _is_integer(dim):
                    add([*where, "shape", j], f"{_brief(dim)} is not of type 'integer'")
                elif dim < 0:
                    add([*where, "shape", j], f"{dim} is less than the minimum of 0")
        for key in digests:
            digest = item[key]
            if not isinstance(digest, str):
                add([*where, key], f"{_brief(digest)} is not of type 'string'")
            else:
                if not _SHA256_PATTERN.search(digest):
                    add([*where, key], f"{_brief(digest)} does not match "
                        f"{_SHA256_PATTERN.pattern!r}")
                if len(digest) != 64:
                    add([*where, key],
                        f"{_brief(digest)} is too {'long' if len(digest) > 64 else 'short'}")
    return (None if records is None else tuple(records)), problems


_TENSOR_KEYS = ("name", "dtype", "shape")  # and one key of DIGEST_ALGORITHMS
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")  # as the schema writes it (re.search)


def _is_integer(value: Any) -> bool:
    """JSON Schema's "integer": an int (not a bool) or a float with no fraction."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _brief(value: Any, limit: int = 400) -> str:
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, list) and len(value) > 50:
        value = value[:50]
    return repr(value)


def _unexpected(keys: list[str]) -> str:
    listed = ", ".join(_brief(k, 40) for k in keys[:5])
    verb = "was" if len(keys) == 1 else "were"
    return f"{listed} {verb} unexpected"


def writer_versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``$.writer`` for this process: hkstore, Python major.minor, implementation, numpy.

    Args:
        extra: more versions to record, among ``jax``, ``haiku`` and ``cloudpickle``.

    Returns:
        e.g. ``{"hkstore": "0.1.0", "python": "3.11", "python_implementation": "cpython",
        "numpy": "2.4.0", "jax": "0.10.2"}``.

    Raises:
        ManifestError: ``extra`` has another key or a non-string value.
    """
    import numpy  # here, not at the top: reading a manifest (inspect) needs no numpy

    python, implementation = current_runtime()
    out = {
        "hkstore": __version__,
        "python": python,
        "python_implementation": implementation,
        "numpy": numpy.__version__,
    }
    for key, value in (extra or {}).items():
        if key not in WriterInfo.OPTIONAL or type(value) is not str:
            raise ManifestError(
                f"{_WHAT}: $.writer.{key}: cannot record {value!r} (extra "
                f"versions are strings for {', '.join(WriterInfo.OPTIONAL)})"
            )
        out[key] = value
    return out
