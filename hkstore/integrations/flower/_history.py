"""The run's metrics by real round number, as Flower reports them and as rounds store them.

Train and evaluate metrics are the strategy's aggregated client metrics, server metrics are
``evaluate_fn``'s (round 0 being the initial evaluation). Each round stores the whole history
so far in its state (:meth:`History.to_tree`), and its own finite numbers as the round's
metrics (:meth:`History.round_metrics`: what ``keep_best`` ranks and ``hkstore inspect``
shows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from hkstore.errors import StrategyStateError

__all__ = ["History", "plain_metrics"]

_SECTIONS = ("train", "evaluate", "server")


def plain_metrics(record: MetricRecord) -> dict[str, Any]:
    """A MetricRecord as JSON numbers (numpy scalars, which it accepts, become Python ones)."""
    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(v) for v in value]
        return float(value) if isinstance(value, float | np.floating) else int(value)
    return {str(k): plain(v) for k, v in record.items()}


@dataclass
class History:
    """The run's metrics by real round number: train and evaluate (aggregated client metrics),
    server (``evaluate_fn``'s, round 0 being the initial evaluation)."""

    train: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, Any]] = field(default_factory=dict)
    server: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_tree(self) -> dict[str, Any]:
        return {name: {r: dict(m) for r, m in getattr(self, name).items()} for name in _SECTIONS}

    @classmethod
    def from_tree(cls, tree: Any, round_: int) -> History:
        ok = isinstance(tree, Mapping) and set(tree) == set(_SECTIONS) and all(
            isinstance(tree[s], Mapping) and all(
                type(r) is int and isinstance(m, Mapping) for r, m in tree[s].items())
            for s in _SECTIONS)
        if not ok:
            raise StrategyStateError(f"resume: round {round_}'s history is malformed")
        return cls(**{s: {r: dict(m) for r, m in tree[s].items()} for s in _SECTIONS})

    def round_metrics(self, round_: int) -> dict[str, Any]:
        """The round's finite numbers as ``{"train.loss": ...}`` (what ``keep_best`` ranks)."""
        flat: dict[str, Any] = {}
        for name in _SECTIONS:
            for key, value in getattr(self, name).get(round_, {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool) and (
                        math.isfinite(value)):
                    flat[f"{name}.{key}"] = value
        return flat

    def result(self, arrays: ArrayRecord) -> Result:
        def records(section: dict[int, dict[str, Any]]) -> dict[int, MetricRecord]:
            return {r: MetricRecord(dict(m)) for r, m in sorted(section.items())}
        return Result(arrays=arrays, train_metrics_clientapp=records(self.train),
                      evaluate_metrics_clientapp=records(self.evaluate),
                      evaluate_metrics_serverapp=records(self.server))
