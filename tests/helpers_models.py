"""Toy models for the tests (module-level functions, so they can be stored by reference)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkstore.model import DevicePolicy, HaikuModel, get_device_policy, set_device_policy

# --- models ---------------------------------------------------------------------------


def mlp_model(x: jax.Array) -> jax.Array:
    """Two-layer MLP classifier: names ``mlp/~/linear_0:b`` ... ``mlp/~/linear_1:w``."""
    return hk.nets.MLP([8, 3], name="mlp")(x)


def frozen_mlp_model(x: jax.Array) -> jax.Array:
    """Three named layers; the tests freeze ``encoder``."""
    h = jax.nn.relu(hk.Linear(6, name="encoder")(x))
    h = jax.nn.tanh(hk.Linear(5, name="hidden")(h))
    return hk.Linear(3, name="head")(h)


def rnn_model(x: jax.Array) -> jax.Array:
    """Vanilla RNN over ``(batch, time, features)`` unrolled with ``hk.dynamic_unroll``."""
    core = hk.VanillaRNN(5, name="rnn")
    outputs, _ = hk.dynamic_unroll(core, x, core.initial_state(x.shape[0]), time_major=False)
    return hk.Linear(1, name="head")(outputs[:, -1])


def cnn_model(x: jax.Array) -> jax.Array:
    """A small conv net over ``(batch, 6, 6, 1)`` images."""
    h = jax.nn.relu(hk.Conv2D(3, kernel_shape=3, name="conv")(x))
    return hk.Linear(3, name="head")(hk.Flatten()(h))


def noisy_model(x: jax.Array) -> jax.Array:
    """``sum(w * (x + noise))``, noise drawn from the model's key: gradients depend on the key."""
    w = hk.get_parameter("w", (x.shape[-1],), init=hk.initializers.Constant(1.0))
    noise = jax.random.normal(hk.next_rng_key(), x.shape)
    return jnp.sum(w * (x + noise), axis=-1, keepdims=True)


#: Shapes ``shape_recording_model`` was traced with (appended at trace time).
SEEN_SHAPES: list[tuple[int, ...]] = []


def shape_recording_model(x: jax.Array) -> jax.Array:
    """A linear model that records the input shape it is traced with."""
    SEEN_SHAPES.append(tuple(x.shape))
    return hk.Linear(1, name="lin")(x)


# --- losses ---------------------------------------------------------------------------


def xent_loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(y_pred)
    return -jnp.take_along_axis(logp, y_true[:, None].astype(jnp.int32), axis=-1)[:, 0]


def mse_loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    """Per-sample mean squared error."""
    return jnp.mean(jnp.square(y_pred - y_true), axis=-1)


# --- cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyCase:
    """One toy model: functions, data info, a batch maker and (optionally) layers to freeze."""

    name: str
    model: Callable[..., Any]
    loss: Callable[..., Any]
    features_shape: tuple[int, ...]
    regression: bool = False
    freeze: dict[str, list[str]] = field(default_factory=dict)

    @property
    def data_info(self) -> dict[str, Any]:
        return {"data_type": "float32", "features_shape": self.features_shape}

    def batch(self, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, None]:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, *self.features_shape)).astype(np.float32)
        if self.regression:
            y = rng.normal(size=(n, 1)).astype(np.float32)
        else:
            y = rng.integers(0, 3, size=(n,)).astype(np.int32)
        return x, y, None

    def build(self, seed: int = 0) -> HaikuModel:
        model = HaikuModel(self.model, self.loss, seed=seed)
        model.initialize(self.data_info)
        if self.freeze:
            model.set_trainable_weights(
                lambda layer, name, value: name not in self.freeze.get(layer, [])
            )
        return model


CASES = [
    ToyCase("mlp", mlp_model, xent_loss, (5,)),
    ToyCase("frozen_mlp", frozen_mlp_model, xent_loss, (5,), freeze={"encoder": ["w", "b"]}),
    ToyCase("rnn", rnn_model, mse_loss, (4, 3), regression=True),
    ToyCase("cnn", cnn_model, xent_loss, (6, 6, 1)),
]
CASE_IDS = [case.name for case in CASES]


# --- references computed without hkstore ----------------------------------------------


def nested(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"module:param": x}`` -> ``{module: {param: x}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        module, _, param = name.rpartition(":")
        out.setdefault(module, {})[param] = value
    return out


def reference_loss_fn(
    case_model: Callable[..., Any], loss: Callable[..., Any]
) -> Callable[..., jax.Array]:
    """``f(trainable_flat, frozen_flat, x, y, w) -> mean(w * loss)``, with plain haiku and jax."""
    apply = hk.transform(case_model).apply
    key = jax.random.key(0)  # the toy models draw no random numbers

    def f(trainable: dict[str, Any], frozen: dict[str, Any], x: Any, y: Any, w: Any) -> jax.Array:
        losses = loss(apply(nested({**frozen, **trainable}), key, x), y)
        if w is not None:
            losses = losses * w
        return jnp.mean(losses)

    return f


@contextlib.contextmanager
def device_policy(gpu: bool = False, idx: int | None = None) -> Iterator[DevicePolicy]:
    """Set the global device policy for a block, then restore the previous one."""
    before = get_device_policy()
    try:
        yield set_device_policy(gpu=gpu, idx=idx)
    finally:
        set_device_policy(gpu=before.gpu, idx=before.idx)


def dropout_mlp_model(x: jax.Array) -> jax.Array:
    """An MLP with dropout: its gradients depend on the model's random key."""
    h = jax.nn.relu(hk.Linear(16, name="hidden")(x))
    h = hk.dropout(hk.next_rng_key(), 0.5, h)
    return hk.Linear(3, name="head")(h)
