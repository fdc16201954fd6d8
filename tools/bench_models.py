"""The models the benchmarks time: an MLP sized to a parameter count, a small conv net, data.

Kept in their own importable module (not in ``bench.py``, which runs as ``__main__``) so that
a saved archive can name the functions by reference (``bench_models:mlp``) and a joblib pickle
(declearn's config) can name them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

FEATURES = 256
OUTPUTS = 10
HIDDEN_LAYERS = 3
#: The conv net's input: one 32x32 RGB image (CIFAR-sized).
CNN_SHAPE = (32, 32, 3)


def mlp(x: Any, widths: Sequence[int]) -> Any:
    """Forward pass of a ReLU MLP with the given layer widths (last one = outputs)."""
    import haiku as hk

    return hk.nets.MLP(list(widths))(x)


def cnn(x: Any, channels: Sequence[int] = (32, 64), dense: int = 128) -> Any:
    """A small conv net (545 k params as defaulted; the dense layer holds most): two strided
    3x3 convs (``channels``), a ``dense``-wide dense layer, ``OUTPUTS`` outputs.

    Strided convolutions rather than max-pooling: the backward pass of ``max_pool`` on
    XLA:CPU (select-and-scatter) costs ~6x the rest of the step and would time that instead.
    The flattening keeps any leading axes, so the net also runs on one unbatched image (as
    declearn's clipping calls it).
    """
    import haiku as hk
    import jax

    h = jax.nn.relu(hk.Conv2D(channels[0], 3, stride=2, name="conv_0")(x))
    h = jax.nn.relu(hk.Conv2D(channels[1], 3, stride=2, name="conv_1")(h))
    h = jax.nn.relu(hk.Linear(dense, name="dense")(h.reshape(*h.shape[:-3], -1)))
    return hk.Linear(OUTPUTS, name="out")(h)


def mse(y_pred: Any, y_true: Any) -> Any:
    """Per-sample mean squared error; works on a batch and on a single sample."""
    import jax.numpy as jnp

    return jnp.mean((y_pred - y_true) ** 2, axis=-1)


def widths_for(params: int, features: int = FEATURES) -> list[int]:
    """Layer widths of an MLP (``HIDDEN_LAYERS`` equal hidden layers) with about ``params``.

    Counts weights and biases: ``features*h + (L-1)*h*h + h*outputs + L*h + outputs``.

    Args:
        params: the wanted number of float32 parameters (>= 1000).
        features: input width.

    Returns:
        The widths to pass to :func:`mlp` (hidden widths, then ``OUTPUTS``).
    """
    a = HIDDEN_LAYERS - 1
    b = features + OUTPUTS + HIDDEN_LAYERS
    c = OUTPUTS - params
    h = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return [max(1, round(h))] * HIDDEN_LAYERS + [OUTPUTS]


def param_count(widths: Sequence[int], features: int = FEATURES) -> int:
    """Exact number of parameters of ``mlp`` with ``widths`` on ``features`` inputs."""
    total, fan_in = 0, features
    for w in widths:
        total += fan_in * w + w
        fan_in = w
    return total


def batch(size: int, features: int = FEATURES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic float32 batch ``(x, y)`` for :func:`mlp` / :func:`mse`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, features), dtype=np.float32)
    y = rng.standard_normal((size, OUTPUTS), dtype=np.float32)
    return x, y


def cnn_batch(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic float32 batch ``(x, y)`` for :func:`cnn` / :func:`mse`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, *CNN_SHAPE), dtype=np.float32)
    y = rng.standard_normal((size, OUTPUTS), dtype=np.float32)
    return x, y
