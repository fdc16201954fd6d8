"""JaxNumpyVector: named jax arrays with elementwise arithmetic (what federated rounds exchange)."""

from __future__ import annotations

import base64
import binascii
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


@dataclass
class VectorSpec:
    """What :meth:`JaxNumpyVector.flatten` needs to rebuild a vector (declearn's spec shape).

    Attributes:
        names: the coefficient names, in order.
        shapes: each name's shape (a tuple of ints).
        dtypes: each name's canonical dtype name (``"float32"``, ``"bfloat16"``...).

    Any object with these three attributes in this shape (declearn's ``VectorSpec``
    included) is accepted by :meth:`JaxNumpyVector.unflatten`.
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


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
    :meth:`sum`. Equality is exact: same names, dtypes, shapes and values. Results have the
    left operand's class, so a subclass (a framework's vector type) stays itself; a subclass
    may also accept other vector types as operands by overriding :meth:`_operand`.

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

    def _like(self, coefs: Mapping[str, Array]) -> Any:
        """Return a vector of this one's class holding ``coefs``."""
        return type(self)(coefs)

    def _operand(self, other: object) -> object:
        """Return ``other`` as an operand this vector computes with (a hook for subclasses).

        The default returns it unchanged: scalars and :class:`JaxNumpyVector` instances are
        operands, anything else makes the operation return ``NotImplemented``.
        """
        return other

    def _binary(self, other: object, op: Callable[[Any, Any], jax.Array], what: str) -> Any:
        other = self._operand(other)
        if isinstance(other, JaxNumpyVector):
            self._check_names(other, what)
            return self._like(
                {
                    name: op(value, _follow(value, other.coefs[name]))
                    for name, value in self.coefs.items()
                }
            )
        if _is_scalar(other):
            return self._like({name: op(value, other) for name, value in self.coefs.items()})
        return NotImplemented

    def _reflected(self, other: object, op: Callable[[Any, Any], jax.Array], what: str) -> Any:
        other = self._operand(other)
        if isinstance(other, JaxNumpyVector):  # another class's vector on the left
            other._check_names(self, what)
            return self._like(
                {
                    name: op(_follow(value, other.coefs[name]), value)
                    for name, value in self.coefs.items()
                }
            )
        if _is_scalar(other):
            return self._like({name: op(other, value) for name, value in self.coefs.items()})
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
        return self._reflected(other, jnp.add, "+")

    def __rsub__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.subtract, "-")

    def __rmul__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.multiply, "*")

    def __rtruediv__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.true_divide, "/")

    def __rpow__(self, other: Operand) -> JaxNumpyVector:
        return self._reflected(other, jnp.power, "**")

    def __neg__(self) -> JaxNumpyVector:
        return self._like({name: jnp.negative(value) for name, value in self.coefs.items()})

    def __pos__(self) -> JaxNumpyVector:
        return self._like(dict(self.coefs))

    def __abs__(self) -> JaxNumpyVector:
        return self._like({name: jnp.abs(value) for name, value in self.coefs.items()})

    def sign(self) -> JaxNumpyVector:
        """Return the elementwise sign (-1, 0 or 1) of every coefficient."""
        return self._like({name: jnp.sign(value) for name, value in self.coefs.items()})

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
        return self._like({name: jnp.sum(value) for name, value in self.coefs.items()})

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
            f"{name!r}: {np.dtype(value.dtype).name} {tuple(value.shape)}"
            for name, value in self.coefs.items()
        )
        return f"{type(self).__name__}({{{inner}}})"

    # --- conversions ------------------------------------------------------------------

    def flatten(self) -> tuple[list[float], VectorSpec]:
        """Return all values as one list of floats, and the spec to rebuild the vector.

        The spec has declearn's shape: ``names`` a list, ``shapes`` and ``dtypes`` dicts
        keyed by name.

        Raises:
            TypeError: a coefficient is complex (not representable as floats).

        Example:
            >>> values, spec = JaxNumpyVector({"a:w": jnp.ones((2,), jnp.bfloat16)}).flatten()
            >>> values, spec.names, spec.shapes, spec.dtypes
            ([1.0, 1.0], ['a:w'], {'a:w': (2,)}, {'a:w': 'bfloat16'})
        """
        values: list[float] = []
        for name, value in self.coefs.items():
            host = np.asarray(value)
            if host.dtype.kind == "c":
                raise TypeError(f"JaxNumpyVector.flatten: coefficient {name!r} is complex")
            values.extend(host.astype(np.float64).ravel().tolist())
        spec = VectorSpec(names=list(self.coefs), shapes=self.shapes(), dtypes=self.dtypes())
        return values, spec

    @classmethod
    def unflatten(cls, values: Sequence[float], spec: Any) -> Any:
        """Rebuild a vector from :meth:`flatten`'s output.

        Args:
            values: the numbers, in the order of ``spec.names``.
            spec: a :class:`VectorSpec`, or any object with the same ``names``, ``shapes``
                and ``dtypes`` attributes (declearn's ``VectorSpec``).

        Returns:
            A vector of this class.

        Raises:
            WeightsMismatchError: ``spec`` lacks a shape or dtype for some names (all named;
                a ``KeyError``).
            TypeError: ``spec`` is not shaped like a :class:`VectorSpec`, or names an
                unknown dtype.
            ValueError: ``values`` does not hold exactly as many numbers as ``spec`` needs.
        """
        names, shapes, dtypes = _read_spec(spec)
        sizes = [math.prod(shapes[name]) for name in names]
        if len(values) != sum(sizes):
            raise ValueError(
                f"JaxNumpyVector.unflatten: {len(values)} values given, spec needs {sum(sizes)}"
            )
        flat = np.asarray(values, dtype=np.float64)
        coefs: dict[str, Array] = {}
        start = 0
        for name, size in zip(names, sizes, strict=True):
            dtype = dtype_from_name(dtypes[name], where=f"JaxNumpyVector.unflatten: {name!r}")
            chunk = flat[start : start + size].astype(dtype)
            coefs[name] = _to_jax(chunk.reshape(shapes[name]))
            start += size
        return cls(coefs)

    def pack(self, *, binary: bool = False) -> dict[str, dict[str, Any]]:
        """Return a plain, JSON- and msgpack-safe form: ``{name: {"dtype", "shape", "data"}}``.

        ``dtype`` is the dtype's canonical *name* (``"bfloat16"`` works), ``shape`` a list of
        ints and ``data`` the little-endian bytes in C order as base64 text, so that JSON (and
        declearn's JSON and msgpack hooks) carry it as it is.

        Args:
            binary: give ``data`` as raw ``bytes`` instead (for binary transports such as
                msgpack: no base64 overhead; not JSON-safe).

        Example:
            >>> JaxNumpyVector({"a:b": jnp.zeros((2,), jnp.bfloat16)}).pack()
            {'a:b': {'dtype': 'bfloat16', 'shape': [2], 'data': 'AAAAAA=='}}
        """
        return {
            name: _pack_array(np.asarray(value), text=not binary)
            for name, value in self.coefs.items()
        }

    @classmethod
    def unpack(cls, data: Mapping[str, Mapping[str, Any]]) -> Any:
        """Rebuild a vector from :meth:`pack`'s output.

        ``data`` may hold the bytes as base64 text (what :meth:`pack` writes) or as raw
        bytes (a binary transport's form).

        Returns:
            A vector of this class.

        Raises:
            TypeError: ``data`` is not shaped like :meth:`pack`'s output, or names an unknown
                dtype (the coefficient is named).
            ValueError: a coefficient's data is not valid base64, or its byte count does not
                match its dtype and shape.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"JaxNumpyVector.unpack needs a dict, got {type(data).__name__}")
        return cls({name: _to_jax(_unpack_array(name, item)) for name, item in data.items()})


def _read_spec(spec: Any) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, str]]:
    """Check a flatten spec's form; return its names, shapes and dtype names."""
    where = "JaxNumpyVector.unflatten"
    names = getattr(spec, "names", None)
    shapes = getattr(spec, "shapes", None)
    dtypes = getattr(spec, "dtypes", None)
    if (
        not isinstance(names, list | tuple)
        or not all(isinstance(name, str) for name in names)
        or not isinstance(shapes, Mapping)
        or not isinstance(dtypes, Mapping)
    ):
        raise TypeError(
            f"{where}: the spec needs names (a list of str) and shapes and dtypes (dicts keyed "
            f"by name), got {type(spec).__name__}"
        )
    parts = (("shape", shapes), ("dtype", dtypes))
    lacking = [
        f"{name!r} (no {' and no '.join(k for k, d in parts if name not in d)})"
        for name in names
        if name not in shapes or name not in dtypes
    ]
    if lacking:
        raise WeightsMismatchError(f"{where}: the spec does not describe {', '.join(lacking)}")
    out_shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        shape = shapes[name]
        if not _is_shape(shape):
            raise TypeError(f"{where}: {name!r} has a bad shape {shape!r}")
        out_shapes[name] = tuple(int(dim) for dim in shape)
    return list(names), out_shapes, {name: dtypes[name] for name in names}


