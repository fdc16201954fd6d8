"""The Flower app the integration tests run: a ClientApp training an hkstore.HaikuModel.

Six clients, each with its own synthetic regression data (partition ``i`` of the node
config: sizes differ, so FedAvg's weights do too); every client trains from the arrays it is
sent with plain SGD and returns them with ``num-examples`` and its training loss. The model
and loss are module-level functions, so round archives can name them by reference.
"""

from __future__ import annotations

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import hkstore
from hkstore.errors import ArrayRecordCastWarning
from hkstore.integrations.flower import from_arrayrecord, to_arrayrecord

NUM_NODES = 6
FEATURES = 4
DATA_INFO = {"data_type": "float32", "features_shape": (FEATURES,)}


def forward(x: jax.Array) -> jax.Array:
    return hk.nets.MLP([8, 2], name="mlp")(x)


def loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    return jnp.mean((y_pred - y_true) ** 2, axis=-1)


def make_model(seed: int = 0) -> hkstore.HaikuModel:
    """The model every party builds (same seed: same initial weights)."""
    model = hkstore.HaikuModel(forward, loss, seed=seed)
    model.initialize(DATA_INFO)
    return model


def partition(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``index``'s data: 16 * (index + 1) samples of a shifted linear problem."""
    rng = np.random.default_rng(100 + index)
    x = rng.normal(loc=0.3 * index, size=(16 * (index + 1), FEATURES)).astype(np.float32)
    w = np.arange(FEATURES * 2, dtype=np.float32).reshape(FEATURES, 2) / 10.0
    y = (x @ w + rng.normal(scale=0.1, size=(len(x), 2))).astype(np.float32)
    return x, y


def _received(message: Message) -> hkstore.HaikuModel:
    model = make_model()
    with warnings.catch_warnings():
        # FedAdam sends float64 back for this float32 model: the cast is expected here
        warnings.simplefilter("ignore", ArrayRecordCastWarning)
        model.set_weights(from_arrayrecord(message.content["arrays"], like=model))
    return model


app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    index = int(context.node_config["partition-id"])
    model = _received(message)
    x, y = partition(index)
    lr = float(message.content["config"]["lr"])
    for start in range(0, len(x), 16):
        grads = model.compute_batch_gradients((x[start:start + 16], y[start:start + 16], None))
        model.apply_updates(grads * -lr)
    losses = model.collect_training_losses()
    metrics = MetricRecord({"num-examples": len(x), "train_loss": float(np.mean(losses))})
    return Message(RecordDict({"arrays": to_arrayrecord(model), "metrics": metrics}),
                   reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    index = int(context.node_config["partition-id"])
    model = _received(message)
    x, y = partition(index)
    y_true, y_pred, _ = model.compute_batch_predictions((x, y, None))
    value = float(np.mean(model.loss_function(y_true, y_pred)))
    metrics = MetricRecord({"num-examples": len(x), "eval_loss": value})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)
