"""The parts of a v1 manifest: one record class per JSON object in ``schemas/manifest.v1.json``.

Each JSON object has a TypedDict (its exact shape) and a frozen record class with ``from_dict``
(parses field by field; every error names the JSON path at fault) and ``to_dict``. The
:class:`~hkstore.store._manifest.Manifest` itself, its cross-field rules and its encoding live
in ``_manifest``.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NotRequired, TypedDict, TypeVar

from hkstore.errors import ArchiveFormatError, ConfigError, ManifestError
from hkstore.store._canonical import canonical_json, json_path
from hkstore.store._digests import ALGORITHMS as DIGEST_ALGORITHMS
from hkstore.store._functions import FUNCTION_KINDS, FunctionKind
from hkstore.store._members import FUNCTIONS, MANIFEST, WEIGHTS, WEIGHTS_ZSTD
from hkstore.store._schema import load_schema

__all__ = [
    "CONFIG_DOCUMENT",
    "MANIFEST_DOCUMENT",
    "MANIFEST_MEMBER",
    "PICKLE_MEMBER",
    "RNG_IMPLEMENTATIONS",
    "SCHEMA",
    "WEIGHTS_MEMBER",
    "WEIGHTS_MEMBER_ZSTD",
    "Document",
    "FunctionJSON",
    "FunctionSpec",
    "Functions",
    "FunctionsJSON",
    "JsonPath",
    "PickleJSON",
    "PickleRecord",
    "RngJSON",
    "RngRecord",
    "TensorJSON",
    "TensorRecord",
    "WeightsJSON",
    "WeightsRecord",
    "WriterInfo",
    "WriterJSON",
    "dtype_codes",
    "expect_int",
    "expect_json_object",
    "expect_object",
    "expect_str",
    "field_error",
    "optional",
    "split_path",
]

MANIFEST_MEMBER = MANIFEST
WEIGHTS_MEMBER = WEIGHTS
WEIGHTS_MEMBER_ZSTD = WEIGHTS_ZSTD
PICKLE_MEMBER = FUNCTIONS
SCHEMA = "manifest.v1.json"

_WHAT = MANIFEST_MEMBER
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PYTHON = re.compile(r"[0-9]+\.[0-9]+")
_IMPLEMENTATION = re.compile(r"[a-z][a-z0-9_]*")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_REF = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_MAX_REF = 1000



@dataclass(frozen=True)
class Document:
    """Names the JSON document a path points into, and the error its bad fields raise.

    A :data:`JsonPath` may start with one ``Document`` (e.g. :data:`CONFIG_DOCUMENT`); without
    one it points into ``manifest.json``.
    """

    name: str
    error: type[ArchiveFormatError]


MANIFEST_DOCUMENT = Document(MANIFEST, ManifestError)
CONFIG_DOCUMENT = Document("config", ConfigError)

#: A location in a document: an optional :class:`Document`, then keys and indices from the top.
JsonPath = list[Any]
T = TypeVar("T")


# --- the JSON document, as typed dicts ----------------------------------------------------------


class WriterJSON(TypedDict):
    hkstore: str
    python: str
    python_implementation: str
    numpy: str
    jax: NotRequired[str]
    haiku: NotRequired[str]
    cloudpickle: NotRequired[str]


class TensorJSON(TypedDict):
    name: str
    dtype: str
    shape: list[int]
    sha256: NotRequired[str]
    blake3: NotRequired[str]


class FunctionJSON(TypedDict):
    kind: FunctionKind
    ref: NotRequired[str]
    kwargs: NotRequired[dict[str, Any]]


class FunctionsJSON(TypedDict):
    model: FunctionJSON
    loss: FunctionJSON


class WeightsJSON(TypedDict):
    member: str
    size: int
    header_sha256: str
    compression: Literal["zstd"] | None
    sha256: NotRequired[str]
    raw_size: NotRequired[int]


class RngJSON(TypedDict):
    impl: str
    key_data: list[int]


class PickleJSON(TypedDict):
    member: str
    size: int
    sha256: str
    raw_size: int
    python: str
    python_implementation: str
    cloudpickle: str


# --- field parsers: each checks one value and names its JSON path -----------------------------


def split_path(path: JsonPath) -> tuple[Document, list[str | int]]:
    """Return the document ``path`` points into and the path inside it."""
    if path and isinstance(path[0], Document):
        return path[0], list(path[1:])
    return MANIFEST_DOCUMENT, list(path)


def field_error(path: JsonPath, message: str) -> ArchiveFormatError:
    """Return the error for the field at ``path``: ``"manifest.json: $.a.b: <message>"``.

    The class is the document's (:class:`ManifestError` for the manifest, :class:`ConfigError`
    for a config).
    """
    document, inner = split_path(path)
    return document.error(f"{document.name}: {json_path(inner)}: {message}")


def expect_object(
    value: Any, path: JsonPath, keys: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    """Return ``value`` if it is an object with all ``keys``, some ``optional``, no others.

    Raises:
        ManifestError: naming ``path`` and the missing or unexpected fields.
    """
    if not isinstance(value, dict):
        raise field_error(path, f"expected an object, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise field_error(path, f"missing field(s) {', '.join(map(repr, missing))}")
    extra = sorted(set(value) - set(keys) - set(optional))
    if extra:
        raise field_error(path, f"unexpected field(s) {', '.join(map(repr, extra))}")
    return value


def expect_str(
    value: Any, path: JsonPath, pattern: re.Pattern[str] | None = None, what: str = ""
) -> str:
    """Return ``value`` if it is a string (that fully matches ``pattern``, described as ``what``).

    Raises:
        ManifestError: naming ``path``.
    """
    if type(value) is not str:
        raise field_error(path, f"expected a string, got {type(value).__name__}")
    if pattern is not None and not pattern.fullmatch(value):
        raise field_error(path, f"{value[:100]!r} is not {what}")
    return value


def expect_int(value: Any, path: JsonPath, *, minimum: int | None = 0) -> int:
    """Return ``value`` if it is an integer (not a bool) of at least ``minimum``.

    Raises:
        ManifestError: naming ``path``.
    """
    if type(value) is not int:  # bool is refused: true is not 1 here
        raise field_error(path, f"expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise field_error(path, f"{value} is below the minimum {minimum}")
    return value


def expect_json_object(value: Any, path: JsonPath, *, owned: bool = False) -> dict[str, Any]:
    """Return ``value`` if it is an object of JSON values (free-form fields).

    Args:
        value: the field's value.
        path: where it sits, for messages.
        owned: ``value`` comes from the strict parser and is handed over: it is JSON by
            construction and is returned as is. Otherwise it is checked to be JSON and
            deep-copied, so the caller's later changes cannot reach the record.

    Raises:
        ManifestError: naming ``path`` (or the path of the first non-JSON value inside it).
    """
    if not isinstance(value, dict):
        raise field_error(path, f"expected an object, got {type(value).__name__}")
    if owned:
        return value
    document, inner = split_path(path)
    try:
        canonical_json(value, what=document.name, at=inner)  # free JSON, but JSON
    except ManifestError as exc:
        if document.error is ManifestError:
            raise
        raise document.error(str(exc)) from None
    return copy.deepcopy(value)


def _sha(value: Any, path: JsonPath) -> str:
    return expect_str(value, path, _SHA256, "a SHA-256 digest (64 lower-case hex digits)")


def optional(value: Any, parse: Callable[[Any, JsonPath], T], path: JsonPath) -> T | None:
    """Return None for a JSON null, else ``parse(value, path)``."""
    return None if value is None else parse(value, path)


@functools.cache
def dtype_codes() -> tuple[str, ...]:
    """The dtype codes of the schema's enum (kept equal to the dtype table by a test)."""
    # The schema's enum, kept equal to the dtype table by a test: no numpy import here.
    schema = load_schema(SCHEMA)
    return tuple(schema["properties"]["tensors"]["items"]["properties"]["dtype"]["enum"])


