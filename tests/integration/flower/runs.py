"""Runs of the test app through the grid double: straight, checkpointed, resumed, and the
controls that resume without the strategy's state or round numbers. Used by the tests and
by ``resume_child.py`` (the fresh process that resumes)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import flower_app
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Result, Strategy
from grid_double import LoopbackGrid

import hkstore
from hkstore.integrations.flower import (
    CheckpointedStrategy,
    array_to_numpy,
    resume,
    to_arrayrecord,
)

#: Python's random seed of a fresh run (a resumed process seeds another one: see ``child``).
RUN_SEED = 1234
STRATEGIES = ("fedavg", "fedadam", "fedavgm")


def make_strategy(name: str) -> Strategy:
    """Half the nodes train and half evaluate each round: node sampling matters."""
    common: dict[str, Any] = {"fraction_train": 0.5, "fraction_evaluate": 0.5,
                              "min_available_nodes": flower_app.NUM_NODES}
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedadam":
        return FedAdam(**common, eta=0.05, eta_l=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=1.0, server_momentum=0.9)
    raise ValueError(name)


def grid() -> LoopbackGrid:
    return LoopbackGrid(flower_app.app, flower_app.NUM_NODES)


def train_config() -> ConfigRecord:
    return ConfigRecord({"lr": 0.05})


def run(name: str, directory: Path, rounds: int, *, resumed: bool) -> tuple[int, Result]:
    """``rounds`` checkpointed rounds: a fresh run (random seeded with RUN_SEED) or a resumed
    one. Returns the round it started after and Flower's Result."""
    model = flower_app.make_model()
    with hkstore.Checkpointer(directory) as ckpt:
        strategy = CheckpointedStrategy(make_strategy(name), ckpt, like=model)
        if resumed:
            last, arrays = resume(ckpt, strategy, like=model)
        else:
            random.seed(RUN_SEED)
            last, arrays = 0, hkstore_arrays(model)
        result = strategy.start(grid(), arrays, num_rounds=rounds, train_config=train_config())
    return last, result


def hkstore_arrays(model: hkstore.HaikuModel) -> ArrayRecord:
    return to_arrayrecord(model)


def control_nothing_restored(name: str, directory: Path, rounds: int) -> Result:
    """Resume as one could without hkstore's wrapper: the last round's model only; a new
    strategy, this process's random state, round numbers from 1."""
    restored = hkstore.Checkpointer(directory).restore(model=flower_app.forward,
                                                       loss=flower_app.loss)
    return make_strategy(name).start(grid(), hkstore_arrays(restored.model), num_rounds=rounds,
                                     train_config=train_config())


def control_rounds_restart(name: str, directory: Path, rounds: int) -> Result:
    """Everything restored (strategy state, random states, exact arrays), but Flower's own
    loop on the wrapped strategy: round numbers restart at 1."""
    model = flower_app.make_model()
    ckpt = hkstore.Checkpointer(directory)
    strategy = CheckpointedStrategy(make_strategy(name), ckpt, like=model)
    _, arrays = resume(ckpt, strategy, like=model)
    return strategy.inner.start(grid(), arrays, num_rounds=rounds, train_config=train_config())


def exact(record: ArrayRecord) -> dict[str, Any]:
    """An ArrayRecord as exactly comparable JSON: dtype, shape and the bytes of each tensor."""
    out = {}
    for name in record:
        array = array_to_numpy(record[name], where=name)
        out[name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                     "hex": np.ascontiguousarray(array).tobytes().hex()}
    return out


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two ``exact()`` forms (same names and shapes)."""
    worst = 0.0
    for name, left in a.items():
        right = b[name]
        x = np.frombuffer(bytes.fromhex(left["hex"]), dtype=left["dtype"]).astype(np.float64)
        y = np.frombuffer(bytes.fromhex(right["hex"]), dtype=right["dtype"]).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


def metrics(result: Result) -> dict[str, Any]:
    return {
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
