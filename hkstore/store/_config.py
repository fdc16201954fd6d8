"""The config document (``hkstore-config`` v1): a model without its weights, as plain JSON.

``HaikuModel.get_config()`` returns one and ``HaikuModel.from_config()`` reads one; this
module owns the document itself, with no jax: :func:`build_config` writes it (and signs it),
:func:`parse_config` checks every field of an untrusted one, all errors naming the config
(:class:`~hkstore.errors.ConfigError`), and :class:`ConfigDocument` verifies its signature and
resolves its functions through the one trust gate that archives use. The schema is
``schemas/config.v1.json``; the spec is section 10 of ``docs/FORMAT.md``.

Example:
    >>> doc = parse_config(build_config(
    ...     seed=3, data_info=None, trainable=None,
    ...     functions={"model": {"kind": "none"}, "loss": {"kind": "none"}}))
    >>> doc.seed, doc.functions.model.kind
    (3, 'none')
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hkstore.errors import (
    ArchiveFormatError,
    ConfigError,
    DigestMismatchError,
    LimitExceededError,
    UnsupportedVersionError,
)
from hkstore.store._canonical import canonical_json
from hkstore.store._functions import ROLES
from hkstore.store._gate import resolve_functions
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._pickle_scan import pickle_globals
from hkstore.store._records import (
    CONFIG_DOCUMENT,
    Functions,
    JsonPath,
    PickleRecord,
    RngRecord,
    expect_int,
    expect_json_object,
    expect_object,
    expect_str,
    field_error,
)
from hkstore.store._schema import load_schema
from hkstore.store._signing import ALGORITHMS, DocumentSignature, Signer
from hkstore.store._signing import verify_with as _verify_with
from hkstore.store._trust import Trust
from hkstore.store._zstd import decompress_bounded

__all__ = [
    "CONFIG_FORMAT",
    "CONFIG_SIGNATURE_CONTEXT",
    "CONFIG_VERSION",
    "ConfigDocument",
    "ConfigPickle",
    "build_config",
    "config_schema",
    "config_with_binary_blob",
    "config_with_text_blob",
    "parse_config",
]

CONFIG_FORMAT = "hkstore-config"
CONFIG_VERSION = 1
#: Prefix of the signed payload (domain separation from manifests).
CONFIG_SIGNATURE_CONTEXT = b"hkstore-config-signature-v1\n"
SCHEMA = "config.v1.json"
_REQUIRED = ("format", "version", "seed", "data_info", "trainable", "functions", "pickle",
             "signature")
_OPTIONAL = ("rng",)
_PICKLE_FIELDS = ("blob", "sha256", "size", "raw_size", "python", "python_implementation",
                  "cloudpickle")
_WHAT = "config"
_KEY_ID = re.compile(r"(ed25519|hmac-sha256):[0-9a-f]{32}")


def _at(*parts: str | int) -> JsonPath:
    return [CONFIG_DOCUMENT, *parts]


@dataclass(frozen=True)
class ConfigPickle:
    """The pickled functions of a config: the zstd frame (base64 in the document) and its record.

    Attributes:
        blob: the base64 text as found in the document (decoded only by :meth:`frame`).
        record: sizes, digest and the writer's runtime, as the manifest's ``$.pickle`` has them.
    """

    blob: str
    record: PickleRecord

    def check(self, limits: Limits = DEFAULT_LIMITS) -> list[str]:
        """Check the blob without running it; return the globals it would import.

        Its base64, size and SHA-256 (:meth:`frame`), its zstd frame and a decompression
        bounded by ``raw_size`` and ``limits.max_functions_bytes``, then a static walk of its
        opcodes (at most ``limits.max_pickle_ops``): bytes that are not one well-formed pickle
        are refused.

        Raises:
            ConfigError: bad base64, or not a well-formed pickle in a valid frame.
            DigestMismatchError: size or digest differs from the record.
            LimitExceededError: over ``max_functions_bytes`` or ``max_pickle_ops``.
        """
        frame = self.frame()
        try:
            raw = decompress_bounded(
                frame,
                declared_size=self.record.raw_size,
                cap=limits.max_functions_bytes,
                what=f"{_WHAT}: $.pickle.blob",
                max_window=limits.max_zstd_window_bytes,
            )
            return pickle_globals(raw, max_ops=limits.max_pickle_ops)
        except LimitExceededError:
            raise
        except ArchiveFormatError as exc:  # the config's own error class names the document
            message = str(exc) if str(exc).startswith(_WHAT) else f"{_WHAT}: $.pickle.blob: {exc}"
            raise ConfigError(message) from None

    def frame(self) -> bytes:
        """Decode the blob strictly and check its size and SHA-256 against the record.

        Raises:
            ConfigError: the blob is not standard padded base64.
            DigestMismatchError: its size or digest differs from the record.
        """
        try:
            frame = base64.b64decode(self.blob, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{_WHAT}: $.pickle.blob is not valid base64 ({exc})") from None
        if len(frame) != self.record.size:
            raise DigestMismatchError(
                f"{_WHAT} pickle: {len(frame)} bytes, $.pickle.size says {self.record.size}"
            )
        actual = hashlib.sha256(frame).hexdigest()
        if actual != self.record.sha256:
            raise DigestMismatchError(
                f"{_WHAT} pickle: sha256 {actual}, $.pickle.sha256 says {self.record.sha256}"
            )
        return frame


@dataclass(frozen=True)
class ConfigDocument:
    """A config that passed :func:`parse_config`: every field checked, nothing resolved yet.

    Attributes:
        seed: the model's seed, in ``[0, 2**32)``.
        data_info: the model's data info, or ``None`` (the model was not initialized).
        trainable: the trainable names in model order, or ``None`` (not initialized).
        functions: how to get the model and loss functions.
        pickle: the pickled functions, or ``None``.
        signature: the signature, or ``None``.
        rng: the model's random state, or ``None`` (configs written before hkstore 0.2.0).
        payload: the exact bytes a signature covers (context prefix included).
    """

    seed: int
    data_info: dict[str, Any] | None
    trainable: tuple[str, ...] | None
    functions: Functions
    pickle: ConfigPickle | None
    signature: DocumentSignature | None
    rng: RngRecord | None
    payload: bytes

    def check_signature(self, trust: Trust) -> str | None:
        """Verify the signature with ``trust``'s keys; return the verifying key id or ``None``.

        ``None``: unsigned, or signed while the policy lists no keys and requires no signature
        (the signature was then checked for form by :func:`parse_config`, not verified).

        Raises:
            SignatureError: a signature is required but absent, or it does not verify.
            UntrustedKeyError: the policy has keys and none of them made the signature.
        """
        if not trust.wants_signature_checked(self.signature is not None, what=_WHAT):
            return None
        assert self.signature is not None
        return _verify_with(
            trust.verifiers,
            key_id=self.signature.key_id,
            algorithm=self.signature.algorithm,
            payload=self.payload,
            signature=self.signature.signature,
            where=_WHAT,
            signed="the config",
            content="config",
        )

    def resolve_functions(
        self, trust: Trust, *, roles: Sequence[str] = ROLES, limits: Limits = DEFAULT_LIMITS
    ) -> dict[str, Callable[..., Any] | None]:
        """Return ``{role: callable or None}`` for ``roles``, as far as ``trust`` allows.

        Goes through the trust gate archives use: references only from allowed modules;
        the pickle only with ``allow_pickle`` and a signature by a trusted key (or
        ``allow_unsigned``), after its size, digest and the writer's Python were checked.

        Raises:
            RefusedCodeError, RuntimeMismatchError, SignatureError, UntrustedKeyError,
            DigestMismatchError, ConfigError.
        """
        return resolve_functions(
            {role: dict(spec.to_dict()) for role, spec in self.functions.items()},
            trust,
            roles=roles,
            verified_key_id=lambda: self.check_signature(trust),
            pickle_record=None if self.pickle is None else self.pickle.record.to_dict(),
            read_pickle=lambda: self._frame(),
            max_pickle_bytes=limits.max_functions_bytes,
            max_window=limits.max_zstd_window_bytes,
            where=_WHAT,
        )

    def _frame(self) -> bytes:
        assert self.pickle is not None  # the gate reads the pickle only when one is recorded
        return self.pickle.frame()


def build_config(
    *,
    seed: int,
    data_info: Mapping[str, Any] | None,
    trainable: Sequence[str] | None,
    functions: Mapping[str, Mapping[str, Any]],
    pickle_blob: bytes | None = None,
    pickle_raw_size: int = 0,
    pickle_runtime: Mapping[str, str] | None = None,
    rng: Mapping[str, Any] | None = None,
    signer: Signer | None = None,
) -> dict[str, Any]:
    """Write a config document (and sign it when ``signer`` is given).

    Args:
        seed: the model's seed.
        data_info: JSON-safe data info, or ``None`` for a model not initialized.
        trainable: trainable names in model order, or ``None``.
        functions: ``{"model": spec, "loss": spec}`` (see ``describe_functions``).
        pickle_blob: the zstd cloudpickle frame when a function is pickled.
        pickle_raw_size: its decompressed size.
        pickle_runtime: ``{"python", "python_implementation", "cloudpickle"}`` of the writer
            (required with ``pickle_blob``).
        rng: the model's random state ``{"impl", "key_data"}``, or ``None`` to leave it out.
        signer: an Ed25519 or HMAC key to sign with.

    Returns:
        The document: a ``dict`` of JSON values, valid against ``schemas/config.v1.json``.

    Raises:
        ConfigError: the parts do not make a valid config (checked by :func:`parse_config`).
    """
    config: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "seed": seed,
        "data_info": None if data_info is None else dict(data_info),
        "trainable": None if trainable is None else list(trainable),
        "functions": {role: dict(spec) for role, spec in functions.items()},
        "pickle": None,
        "signature": None,
    }
    if rng is not None:
        config["rng"] = dict(rng)
    if pickle_blob is not None:
        if pickle_runtime is None:
            raise ConfigError(f"{_WHAT}: a pickled config needs the writer's runtime")
        config["pickle"] = {
            "blob": base64.b64encode(pickle_blob).decode("ascii"),
            "sha256": hashlib.sha256(pickle_blob).hexdigest(),
            "size": len(pickle_blob),
            "raw_size": pickle_raw_size,
            **{key: pickle_runtime[key] for key in ("python", "python_implementation",
                                                    "cloudpickle")},
        }
    if signer is not None:
        payload = CONFIG_SIGNATURE_CONTEXT + canonical_json(config, what=_WHAT)
        config["signature"] = {
            "algorithm": signer.algorithm,
            "key_id": signer.key_id,
            "signature": base64.b64encode(signer.sign(payload)).decode("ascii"),
        }
    parse_config(config)  # what we write, we can read
    return config


def parse_config(config: Any, *, limits: Limits = DEFAULT_LIMITS) -> ConfigDocument:
    """Check every field of an untrusted config document; resolve nothing.

    Order: it is an object; ``format`` and ``version`` (a newer version is refused as such,
    before anything else is read); the member set; then each field, the pickle's size bound
    before its base64 is decoded, then the pickle blob itself (:meth:`ConfigPickle.check`:
    digest, zstd frame, bounded decompression, a well-formed opcode stream; never
    unpickled), as an archive's pickle member is checked by every load. A malformed
    signature is refused here, keys or not.

    Args:
        config: the document (as ``json.loads`` or a message decoder gives it).
        limits: ``max_functions_bytes`` bounds the pickle blob.

    Returns:
        The checked :class:`ConfigDocument`.

    Raises:
        ConfigError: naming the field at fault (``config: $.seed: ...``).
        UnsupportedVersionError: ``version`` is not 1.
        LimitExceededError: the pickle blob is larger than the limits allow.
        DigestMismatchError: the pickle blob's size or digest differs from its record.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{_WHAT}: expected a JSON object, got {type(config).__name__}")
    cfg = dict(config)
    if cfg.get("format") != CONFIG_FORMAT:
        raise ConfigError(
            f"{_WHAT}: $.format is {str(cfg.get('format'))[:60]!r}; expected {CONFIG_FORMAT!r} "
            "(an old declearn config? convert it with `hkstore convert-declearn`)"
        )
    version = cfg.get("version")
    if type(version) is not int:
        raise ConfigError(f"{_WHAT}: $.version is {str(version)[:40]!r}; expected an integer")
    if version != CONFIG_VERSION:
        raise UnsupportedVersionError(
            f"{_WHAT}: version {version} is not supported (this reader implements "
            f"{CONFIG_VERSION})"
        )
    d = expect_object(cfg, _at(), _REQUIRED, _OPTIONAL)
    seed = expect_int(d["seed"], _at("seed"))
    if seed >= 2**32:
        raise field_error(_at("seed"), f"{seed} is not below 2**32 (seeds are 32-bit)")
    data_info = None
    if d["data_info"] is not None:
        data_info = expect_json_object(d["data_info"], _at("data_info"))
    trainable = None
    if d["trainable"] is not None:
        if not isinstance(d["trainable"], list):
            raise field_error(_at("trainable"), "expected an array of names or null")
        trainable = tuple(expect_str(n, _at("trainable", i)) for i, n in enumerate(d["trainable"]))
        if len(set(trainable)) != len(trainable):
            raise field_error(_at("trainable"), "a name is listed twice")
    functions = Functions.from_dict(d["functions"], _at("functions"))
    pickle = None if d["pickle"] is None else _parse_pickle(d["pickle"], limits)
    if pickle is not None:
        pickle.check(limits)  # whether or not anything will be unpickled: one verdict
    pickled = [role for role, spec in functions.items() if spec.kind == "pickle"]
    if pickled and pickle is None:
        raise field_error(_at("pickle"), f"is null but {' and '.join(pickled)} is pickled")
    if pickle is not None and not pickled:
        raise field_error(_at("pickle"), "is set but no function has kind 'pickle'")
    signature = None if d["signature"] is None else _parse_signature(d["signature"])
    rng = RngRecord.from_dict(d["rng"], _at("rng")) if "rng" in d else None
    unsigned = {**cfg, "signature": None}
    payload = CONFIG_SIGNATURE_CONTEXT + canonical_json(unsigned, what=_WHAT)
    return ConfigDocument(
        seed=seed,
        data_info=data_info,
        trainable=trainable,
        functions=functions,
        pickle=pickle,
        signature=signature,
        rng=rng,
        payload=payload,
    )


