"""A model's full state, as one value: what it takes to write a HaikuModel out and rebuild it.

:meth:`HaikuModel.export_state` returns a :class:`ModelState` and
:meth:`HaikuModel.from_state` rebuilds a model from one. Saving (``hkstore.save``), the
checkpoint manager and the framework integrations all go through this pair, never through a
model's private members. :class:`RngState` is the model's random state (``model.rng_state``):
the PRNG key itself, not the seed it started from, so that training resumed from a saved state
draws the same random numbers as training that never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from hkstore.errors import RngStateError
from hkstore.model._device import to_host_stream
from hkstore.store import RNG_IMPLEMENTATIONS

__all__ = ["ModelState", "RngState", "WeightSpec"]


@dataclass(frozen=True)
class RngState:
    """A PRNG key as plain data: jax's implementation name and the key's 32-bit words.

    Attributes:
        impl: ``"threefry2x32"`` (jax's default), ``"rbg"`` or ``"unsafe_rbg"``.
        key_data: the key's words (``jax.random.key_data``), each in ``[0, 2**32)``.

    Raises:
        RngStateError: an unknown implementation, or the wrong number or range of words.

    Example:
        >>> import jax
        >>> state = RngState.from_key(jax.random.key(7))
        >>> state
        RngState(impl='threefry2x32', key_data=(0, 7))
        >>> RngState.from_key(state.to_key()) == state
        True
    """

    impl: str
    key_data: tuple[int, ...]

    def __post_init__(self) -> None:
        words = RNG_IMPLEMENTATIONS.get(self.impl) if isinstance(self.impl, str) else None
        if words is None:
            raise RngStateError(
                f"rng_state: implementation {self.impl!r} is not one of "
                f"{', '.join(map(repr, RNG_IMPLEMENTATIONS))}"
            )
        data = tuple(self.key_data)
        if len(data) != words or not all(
            isinstance(w, int | np.integer) and not isinstance(w, bool) and 0 <= w < 2**32
            for w in data
        ):
            raise RngStateError(
                f"rng_state: {self.impl!r} keys are {words} unsigned 32-bit words, got "
                f"{list(data)[:8]!r}"
            )
        object.__setattr__(self, "key_data", tuple(int(w) for w in data))

    @classmethod
    def from_key(cls, key: Any) -> RngState:
        """Read a jax key: a typed key (``jax.random.key``) or a raw ``uint32[2]`` threefry key.

        Raises:
            RngStateError: ``key`` is not a single PRNG key.
        """
        if isinstance(key, RngState):
            return key
        if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise RngStateError(f"rng_state: expected one key, got keys of shape {key.shape}")
            impl = str(jax.random.key_impl(key))
            data = np.asarray(jax.random.key_data(key)).reshape(-1)
            return cls(impl, tuple(int(w) for w in data))
        raw = np.asarray(key) if isinstance(key, np.ndarray | jax.Array) else None
        if raw is not None and raw.dtype == np.uint32 and raw.shape == (2,):
            return cls("threefry2x32", tuple(int(w) for w in raw))
        raise RngStateError(
            "rng_state: expected an RngState, a jax PRNG key (jax.random.key) or a raw "
            f"uint32[2] key, got {type(key).__name__}"
            + (f" of dtype {raw.dtype} and shape {raw.shape}" if raw is not None else "")
        )

    def to_key(self, device: jax.Device | None = None) -> jax.Array:
        """Return the typed jax key (on ``device`` when given)."""
        data = jax.device_put(np.asarray(self.key_data, dtype=np.uint32), device)
        return jax.random.wrap_key_data(data, impl=self.impl)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form archives and configs record: ``{"impl", "key_data"}``."""
        return {"impl": self.impl, "key_data": list(self.key_data)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> RngState:
        """Build from :meth:`to_dict`'s form (already checked by the document's parser)."""
        return cls(str(value["impl"]), tuple(value["key_data"]))


@dataclass(frozen=True)
class WeightSpec:
    """One weight's name, numpy dtype and shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelState:
    """Everything needed to write a :class:`~hkstore.HaikuModel` out and rebuild it.

    A ``ModelState`` is a snapshot: the arrays it holds are immutable jax arrays (or numpy
    arrays the model handed over), so training the model after
    :meth:`~hkstore.HaikuModel.export_state` does not change it. Nothing is copied to the
    host until :meth:`host_weights` is iterated, one tensor at a time.

    Attributes:
        model: the forward function.
        loss: the per-sample loss function ``loss(y_pred, y_true)``.
        seed: the model's seed (what ``HaikuModel(seed=...)`` was given or drew); ``None``
            lets :meth:`~hkstore.HaikuModel.from_state` draw one.
        data_info: the data info the model was initialized with; ``None`` before
            ``initialize``.
        weights: ``{name: array}`` in model order (empty before ``initialize``).
        trainable: the trainable weight names, in model order.
        rng: the model's current random state; ``None`` means the state a freshly
            initialized model with this seed has (what archives written before hkstore 0.2.0
            imply).

    Example:
        >>> state = model.export_state()
        >>> again = hkstore.HaikuModel.from_state(state)
        >>> again.get_weight_names() == model.get_weight_names()
        True
    """

    model: Callable[..., Any]
    loss: Callable[..., Any]
    seed: int | None
    data_info: Mapping[str, Any] | None
    weights: Mapping[str, Any] = field(default_factory=dict)
    trainable: Sequence[str] = ()
    rng: RngState | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", dict(self.weights))
        object.__setattr__(self, "trainable", tuple(self.trainable))
        if self.data_info is not None:
            object.__setattr__(self, "data_info", dict(self.data_info))

    @property
    def initialized(self) -> bool:
        """Whether the state has weights (the model was initialized)."""
        return self.data_info is not None

    def weight_specs(self) -> list[WeightSpec]:
        """Return every weight's name, dtype and shape, in model order (no transfer)."""
        return [
            WeightSpec(name, np.dtype(value.dtype), tuple(int(d) for d in value.shape))
            for name, value in self.weights.items()
        ]

    def host_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, host array)`` in model order, the next ones' copies under way.

        Device arrays go through pinned host memory where the device offers it, with at most
        ~256 MiB of copies started ahead of the one handed out (``to_host_stream``), so the
        transfers overlap the hashing and writing; on the CPU the arrays are zero-copy views.
        """
        yield from to_host_stream(self.weights.items())
