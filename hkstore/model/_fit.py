"""Fit checks: do named arrays match a model's weights by name, shape and dtype? (all at once)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from hkstore.errors import WeightsMismatchError

__all__ = ["Spec", "check_fit", "spec_of"]

#: (shape, dtype) of one weight.
Spec = tuple[tuple[int, ...], np.dtype]


def spec_of(value: object) -> Spec:
    """Return ``(shape, dtype)`` of an array-like with ``.shape`` and ``.dtype`` (no transfer)."""
    return tuple(int(d) for d in value.shape), np.dtype(value.dtype)  # type: ignore[attr-defined]


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def check_fit(
    expected: Mapping[str, Spec], given: Mapping[str, Spec], *, where: str, given_as: str
) -> None:
    """Raise one error naming every difference between ``given`` and ``expected``.

    Args:
        expected: the model's ``{name: (shape, dtype)}``.
        given: the caller's ``{name: (shape, dtype)}``.
        where: the calling method (``"set_weights"``), first word of the message.
        given_as: what the caller gave (``"weights"``, ``"updates"``), for the message.

    Raises:
        WeightsMismatchError: names missing or unexpected, or a shape or dtype differs
            (a ``KeyError`` and a ``ValueError``); the message counts and lists them all.
    """
    problems: list[str] = []
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing:
        problems.append(f"missing {len(missing)} name(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} name(s): {_names(unexpected)}")
    for name, (shape, dtype) in expected.items():
        if name not in given:
            continue
        got_shape, got_dtype = given[name]
        if got_shape != shape:
            problems.append(f"{name!r}: shape {got_shape} given, model has {shape}")
        if got_dtype != dtype:
            problems.append(f"{name!r}: dtype {got_dtype.name} given, model has {dtype.name}")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise WeightsMismatchError(
            f"{where}: {len(problems)} mismatch(es) between the {given_as} and the model:\n{lines}"
        )
