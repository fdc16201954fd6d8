"""DeclearnJaxVector: hkstore's JaxNumpyVector as a declearn ``Vector``.

It is an :class:`hkstore.JaxNumpyVector` (same arithmetic, exact dtype-aware equality,
pack by dtype name, bfloat16) that declearn's aggregators, optimizer modules (SGD, Adam,
momentum, clipping, Scaffold), DP noise and SecAgg accept:

- registered with declearn (type registry, JSON and msgpack) for a marker type of its own,
  so that jax arrays keep building declearn's own ``JaxNumpyVector`` through ``Vector.build``;
- msgpack carries the coefficients as raw bytes (JSON as base64 text, :meth:`pack`);
- ``flatten()`` gives declearn's ``VectorSpec`` (with the registration info SecAgg's
  ``Vector.build_from_specs`` needs);
- declearn's ``NumpyVector`` (DP noise) and ``JaxNumpyVector`` are accepted as operands, on
  either side; the result is a ``DeclearnJaxVector``.

Unpacked coefficients live on jax's default device; a model moves what it receives to its
own device.
"""

from __future__ import annotations

import sys
from typing import Any

from declearn.model.api import Vector, VectorSpec, register_vector_type
from declearn.model.sklearn import NumpyVector
from declearn.utils import access_registration_info
from declearn.utils.serialize import add_serialization_support

import hkstore

__all__ = ["DeclearnJaxVector"]


class HkstoreJaxCoefs:
    """The marker type :class:`DeclearnJaxVector` is registered for; no value is one.

    declearn's ``Vector.build(coefs)`` picks a vector class from the type of the values,
    one class per type, and a later registration silently replaces an earlier one:
    registering for ``jax.Array`` would take jax arrays away from declearn's own
    ``JaxNumpyVector``.
    """


@register_vector_type(HkstoreJaxCoefs, name="hkstore-jax")
class DeclearnJaxVector(hkstore.JaxNumpyVector, Vector):
    """An :class:`hkstore.JaxNumpyVector` that declearn's engine accepts as a ``Vector``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from declearn.model.sklearn import NumpyVector
        >>> v = DeclearnJaxVector({"lin:w": jnp.ones((2,))})
        >>> noisy = v + NumpyVector({"lin:w": np.full((2,), 0.5, np.float32)})
        >>> type(noisy).__name__, noisy.coefs["lin:w"].tolist()
        ('DeclearnJaxVector', [1.5, 1.5])
    """

    @property
    def compatible_vector_types(self) -> set[type[Vector]]:
        """Vector types this one combines with: itself, ``NumpyVector``, declearn's jax one."""
        types: set[type[Vector]] = {type(self), DeclearnJaxVector, NumpyVector}
        haiku_module = sys.modules.get("declearn.model.haiku")  # only if already imported:
        if haiku_module is not None:  # importing it turns on jax_enable_x64 process-wide
            types.add(haiku_module.JaxNumpyVector)
        return types

    def _operand(self, other: object) -> object:
        """Turn a compatible declearn vector into an operand (its arrays, same names)."""
        if isinstance(other, hkstore.JaxNumpyVector) or not isinstance(other, Vector):
            return other
        if isinstance(other, tuple(self.compatible_vector_types)):
            coefs: dict[str, Any] = getattr(other, "coefs")  # noqa: B009  (a declearn Vector)
            return hkstore.JaxNumpyVector(coefs)
        return other

    def flatten(self) -> tuple[list[float], VectorSpec]:
        """Return the values as floats and declearn's ``VectorSpec`` (``v_type`` included).

        Raises:
            TypeError: a coefficient is complex.
        """
        values, _ = hkstore.JaxNumpyVector.flatten(self)
        spec = VectorSpec(
            names=list(self.coefs),
            shapes=self.shapes(),
            dtypes=self.dtypes(),
            v_type=access_registration_info(type(self)),
        )
        return values, spec


def _pack_binary(vector: DeclearnJaxVector) -> dict[str, Any]:
    return vector.pack(binary=True)


# msgpack is a binary transport: raw bytes, not the base64 text JSON needs.
add_serialization_support(
    DeclearnJaxVector,
    "msgpack",
    _pack_binary,
    DeclearnJaxVector.unpack,
    name=DeclearnJaxVector.__name__,
    overwrite=True,
)
