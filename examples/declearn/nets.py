"""The demo's model and data: a small classifier whose first layer stays frozen.

``forward`` and ``loss`` live in an importable module, so archives and messages refer to them
by name (``nets:forward``); receivers pass them in themselves (their receive policy), so
nothing sent over the wire is ever imported or unpickled.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

FEATURES = 8
CLASSES = 3
DATA_INFO = {"data_type": "float32", "features_shape": (FEATURES,)}


def forward(x: jax.Array) -> jax.Array:
    """encoder (frozen in the demo) -> hidden layer with dropout -> head."""
    h = jax.nn.relu(hk.Linear(16, name="encoder")(x))
    h = jax.nn.tanh(hk.Linear(16, name="hidden")(h))
    h = hk.dropout(hk.next_rng_key(), 0.1, h)  # draws from the model's random state
    return hk.Linear(CLASSES, name="head")(h)


def loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(y_pred)
    return -jnp.take_along_axis(logp, y_true[:, None].astype(jnp.int32), axis=-1)[:, 0]


def frozen(module: str, name: str, value: object) -> bool:
    """The trainable criterion: everything but the encoder."""
    return module != "encoder"


def client_data(index: int, samples: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Client ``index``'s data: features and labels of one shared linear teacher, shifted per
    client (the clients' data differ)."""
    teacher = np.random.default_rng(1234).normal(size=(FEATURES, CLASSES))
    rng = np.random.default_rng(index)
    x = (rng.normal(size=(samples, FEATURES)) + 0.3 * index).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(samples, CLASSES)), axis=1)
    return x, y.astype(np.int32)
