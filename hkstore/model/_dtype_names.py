"""Dtypes by name: turn a dtype name such as ``"bfloat16"`` into a numpy dtype, strictly."""

from __future__ import annotations

import ml_dtypes  # registers bfloat16, float8_* ... with numpy, so np.dtype(name) finds them
import numpy as np

__all__ = ["dtype_from_name", "dtype_name"]

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


def _is_numeric(dtype: np.dtype) -> bool:
    if dtype.kind in _NUMERIC_KINDS:
        return True
    # ml_dtypes' types (bfloat16, float8_*, int4...) are numpy "void" kinds to numpy itself.
    return getattr(dtype.type, "__module__", "").startswith(ml_dtypes.__name__)
