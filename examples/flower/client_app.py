"""The example's ClientApp: receive the global arrays, train an hkstore model, send them back.

``from_arrayrecord`` checks the received arrays against the local model (names, shapes,
dtypes) before anything changes; FedAdam sends float64 arrays for this float32 model, which it
casts back with one warning per process.
"""

from __future__ import annotations

import task
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hkstore.integrations.flower import from_arrayrecord, to_arrayrecord

app = ClientApp()


def _local(message: Message, context: Context) -> tuple[object, object, object]:
    model = task.make_model()
    model.set_weights(from_arrayrecord(message.content["arrays"], like=model))
    x, y = task.load_partition(int(context.node_config["partition-id"]),
                               int(context.node_config["num-partitions"]))
    return model, x, y


@app.train()
def train(message: Message, context: Context) -> Message:
    model, x, y = _local(message, context)
    train_loss = task.train(model, x, y, lr=float(message.content["config"]["lr"]))
    metrics = MetricRecord({"num-examples": len(x), "train_loss": train_loss})
    return Message(RecordDict({"arrays": to_arrayrecord(model), "metrics": metrics}),
                   reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    model, x, y = _local(message, context)
    eval_loss, accuracy = task.evaluate(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval_loss": eval_loss,
                            "accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)
