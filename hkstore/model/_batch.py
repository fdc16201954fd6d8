"""Batches: check an ``(inputs, y_true, s_wght)`` tuple and place its arrays on a device."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hkstore.model._device import put_on

__all__ = ["Batch", "PlacedBatch", "place_batch"]

#: ``(inputs, y_true, s_wght)``: inputs an array or a list/tuple of arrays (one per model
#: input), ``y_true`` an array or None, ``s_wght`` per-sample weights (shape ``(n,)``) or None.
Batch = tuple[Any, Any, Any]
#: A checked batch on the model's device: (inputs as a tuple, y_true or None, s_wght or None).
PlacedBatch = tuple[tuple[jax.Array, ...], jax.Array | None, jax.Array | None]


def _check_array(value: object, what: str) -> None:
    if not isinstance(value, np.ndarray | jax.Array):
        raise TypeError(f"{what} must be a numpy or jax array, got {type(value).__name__}")
    if value.ndim == 0:
        raise ValueError(f"{what} must have a leading batch dimension, got a 0-d array")


def place_batch(batch: object, device: jax.Device, *, where: str) -> PlacedBatch:
    """Check ``batch`` and return its arrays placed on ``device`` (numpy ones transferred).

    Args:
        batch: ``(inputs, y_true, s_wght)``.
        device: where the model lives.
        where: the calling method, for error messages.

    Returns:
        ``(inputs, y_true, s_wght)`` with ``inputs`` always a tuple of jax arrays.

    Raises:
        TypeError: ``batch`` is not a 3-tuple/list, or holds something that is not a numpy or
            jax array (or None for ``y_true``/``s_wght``).
        ValueError: the arrays disagree on the number of samples, or ``s_wght`` is not 1-d.
    """
    if not isinstance(batch, tuple | list) or len(batch) != 3:
        raise TypeError(
            f"{where}: batch must be a tuple (inputs, y_true, s_wght), got {type(batch).__name__}"
        )
    inputs, y_true, s_wght = batch
    if isinstance(inputs, tuple | list):
        if not inputs:
            raise TypeError(f"{where}: batch inputs is an empty {type(inputs).__name__}")
        for i, value in enumerate(inputs):
            _check_array(value, f"{where}: batch inputs[{i}]")
        xs = tuple(inputs)
    else:
        _check_array(inputs, f"{where}: batch inputs")
        xs = (inputs,)
    if y_true is not None:
        _check_array(y_true, f"{where}: batch y_true")
    if s_wght is not None:
        _check_array(s_wght, f"{where}: batch s_wght")
        if s_wght.ndim != 1:
            raise ValueError(
                f"{where}: batch s_wght must be 1-d (one weight per sample), got shape "
                f"{tuple(s_wght.shape)}"
            )
    sizes = {f"inputs[{i}]": x.shape[0] for i, x in enumerate(xs)}
    if y_true is not None:
        sizes["y_true"] = y_true.shape[0]
    if s_wght is not None:
        sizes["s_wght"] = s_wght.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: batch arrays disagree on the number of samples: {sizes}")
    return put_on((xs, y_true, s_wght), device)
