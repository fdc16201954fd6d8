"""The trainable mask: turn a ``set_trainable_weights`` criterion into names, in model order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from hkstore.errors import WeightsMismatchError

__all__ = ["Criterion", "select_trainable"]

#: A list of ``"module:param"`` names, a dict ``{module: {param: ...}}`` (or
#: ``{module: [param, ...]}``), or any callable ``(module, param, value) -> bool``.
Criterion = Callable[[str, str, jax.Array], bool] | Mapping[str, Any] | Iterable[str]


def _names_from_dict(criterion: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for module, inner in criterion.items():
        if isinstance(inner, str | bytes) or not isinstance(inner, Iterable):
            raise TypeError(
                f"set_trainable_weights: criterion[{module!r}] must be a dict or list of "
                f"param names, got {type(inner).__name__}"
            )
        names.extend(f"{module}:{param}" for param in inner)
    return names


def select_trainable(
    criterion: Criterion,
    names: Sequence[str],
    where: Mapping[str, tuple[str, str]],
    value_of: Callable[[str], jax.Array],
) -> list[str]:
    """Return the names ``criterion`` selects, in model order (a new list).

    Args:
        criterion: see :data:`Criterion`; callables may be functions, ``functools.partial``
            objects or instances with ``__call__``.
        names: every weight name, in model order.
        where: ``name -> (module path, param name)``.
        value_of: the current value of a weight (what a callable criterion is shown).

    Raises:
        WeightsMismatchError: names that are not weights (a ``KeyError`` naming them all).
        TypeError: ``criterion`` is a single string, or none of the accepted forms.
    """
    if isinstance(criterion, str | bytes):
        raise TypeError("set_trainable_weights: pass a list of names, not a single string")
    if isinstance(criterion, Mapping):
        selected = _names_from_dict(criterion)
    elif callable(criterion):
        selected = [name for name in names if bool(criterion(*where[name], value_of(name)))]
    elif isinstance(criterion, Iterable):
        selected = list(criterion)
        bad = [item for item in selected if not isinstance(item, str)]
        if bad:
            raise TypeError(f"set_trainable_weights: names must be str, got {bad!r}")
    else:
        raise TypeError(
            "set_trainable_weights: criterion must be a list of names, a dict or a callable, "
            f"got {type(criterion).__name__}"
        )
    unknown = [name for name in selected if name not in where]
    if unknown:
        raise WeightsMismatchError(
            f"set_trainable_weights: {len(unknown)} name(s) are not weights of the model: "
            f"{', '.join(map(repr, unknown))} (weights: {', '.join(map(repr, names))})"
        )
    chosen = set(selected)
    return [name for name in names if name in chosen]