def _parse_pickle(value: Any, limits: Limits) -> ConfigPickle:
    path = _at("pickle")
    d = expect_object(value, path, _PICKLE_FIELDS)
    blob = expect_str(d["blob"], [*path, "blob"])
    # the frame is never larger than its content plus zstd's framing (bounded by the cap)
    most = 4 * ((limits.max_functions_bytes + (1 << 16)) // 3 + 1)
    if len(blob) > most:
        raise LimitExceededError(
            f"{_WHAT}: $.pickle.blob is {len(blob)} characters, more than "
            f"max_functions_bytes={limits.max_functions_bytes} allows"
        )
    record = PickleRecord.from_dict(
        {**{k: v for k, v in d.items() if k != "blob"}, "member": PickleRecord.member},
        path,
    )
    return ConfigPickle(blob=blob, record=record)


def _parse_signature(value: Any) -> DocumentSignature:
    path = _at("signature")
    d = expect_object(value, path, ("algorithm", "key_id", "signature"))
    algorithm = expect_str(d["algorithm"], [*path, "algorithm"])
    if algorithm not in ALGORITHMS:
        raise field_error(
            [*path, "algorithm"],
            f"{algorithm[:40]!r} is not one of {', '.join(map(repr, ALGORITHMS))}",
        )
    key_id = expect_str(d["key_id"], [*path, "key_id"], _KEY_ID, "a key id 'algorithm:32 hex'")
    text = expect_str(d["signature"], [*path, "signature"])
    try:
        raw = base64.b64decode(text[:256], validate=True)
    except (binascii.Error, ValueError):
        raise field_error([*path, "signature"], "is not standard padded base64") from None
    if len(text) > 256 or len(raw) != ALGORITHMS[algorithm]:
        raise field_error(
            [*path, "signature"],
            f"an {algorithm} signature is {ALGORITHMS[algorithm]} bytes",
        )
    return DocumentSignature(algorithm=algorithm, key_id=key_id, signature=raw)


def config_schema() -> dict[str, Any]:
    """Return (a fresh copy of) the config's JSON Schema, ``schemas/config.v1.json``."""
    return load_schema(SCHEMA)


def config_with_binary_blob(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` whose pickle blob is raw bytes instead of base64 text.

    This is the ``allow_bin=True`` form declearn's binary (msgpack) transport expects; a
    config without a pickle is returned as a plain copy. The signature, computed over the
    text form, still verifies after :func:`config_with_text_blob`.

    Example:
        >>> cfg = {"pickle": {"blob": "AAE="}}
        >>> config_with_binary_blob(cfg)["pickle"]["blob"]
        b'\\x00\\x01'
    """
    out = dict(config)
    record = out.get("pickle")
    if isinstance(record, Mapping) and isinstance(record.get("blob"), str):
        try:
            blob = base64.b64decode(record["blob"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{_WHAT}: $.pickle.blob is not valid base64 ({exc})") from None
        out["pickle"] = {**record, "blob": blob}
    return out


def config_with_text_blob(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` whose pickle blob is base64 text (undo the binary form).

    A blob that is already text is left as it is (:func:`parse_config` checks it).

    Example:
        >>> config_with_text_blob({"pickle": {"blob": b"\\x00\\x01"}})["pickle"]["blob"]
        'AAE='
    """
    out = dict(config)
    record = out.get("pickle")
    if isinstance(record, Mapping):
        blob = record.get("blob")
        if isinstance(blob, bytes | bytearray | memoryview):
            out["pickle"] = {**record, "blob": base64.b64encode(blob).decode("ascii")}
    return out
