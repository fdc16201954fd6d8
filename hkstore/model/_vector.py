"""JaxNumpyVector: named jax arrays with elementwise arithmetic (what federated rounds exchange)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from hkstore.errors import WeightsMismatchError
from hkstore.model._dtype_names import dtype_from_name

__all__ = ["JaxNumpyVector", "VectorSpec"]

Array = jax.Array | np.ndarray
Operand: TypeAlias = "JaxNumpyVector | int | float | np.number | jax.Array | np.ndarray"


@dataclass(frozen=True)
class VectorSpec:
    """What :meth:`JaxNumpyVector.flatten` needs to rebuild a vector: names, shapes, dtype names."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


def _is_scalar(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return isinstance(value, jax.Array | np.ndarray) and value.ndim == 0


def _single_device(value: Array) -> jax.Device | None:
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
        return None
    devices = value.devices()
    return next(iter(devices)) if len(devices) == 1 else None


def _follow(left: Array, right: Array) -> Array:
    """Return ``right``, moved to ``left``'s device when both are jax arrays on different ones."""
    target = _single_device(left)
    if target is None:
        return right
    source = _single_device(right)
    if source is None or source == target:
        return right
    return jax.device_put(right, target)


class JaxNumpyVector:
    """Named arrays (``{"layer:param": jax.Array}``) with elementwise arithmetic.

    Supports ``+ - * / **`` with a scalar or with a vector of the same names (a right-hand
    vector living on another device is moved to the left one's device first), the reflected
    forms, ``-v``, ``abs(v)``, and :meth:`sign`, :meth:`minimum`, :meth:`maximum`,
    :meth:`sum`. Equality is exact: same names, dtypes, shapes and values.

    Attributes:
        coefs: the named arrays (jax arrays; numpy arrays are kept as given until an
            operation turns them into jax arrays).

    Example:
        >>> import jax.numpy as jnp
        >>> v = JaxNumpyVector({"lin:w": jnp.ones((2,))})
        >>> (2 * v - 1).coefs["lin:w"].tolist()
        [1.0, 1.0]
    """

    __array_ufunc__ = None  # make numpy scalars on the left defer to our reflected operators
    __hash__ = None  # type: ignore[assignment]  # mutable container, equality by value

    def __init__(self, coefs: Mapping[str, Array]) -> None:
        """Wrap ``coefs``.

        Raises:
            TypeError: ``coefs`` is not a mapping of str to jax/numpy arrays (names the bad keys).
        """
        if not isinstance(coefs, Mapping):
            raise TypeError(f"JaxNumpyVector needs a dict of arrays, got {type(coefs).__name__}")
        checked: dict[str, Array] = {}
        bad: list[str] = []
        for name, value in coefs.items():
            if isinstance(value, np.generic):
                value = np.asarray(value)
            if not isinstance(name, str) or not isinstance(value, jax.Array | np.ndarray):
                bad.append(f"{name!r} ({type(value).__name__})")
                continue
            checked[name] = value
        if bad:
            raise TypeError(
                "JaxNumpyVector coefficients must be jax or numpy arrays under str names; "
                f"bad: {', '.join(bad)}"
            )
        self.coefs: dict[str, Array] = checked

    # --- arithmetic -------------------------------------------------------------------

    def _check_names(self, other: JaxNumpyVector, what: str) -> None:
        if self.coefs.keys() == other.coefs.keys():
            return
        missing = [name for name in self.coefs if name not in other.coefs]
        extra = [name for name in other.coefs if name not in self.coefs]
        raise WeightsMismatchError(
            f"JaxNumpyVector {what}: the operands' names differ; missing from the right "
            f"operand: {missing}; only in the right operand: {extra}"
        )

    def _binary(self, other: object, op: Callable[[Any, Any], jax.Array], what: str) -> Any:
        if isinstance(other, JaxNumpyVector):
            self._check_names(other, what)
            return JaxNumpyVector(
                {
                    name: op(value, _follow(value, other.coefs[name]))
                    for name, value in self.coefs.items()
                }
            )
        if _is_scalar(other):
            return JaxNumpyVector({name: op(value, other) for name, value in self.coefs.items()})
        return NotImplemented

    def _reflected(self, other: object, op: Callable[[Any, Any], jax.Array]) -> Any:
        if _is_scalar(other):
            return JaxNumpyVector({name: op(other, value) for name, value in self.coefs.items()})
        return NotImplemented

    def __add__(self, other: Operand) -> JaxNumpyVector:
        return self._binary(other, jnp.add, "+")

    def __sub__(self, other: Operand) -> JaxNumpyVector:
        return self._binary(other, jnp.subtract, "-")

    def __mul__(self, other: Operand) -> JaxNumpyVector:
        return self._binary(other, jnp.multiply, "*")

    def __truediv__(self, other: Operand) -> JaxNumpyVector:
        return self._binary(other, jnp.true_divide, "/")

    def __pow__(self, other: Operand) -> JaxNumpyVector:
        return self._binary(other, jnp.power, "**")

    def __radd__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.add)

    def __rsub__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.subtract)

    def __rmul__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.multiply)

    def __rtruediv__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.true_divide)

    def __rpow__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.power)

    def __neg__(self) -> JaxNumpyVector:
        return JaxNumpyVector({name: jnp.negative(value) for name, value in self.coefs.items()})

    def __pos__(self) -> JaxNumpyVector:
        return JaxNumpyVector(dict(self.coefs))

    def __abs__(self) -> JaxNumpyVector:
        return JaxNumpyVector({name: jnp.abs(value) for name, value in self.coefs.items()})

    def sign(self) -> JaxNumpyVector:
        """Return the elementwise sign (-1, 0 or 1) of every coefficient."""
        return JaxNumpyVector({name: jnp.sign(value) for name, value in self.coefs.items()})

    def minimum(self, other: Operand) -> JaxNumpyVector:
        """Return the elementwise minimum with a scalar or a vector of the same names.

        Raises:
            TypeError: ``other`` is neither a scalar nor a JaxNumpyVector.
            WeightsMismatchError: ``other`` is a vector with other names (a ``KeyError``).
        """
        return self._elementwise(other, jnp.minimum, "minimum")

    def maximum(self, other: Operand) -> JaxNumpyVector:
        """Return the elementwise maximum with a scalar or a vector of the same names.

        Raises:
            TypeError: ``other`` is neither a scalar nor a JaxNumpyVector.
            WeightsMismatchError: ``other`` is a vector with other names (a ``KeyError``).
        """
        return self._elementwise(other, jnp.maximum, "maximum")

    def _elementwise(
        self, other: object, op: Callable[[Any, Any], jax.Array], what: str
    ) -> JaxNumpyVector:
        result = self._binary(other, op, what)
        if result is NotImplemented:
            raise TypeError(
                f"JaxNumpyVector.{what} takes a scalar or a JaxNumpyVector, "
                f"got {type(other).__name__}"
            )
        return result

    def sum(self) -> JaxNumpyVector:
        """Return the sum of each coefficient, as a vector of 0-d arrays."""
        return JaxNumpyVector({name: jnp.sum(value) for name, value in self.coefs.items()})

    # --- description ------------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return each coefficient's shape."""
        return {name: tuple(value.shape) for name, value in self.coefs.items()}

    def dtypes(self) -> dict[str, str]:
        """Return each coefficient's dtype name (``"float32"``, ``"bfloat16"``...)."""
        return {name: np.dtype(value.dtype).name for name, value in self.coefs.items()}

    def __eq__(self, other: object) -> bool:
        """Exact equality: same names, and per name the same dtype, shape and values."""
        if not isinstance(other, JaxNumpyVector):
            return NotImplemented
        if self.coefs.keys() != other.coefs.keys():
            return False
        for name, value in self.coefs.items():
            mine, theirs = np.asarray(value), np.asarray(other.coefs[name])
            if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
                return False
            if not np.array_equal(mine, theirs):
                return False
        return True

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{name!r}: {np.dtype(value.dtype).name}{list(value.shape)}"
            for name, value in self.coefs.items()
        )
        return f"JaxNumpyVector({{{inner}}})"

    # --- conversions ------------------------------------------------------------------

    def flatten(self) -> tuple[list[float], VectorSpec]:
        """Return all values as one list of floats, and the spec to rebuild the vector.

        Raises:
            TypeError: a coefficient is complex (not representable as floats).
        """
        values: list[float] = []
        for name, value in self.coefs.items():
            host = np.asarray(value)
            if host.dtype.kind == "c":
                raise TypeError(f"JaxNumpyVector.flatten: coefficient {name!r} is complex")
            values.extend(host.astype(np.float64).ravel().tolist())
        spec = VectorSpec(
            names=tuple(self.coefs),
            shapes=tuple(self.shapes().values()),
            dtypes=tuple(self.dtypes().values()),
        )
        return values, spec

    @classmethod
    def unflatten(cls, values: Sequence[float], spec: VectorSpec) -> JaxNumpyVector:
        """Rebuild a vector from :meth:`flatten`'s output.

        Raises:
            ValueError: ``values`` does not hold exactly as many numbers as ``spec`` needs.
            TypeError: ``spec`` names an unknown dtype.
        """
        sizes = [math.prod(shape) for shape in spec.shapes]
        if len(values) != sum(sizes):
            raise ValueError(
                f"JaxNumpyVector.unflatten: {len(values)} values given, spec needs {sum(sizes)}"
            )
        flat = np.asarray(values, dtype=np.float64)
        coefs: dict[str, Array] = {}
        start = 0
        rows = zip(spec.names, spec.shapes, spec.dtypes, sizes, strict=True)
        for name, shape, dtype, size in rows:
            chunk = flat[start : start + size].astype(dtype_from_name(dtype, where=name))
            coefs[name] = _to_jax(chunk.reshape(shape))
            start += size
        return cls(coefs)

    def pack(self) -> dict[str, dict[str, Any]]:
        """Return a plain, serializable form: ``{name: {"dtype", "shape", "data"}}``.

        ``dtype`` is the dtype's *name* (``"bfloat16"`` works), ``data`` the little-endian
        bytes in C order.
        """
        packed: dict[str, dict[str, Any]] = {}
        for name, value in self.coefs.items():
            host = np.asarray(value)
            little = host.dtype.newbyteorder("<") if host.dtype.itemsize > 1 else host.dtype
            packed[name] = {
                "dtype": host.dtype.name,
                "shape": list(host.shape),
                "data": np.ascontiguousarray(host, dtype=little).tobytes(),
            }
        return packed

    @classmethod
    def unpack(cls, data: Mapping[str, Mapping[str, Any]]) -> JaxNumpyVector:
        """Rebuild a vector from :meth:`pack`'s output.

        Raises:
            TypeError: ``data`` is not shaped like :meth:`pack`'s output, or names an unknown
                dtype (the coefficient is named).
            ValueError: a coefficient's byte count does not match its dtype and shape.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"JaxNumpyVector.unpack needs a dict, got {type(data).__name__}")
        coefs: dict[str, Array] = {}
        for name, item in data.items():
            if not isinstance(item, Mapping) or set(item) != {"dtype", "shape", "data"}:
                raise TypeError(
                    f"JaxNumpyVector.unpack: {name!r} must be a dict with keys dtype, shape, data"
                )
            dtype = dtype_from_name(item["dtype"], where=f"JaxNumpyVector.unpack: {name!r}")
            shape = item["shape"]
            raw = item["data"]
            if not isinstance(shape, list | tuple) or not all(
                isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
            ):
                raise TypeError(f"JaxNumpyVector.unpack: {name!r} has a bad shape {shape!r}")
            if not isinstance(raw, bytes | bytearray | memoryview):
                raise TypeError(f"JaxNumpyVector.unpack: {name!r} data must be bytes")
            expected = math.prod(shape) * dtype.itemsize
            if len(raw) != expected:
                raise ValueError(
                    f"JaxNumpyVector.unpack: {name!r} has {len(raw)} bytes, "
                    f"{dtype.name}{list(shape)} needs {expected}"
                )
            little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
            host = np.frombuffer(raw, dtype=little).astype(dtype).reshape(shape)
            coefs[name] = _to_jax(host)
        return cls(coefs)


def _to_jax(host: np.ndarray) -> Array:
    """Return ``host`` as a jax array, unless jax (x64 off) would change its dtype: then as is."""
    if jax.dtypes.canonicalize_dtype(host.dtype) != host.dtype:
        return host
    return jnp.asarray(host)
