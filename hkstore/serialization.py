"""Saving and loading HaikuModels: archives (``save``/``load``/``dumps``/``loads``) and configs.

This module bridges the wrapper (``hkstore.model``, jax) and the format (``hkstore.store``,
no jax). Each direction reads like the format's headings:

save: describe the functions -> stream the weights -> manifest -> signature -> atomic rename.
load: open (container, manifest) -> signature -> weights with digests -> functions through the
trust gate (only for those the caller did not pass) -> one all-or-nothing restore.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hkstore.errors import (
    ArchiveFormatError,
    DigestMismatchError,
    HkstoreError,
    ManifestError,
    NotInitializedError,
    SignatureError,
    UnsupportedVersionError,
)
from hkstore.store._archive import ArchiveContent, open_archive, write_archive
from hkstore.store._atomic import atomic_write
from hkstore.store._canonical import canonical_json
from hkstore.store._dtypes import code_for_dtype
from hkstore.store._functions import function_reference, pickle_functions, pickle_runtime
from hkstore.store._gate import ROLES, resolve_functions
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._manifest import Manifest, writer_versions
from hkstore.store._records import PickleRecord
from hkstore.store._signing import Signer, verify_with
from hkstore.store._trust import Trust
from hkstore.store._weights import TensorSpec

if TYPE_CHECKING:
    from hkstore.model import HaikuModel

__all__ = ["dumps", "load", "loads", "model_from_config", "model_to_config", "save"]

FunctionsMode = Literal["reference", "pickle", "none"]
Source = str | os.PathLike[str] | bytes | bytearray | memoryview


# --- save ---------------------------------------------------------------------------------


def save(
    model: HaikuModel,
    path: str | os.PathLike[str],
    *,
    functions: FunctionsMode = "reference",
    signer: Signer | None = None,
    compression: Literal["zstd"] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """Save an initialized model to ``path`` atomically (temp file, fsync, rename).

    Args:
        model: an initialized :class:`hkstore.HaikuModel`.
        path: the archive to write (conventionally ``*.hkz``); replaced atomically.
        functions: how the model and loss functions travel: ``"reference"`` (importable
            ``module:qualname``, the default), ``"pickle"`` (cloudpickle by value, opt-in;
            sign it), or ``"none"`` (the loader supplies them).
        signer: an :class:`hkstore.Ed25519Signer` or :class:`hkstore.HmacKey` to sign with.
        compression: ``None`` (memory-mappable weights) or ``"zstd"``.
        metadata: free JSON-safe user metadata (round number, metrics...).

    Returns:
        The manifest written.

    Raises:
        NotInitializedError: the model has no weights yet.
        NotImportableError: ``functions="reference"`` and a function is a lambda, closure or
            defined in ``__main__`` (use ``functions="pickle"``).
        UnsupportedDtypeError: a weight's dtype cannot be stored exactly.
        ManifestError: ``metadata`` or ``data_info`` is not JSON-safe.

    Example:
        >>> hkstore.save(model, "round-3.hkz", metadata={"round": 3})  # doctest: +SKIP
    """
    content = _content(model, functions, metadata)
    with atomic_write(path) as handle:
        return write_archive(handle, content, signer=signer, compression=compression)


def dumps(
    model: HaikuModel,
    *,
    functions: FunctionsMode = "reference",
    signer: Signer | None = None,
    compression: Literal["zstd"] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Return the archive bytes of ``model`` (for messages); arguments as :func:`save`."""
    content = _content(model, functions, metadata)
    buffer = io.BytesIO()
    write_archive(buffer, content, signer=signer, compression=compression)
    return buffer.getvalue()


def _content(
    model: HaikuModel, functions: FunctionsMode, metadata: Mapping[str, Any] | None
) -> ArchiveContent:
    if not model.get_weight_names():
        raise NotInitializedError("cannot save a model that is not initialized")
    specs = [
        TensorSpec(name=name, dtype=code_for_dtype(dtype, where=f"weight {name!r}"),
                   shape=tuple(shape))
        for name, dtype, shape in model._weight_specs()
    ]
    specs_json, blob, raw_size = _describe_functions(model, functions)
    writer = _writer_versions(pickled=blob is not None)
    data_info = json_safe(model.data_info, where="data_info")
    meta = json_safe(dict(metadata or {}), where="metadata")
    return ArchiveContent(
        specs=specs,
        fetch=_ordered_fetch(model._host_weights()),
        trainable=model.get_weight_names(trainable=True),
        data_info=data_info,
        seed=int(model._seed),
        functions=specs_json,
        pickle_blob=blob,
        pickle_raw_size=raw_size,
        metadata=meta,
        writer=writer,
    )


