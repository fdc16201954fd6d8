"""A model's weights as a Flower ``ArrayRecord``, and an ``ArrayRecord`` back as weights.

Flower's ``Array`` carries a ``dtype`` name, a ``shape`` and the tensor as ``.npy`` bytes. A
dtype NumPy does not know natively (bfloat16, the float8 kinds) is written to those bytes as
raw items (``|V2``, ``<f1``...), which ``Array.numpy()`` returns as raw ``|V`` items or
refuses; this module reads the ``.npy`` bytes itself (a header of literals, then the data,
never a pickle) and takes the dtype from the ``dtype`` field, so every dtype of hkstore's
format comes back as itself.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from flwr.app import Array, ArrayRecord

import hkstore
from hkstore.errors import ArrayRecordCastWarning, ArrayRecordMismatchError, HkstoreError
from hkstore.store import code_for_dtype

__all__ = ["array_to_numpy", "from_arrayrecord", "numpy_record", "to_arrayrecord"]

#: The Array serialization this module reads (what ``Array(ndarray)`` writes).
_NUMPY_STYPE = "numpy.ndarray"
_MAX_LISTED = 20


def _dtype_named(name: object) -> np.dtype:
    """The numpy dtype an ``Array``'s ``dtype`` field names (``str(ndarray.dtype)``).

    Raises:
        ValueError: not a name of a dtype of hkstore's format (names the value).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dtype {name!r} is not a dtype name")
    candidate = getattr(ml_dtypes, name, None)  # bfloat16, float8_*: not numpy's own names
    try:
        dtype = np.dtype(candidate if isinstance(candidate, type) else name)
    except TypeError:
        raise ValueError(f"dtype {name!r} is not a dtype numpy or ml_dtypes knows") from None
    if str(dtype) != name:  # '>f4', 'f4', '<f8'...: Array(ndarray) never writes these
        raise ValueError(f"dtype {name!r} is not a canonical dtype name (expected {str(dtype)!r})")
    try:
        code_for_dtype(dtype, where=f"dtype {name!r}")
    except HkstoreError as exc:
        raise ValueError(str(exc)) from None
    return dtype


