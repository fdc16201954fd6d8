"""The one dtype table: safetensors dtype codes <-> numpy dtypes (ml_dtypes for the exotic ones).

Every other place (schema enum, docs/FORMAT.md, codec) derives from :data:`DTYPES`; a test
checks they agree. Archive strings are looked up here, never handed to ``np.dtype()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from hkstore.errors import UnsupportedDtypeError

__all__ = ["DTYPES", "DtypeInfo", "code_for_dtype", "dtype_for_code"]


@dataclass(frozen=True)
class DtypeInfo:
    """One row of the table: safetensors ``code``, numpy ``dtype``, bytes per element."""

    code: str
    dtype: np.dtype
    itemsize: int


def _row(code: str, dtype: type) -> DtypeInfo:
    dt: np.dtype = np.dtype(dtype)
    if dt.itemsize > 1:
        dt = dt.newbyteorder("<")
    return DtypeInfo(code=code, dtype=dt, itemsize=dt.itemsize)


#: Every safetensors dtype that numpy can hold one element per ``itemsize`` bytes.
#: (safetensors' sub-byte F4/F6 kinds are packed and have no numpy equivalent: refused.)
DTYPES: dict[str, DtypeInfo] = {
    row.code: row
    for row in (
        _row("BOOL", np.bool_),
        _row("U8", np.uint8),
        _row("I8", np.int8),
        _row("U16", np.uint16),
        _row("I16", np.int16),
        _row("U32", np.uint32),
        _row("I32", np.int32),
        _row("U64", np.uint64),
        _row("I64", np.int64),
        _row("F16", np.float16),
        _row("BF16", ml_dtypes.bfloat16),
        _row("F32", np.float32),
        _row("F64", np.float64),
        _row("C64", np.complex64),
        _row("F8_E4M3", ml_dtypes.float8_e4m3fn),
        _row("F8_E5M2", ml_dtypes.float8_e5m2),
        _row("F8_E8M0", ml_dtypes.float8_e8m0fnu),
        _row("F8_E4M3FNUZ", ml_dtypes.float8_e4m3fnuz),
        _row("F8_E5M2FNUZ", ml_dtypes.float8_e5m2fnuz),
    )
}

_BY_DTYPE: dict[np.dtype, str] = {row.dtype: row.code for row in DTYPES.values()}


def dtype_for_code(code: str, *, where: str = "tensor") -> DtypeInfo:
    """Return the table row for a safetensors dtype ``code`` such as ``"BF16"``.

    Raises:
        UnsupportedDtypeError: ``code`` is not in the table (message names ``where``).
    """
    try:
        return DTYPES[code]
    except (KeyError, TypeError):
        known = ", ".join(DTYPES)
        raise UnsupportedDtypeError(
            f"{where}: dtype {code!r} is not a supported safetensors dtype "
            f"(expected one of {known})"
        ) from None


def code_for_dtype(dtype: object, *, where: str = "tensor") -> str:
    """Return the safetensors code for a numpy (or ml_dtypes) dtype; big-endian is refused.

    Raises:
        UnsupportedDtypeError: the dtype has no exact safetensors equivalent.
    """
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        raise UnsupportedDtypeError(f"{where}: {dtype!r} is not a dtype") from None
    if dt.byteorder == ">":
        raise UnsupportedDtypeError(
            f"{where}: big-endian dtype {dt.str!r}; the format is little-endian"
        )
    code = _BY_DTYPE.get(dt.newbyteorder("<") if dt.itemsize > 1 else dt)
    if code is None:
        known = ", ".join(str(r.dtype) for r in DTYPES.values())
        raise UnsupportedDtypeError(
            f"{where}: dtype {dt} cannot be stored exactly (supported: {known}); cast it yourself"
        )
    return code
