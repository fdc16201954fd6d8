"""hkstore demo: train a small MLP with a frozen first layer, with per-sample clipped gradients.

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python tools/demo.py``
(``make demo`` does this). Each step is a function so that later steps (save, load...) can be
added to :func:`main`.
"""

from __future__ import annotations

import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkstore.model import HaikuModel, set_device_policy

FEATURES = 8
CLASSES = 3
FROZEN_LAYER = "mlp/~/linear_0"


def mlp(x: jax.Array) -> jax.Array:
    """The model: a three-layer MLP classifier."""
    return hk.nets.MLP([16, 16, CLASSES], name="mlp")(x)


def xent_loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(y_pred)
    return -jnp.take_along_axis(logp, y_true[:, None], axis=-1)[:, 0]


def make_data(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic, learnable data: labels from a fixed random linear map of the features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(FEATURES, CLASSES)), axis=1).astype(np.int32)
    return x, y


def choose_device() -> str:
    """Use a GPU when jax has one, the CPU otherwise (without the fallback warning)."""
    gpu = any(device.platform == "gpu" for device in jax.devices())
    policy = set_device_policy(gpu=gpu)
    return f"{'gpu' if policy.gpu else 'cpu'} ({jax.devices()[0]})"


def build_model(seed: int = 0) -> HaikuModel:
    """Wrap and initialize the MLP, then freeze its first layer."""
    model = HaikuModel(mlp, xent_loss, seed=seed)
    model.initialize({"data_type": "float32", "features_shape": (FEATURES,)})
    model.set_trainable_weights(lambda layer, name, value: layer != FROZEN_LAYER)
    return model


def show_weights(model: HaikuModel) -> None:
    """Print which weights train and which are frozen."""
    trainable = model.get_weight_names(trainable=True)
    frozen = [name for name in model.get_weight_names() if name not in trainable]
    print(f"trainable ({len(trainable)}): {', '.join(trainable)}")
    print(f"frozen    ({len(frozen)}): {', '.join(frozen)}")


def train(
    model: HaikuModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 6,
    batch_size: int = 32,
    learning_rate: float = 0.5,
    max_norm: float = 1.0,
) -> list[float]:
    """Plain SGD on per-sample clipped gradients; return (and print) the mean loss per epoch."""
    history = []
    for epoch in range(epochs):
        for start in range(0, len(x), batch_size):
            batch = (x[start : start + batch_size], y[start : start + batch_size], None)
            grads = model.compute_batch_gradients(batch, max_norm=max_norm)
            model.apply_updates(grads * -learning_rate)
        losses = model.collect_training_losses()
        history.append(float(np.mean(losses)))
        print(f"epoch {epoch + 1}: mean training loss {history[-1]:.4f} ({len(losses)} steps)")
    return history


def check_frozen(model: HaikuModel, before: dict[str, np.ndarray]) -> None:
    """Confirm that the frozen weights did not move."""
    after = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    frozen = [name for name in before if name not in model.get_weight_names(trainable=True)]
    unchanged = all(np.array_equal(before[name], after[name]) for name in frozen)
    print(f"frozen weights unchanged: {unchanged}")
    if not unchanged:
        raise SystemExit("frozen weights changed")


def main() -> int:
    """Run the demo; return the exit status."""
    print(f"device: {choose_device()}")
    x, y = make_data()
    model = build_model(seed=0)
    show_weights(model)
    before = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    history = train(model, x, y)
    check_frozen(model, before)
    print(f"loss went from {history[0]:.4f} to {history[-1]:.4f}")
    return 0 if history[-1] < history[0] else 1


if __name__ == "__main__":
    sys.exit(main())