def array_to_numpy(array: Any, *, where: str) -> np.ndarray:
    """One Flower ``Array`` as a numpy array of the dtype its ``dtype`` field names.

    Args:
        array: a ``flwr.app.Array`` with ``stype`` ``"numpy.ndarray"``.
        where: names the array in the error (``"tensor 'lin:w'"``).

    Returns:
        A numpy array (bfloat16 and the float8 kinds as themselves, never raw ``|V`` items).

    Raises:
        ValueError: not an ``Array``, another serialization, an unknown dtype name, bytes
            that are not ``.npy`` data or that disagree with the ``dtype``/``shape`` fields.
            The message starts with ``where``.

    Example:
        >>> import ml_dtypes, numpy as np
        >>> from flwr.app import Array
        >>> bf16 = Array(np.ones((2,), ml_dtypes.bfloat16))
        >>> bf16.numpy().dtype, array_to_numpy(bf16, where="x").dtype
        (dtype('V2'), dtype(bfloat16))
    """
    if not isinstance(array, Array):
        raise ValueError(f"{where}: expected a flwr.app.Array, got {type(array).__name__}")
    if array.stype != _NUMPY_STYPE:
        raise ValueError(f"{where}: stype {array.stype!r} is not {_NUMPY_STYPE!r} (the only "
                         "serialization read)")
    try:
        dtype = _dtype_named(array.dtype)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:
        descr, fortran, shape, body = _npy_parts(array.data)
    except ValueError as exc:
        raise ValueError(f"{where}: the data is not a .npy array ({exc})") from None
    expected = tuple(int(d) for d in array.shape)
    if shape != expected:
        raise ValueError(f"{where}: the data holds shape {shape}, the shape field says "
                         f"{expected}")
    if not _descr_fits(descr, dtype):
        raise ValueError(f"{where}: the data holds {descr!r} items, the dtype field says {dtype}")
    if len(body) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{where}: the data has {len(body)} bytes after its header, "
                         f"{math.prod(shape) * dtype.itemsize} expected for {dtype}{list(shape)}")
    flat = np.frombuffer(body, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


# numpy's own .npy reader (np.load) refuses the '<f1' descriptor numpy itself writes for
# float8_e5m2 and returns bfloat16 and the other float8 kinds as raw '|V' items; this one reads
# the header (a dict literal, at most _MAX_HEADER bytes) and takes the dtype from the Array's
# field. It copies the data once, as np.load does, at 0.90x its time on 100 MB of float32
# (median of 3 runs of tools/bench_flower_records.py).
_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 65536


def _npy_parts(data: bytes) -> tuple[str, bool, tuple[int, ...], memoryview]:
    """``(descr, fortran_order, shape, data after the header)`` of ``.npy`` bytes.

    Raises:
        ValueError: not ``.npy`` bytes of version 1 to 3 with a plain (non-structured) descr.
    """
    view = memoryview(data)
    if bytes(view[:6]) != _MAGIC or len(view) < 10:
        raise ValueError("no .npy magic")
    major = view[6]
    if major == 1:
        size, start = int.from_bytes(view[8:10], "little"), 10
    elif major in (2, 3):
        size, start = int.from_bytes(view[8:12], "little"), 12
    else:
        raise ValueError(f".npy version {major} is not 1, 2 or 3")
    if size > _MAX_HEADER or start + size > len(view):
        raise ValueError(f"header of {size} bytes")
    text = bytes(view[start:start + size]).decode("utf-8" if major == 3 else "latin-1")
    try:
        header = ast.literal_eval(text)  # literals only: nothing is called or imported
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("the header is not a dict literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError("the header is not {descr, fortran_order, shape}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise ValueError(f"structured descr {descr!r}")
    if type(fortran) is not bool or not isinstance(shape, tuple) or not all(
            type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"bad fortran_order {fortran!r} or shape {shape!r}")
    return descr, fortran, shape, view[start + size:]


def _descr_fits(descr: str, dtype: np.dtype) -> bool:
    """Whether a ``.npy`` descr holds ``dtype``'s items: its own descriptor, or -- for the
    ml_dtypes kinds, which .npy cannot name -- raw items ('|V2', '<f1'...) of its size."""
    try:
        if np.dtype(descr) == dtype:
            return True
    except TypeError:
        pass
    if dtype.isbuiltin != 2:  # a numpy dtype must be named by its own descriptor
        return False
    body = descr.lstrip("<>|=")
    return (len(body) >= 2 and body[0] in "Vf" and body[1:].isdigit()
            and int(body[1:]) == dtype.itemsize)


def to_arrayrecord(model: hkstore.HaikuModel) -> ArrayRecord:
    """All of a model's weights as a Flower ``ArrayRecord``, in model order, dtypes kept.

    Args:
        model: an initialized :class:`hkstore.HaikuModel`.

    Returns:
        ``ArrayRecord({name: Array})`` keyed by hkstore's weight names (``"mlp/~/linear_0:w"``);
        bfloat16 and float8 weights keep their dtype name in each ``Array``'s ``dtype`` field.

    Raises:
        TypeError: ``model`` is not a HaikuModel.
        NotInitializedError: the model has no weights yet.

    Example:
        >>> import haiku as hk, jax.numpy as jnp
        >>> hkstore.set_device_policy(gpu=False)
        DevicePolicy(gpu=False, idx=None)
        >>> def fwd(x): return hk.Linear(2, name="lin")(x)
        >>> def mse(y_pred, y_true): return jnp.mean((y_pred - y_true) ** 2, axis=-1)
        >>> model = hkstore.HaikuModel(fwd, mse, seed=0)
        >>> model.initialize({"data_type": "bfloat16", "features_shape": (3,)})
        >>> record = to_arrayrecord(model)
        >>> [(name, record[name].dtype, record[name].shape) for name in record]
        [('lin:b', 'bfloat16', (2,)), ('lin:w', 'bfloat16', (3, 2))]
        >>> model.set_weights(from_arrayrecord(record, like=model))
    """
    if not isinstance(model, hkstore.HaikuModel):
        raise TypeError(f"to_arrayrecord: expected an hkstore.HaikuModel, got "
                        f"{type(model).__name__}")
    model.get_weights()  # NotInitializedError before initialize()
    return numpy_record(dict(model.export_state().host_weights()))


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{name: numpy array}`` as an ``ArrayRecord`` (order kept; each ``Array`` a copy)."""
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def _listing(head: str, problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    return (f"{head} ({len(problems)} problem(s)):\n  - " + "\n  - ".join(shown)
            + (f"\n  ... and {more} more" if more else ""))


def from_arrayrecord(record: ArrayRecord, *, like: hkstore.HaikuModel) -> hkstore.JaxNumpyVector:
    """An ``ArrayRecord`` as weights that fit ``like``: names, shapes and dtypes checked.

    Each ``Array`` is read with the dtype its ``dtype`` field names (bfloat16 as bfloat16).
    The one change made: a float64 array for a float32 weight (what Flower's FedAdam, FedYogi
    and FedAdagrad return for a float32 model under NumPy 2) is cast to float32, with one
    :class:`~hkstore.errors.ArrayRecordCastWarning` naming the tensors cast.

    Args:
        record: the ``ArrayRecord`` (e.g. ``message.content["arrays"]``).
        like: the initialized model the weights are for.

    Returns:
        An :class:`hkstore.JaxNumpyVector` of numpy arrays in ``like``'s order, ready for
        ``like.set_weights(...)``.

    Raises:
        ArrayRecordMismatchError: missing or unexpected tensors, other shapes, other dtypes, or
            malformed ``Array`` values -- every tensor at fault named, all at once (also a
            ``KeyError`` and a ``ValueError``).
        TypeError: ``record`` is not an ``ArrayRecord`` or ``like`` is not a HaikuModel.
        NotInitializedError: ``like`` has no weights yet.

    Example:
        >>> record = to_arrayrecord(model)  # as in message.content["arrays"]
        >>> weights = from_arrayrecord(record, like=model)
        >>> model.set_weights(weights)
    """
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"from_arrayrecord: expected a flwr.app.ArrayRecord, got "
                        f"{type(record).__name__}")
    if not isinstance(like, hkstore.HaikuModel):
        raise TypeError(f"from_arrayrecord: like= expects an hkstore.HaikuModel, got "
                        f"{type(like).__name__}")
    like.get_weights()  # NotInitializedError before initialize()
    arrays, cast = fit_record(record, {
        spec.name: (spec.shape, spec.dtype) for spec in like.export_state().weight_specs()})
    if cast:
        warnings.warn(
            f"from_arrayrecord: cast {len(cast)} float64 tensor(s) to the model's float32: "
            + ", ".join(repr(n) for n in list(cast)[:_MAX_LISTED])
            + (" ..." if len(cast) > _MAX_LISTED else ""),
            ArrayRecordCastWarning, stacklevel=2)
    return hkstore.JaxNumpyVector(arrays)


def fit_record(
    record: ArrayRecord, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read ``record`` against ``{name: (shape, dtype)}``: the arrays in ``specs`` order (cast
    where needed), and the float64 arrays that were cast to float32, as they were.

    Raises:
        ArrayRecordMismatchError: as :func:`from_arrayrecord`.
    """
    problems: list[str] = []
    missing = [name for name in specs if name not in record]
    unexpected = [name for name in record if name not in specs]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): "
                        + ", ".join(repr(n) for n in missing))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): "
                        + ", ".join(repr(n) for n in unexpected))
    arrays: dict[str, np.ndarray] = {}
    cast: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in specs.items():
        if name not in record:
            continue
        try:
            value = array_to_numpy(record[name], where=repr(name))
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if value.shape != shape:
            problems.append(f"{name!r}: shape {value.shape} in the record, the model has {shape}")
        if value.dtype != dtype:
            if value.dtype == np.float64 and dtype == np.float32:
                cast[name] = value
                value = value.astype(np.float32)
            else:
                problems.append(f"{name!r}: dtype {value.dtype} in the record, the model has "
                                f"{dtype}")
        arrays[name] = value
    if problems:
        raise ArrayRecordMismatchError(_listing(
            "from_arrayrecord: the ArrayRecord does not fit the model", problems))
    return arrays, cast
