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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from hkstore._version import __version__
from hkstore.errors import LimitExceededError, ManifestError, UnsupportedVersionError
from hkstore.store._canonical import canonical_json, json_path, parse_json_strict
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
    expect_int,
    expect_json_object,
    expect_object,
    expect_str,
    field_error,
    optional,
)
from hkstore.store._schema import load_schema, validate

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
        problems = self.problems()
        if problems:
            raise _many(problems)

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
            where = json_path(["tensors", i, "name"])
            if not tensor.name:
                out.append(f"{where}: tensor name is empty")
            elif tensor.name == "__metadata__":
                out.append(f"{where}: '__metadata__' is reserved by safetensors")
            elif tensor.name in first:
                out.append(
                    f"{where}: duplicate tensor name {tensor.name!r} "
                    f"(also {json_path(['tensors', first[tensor.name]])})"
                )
            else:
                first[tensor.name] = i
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
    def from_dict(cls, value: Any) -> Manifest:
        """Build a Manifest from the parsed JSON document, field by field.

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
        return cls(
            writer=WriterInfo.from_dict(d["writer"]),
            data_info=expect_json_object(d["data_info"], ["data_info"]),
            seed=optional(d["seed"], functools.partial(expect_int, minimum=None), ["seed"]),
            tensors=tuple(
                TensorRecord.from_dict(t, ["tensors", i]) for i, t in enumerate(d["tensors"])
            ),
            trainable=tuple(expect_str(n, ["trainable", i]) for i, n in enumerate(d["trainable"])),
            functions=Functions.from_dict(d["functions"]),
            weights=WeightsRecord.from_dict(d["weights"]),
            pickle=optional(d["pickle"], PickleRecord.from_dict, ["pickle"]),
            metadata=expect_json_object(d["metadata"], ["metadata"]),
            rng=RngRecord.from_dict(d["rng"], ["rng"]) if "rng" in d else None,
        )

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
    validate(document, schema=SCHEMA, what=_WHAT)
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
    document = parse_json_strict(data, what=_WHAT, max_bytes=limits.max_manifest_bytes)
    _check_format(document)
    tensors = document.get("tensors")
    if isinstance(tensors, list) and len(tensors) > limits.max_tensors:
        raise LimitExceededError(
            f"{_WHAT}: {len(tensors)} tensors, more than the limit of {limits.max_tensors}"
        )
    expected = canonical_json(document, what=_WHAT)
    raw = bytes(data)
    if expected != raw:
        at = next(
            (i for i, (a, b) in enumerate(zip(expected, raw, strict=False)) if a != b),
            min(len(expected), len(raw)),
        )
        raise ManifestError(
            f"{_WHAT}: not canonical JSON (first difference at byte {at}; expected UTF-8, "
            "sorted keys, no whitespace between tokens, shortest number forms)"
        )
    validate(document, schema=SCHEMA, what=_WHAT)
    return Manifest.from_dict(document)


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
