"""Reading declearn 2.x HaikuModel configs and checkpoints as archive content, never unpickling.

declearn's ``HaikuModel.get_config()`` stores the model and loss functions as hex-encoded
joblib pickles; for an importable function such a pickle is nothing but one global reference
(``module`` + ``qualname``). This module reads that reference from the pickle's opcodes
(:func:`hkstore.store.is_plain_global_reference`) and refuses any other pickle,
listing the globals it would import. The weights come from a checkpoint's
``model_state_<timestamp>.mpk``: a MessagePack document in declearn's wire form, where a typed
object is the map ``{"__type__": NAME, "dump": VALUE}``, a vector is
``{"__type__": "JaxNumpyVector", "dump": {weight name: array}}`` and an array is
``{"__type__": "np.ndarray", "dump": [raw bytes, dtype character, shape]}`` (raw bytes in the
writer's byte order: little-endian on every platform declearn runs on).

A plain ``model_config.json`` holds no weights, so converting it alone is refused with a message
that names what to pass instead (the checkpoint folder, or ``--state FILE``).

This module imports neither declearn nor jax: the ``hkstore convert-declearn`` command runs on a
machine that has neither. Every failure is an :class:`~hkstore.errors.HkstoreError`
(:class:`~hkstore.errors.DeclearnFormatError` for input that is not declearn's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hkstore.errors import (
    ArchiveFormatError,
    DeclearnFormatError,
    LimitExceededError,
    MissingDependencyError,
    RefusedCodeError,
    UnsupportedDtypeError,
)
from hkstore.store import (
    DEFAULT_LIMITS,
    ArchiveContent,
    Limits,
    TensorSpec,
    atomic_write,
    dtype_for_code,
    is_plain_global_reference,
    open_regular,
    parse_json_strict,
    pickle_globals,
    write_archive,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CONFIG_NAME",
    "ConvertSummary",
    "DeclearnModel",
    "convert",
    "decode_array",
    "function_reference",
    "locate_inputs",
    "read_declearn",
]

#: The config file declearn's ``Checkpointer`` writes for a model.
CONFIG_NAME = "model_config.json"
_STATE_PREFIX = "model_state_"
_STATE_SUFFIX = ".mpk"
_ROLES = ("model", "loss")
#: numpy's limits on an array's rank and on one dimension.
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1
#: declearn vector types whose ``dump`` is ``{name: np.ndarray}``.
_VECTOR_TYPES = frozenset({"JaxNumpyVector", "NumpyVector"})

# dtype characters (``ndarray.dtype.char``) and dtype strings declearn may write, mapped to
# safetensors codes by an explicit table: an input's string is never handed to ``np.dtype``.
# ``l``/``L`` are C ``long``: 8 bytes on Linux and macOS, 4 on Windows; resolved by size.
_DTYPE_CODES: dict[str, str | tuple[str, str]] = {
    "?": "BOOL", "b": "I8", "B": "U8", "h": "I16", "H": "U16", "i": "I32", "I": "U32",
    "q": "I64", "Q": "U64", "l": ("I32", "I64"), "L": ("U32", "U64"),
    "e": "F16", "f": "F32", "d": "F64", "F": "C64", "E": "BF16",
    "bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16",
    "bfloat16": "BF16", "float32": "F32", "float64": "F64", "complex64": "C64",
    "|b1": "BOOL", "|i1": "I8", "|u1": "U8", "<i2": "I16", "<u2": "U16", "<i4": "I32",
    "<u4": "U32", "<i8": "I64", "<u8": "U64", "<f2": "F16", "<f4": "F32", "<f8": "F64",
    "<c8": "C64",
}  # fmt: skip


@dataclass(frozen=True)
class DeclearnModel:
    """A declearn HaikuModel read without unpickling.

    Attributes:
        config_path: the ``model_config.json`` read.
        state_path: the ``model_state_*.mpk`` the weights came from.
        references: ``{"model": "module:qualname", "loss": "module:qualname"}``.
        data_info: the config's ``data_info`` (JSON).
        weights: ``{name: (safetensors dtype code, array)}`` in the state's order.
    """

    config_path: Path
    state_path: Path
    references: dict[str, str]
    data_info: dict[str, Any]
    weights: dict[str, tuple[str, np.ndarray]]


def locate_inputs(path: Path, state: Path | None) -> tuple[Path, Path]:
    """Find the config and the state file for ``path`` (a folder or a ``model_config.json``).

    In a checkpoint folder the newest state is taken: declearn names states
    ``model_state_YY-MM-DD_HH-MM-SS.mpk``, so the last name in sorted order is the newest.

    Raises:
        DeclearnFormatError: ``path`` does not exist, or no state file is given or found.
    """
    if not path.exists():
        raise DeclearnFormatError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    config = folder / CONFIG_NAME if path.is_dir() else path
    if not config.is_file():
        raise DeclearnFormatError(
            f"{path}: no {CONFIG_NAME} in this folder; pass a declearn checkpoint"
        )
    if state is not None:
        if not state.is_file():
            raise DeclearnFormatError(f"state file {state}: no such file")
        return config, state
    states = sorted(
        name for name in os.listdir(folder)
        if name.startswith(_STATE_PREFIX) and name.endswith(_STATE_SUFFIX)
    )
    if not path.is_dir() or not states:
        raise DeclearnFormatError(
            f"{path}: a declearn model config holds no weights (declearn keeps them in "
            f"{_STATE_PREFIX}<timestamp>{_STATE_SUFFIX} files); pass the checkpoint folder "
            "that holds both, or --state FILE"
        )
    return config, folder / states[-1]


def read_declearn(
    config_path: Path,
    state_path: Path,
    *,
    overrides: Mapping[str, str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> DeclearnModel:
    """Read a declearn HaikuModel config and one of its weight states, executing nothing.

    Args:
        config_path: declearn's ``model_config.json``.
        state_path: a ``model_state_*.mpk`` file.
        overrides: ``{"model"|"loss": "module:qualname"}`` used instead of the pickle's
            reference (the pickle is then not read for that role).
        limits: caps on the input sizes.

    Returns:
        A :class:`DeclearnModel`.

    Raises:
        DeclearnFormatError: the files are not in declearn's format (the message names the
            file and the field).
        RefusedCodeError: a function pickle is not a plain reference to a global (the
            message lists the globals it would import).
        LimitExceededError: a file is larger than ``limits`` allow.
        UnsupportedDtypeError: a weight has a dtype the archive format cannot store.
    """
    config = _read_config(config_path, limits)
    references = dict(overrides or {})
    for role, ref in references.items():
        if not _is_reference(ref):
            raise DeclearnFormatError(
                f"{role} reference {ref!r}: expected MODULE:QUALNAME, e.g. mypkg.nets:forward"
            )
    for role in _ROLES:
        if role not in references:
            references[role] = function_reference(config[role], role=role, where=config_path.name)
    data_info = config.get("data_info") or {}
    if not isinstance(data_info, dict):
        raise DeclearnFormatError(f"{config_path.name}: 'data_info' is not an object")
    weights = _read_state(state_path, limits)
    return DeclearnModel(config_path, state_path, references, data_info, weights)


def _read_config(path: Path, limits: Limits) -> dict[str, Any]:
    data = _read_bytes(path, limits.max_manifest_bytes)
    try:
        config = parse_json_strict(data, what=path.name, max_bytes=limits.max_manifest_bytes)
    except LimitExceededError:
        raise
    except ArchiveFormatError as exc:  # the strict parser's ManifestError: not declearn's JSON
        raise DeclearnFormatError(str(exc)) from None
    typekey = config.get("typekey")
    if typekey != "haiku":
        raise DeclearnFormatError(
            f"{path.name}: 'typekey' is {typekey!r}; only declearn HaikuModel configs "
            "('typekey': 'haiku') can be converted"
        )
    for role in _ROLES:
        if not isinstance(config.get(role), str):
            raise DeclearnFormatError(
                f"{path.name}: {role!r} must be the hex string of a joblib pickle"
            )
    return config


def function_reference(hex_pickle: str, *, role: str, where: str) -> str:
    """Return ``"module:qualname"`` from a declearn hex pickle of a function, without loading it.

    Raises:
        DeclearnFormatError: the text is not hex, or the bytes are not a pickle.
        RefusedCodeError: the pickle is anything but one plain global reference; the message
            lists every global it would import (read statically, never executed).
    """
    try:
        data = bytes.fromhex(hex_pickle)
    except ValueError:
        raise DeclearnFormatError(f"{where}: {role!r} is not a hex string") from None
    try:
        reference = is_plain_global_reference(data)
        imports = [] if reference is not None else pickle_globals(data)
    except LimitExceededError:
        raise
    except ArchiveFormatError as exc:  # malformed opcodes: not a pickle declearn wrote
        raise DeclearnFormatError(f"{where}: {role!r}: {exc}") from None
    if reference is None:
        listed = ", ".join(imports) or "none"
        raise RefusedCodeError(
            f"{where}: the {role!r} pickle is not a plain reference to an importable function "
            f"and is refused unread; it would import: {listed}"
        )
    return reference


def _read_state(path: Path, limits: Limits) -> dict[str, tuple[str, np.ndarray]]:
    try:
        import msgpack
    except ImportError:
        raise MissingDependencyError(
            "reading declearn checkpoints needs the 'msgpack' package: pip install msgpack"
        ) from None
    data = _read_bytes(path, limits.max_total_bytes)
    try:
        document = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated classes on bad input
        raise DeclearnFormatError(f"{path.name}: not a MessagePack document ({exc})") from None
    coefs = _unwrap(document, _VECTOR_TYPES, f"{path.name}")
    if not isinstance(coefs, dict) or not coefs:
        raise DeclearnFormatError(f"{path.name}: the vector holds no weights")
    if len(coefs) > limits.max_tensors:
        raise LimitExceededError(
            f"{path.name}: {len(coefs)} weights, more than max_tensors={limits.max_tensors}"
        )
    return {
        name: decode_array(_unwrap(value, {"np.ndarray"}, f"{path.name}: {name!r}"),
                           where=f"{path.name}: weight {name!r}")
        for name, value in coefs.items()
    }


def _unwrap(value: Any, types: frozenset[str] | set[str], where: str) -> Any:
    """Return the ``dump`` of a declearn ``{"__type__": NAME, "dump": VALUE}`` wrapper."""
    if not isinstance(value, dict) or set(value) != {"__type__", "dump"}:
        raise DeclearnFormatError(
            f"{where}: expected a declearn typed object {{'__type__', 'dump'}} "
            f"of type {' or '.join(sorted(types))}"
        )
    if value["__type__"] not in types:
        raise DeclearnFormatError(
            f"{where}: type {value['__type__']!r}, expected {' or '.join(sorted(types))}"
        )
    return value["dump"]


def decode_array(wire: Any, *, where: str) -> tuple[str, np.ndarray]:
    """Decode declearn's array wire form ``[raw bytes, dtype, shape]`` (a copy-free view).

    Returns:
        ``(safetensors dtype code, read-only array)``.

    Raises:
        DeclearnFormatError: not that form, or the byte count disagrees with dtype and shape.
        UnsupportedDtypeError: the dtype is not one the archive format stores.
    """
    import numpy as np

    if not (isinstance(wire, Sequence) and len(wire) == 3):
        raise DeclearnFormatError(f"{where}: expected [data, dtype, shape]")
    raw, dtype_text, shape = wire
    if not isinstance(raw, bytes):
        raise DeclearnFormatError(f"{where}: data is {type(raw).__name__}, expected bytes")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise DeclearnFormatError(f"{where}: shape {str(shape)[:80]} is not a list of sizes")
    if len(shape) > _MAX_NDIM or any(d > _MAX_DIM for d in shape):
        # numpy (and so declearn) never writes these: refused here, not by numpy's reshape
        raise DeclearnFormatError(
            f"{where}: shape of {len(shape)} dimensions (at most {_MAX_NDIM}, each below "
            f"2**63) is not an array numpy can hold"
        )
    count = math.prod(shape)
    entry = _DTYPE_CODES.get(dtype_text) if isinstance(dtype_text, str) else None
    if entry is None:
        raise UnsupportedDtypeError(
            f"{where}: dtype {dtype_text!r} has no exact safetensors equivalent"
        )
    if isinstance(entry, tuple):  # C long: pick the width the byte count implies
        fits = [c for c in entry if count * dtype_for_code(c).itemsize == len(raw)]
        entry = fits[-1] if fits else entry[-1]
    info = dtype_for_code(entry, where=where)
    if count * info.itemsize != len(raw):
        raise DeclearnFormatError(
            f"{where}: {len(raw)} bytes of data, but shape {shape} of {dtype_text!r} needs "
            f"{count * info.itemsize}"
        )
    return entry, np.frombuffer(raw, dtype=info.dtype).reshape(shape)


def _read_bytes(path: Path, cap: int) -> bytes:
    """Read a whole input file: a regular file only (never a FIFO or a device), bounded."""
    try:
        fd = open_regular(path)
    except ArchiveFormatError as exc:  # a folder, FIFO, device or socket
        raise DeclearnFormatError(str(exc)) from None
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise LimitExceededError(f"{path.name}: {size} bytes, more than the limit of {cap}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(size + 1)  # one byte more: a file that grew is noticed
    finally:
        os.close(fd)
    if len(data) > size:
        raise DeclearnFormatError(f"{path.name}: the file changed while it was read")
    return data


@dataclass(frozen=True)
class ConvertSummary:
    """What :func:`convert` wrote: a line for stdout and warnings for stderr."""

    text: str
    warnings: list[str]


def convert(
    config_path: Path,
    state_path: Path,
    out: str | os.PathLike[str],
    *,
    overrides: Mapping[str, str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ConvertSummary:
    """Convert a declearn HaikuModel checkpoint into an hkstore archive at ``out`` (atomically).

    The archive stores the weights in the state's order, all of them trainable (declearn
    checkpoints do not record a trainable mask; declearn itself restores every weight as
    trainable), the config's ``data_info``, and both functions as references. Its metadata
    records where it came from: ``{"converted_from": {"format": "declearn", "config": ...,
    "state": ...}}`` (file names only).

    Raises:
        as :func:`read_declearn`; OSError when ``out`` cannot be written.
    """
    model = read_declearn(config_path, state_path, overrides=overrides, limits=limits)
    names = list(model.weights)
    content = ArchiveContent(
        specs=[TensorSpec(n, model.weights[n][0], tuple(model.weights[n][1].shape))
               for n in names],
        fetch=lambda name: model.weights[name][1],
        trainable=names,
        data_info=model.data_info,
        seed=None,
        functions={role: {"kind": "reference", "ref": ref, "kwargs": {}}
                   for role, ref in model.references.items()},
        metadata={"converted_from": {"format": "declearn", "config": config_path.name,
                                     "state": state_path.name}},
    )
    with atomic_write(out) as handle:
        write_archive(handle, content)
    warnings = [
        f"the {role} reference {ref!r} names a private or dunder module or attribute, which "
        f"hkstore never imports by reference; pass --{role}-ref MODULE:QUALNAME with its "
        f"public name, or supply {role}= when loading"
        for role, ref in model.references.items() if _has_private_part(ref)
    ]
    text = (
        f"{os.fspath(out)}: {len(names)} tensors from {state_path.name} (all trainable), "
        f"model {model.references['model']}, loss {model.references['loss']}"
    )
    return ConvertSummary(text, warnings)


def _is_reference(ref: str) -> bool:
    module, colon, qualname = ref.partition(":")
    return bool(colon) and all(
        part.isidentifier() for part in [*module.split("."), *qualname.split(".")]
    )


def _has_private_part(ref: str) -> bool:
    module, _, qualname = ref.partition(":")
    return any(part.startswith("_") for part in [*module.split("."), *qualname.split(".")])