def _ordered_fetch(items: Iterator[tuple[str, np.ndarray]]) -> Callable[[str], np.ndarray]:
    """Adapt the model's host-weights iterator to the codec's ``fetch(name)`` calls."""

    def fetch(name: str) -> np.ndarray:
        got, array = next(items)
        if got != name:  # pragma: no cover - both sides follow the model order
            raise HkstoreError(f"weights out of order: expected {name!r}, got {got!r}")
        return array

    return fetch


def _describe_functions(
    model: HaikuModel, mode: FunctionsMode
) -> tuple[dict[str, dict[str, Any]], bytes | None, int]:
    fns = {"model": model._model_fn, "loss": model._loss_fn}
    if mode == "reference":
        return {role: function_reference(fn) for role, fn in fns.items()}, None, 0
    if mode == "pickle":
        blob, raw_size = pickle_functions(fns)
        return {role: {"kind": "pickle"} for role in fns}, blob, raw_size
    if mode == "none":
        return {role: {"kind": "none"} for role in fns}, None, 0
    raise ValueError(f"functions: expected 'reference', 'pickle' or 'none', got {mode!r}")


def _writer_versions(*, pickled: bool) -> dict[str, str]:
    import haiku
    import jax

    extra = {"jax": jax.__version__, "haiku": haiku.__version__}
    if pickled:
        extra["cloudpickle"] = pickle_runtime()["cloudpickle"]
    return writer_versions(extra)


def json_safe(value: Any, *, where: str) -> Any:
    """Return ``value`` as plain JSON types (tuples and numpy scalars/arrays become lists).

    Raises:
        ManifestError: something that has no exact JSON form (named by its path).
    """
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestError(f"{where}: key {key!r} is not a string")
            out[key] = json_safe(item, where=f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(item, where=f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [json_safe(item, where=f"{where}[]") for item in sorted(value, key=repr)]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), where=where)
    if isinstance(value, np.generic):
        return json_safe(value.item(), where=where)
    if isinstance(value, np.dtype):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        canonical_json(value)  # refuses NaN/Inf
        return value
    raise ManifestError(f"{where}: {type(value).__name__} is not JSON-safe")


# --- load ---------------------------------------------------------------------------------


