"""A Flower strategy's state as plain data (arrays and JSON), and back: the state table.

What a strategy changes while it runs is listed here, class by class (:data:`STATE_TABLE`),
never guessed from ``vars()``: a strategy not in the table is refused unless the caller names
the attributes to keep. Nested strategies (the differential-privacy wrappers hold the strategy
they wrap in ``strategy``) are captured with their own entry. The global random states that
strategies draw from -- Python's ``random`` (node sampling) and NumPy's global generator (the
DP wrappers' noise) -- are captured as arrays of their 32-bit words. Nothing is pickled: the
values become a tree of numpy arrays and JSON scalars that :class:`hkstore.Checkpointer` stores.
"""

from __future__ import annotations

import importlib.metadata
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from hkstore.errors import StrategyStateError
from hkstore.integrations.flower._records import array_to_numpy, numpy_record

__all__ = [
    "STATE_TABLE",
    "StateSpec",
    "capture_random",
    "capture_strategy",
    "class_path",
    "restore_random",
    "spec_for",
    "strategy_setter",
]


@dataclass(frozen=True)
class StateSpec:
    """What one strategy class changes while it runs.

    Attributes:
        attributes: the attributes holding state (arrays, ``ArrayRecord`` values, numbers...).
        nested: attributes holding another strategy, captured with its own entry.
        refuse: ``(attribute, reason)``: the strategy is refused while that attribute is not
            ``None`` (state hkstore cannot store).
    """

    attributes: tuple[str, ...] = ()
    nested: tuple[str, ...] = ()
    refuse: tuple[tuple[str, str], ...] = ()


_FEDOPT = StateSpec(("current_arrays", "m_t", "v_t"))
_ACCOUNTANT = (("accountant", "its privacy accountant's state is not stored"),)

#: Flower's built-in strategies (flwr 1.42), by exact class. FedAvg, FedProx, FedMedian,
#: FedTrimmedAvg, Krum, MultiKrum and Bulyan keep no state between rounds beyond the global
#: random state; FedXgbBagging and FedXgbCyclic keep model bytes and node tables and are not
#: listed (pass ``state_attributes=`` to wrap them at your own risk).
STATE_TABLE: dict[type, StateSpec] = {
    FedAvg: StateSpec(),
    FedProx: StateSpec(),
    FedMedian: StateSpec(),
    FedTrimmedAvg: StateSpec(),
    Krum: StateSpec(),
    MultiKrum: StateSpec(),
    Bulyan: StateSpec(),
    QFedAvg: StateSpec(("current_arrays",)),
    FedAvgM: StateSpec(("current_arrays", "momentum_vector")),
    FedAdam: _FEDOPT,
    FedYogi: _FEDOPT,
    FedAdagrad: _FEDOPT,
    DifferentialPrivacyServerSideAdaptiveClipping: StateSpec(
        ("clipping_norm", "current_arrays"), nested=("strategy",)),
    DifferentialPrivacyClientSideAdaptiveClipping: StateSpec(
        ("clipping_norm",), nested=("strategy",)),
    DifferentialPrivacyServerSideFixedClipping: StateSpec(
        ("current_arrays",), nested=("strategy",), refuse=_ACCOUNTANT),
    DifferentialPrivacyClientSideFixedClipping: StateSpec(
        (), nested=("strategy",), refuse=_ACCOUNTANT),
}


