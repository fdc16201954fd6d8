"""Data info: check the ``data_info`` a model is initialized from; merge several parties' own."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from hkstore.errors import DataInfoError
from hkstore.model._dtype_names import canonical_dtype_name

__all__ = ["REQUIRED_FIELDS", "aggregate_data_info", "validate_data_info"]

#: The fields :class:`HaikuModel` needs before it can build its weights.
REQUIRED_FIELDS: frozenset[str] = frozenset({"data_type", "features_shape"})


def _check_data_type(value: Any) -> str:
    try:
        return canonical_dtype_name(value, where="data_info['data_type']")
    except TypeError as exc:  # UnsupportedDtypeError included
        raise DataInfoError(str(exc)) from None


def _check_features_shape(value: Any) -> tuple[int, ...]:
    where = "data_info['features_shape']"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise DataInfoError(f"{where}: expected a tuple of positive ints, got {value!r}")
    dims = list(value)
    if any(dim is None for dim in dims):
        # Supporting unknown dims would mean guessing a size to build the weights with; the
        # caller knows better. Weights rarely depend on such a dim (sequence length...), so any
        # concrete value used in training works.
        raise DataInfoError(
            f"{where}: {tuple(dims)!r} has None (unknown) dimensions; hkstore builds the weights "
            "from a zero batch of that shape, so give every dimension a concrete size (for a "
            "variable sequence length, any length the model accepts, e.g. 1)"
        )
    bad = [
        dim
        for dim in dims
        if isinstance(dim, bool | np.bool_) or not isinstance(dim, numbers.Integral) or dim < 1
    ]
    if bad:
        raise DataInfoError(
            f"{where}: every dimension must be a positive int, got {tuple(dims)!r} "
            f"(bad: {', '.join(repr(dim) for dim in bad)})"
        )
    return tuple(int(dim) for dim in dims)


def _check_n_samples(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise DataInfoError(f"data_info['n_samples']: expected an int >= 0, got {value!r}")
    return int(value)


def _check_classes(value: Any) -> list[Any]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise DataInfoError(f"data_info['classes']: expected a collection of labels, got {value!r}")
    items = value.tolist() if isinstance(value, np.ndarray) else list(value)
    try:
        return sorted(set(items))
    except TypeError:  # labels of mixed types: keep first-seen order, drop duplicates
        pass
    try:
        return list(dict.fromkeys(items))
    except TypeError:  # a list or dict as a label: no set of labels can hold it
        raise DataInfoError(
            "data_info['classes']: labels must be hashable (strings, numbers, tuples), got "
            f"{str(items)[:80]}"
        ) from None


_CHECKS = {
    "data_type": _check_data_type,
    "features_shape": _check_features_shape,
    "n_samples": _check_n_samples,
    "classes": _check_classes,
}


def validate_data_info(
    data_info: Mapping[str, Any], required: Iterable[str] = REQUIRED_FIELDS
) -> dict[str, Any]:
    """Check a ``data_info`` dict and return it normalized.

    Known fields are checked and normalized: ``data_type`` (any numeric dtype or dtype name
    numpy parses -- ``"int"``, ``"<f4"``, ``"double"``, ``np.float32`` -- that the archive
    format can store, turned into its canonical name such as ``"float32"`` or
    ``"bfloat16"``), ``features_shape`` (tuple of positive ints; ``None`` dimensions are
    refused), ``n_samples`` (int >= 0) and ``classes`` (sorted list of distinct labels). Other
    fields are passed through unchanged.

    Args:
        data_info: the dict to check.
        required: fields that must be present.

    Returns:
        A new dict with the same fields, normalized.

    Raises:
        DataInfoError: ``data_info`` is not a mapping, lacks a required field (all missing
            fields are named), or a field has a bad value.

    Example:
        >>> validate_data_info({"data_type": "float32", "features_shape": [28, 28]})
        {'data_type': 'float32', 'features_shape': (28, 28)}
        >>> validate_data_info({"data_type": "<f8", "features_shape": [3]})["data_type"]
        'float64'
    """
    if not isinstance(data_info, Mapping):
        raise DataInfoError(f"data_info must be a dict, got {type(data_info).__name__}")
    missing = sorted(set(required) - set(data_info))
    if missing:
        raise DataInfoError(
            f"data_info lacks required field(s) {', '.join(map(repr, missing))} "
            f"(got {sorted(map(str, data_info))})"
        )
    out: dict[str, Any] = {}
    for key, value in data_info.items():
        check = _CHECKS.get(key)
        out[key] = check(value) if check is not None else value
    return out


def aggregate_data_info(
    infos: Sequence[Mapping[str, Any]], required: Iterable[str] = REQUIRED_FIELDS
) -> dict[str, Any]:
    """Merge the ``data_info`` of several parties into one.

    ``classes`` are united, ``n_samples`` summed; every other field must be equal everywhere.

    Args:
        infos: one ``data_info`` per party (at least one).
        required: fields every party must give.

    Returns:
        The merged, normalized ``data_info``.

    Raises:
        DataInfoError: no infos, a party's info is invalid, or parties disagree on a field
            (the field and the values are named).
    """
    if not infos:
        raise DataInfoError("aggregate_data_info needs at least one data_info")
    checked = [validate_data_info(info, required) for info in infos]
    out: dict[str, Any] = {}
    conflicts: list[str] = []
    for info in checked:
        for key, value in info.items():
            if key not in out:
                out[key] = value
            elif key == "classes":
                out[key] = _check_classes([*out[key], *value])
            elif key == "n_samples":
                out[key] += value
            elif out[key] != value and key not in conflicts:
                conflicts.append(key)
    if conflicts:
        details = "; ".join(
            f"{key!r}: {[info.get(key) for info in checked]!r}" for key in conflicts
        )
        raise DataInfoError(f"data_info differs between parties: {details}")
    return out