def load(
    source: Source,
    *,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    trust: Trust | None = None,
    verify: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> HaikuModel:
    """Load a model from an archive path or its bytes, on the loader's device policy.

    Weights, trainable mask, data info and seed come from the archive. The functions come
    from the caller (``model=``, ``loss=``; nothing in the archive is imported or unpickled)
    or, for those not given, from the archive through ``trust`` (see :class:`hkstore.Trust`).

    Args:
        source: a path or archive bytes.
        model: the model function (``hk.transform``-able); overrides the archive's.
        loss: the loss function ``loss(y_pred, y_true)``; overrides the archive's.
        trust: what the archive may make this process import or unpickle, and which keys
            verify its signature. Default ``Trust()``: nothing.
        verify: check every tensor's SHA-256 (default). ``False`` skips only the tensor
            digests (structure, header and signature are still checked): for archives you
            wrote yourself.
        limits: size and count limits for untrusted input.

    Returns:
        A new, initialized :class:`hkstore.HaikuModel`.

    Raises:
        ArchiveFormatError (and subclasses): malformed, truncated or oversized archive.
        DigestMismatchError: a tensor or member differs from its digest.
        SignatureError, UntrustedKeyError: the signature is missing, bad or untrusted.
        RefusedCodeError: the archive's functions are needed but the policy refuses them.
        WeightsMismatchError: the weights do not fit the model function (all mismatches).

    Example:
        >>> m = hkstore.load("round-3.hkz", model=forward_fn, loss=loss_fn)  # doctest: +SKIP
    """
    from hkstore.model import HaikuModel

    trust = trust or Trust()
    with open_archive(source, limits=limits) as archive:
        archive.check_signature(trust)
        weights = archive.read_weights(verify=verify)
        given = {"model": model, "loss": loss}
        missing = [role for role in ROLES if given[role] is None]
        if missing:
            given.update(archive.functions(trust, roles=missing))
        manifest = archive.manifest
    model_fn, loss_fn = _require_functions(given, where="archive")
    return HaikuModel._restore(
        model_fn,
        loss_fn,
        seed=manifest.seed,
        data_info=manifest.data_info,
        weights=weights,
        trainable=manifest.trainable,
    )


def loads(
    data: bytes | bytearray | memoryview,
    *,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    trust: Trust | None = None,
    verify: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> HaikuModel:
    """Load a model from archive bytes (what :func:`dumps` returns); see :func:`load`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"loads() takes bytes, got {type(data).__name__}")
    return load(data, model=model, loss=loss, trust=trust, verify=verify, limits=limits)


def _require_functions(
    given: Mapping[str, Callable[..., Any] | None], *, where: str
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    model_fn, loss_fn = given["model"], given["loss"]
    for role, fn in (("model", model_fn), ("loss", loss_fn)):
        if fn is None:
            raise ArchiveFormatError(
                f"the {where} stores no {role} function (kind 'none'); pass {role}= yourself"
            )
    assert model_fn is not None and loss_fn is not None
    return model_fn, loss_fn


# --- configs ------------------------------------------------------------------------------

CONFIG_FORMAT = "hkstore-config"
CONFIG_VERSION = 1
CONFIG_SIGNATURE_CONTEXT = b"hkstore-config-signature-v1\n"


def model_to_config(
    model: HaikuModel,
    *,
    functions: FunctionsMode = "reference",
    signer: Signer | None = None,
) -> dict[str, Any]:
    """Return the model's JSON-safe config: functions, seed, data info and trainable names.

    No weights (as in declearn); see :func:`save` for those. Pickled functions travel only
    when ``functions="pickle"``, base64-encoded, with their digest and writer's Python; sign
    the config (``signer``) so a receiver can accept them.

    Raises:
        NotImportableError: ``functions="reference"`` and a function is not importable.
    """
    specs, blob, raw_size = _describe_functions(model, functions)
    initialized = bool(model.get_weight_names())
    config: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "seed": int(model._seed),
        "data_info": json_safe(model.data_info, where="data_info") if initialized else None,
        "trainable": model.get_weight_names(trainable=True) if initialized else None,
        "functions": specs,
        "pickle": None,
        "signature": None,
    }
    if blob is not None:
        writer = _writer_versions(pickled=True)
        config["pickle"] = {
            "blob": base64.b64encode(blob).decode("ascii"),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "size": len(blob),
            "raw_size": raw_size,
            "python": writer["python"],
            "python_implementation": writer["python_implementation"],
            "cloudpickle": writer["cloudpickle"],
        }
    if signer is not None:
        payload = CONFIG_SIGNATURE_CONTEXT + canonical_json(config)
        config["signature"] = {
            "algorithm": signer.algorithm,
            "key_id": signer.key_id,
            "signature": base64.b64encode(signer.sign(payload)).decode("ascii"),
        }
    return config


def model_from_config(
    config: Mapping[str, Any],
    *,
    trust: Trust | None = None,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
) -> HaikuModel:
    """Rebuild a model from :func:`model_to_config` output, through the same trust gate.

    Functions the caller passes are used as given; the others are resolved from the config
    only as ``trust`` allows. When the config has data info, the model is initialized (same
    seed, so the same initial weights) and its trainable mask restored.

    Raises:
        ManifestError: the config is malformed.
        RefusedCodeError, SignatureError, UntrustedKeyError, DigestMismatchError,
        RuntimeMismatchError: as for :func:`load`.
    """
    from hkstore.model import HaikuModel

    trust = trust or Trust()
    cfg = _check_config(config)
    _config_signature(cfg, trust)  # always: a bad or untrusted signature fails even if unused
    given = {"model": model, "loss": loss}
    missing = [role for role in ROLES if given[role] is None]
    if missing:
        given.update(
            resolve_functions(
                cfg["functions"],
                trust,
                roles=missing,
                verified_key_id=lambda: _config_signature(cfg, trust),
                pickle_record=cfg["pickle"],
                read_pickle=lambda: _config_blob(cfg),
                max_pickle_bytes=DEFAULT_LIMITS.max_functions_bytes,
                where="config",
            )
        )
    model_fn, loss_fn = _require_functions(given, where="config")
    new = HaikuModel(model_fn, loss_fn, seed=cfg["seed"])
    if cfg["data_info"] is not None:
        new.initialize(cfg["data_info"])
        if cfg["trainable"] is not None:
            new.set_trainable_weights(list(cfg["trainable"]))
    return new


_CONFIG_KEYS = {"format", "version", "seed", "data_info", "trainable", "functions", "pickle",
                "signature"}


def _check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise ManifestError(f"config: expected a dict, got {type(config).__name__}")
    cfg = dict(config)
    if cfg.get("format") != CONFIG_FORMAT:
        raise ManifestError(
            f"config: 'format' is {cfg.get('format')!r}, expected {CONFIG_FORMAT!r} "
            "(an old declearn config? convert it with `hkstore convert-declearn`)"
        )
    version = cfg.get("version")
    if type(version) is not int:
        raise ManifestError(f"config: 'version' must be an integer, got {version!r}")
    if version != CONFIG_VERSION:
        raise UnsupportedVersionError(
            f"config: version {version} is not supported (this reader implements "
            f"{CONFIG_VERSION})"
        )
    keys = set(cfg)
    if keys != _CONFIG_KEYS:
        raise ManifestError(
            f"config: missing keys {sorted(_CONFIG_KEYS - keys)}, "
            f"unexpected keys {sorted(keys - _CONFIG_KEYS)}"
        )
    functions = cfg["functions"]
    if not isinstance(functions, Mapping) or set(functions) != set(ROLES):
        raise ManifestError("config: 'functions' must map exactly 'model' and 'loss'")
    for role, spec in functions.items():
        if not isinstance(spec, Mapping) or spec.get("kind") not in ("reference", "pickle",
                                                                       "none"):
            raise ManifestError(f"config: functions.{role} has no valid 'kind'")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise ManifestError("config: 'seed' must be an integer")
    if cfg["pickle"] is not None:
        record = cfg["pickle"]
        if not isinstance(record, Mapping) or not isinstance(record.get("blob"), str):
            raise ManifestError("config: 'pickle' must be null or an object with a 'blob'")
        fields = {k: v for k, v in record.items() if k != "blob"}
        PickleRecord.from_dict({**fields, "member": PickleRecord.member}, ["pickle"])
    return cfg


def _config_signature(cfg: Mapping[str, Any], trust: Trust) -> str | None:
    signature = cfg["signature"]
    if signature is None:
        if trust.require_signature:
            raise SignatureError("config is unsigned, but the trust policy requires a signature")
        return None
    if not trust.verifiers:
        if trust.require_signature:
            raise SignatureError("the trust policy requires a signature but lists no keys")
        return None
    try:
        key_id, algorithm = signature["key_id"], signature["algorithm"]
        raw = base64.b64decode(signature["signature"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise SignatureError(f"config: malformed signature ({exc})") from None
    unsigned = {**cfg, "signature": None}
    return verify_with(
        trust.verifiers,
        key_id=str(key_id),
        algorithm=str(algorithm),
        payload=CONFIG_SIGNATURE_CONTEXT + canonical_json(unsigned),
        signature=raw,
        where="config",
        signed="the config",
        content="config",
    )


def _config_blob(cfg: Mapping[str, Any]) -> bytes:
    record = cfg["pickle"]
    try:
        blob = base64.b64decode(record["blob"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveFormatError(f"config: pickle blob is not valid base64 ({exc})") from None
    if len(blob) != record["size"]:
        raise DigestMismatchError(f"config pickle: size {len(blob)}, recorded {record['size']}")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != record["sha256"]:
        raise DigestMismatchError(f"config pickle: sha256 {actual}, recorded {record['sha256']}")
    return blob
