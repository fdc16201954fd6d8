"""Retention rules of a checkpoint directory: which rounds to keep, and which rule keeps each.

Three rules, combined by union (a round is kept if any rule keeps it), plus one that always
holds: the newest complete round is never removed.

- ``keep_last=n``: the ``n`` newest rounds;
- ``keep_every=k``: every round divisible by ``k``;
- ``keep_best=(metric, "min" | "max", n)``: the ``n`` best rounds by a number in their metrics
  (rounds without that metric, or with a non-number there, are never "best"; ties go to the
  newer round).

No rule at all keeps every round. Pure functions of the round numbers and metrics: the writer
applies them after each save, ``hkstore inspect`` shows them from the newest round's record.

Example:
    >>> rules = Retention.from_args(keep_last=1, keep_every=2)
    >>> rules.reasons({1: {}, 2: {}, 3: {}})
    {1: [], 2: ['keep_every'], 3: ['newest', 'keep_last']}
    >>> rules.to_remove({1: {}, 2: {}, 3: {}})
    [1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["KeepBest", "Retention"]

_MODES = ("min", "max")


@dataclass(frozen=True)
class KeepBest:
    """The ``keep_best`` rule: the ``count`` best rounds by ``metric`` (``mode``: min or max)."""

    metric: str
    mode: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the round record holds."""
        return {"count": self.count, "metric": self.metric, "mode": self.mode}


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1 or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Retention:
    """The retention rules in force (all ``None``: keep every round)."""

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: KeepBest | None = None

    @classmethod
    def from_args(
        cls,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: tuple[str, str, int] | None = None,
    ) -> Retention:
        """Check the Checkpointer's arguments and build the rules.

        Raises:
            ValueError: a count that is not an integer >= 1, or a ``keep_best`` that is not
                ``(metric name, "min" | "max", count)``.
        """
        best = None
        if keep_best is not None:
            if not (isinstance(keep_best, tuple | list) and len(keep_best) == 3):
                raise ValueError(
                    f"keep_best: expected (metric, 'min' | 'max', count), got {keep_best!r}"
                )
            metric, mode, count = keep_best
            if not isinstance(metric, str) or not metric:
                raise ValueError(f"keep_best: the metric must be a non-empty name, got {metric!r}")
            if mode not in _MODES:
                raise ValueError(f"keep_best: mode must be 'min' or 'max', got {mode!r}")
            best = KeepBest(metric, mode, _positive("keep_best count", count) or 0)
        return cls(
            keep_last=_positive("keep_last", keep_last),
            keep_every=_positive("keep_every", keep_every),
            keep_best=best,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the round record holds (``$.retention``)."""
        return {
            "keep_best": None if self.keep_best is None else self.keep_best.to_dict(),
            "keep_every": self.keep_every,
            "keep_last": self.keep_last,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Retention:
        """Build from :meth:`to_dict`'s form (already checked against the record's schema)."""
        best = value.get("keep_best")
        return cls(
            keep_last=value.get("keep_last"),
            keep_every=value.get("keep_every"),
            keep_best=None if best is None else KeepBest(best["metric"], best["mode"],
                                                         best["count"]),
        )

    @property
    def keeps_all(self) -> bool:
        """Whether no rule is in use (every round is kept)."""
        return self.keep_last is None and self.keep_every is None and self.keep_best is None

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        """The round's ``keep_best`` metric, or ``None`` (no rule, metric absent, not a number)."""
        if self.keep_best is None:
            return None
        value = metrics.get(self.keep_best.metric)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def best(self, rounds: Mapping[int, Mapping[str, Any]]) -> list[int]:
        """Rounds ranked best first by the ``keep_best`` metric (all of them, not ``count``)."""
        if self.keep_best is None:
            return []
        sign = 1.0 if self.keep_best.mode == "min" else -1.0
        scored = [(sign * s, -n, n) for n, m in rounds.items() if (s := self.score(m)) is not None]
        return [n for _, _, n in sorted(scored)]

    def reasons(self, rounds: Mapping[int, Mapping[str, Any]]) -> dict[int, list[str]]:
        """For each round, the rules that keep it (empty: the next save removes it).

        ``"newest"`` marks the newest round; ``"all"`` every round when no rule is in use.
        """
        out: dict[int, list[str]] = {n: [] for n in sorted(rounds)}
        if not out:
            return out
        out[max(out)].append("newest")
        if self.keeps_all:
            for why in out.values():
                why.append("all")
            return out
        if self.keep_last is not None:
            for n in sorted(out)[-self.keep_last :]:
                out[n].append("keep_last")
        if self.keep_every is not None:
            for n in out:
                if n % self.keep_every == 0:
                    out[n].append("keep_every")
        if self.keep_best is not None:
            for n in self.best(rounds)[: self.keep_best.count]:
                out[n].append("keep_best")
        return out

    def to_remove(self, rounds: Mapping[int, Mapping[str, Any]]) -> list[int]:
        """The rounds no rule keeps, ascending (never the newest)."""
        return [n for n, why in self.reasons(rounds).items() if not why]
