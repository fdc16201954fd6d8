"""Dtypes by name: a dtype name such as ``"bfloat16"`` as a numpy dtype, strictly or normalised.

Two readings: :func:`dtype_from_name` takes only canonical names (what vectors and archives
write, so that a name means one dtype on every machine); :func:`canonical_dtype_name` takes
any name numpy parses (``"float"``, ``"i8"``, ``"<f4"``, ``np.float32``), as declearn's
``data_info`` does, and returns the canonical name.
"""

from __future__ import annotations

import ml_dtypes  # registers bfloat16, float8_* ... with numpy, so np.dtype(name) finds them
import numpy as np

from hkstore.errors import UnsupportedDtypeError
from hkstore.store import code_for_dtype

__all__ = ["canonical_dtype_name", "dtype_from_name", "dtype_name"]

_NUMERIC_KINDS = frozenset("biufc")


def dtype_name(dtype: object) -> str:
    """Return the canonical name of a numpy, jax or ml_dtypes dtype (``"bfloat16"``, ``"int32"``).

    Raises:
        TypeError: ``dtype`` is not a dtype.
    """
    return np.dtype(dtype).name  # type: ignore[call-overload]


def dtype_from_name(name: object, *, where: str = "dtype") -> np.dtype:
    """Return the numeric dtype called ``name``, refusing anything that is not its canonical name.

    Only canonical names of numeric numpy dtypes and of ``ml_dtypes`` types are accepted:
    ``"float32"`` and ``"bfloat16"`` are, ``"<f4"``, ``"float"``, ``"object"`` and ``"V2"``
    are not (a name must mean one dtype, the same on every machine).

    Args:
        name: the dtype name.
        where: what the name describes, for the error message.

    Returns:
        The numpy dtype (native byte order).

    Raises:
        TypeError: ``name`` is not a string, or names no numeric dtype.
    """
    if not isinstance(name, str):
        raise TypeError(f"{where}: a dtype name (str) is required, got {type(name).__name__}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name != name or not _is_numeric(dtype):
        raise TypeError(
            f"{where}: {name!r} is not the name of a numeric dtype "
            "(expected a numpy or ml_dtypes name such as 'float32' or 'bfloat16')"
        )
    return dtype


def canonical_dtype_name(value: object, *, where: str = "dtype") -> str:
    """Return the canonical name of any numeric dtype numpy parses, if the format can store it.

    Accepts names (``"int"``, ``"float"``, ``"i8"``, ``"<f4"``, ``">f4"``, ``"double"``,
    ``"bfloat16"``), numpy dtypes and scalar types (``np.float32``, ``ml_dtypes.bfloat16``).
    Byte order is dropped (``">f4"`` is ``"float32"``). Platform-dependent aliases are read on
    this machine (``"int"`` is numpy's default integer here); the canonical name is what
    travels afterwards.

    Args:
        value: the dtype or its name.
        where: what the dtype describes, for the error message.

    Returns:
        The canonical name (``"float32"``, ``"int64"``, ``"bfloat16"``...).

    Raises:
        TypeError: ``value`` is not a dtype numpy parses, or not a numeric one (object,
            string, void, datetime...).
        UnsupportedDtypeError: a numeric dtype the archive format cannot store
            (``complex128``, ``longdouble``...); also a ``TypeError``.

    Example:
        >>> [canonical_dtype_name(n) for n in ("float", "<f4", "i8", "double", "bfloat16")]
        ['float64', 'float32', 'int64', 'float64', 'bfloat16']
    """
    if isinstance(value, bool) or not (
        isinstance(value, str | np.dtype)
        or (isinstance(value, type) and issubclass(value, np.generic))
    ):
        raise TypeError(
            f"{where}: a dtype or dtype name is required, got {type(value).__name__}"
        )
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError, SyntaxError):  # numpy raises all three on odd strings
        raise TypeError(f"{where}: {value!r} is not a dtype numpy knows") from None
    if dtype.fields is not None or dtype.subdtype is not None or not _is_numeric(dtype):
        raise TypeError(
            f"{where}: {value!r} is {str(dtype)!r}, not a numeric dtype (expected a number "
            "type such as 'float32', 'int64' or 'bfloat16')"
        )
    native = dtype.newbyteorder("=")
    try:
        code_for_dtype(native, where=where)
    except UnsupportedDtypeError as exc:
        raise UnsupportedDtypeError(f"{exc} ({value!r} names it)") from None
    return native.name


def _is_numeric(dtype: np.dtype) -> bool:
    if dtype.kind in _NUMERIC_KINDS:
        return True
    # ml_dtypes' types (bfloat16, float8_*, int4...) are numpy "void" kinds to numpy itself.
    return getattr(dtype.type, "__module__", "").startswith(ml_dtypes.__name__)