def _flwr_version() -> str:
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def class_path(cls: type) -> str:
    """``module:qualname`` of a class: how a checkpoint names a strategy class (never imported)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def spec_for(strategy: Strategy, attributes: Sequence[str] | None) -> StateSpec:
    """The state spec of ``strategy``: the caller's ``attributes``, or the table's entry.

    Raises:
        StrategyStateError: a class without an entry and no ``attributes``; attributes the
            strategy does not have; a ``refuse`` attribute that is set. Nested strategies are
            checked too (their path named).
    """
    problems: list[str] = []
    _check(strategy, attributes, "strategy", problems)
    if problems:
        raise StrategyStateError("CheckpointedStrategy: cannot checkpoint this strategy:\n  - "
                                 + "\n  - ".join(problems))
    if attributes is not None:
        return StateSpec(tuple(attributes))
    return STATE_TABLE[type(strategy)]


def _check(strategy: Any, attributes: Sequence[str] | None, where: str,
           problems: list[str]) -> None:
    cls = type(strategy)
    if attributes is not None:
        names = list(attributes)
        bad = [n for n in names if not isinstance(n, str) or not n.isidentifier()]
        if bad:
            problems.append(f"{where}: state_attributes must be attribute names, got {bad!r}")
            return
        absent = [n for n in names if not hasattr(strategy, n)]
        if absent:
            problems.append(f"{where} ({cls.__qualname__}): no attribute(s) "
                            + ", ".join(repr(n) for n in absent))
        return
    spec = STATE_TABLE.get(cls)
    if spec is None:
        known = ", ".join(sorted(c.__qualname__ for c in STATE_TABLE))
        problems.append(
            f"{where}: {class_path(cls)} is not in hkstore's state table ({known}); name the "
            "attributes it changes while it runs with state_attributes=[...] (a subclass "
            "of a listed class needs them too: its own state would be missed)")
        return
    absent = [n for n in (*spec.attributes, *spec.nested) if not hasattr(strategy, n)]
    if absent:  # the table is written for flwr 1.42: a later Flower may have renamed them
        problems.append(f"{where} ({cls.__qualname__}): no attribute(s) "
                        + ", ".join(repr(n) for n in absent)
                        + f" in flwr {_flwr_version()} (hkstore's state table is written for "
                        "flwr 1.42); pass state_attributes=[...]")
        return
    for name, reason in spec.refuse:
        if getattr(strategy, name, None) is not None:
            problems.append(f"{where} ({cls.__qualname__}): {name!r} is set; {reason}")
    for name in spec.nested:
        _check(getattr(strategy, name), None, f"{where}.{name}", problems)


# --- capturing ---------------------------------------------------------------------------


def capture_strategy(strategy: Any, spec: StateSpec) -> dict[str, Any]:
    """The state of ``strategy`` (and of the strategies it nests) as a plain tree.

    Returns:
        ``{"class": "module:qualname", "attributes": {name: value}, "nested": {name: tree}}``
        where each value is a JSON scalar, a numpy array, or a tagged node (``ArrayRecord``,
        ``dict``, ``list``, ``tuple``) keeping its order.

    Raises:
        StrategyStateError: an attribute holds something that cannot be stored (names it).
    """
    problems: list[str] = []
    tree = _capture(strategy, spec, "strategy", problems)
    if problems:
        raise StrategyStateError("CheckpointedStrategy: cannot store the strategy's state:\n  - "
                                 + "\n  - ".join(problems))
    return tree


def _capture(strategy: Any, spec: StateSpec, where: str, problems: list[str]) -> dict[str, Any]:
    return {
        "class": class_path(type(strategy)),
        "attributes": {name: _encode(getattr(strategy, name), f"{where}.{name}", problems)
                       for name in spec.attributes},
        "nested": {name: _capture(getattr(strategy, name), STATE_TABLE[type(getattr(
                       strategy, name))], f"{where}.{name}", problems)
                   for name in spec.nested},
    }


def _encode(value: Any, where: str, problems: list[str]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return value
    if isinstance(value, ArrayRecord):
        names = list(value)
        arrays = []
        for name in names:
            try:
                arrays.append(array_to_numpy(value[name], where=f"{where}[{name!r}]"))
            except ValueError as exc:
                problems.append(str(exc))
        return {"kind": "ArrayRecord", "names": names, "arrays": arrays}
    if type(value) is dict:
        names = list(value)
        if not all(isinstance(n, str) for n in names):
            problems.append(f"{where}: a dict with keys other than strings")
            return None
        return {"kind": "dict", "names": names,
                "values": [_encode(value[n], f"{where}[{n!r}]", problems) for n in names]}
    if type(value) in (list, tuple):
        return {"kind": type(value).__name__,
                "items": [_encode(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]}
    problems.append(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be "
                    "stored (arrays, ArrayRecord, dicts, lists, tuples and JSON scalars can)")
    return None


# --- putting back ------------------------------------------------------------------------


def strategy_setter(strategy: Any, spec: StateSpec, tree: Any, *, round_: int
                    ) -> list[tuple[Any, str, Any]]:
    """Check a stored tree against ``strategy`` and decode it, changing nothing yet.

    Returns:
        ``[(object, attribute, value)]``: the assignments that put the state back.

    Raises:
        StrategyStateError: the tree was written for another class (each class path named,
            with the round), with other attributes, or is malformed.
    """
    problems: list[str] = []
    assignments: list[tuple[Any, str, Any]] = []
    _setter(strategy, spec, tree, "strategy", problems, assignments)
    if problems:
        raise StrategyStateError(
            f"resume: round {round_}'s strategy state does not fit this strategy:\n  - "
            + "\n  - ".join(problems))
    return assignments


def _setter(strategy: Any, spec: StateSpec, tree: Any, where: str, problems: list[str],
            out: list[tuple[Any, str, Any]]) -> None:
    if not isinstance(tree, Mapping) or set(tree) != {"class", "attributes", "nested"}:
        problems.append(f"{where}: not a strategy state")
        return
    mine = class_path(type(strategy))
    if tree["class"] != mine:
        problems.append(f"{where}: the checkpoint was written by {tree['class']}, this strategy "
                        f"is {mine}")
        return
    stored, expected = sorted(tree["attributes"]), sorted(spec.attributes)
    if stored != expected:
        problems.append(f"{where}: the checkpoint keeps attributes {stored}, this strategy "
                        f"keeps {expected}")
        return
    if sorted(tree["nested"]) != sorted(spec.nested):
        problems.append(f"{where}: the checkpoint nests {sorted(tree['nested'])}, this strategy "
                        f"nests {sorted(spec.nested)}")
        return
    for name in spec.attributes:
        out.append((strategy, name, _decode(tree["attributes"][name], f"{where}.{name}",
                                            problems)))
    for name in spec.nested:
        inner = getattr(strategy, name)
        _setter(inner, STATE_TABLE[type(inner)], tree["nested"][name], f"{where}.{name}",
                problems, out)


def _decode(node: Any, where: str, problems: list[str]) -> Any:
    if node is None or isinstance(node, bool | int | float | str | np.ndarray | np.generic):
        return node
    kind = node.get("kind") if isinstance(node, Mapping) else None
    if kind == "ArrayRecord":
        names, arrays = node.get("names"), node.get("arrays")
        if (isinstance(names, list) and isinstance(arrays, list) and len(names) == len(arrays)
                and all(isinstance(a, np.ndarray) for a in arrays)):
            return numpy_record(dict(zip(names, arrays, strict=True)))
    elif kind == "dict":
        names, values = node.get("names"), node.get("values")
        if isinstance(names, list) and isinstance(values, list) and len(names) == len(values):
            return {n: _decode(v, f"{where}[{n!r}]", problems)
                    for n, v in zip(names, values, strict=True)}
    elif kind in ("list", "tuple") and isinstance(node.get("items"), list):
        items = [_decode(v, f"{where}[{i}]", problems) for i, v in enumerate(node["items"])]
        return items if kind == "list" else tuple(items)
    problems.append(f"{where}: malformed stored value")
    return None


# --- the global random states --------------------------------------------------------------


def _words(values: Sequence[int], where: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1 or array.size == 0 or array.min() < 0 or array.max() >= 2**32:
        raise StrategyStateError(f"{where}: expected 32-bit words")
    return array.astype(np.uint32)


def capture_random() -> dict[str, Any]:
    """Python's ``random`` and NumPy's global generator states, as arrays and JSON scalars."""
    version, internal, gauss = random.getstate()
    key, words, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "internal": _words(internal, "random.getstate()"),
                   "gauss_next": gauss},
        "numpy": {"key": str(key), "words": np.array(words, dtype=np.uint32), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def restore_random(tree: Any, *, round_: int) -> None:
    """Put back what :func:`capture_random` returned (checked first: both or neither).

    Raises:
        StrategyStateError: a malformed stored random state (names the round).
    """
    try:
        py, nps = tree["python"], tree["numpy"]
        internal = tuple(int(w) for w in _words(py["internal"], "python random"))
        python_state = (int(py["version"]), internal, py["gauss_next"])
        numpy_state = (str(nps["key"]), np.asarray(nps["words"], dtype=np.uint32),
                       int(nps["pos"]), int(nps["has_gauss"]), float(nps["cached_gaussian"]))
        probe = random.Random()
        probe.setstate(python_state)  # refuses a malformed state before anything changes
        np.random.RandomState().set_state(numpy_state)
    except (KeyError, TypeError, ValueError, StrategyStateError) as exc:
        raise StrategyStateError(f"resume: round {round_}'s random state is malformed "
                                 f"({type(exc).__name__}: {exc})") from None
    random.setstate(python_state)
    np.random.set_state(numpy_state)