# --- the records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterInfo:
    """Versions of the software that wrote an archive (``$.writer``)."""

    hkstore: str
    python: str
    python_implementation: str
    numpy: str
    jax: str | None = None
    haiku: str | None = None
    cloudpickle: str | None = None

    #: The versions recorded only when known.
    OPTIONAL: ClassVar[tuple[str, ...]] = ("jax", "haiku", "cloudpickle")

    @classmethod
    def from_dict(cls, value: Any, path: JsonPath | None = None) -> WriterInfo:
        """Parse ``$.writer``; raises :class:`ManifestError` naming the field at fault."""
        path = ["writer"] if path is None else path
        d = expect_object(
            value, path, ("hkstore", "python", "python_implementation", "numpy"), cls.OPTIONAL
        )
        return cls(
            hkstore=expect_str(d["hkstore"], [*path, "hkstore"]),
            python=expect_str(d["python"], [*path, "python"], _PYTHON, "a Python major.minor"),
            python_implementation=expect_str(
                d["python_implementation"],
                [*path, "python_implementation"],
                _IMPLEMENTATION,
                "a lower-case implementation name",
            ),
            numpy=expect_str(d["numpy"], [*path, "numpy"]),
            **{k: expect_str(d[k], [*path, k]) for k in cls.OPTIONAL if k in d},
        )

    def to_dict(self) -> WriterJSON:
        """Return the JSON object (optional versions only when known)."""
        out = WriterJSON(
            hkstore=self.hkstore,
            python=self.python,
            python_implementation=self.python_implementation,
            numpy=self.numpy,
        )
        for key in self.OPTIONAL:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)  # type: ignore[literal-required]
        return out


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the weights member: name, safetensors dtype code, shape, data digest.

    ``algorithm`` names the digest's hash: the tensor object's key for it (``"sha256"`` or
    ``"blake3"``, from the digest table ``_digests.ALGORITHMS``), so the choice is signed
    with the manifest.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    algorithm: str = "sha256"

    @classmethod
    def _trusted(
        cls, name: str, dtype: str, shape: tuple[int, ...], digest: str, algorithm: str
    ) -> TensorRecord:
        """Build from fields already checked (the manifest's one validation pass): 0.2 us
        against 0.6 us for the frozen dataclass's ``__init__``, measured here."""
        record = object.__new__(cls)
        fields = record.__dict__
        fields["name"] = name
        fields["dtype"] = dtype
        fields["shape"] = shape
        fields["digest"] = digest
        fields["algorithm"] = algorithm
        return record

    @classmethod
    def from_dict(cls, value: Any, path: JsonPath) -> TensorRecord:
        """Parse one ``$.tensors[i]``; raises :class:`ManifestError` naming the field."""
        d = expect_object(value, path, ("name", "dtype", "shape"), DIGEST_ALGORITHMS)
        dtype = expect_str(d["dtype"], [*path, "dtype"])
        if dtype not in dtype_codes():
            raise field_error(
                [*path, "dtype"],
                f"{dtype[:100]!r} is not a supported dtype code "
                f"(expected one of {', '.join(dtype_codes())})",
            )
        shape = d["shape"]
        if not isinstance(shape, list):
            raise field_error([*path, "shape"], f"expected an array, got {type(shape).__name__}")
        found = [key for key in DIGEST_ALGORITHMS if key in d]
        if len(found) != 1:
            raise field_error(
                path,
                f"expected exactly one digest field (one of "
                f"{', '.join(map(repr, DIGEST_ALGORITHMS))}), got "
                + (", ".join(map(repr, found)) if found else "none"),
            )
        algorithm = found[0]
        return cls(
            name=expect_str(d["name"], [*path, "name"]),
            dtype=dtype,
            shape=tuple(expect_int(n, [*path, "shape", i]) for i, n in enumerate(shape)),
            digest=expect_str(
                d[algorithm], [*path, algorithm], _SHA256, "a digest (64 lower-case hex digits)"
            ),
            algorithm=algorithm,
        )

    def to_dict(self) -> TensorJSON:
        """Return the JSON object (the digest under its algorithm's key)."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        out[self.algorithm] = self.digest
        return out  # type: ignore[return-value]


@dataclass(frozen=True)
class FunctionSpec:
    """How one function is stored: by ``reference``, in the ``pickle`` member, or ``none``.

    ``ref`` (``"module:qualname"``) and ``kwargs`` are set only for a reference.
    """

    kind: FunctionKind
    ref: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", copy.deepcopy(dict(self.kwargs)))

    @classmethod
    def _owned(cls, kind: Any, ref: str | None, kwargs: dict[str, Any]) -> FunctionSpec:
        """Build without copying ``kwargs`` (handed over by the strict parser)."""
        spec = object.__new__(cls)
        for name, value in (("kind", kind), ("ref", ref), ("kwargs", kwargs)):
            object.__setattr__(spec, name, value)
        return spec

    @classmethod
    def reference(cls, ref: str, kwargs: Mapping[str, Any] | None = None) -> FunctionSpec:
        """A function imported by the loader as ``ref`` (bound to ``kwargs`` if any)."""
        return cls("reference", ref, dict(kwargs or {}))

    @classmethod
    def pickled(cls) -> FunctionSpec:
        """A function stored in the pickle member."""
        return cls("pickle")

    @classmethod
    def none(cls) -> FunctionSpec:
        """A function the loader must supply."""
        return cls("none")

    @classmethod
    def from_dict(cls, value: Any, path: JsonPath, *, owned: bool = False) -> FunctionSpec:
        """Parse ``$.functions.model`` or ``.loss``; raises :class:`ManifestError`.

        ``owned``: ``value`` comes from the strict parser (see :func:`expect_json_object`).
        """
        if not isinstance(value, dict):
            raise field_error(path, f"expected an object, got {type(value).__name__}")
        kind = value.get("kind")
        if kind not in FUNCTION_KINDS:
            raise field_error(
                [*path, "kind"], f"{kind!r} is not one of {', '.join(map(repr, FUNCTION_KINDS))}"
            )
        if kind != "reference":
            expect_object(value, path, ("kind",))
            return cls._owned(kind, None, {}) if owned else cls(kind)
        d = expect_object(value, path, ("kind", "ref", "kwargs"))
        ref = expect_str(d["ref"], [*path, "ref"], _REF, "a reference 'dotted.module:qual.name'")
        if len(ref) > _MAX_REF:
            raise field_error([*path, "ref"], f"{len(ref)} characters, more than {_MAX_REF}")
        kwargs = expect_json_object(d["kwargs"], [*path, "kwargs"], owned=owned)
        return cls._owned("reference", ref, kwargs) if owned else cls("reference", ref, kwargs)

    def to_dict(self) -> FunctionJSON:
        """Return the JSON object."""
        if self.kind != "reference":
            return FunctionJSON(kind=self.kind)
        return FunctionJSON(
            kind="reference", ref=str(self.ref), kwargs=copy.deepcopy(dict(self.kwargs))
        )


@dataclass(frozen=True)
class Functions:
    """The model (forward) function and the loss function (``$.functions``)."""

    model: FunctionSpec
    loss: FunctionSpec

    @classmethod
    def from_dict(
        cls, value: Any, path: JsonPath | None = None, *, owned: bool = False
    ) -> Functions:
        """Parse ``$.functions``; raises :class:`ManifestError`."""
        path = ["functions"] if path is None else path
        d = expect_object(value, path, ("model", "loss"))
        return cls(
            FunctionSpec.from_dict(d["model"], [*path, "model"], owned=owned),
            FunctionSpec.from_dict(d["loss"], [*path, "loss"], owned=owned),
        )

    def to_dict(self) -> FunctionsJSON:
        """Return the JSON object."""
        return FunctionsJSON(model=self.model.to_dict(), loss=self.loss.to_dict())

    def items(self) -> tuple[tuple[str, FunctionSpec], ...]:
        """``(("model", spec), ("loss", spec))``."""
        return (("model", self.model), ("loss", self.loss))


@dataclass(frozen=True)
class WeightsRecord:
    """The weights member (``$.weights``): name, stored size, header digest, compression.

    ``sha256`` (of the compressed member) and ``raw_size`` (decompressed) only with zstd.
    """

    member: str
    size: int
    header_sha256: str
    compression: Literal["zstd"] | None
    sha256: str | None = None
    raw_size: int | None = None

    @classmethod
    def from_dict(cls, value: Any, path: JsonPath | None = None) -> WeightsRecord:
        """Parse ``$.weights``; raises :class:`ManifestError`."""
        path = ["weights"] if path is None else path
        d = expect_object(
            value, path, ("member", "size", "header_sha256", "compression"), ("sha256", "raw_size")
        )
        member = expect_str(d["member"], [*path, "member"])
        if member not in (WEIGHTS_MEMBER, WEIGHTS_MEMBER_ZSTD):
            raise field_error(
                [*path, "member"],
                f"{member[:100]!r} is not {WEIGHTS_MEMBER!r} or {WEIGHTS_MEMBER_ZSTD!r}",
            )
        compression = d["compression"]
        if compression not in (None, "zstd"):
            raise field_error([*path, "compression"], f"{compression!r} is not null or 'zstd'")
        return cls(
            member=member,
            size=expect_int(d["size"], [*path, "size"]),
            header_sha256=_sha(d["header_sha256"], [*path, "header_sha256"]),
            compression=compression,
            sha256=optional(d.get("sha256"), _sha, [*path, "sha256"]),
            raw_size=optional(d.get("raw_size"), expect_int, [*path, "raw_size"]),
        )

    def to_dict(self) -> WeightsJSON:
        """Return the JSON object (``sha256``/``raw_size`` only when set)."""
        out = WeightsJSON(
            member=self.member,
            size=self.size,
            header_sha256=self.header_sha256,
            compression=self.compression,
        )
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.raw_size is not None:
            out["raw_size"] = self.raw_size
        return out


@dataclass(frozen=True)
class PickleRecord:
    """The ``functions.pkl.zst`` member (``$.pickle``) and the runtime that wrote it."""

    size: int
    sha256: str
    raw_size: int
    python: str
    python_implementation: str
    cloudpickle: str
    member: str = PICKLE_MEMBER

    @classmethod
    def from_dict(cls, value: Any, path: JsonPath | None = None) -> PickleRecord:
        """Parse ``$.pickle`` (not null); raises :class:`ManifestError`."""
        path = ["pickle"] if path is None else path
        d = expect_object(
            value,
            path,
            (
                "member",
                "size",
                "sha256",
                "raw_size",
                "python",
                "python_implementation",
                "cloudpickle",
            ),
        )
        if d["member"] != PICKLE_MEMBER:
            raise field_error([*path, "member"], f"{d['member']!r} is not {PICKLE_MEMBER!r}")
        return cls(
            size=expect_int(d["size"], [*path, "size"]),
            sha256=_sha(d["sha256"], [*path, "sha256"]),
            raw_size=expect_int(d["raw_size"], [*path, "raw_size"]),
            python=expect_str(d["python"], [*path, "python"], _PYTHON, "a Python major.minor"),
            python_implementation=expect_str(
                d["python_implementation"],
                [*path, "python_implementation"],
                _IMPLEMENTATION,
                "a lower-case implementation name",
            ),
            cloudpickle=expect_str(d["cloudpickle"], [*path, "cloudpickle"]),
        )

    def to_dict(self) -> PickleJSON:
        """Return the JSON object."""
        return PickleJSON(
            member=self.member,
            size=self.size,
            sha256=self.sha256,
            raw_size=self.raw_size,
            python=self.python,
            python_implementation=self.python_implementation,
            cloudpickle=self.cloudpickle,
        )


#: PRNG implementations a model's random state may use, and the number of 32-bit words of
#: their key data (jax's names: ``jax.random.key_impl``).
RNG_IMPLEMENTATIONS: dict[str, int] = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}


@dataclass(frozen=True)
class RngRecord:
    """A model's random state (``$.rng``): its PRNG implementation and raw key data.

    Attributes:
        impl: one of :data:`RNG_IMPLEMENTATIONS` (``"threefry2x32"``, jax's default).
        key_data: the key's 32-bit words, as ``jax.random.key_data`` gives them.

    Example:
        >>> RngRecord.from_dict({"impl": "threefry2x32", "key_data": [0, 42]}, ["rng"])
        RngRecord(impl='threefry2x32', key_data=(0, 42))
    """

    impl: str
    key_data: tuple[int, ...]

    @classmethod
    def from_dict(cls, value: Any, path: JsonPath) -> RngRecord:
        """Parse ``$.rng`` (not null); raises the document's error naming the field."""
        d = expect_object(value, path, ("impl", "key_data"))
        impl = expect_str(d["impl"], [*path, "impl"])
        words = RNG_IMPLEMENTATIONS.get(impl)
        if words is None:
            raise field_error(
                [*path, "impl"],
                f"{impl[:40]!r} is not one of {', '.join(map(repr, RNG_IMPLEMENTATIONS))}",
            )
        data = d["key_data"]
        if not isinstance(data, list) or len(data) != words:
            raise field_error(
                [*path, "key_data"], f"expected an array of {words} integers for {impl!r}"
            )
        key = tuple(expect_int(n, [*path, "key_data", i]) for i, n in enumerate(data))
        for i, n in enumerate(key):
            if n >= 1 << 32:
                raise field_error([*path, "key_data", i], f"{n} is not a 32-bit unsigned word")
        return cls(impl=impl, key_data=key)

    def to_dict(self) -> RngJSON:
        """Return the JSON object."""
        return RngJSON(impl=self.impl, key_data=list(self.key_data))