def _is_shape(shape: object) -> bool:
    return isinstance(shape, list | tuple) and all(
        isinstance(dim, int | np.integer) and not isinstance(dim, bool) and dim >= 0
        for dim in shape
    )


def _pack_array(host: np.ndarray, *, text: bool) -> dict[str, Any]:
    """One coefficient's packed form; ``text``: data as base64 (else raw bytes)."""
    little = host.dtype.newbyteorder("<") if host.dtype.itemsize > 1 else host.dtype
    raw = np.ascontiguousarray(host, dtype=little).tobytes()
    return {
        "dtype": host.dtype.name,
        "shape": list(host.shape),
        "data": base64.b64encode(raw).decode("ascii") if text else raw,
    }


def _unpack_array(name: str, item: object) -> np.ndarray:
    """Read one packed coefficient (data as base64 text or raw bytes) into a host array."""
    where = f"JaxNumpyVector.unpack: {name!r}"
    if not isinstance(item, Mapping) or set(item) != {"dtype", "shape", "data"}:
        raise TypeError(f"{where} must be a dict with keys dtype, shape, data")
    dtype = dtype_from_name(item["dtype"], where=where)
    shape, raw = item["shape"], item["data"]
    if not _is_shape(shape):
        raise TypeError(f"{where} has a bad shape {shape!r}")
    if isinstance(raw, str):
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{where}: data is not valid base64 ({exc})") from None
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"{where}: data must be base64 text or bytes")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{where} has {len(raw)} bytes, {dtype.name}{tuple(shape)} needs {expected}"
        )
    little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    return np.frombuffer(raw, dtype=little).astype(dtype).reshape(tuple(shape))


def _to_jax(host: np.ndarray) -> Array:
    """Return ``host`` as a jax array, unless jax (x64 off) would change its dtype: then as is."""
    if jax.dtypes.canonicalize_dtype(host.dtype) != host.dtype:
        return host
    return jnp.asarray(host)
