"""The example's model and data: a small Haiku classifier, trained with hkstore on each client.

Each client holds one partition of a synthetic 3-class problem (partition ``i`` of
``num-partitions``, as Flower's node config numbers them); the model, the loss and the data
are the same in every process, so a checkpoint names the functions by reference
(``task:forward``).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import hkstore

FEATURES = 8
CLASSES = 3
DATA_INFO = {"data_type": "float32", "features_shape": (FEATURES,)}


def forward(x: jax.Array) -> jax.Array:
    """A two-layer MLP producing class logits."""
    return hk.nets.MLP([16, CLASSES], name="mlp")(x)


def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample cross-entropy (labels are one-hot)."""
    return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def make_model() -> hkstore.HaikuModel:
    """The model every party builds (same seed: the server's initial weights)."""
    hkstore.set_device_policy(gpu=False)
    model = hkstore.HaikuModel(forward, loss, seed=0)
    model.initialize(DATA_INFO)
    return model


def load_partition(index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Partition ``index`` of ``count``: 64 samples each, one-hot labels, a skewed class mix."""
    rng = np.random.default_rng(1000 + index)
    centers = np.random.default_rng(0).normal(scale=2.0, size=(CLASSES, FEATURES))
    mix = np.roll(np.array([0.6, 0.3, 0.1]), index % CLASSES)
    labels = rng.choice(CLASSES, size=64, p=mix)
    x = (centers[labels] + rng.normal(size=(64, FEATURES))).astype(np.float32)
    return x, np.eye(CLASSES, dtype=np.float32)[labels]


def train(model: hkstore.HaikuModel, x: np.ndarray, y: np.ndarray, lr: float,
          batch: int = 16) -> float:
    """One epoch of plain SGD; returns the mean batch loss."""
    for start in range(0, len(x), batch):
        grads = model.compute_batch_gradients((x[start:start + batch], y[start:start + batch],
                                               None))
        model.apply_updates(grads * -lr)
    return float(np.mean(model.collect_training_losses()))


def evaluate(model: hkstore.HaikuModel, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean loss and accuracy."""
    y_true, logits, _ = model.compute_batch_predictions((x, y, None))
    losses = model.loss_function(y_true, logits)
    return float(np.mean(losses)), float(np.mean(logits.argmax(-1) == y_true.argmax(-1)))
