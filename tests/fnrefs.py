"""Importable functions for tests/test_functions.py: targets for references and pickles."""

from __future__ import annotations

import functools
from math import sqrt  # re-exported name defined elsewhere: a reference must not reach it
from typing import Any

__all__ = [
    "NOT_CALLABLE",
    "Losses",
    "forward",
    "l1_partial",
    "make_closure",
    "private_alias",
    "scaled_loss",
    "sqrt",
]


def forward(x: float) -> float:
    """A module-level model function."""
    return 2.0 * x + 1.0


def scaled_loss(pred: float, target: float, *, scale: float = 1.0, power: int = 2) -> float:
    """A loss with keyword options, stored as ``functools.partial`` with JSON kwargs."""
    return scale * abs(pred - target) ** power


def _private_loss(pred: float, target: float) -> float:
    return abs(pred - target)


private_alias = _private_loss  # public name, private __qualname__: not a reference


class Losses:
    """A namespace class: static methods resolve by qualname, instances are refused."""

    @staticmethod
    def l1(pred: float, target: float) -> float:
        return abs(pred - target)

    def __call__(self, pred: float, target: float) -> float:
        return abs(pred - target)

    def bound(self, pred: float, target: float) -> float:
        return abs(pred - target)


NOT_CALLABLE = 3
l1_partial = functools.partial(scaled_loss, power=1)


def make_closure(offset: float) -> Any:
    """Return a closure (not importable by name; pickled by value)."""

    def shifted(x: float) -> float:
        return x + offset

    return shifted
