"""declearn's run state as a checkpoint state: arrays and JSON, never pickled, and back.

A declearn ``Optimizer.get_state()`` is made of dicts, ``(name, state)`` tuples, lists,
scalars, numpy arrays and declearn ``Vector`` objects (:class:`DeclearnJaxVector` for an
hkstore model, declearn's ``NumpyVector``...). :func:`to_tree` writes it as a tree that
:class:`hkstore.Checkpointer` stores as named tensors plus JSON: a vector becomes
``{"declearn_vector": <its declearn registration name>, "coefs": {name: array}}``, everything
else keeps its shape. :func:`from_tree` rebuilds it, taking vector classes from declearn's
type registry only (no module is imported for a name read from disk).

Random generators (numpy's ``Generator``: declearn's client samplers and in-memory datasets
draw from one) are stored as their bit generator's state, plain JSON (:func:`generator_state`,
:func:`set_generator_state`); :func:`sampler_state` and :func:`restore_sampler` do the same for
declearn's client samplers (their generator, their criterion scores, composed samplers).

Example:
    >>> import numpy as np
    >>> from declearn.model.sklearn import NumpyVector
    >>> tree = to_tree({"velocity": NumpyVector({"w": np.ones(2)}), "steps": 3})
    >>> tree["velocity"]["declearn_vector"], tree["steps"]
    ('numpy', 3)
    >>> from_tree(tree)["velocity"].coefs["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import jax
import numpy as np
from declearn.model.api import Vector
from declearn.utils import access_registered, access_registration_info

from hkstore.errors import StateMismatchError

__all__ = [
    "VECTOR_KEY",
    "ClientSet",
    "from_tree",
    "generator_of",
    "generator_state",
    "order_sampler_clients",
    "restore_sampler",
    "sampler_state",
    "set_generator_state",
    "to_tree",
]

#: The key that marks a stored declearn vector.
VECTOR_KEY = "declearn_vector"
_MAX_LISTED = 20


def _raise(what: str, problems: list[str]) -> None:
    if problems:
        listed = problems[:_MAX_LISTED]
        more = len(problems) - len(listed)
        tail = f"\n  ... and {more} more" if more else ""
        raise StateMismatchError(f"{what}:\n  " + "\n  ".join(listed) + tail)


def _key(path: str, key: object) -> str:
    return f"{path}[{key!r}]"


def to_tree(value: Any, *, what: str = "declearn state") -> Any:
    """Return ``value`` (a declearn state) as a tree of dicts, lists, tuples, arrays and JSON.

    Raises:
        StateMismatchError: naming every path that holds something else (an object that is
            neither a vector nor plain data, a dict key that is not a string, a dict that
            already uses the vector marker key).
    """
    problems: list[str] = []
    tree = _to_tree(value, "$", problems)
    _raise(f"{what}: cannot store", problems)
    return tree


def _to_tree(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, Vector):
        try:
            name, group = access_registration_info(type(value))
        except KeyError:
            name, group = "", ""
        if group != "Vector":
            problems.append(f"{path}: {type(value).__name__} is not a registered declearn Vector")
            return None
        coefs = {}
        for key, coef in value.coefs.items():
            if not isinstance(coef, np.ndarray | np.generic | jax.Array):
                problems.append(f"{_key(path, key)}: a {type(coef).__name__} coefficient "
                                "(expected a numpy or jax array)")
            coefs[str(key)] = coef
        return {VECTOR_KEY: name, "coefs": coefs}
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        return value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        if VECTOR_KEY in value:
            problems.append(f"{path}: a dict holding the reserved key {VECTOR_KEY!r}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: key {key!r} is not a string")
                continue
            out[key] = _to_tree(item, _key(path, key), problems)
        return out
    if type(value) in (list, tuple):
        items = [_to_tree(item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    problems.append(f"{path}: {type(value).__module__}.{type(value).__qualname__} is neither "
                    "a declearn Vector nor arrays and JSON")
    return None


def from_tree(tree: Any, *, what: str = "declearn state") -> Any:
    """Rebuild a declearn state written by :func:`to_tree`.

    Raises:
        StateMismatchError: naming every vector whose name declearn has not registered (or
            that is not a ``Vector``) and every malformed vector entry.
    """
    problems: list[str] = []
    value = _from_tree(tree, "$", problems)
    _raise(f"{what}: cannot rebuild", problems)
    return value


def _from_tree(tree: Any, path: str, problems: list[str]) -> Any:
    if isinstance(tree, Mapping):
        if VECTOR_KEY in tree:
            return _vector(tree, path, problems)
        return {key: _from_tree(item, _key(path, key), problems) for key, item in tree.items()}
    if type(tree) in (list, tuple):
        items = [_from_tree(item, f"{path}[{i}]", problems) for i, item in enumerate(tree)]
        return tuple(items) if isinstance(tree, tuple) else items
    return tree


def _vector(tree: Mapping[str, Any], path: str, problems: list[str]) -> Vector | None:
    name, coefs = tree.get(VECTOR_KEY), tree.get("coefs")
    if set(tree) != {VECTOR_KEY, "coefs"} or not isinstance(name, str) \
            or not isinstance(coefs, Mapping):
        problems.append(f"{path}: a stored vector holds {VECTOR_KEY!r} (a name) and 'coefs' "
                        f"(a dict), got keys {sorted(map(str, tree))}")
        return None
    try:
        cls = access_registered(name, group="Vector")
    except KeyError:
        problems.append(f"{path}: vector type {name!r} is not registered with declearn in this "
                        "process (import the module that defines it first)")
        return None
    if not (isinstance(cls, type) and issubclass(cls, Vector)):
        problems.append(f"{path}: {name!r} is registered as {cls!r}, not a declearn Vector")
        return None
    return cls(dict(coefs))


# --- random generators and client samplers ----------------------------------------------------


def generator_state(generator: np.random.Generator) -> dict[str, Any]:
    """Return a numpy generator's bit-generator state as JSON (its arrays as lists).

    Example:
        >>> rng = np.random.default_rng(0); _ = rng.random()
        >>> again = np.random.default_rng(1)
        >>> set_generator_state(again, generator_state(rng)); again.random() == rng.random()
        True
    """
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return {"array": value.tolist(), "dtype": value.dtype.str}
        if isinstance(value, np.generic):
            return value.item()
        return value

    return {"generator": plain(generator.bit_generator.state)}


def set_generator_state(generator: np.random.Generator, state: Mapping[str, Any], *,
                        where: str = "generator") -> None:
    """Put a numpy generator back in a state :func:`generator_state` returned.

    Raises:
        StateMismatchError: the state is not one of this generator's kind (names both).
    """
    def native(value: Any) -> Any:
        if isinstance(value, Mapping):
            if set(value) == {"array", "dtype"}:
                return np.asarray(value["array"], dtype=np.dtype(str(value["dtype"])))
            return {k: native(v) for k, v in value.items()}
        return value

    stored = state.get("generator") if isinstance(state, Mapping) else None
    kind = type(generator.bit_generator).__name__
    if not isinstance(stored, Mapping) or stored.get("bit_generator") != kind:
        found = stored.get("bit_generator") if isinstance(stored, Mapping) else stored
        raise StateMismatchError(f"{where}: the stored state is of a {found!r} generator, "
                                 f"this one is a {kind!r}")
    try:
        generator.bit_generator.state = native(stored)
    except (TypeError, ValueError, KeyError) as exc:
        raise StateMismatchError(f"{where}: the stored {kind} state does not fit ({exc})") from None


def generator_of(owner: object) -> np.random.Generator | None:
    """Return the numpy generator a declearn sampler or dataset draws from, or ``None``.

    declearn 2.9 keeps it in the ``_rng`` attribute (``InMemoryDataset``,
    ``UniformClientSampler``, ``WeightedClientSampler``); a tripwire test pins that.
    """
    rng = getattr(owner, "_rng", None)
    return rng if isinstance(rng, np.random.Generator) else None


def sampler_state(sampler: object) -> dict[str, Any]:
    """Return what a declearn client sampler carries from round to round, as JSON.

    Its random generator (``UniformClientSampler``, ``WeightedClientSampler``), its criterion
    scores (``CriterionClientSampler``) and those of composed samplers. Not included: the
    history a criterion may keep of its own (declearn's training-time criterion averages the
    time clients spent, which no rerun reproduces anyway).
    """
    state: dict[str, Any] = {"kind": type(sampler).__name__}
    rng = generator_of(sampler)
    if rng is not None:
        state["rng"] = generator_state(rng)
    scores = getattr(sampler, "client_to_score", None)
    if isinstance(scores, dict):
        state["scores"] = {str(k): v for k, v in scores.items()}
    children = getattr(sampler, "samplers", None)
    if isinstance(children, list):
        state["samplers"] = [sampler_state(child) for child in children]
    return state


def restore_sampler(sampler: object, state: Mapping[str, Any], *,
                    where: str = "client sampler") -> None:
    """Put a client sampler back in the state :func:`sampler_state` returned.

    Raises:
        StateMismatchError: the stored sampler is of another kind or shape (names both).
    """
    kind = type(sampler).__name__
    if state.get("kind") != kind:
        raise StateMismatchError(f"{where}: the checkpoint holds a {state.get('kind')!r} "
                                 f"sampler's state, this server uses a {kind!r}")
    rng = generator_of(sampler)
    if ("rng" in state) != (rng is not None):
        raise StateMismatchError(f"{where}: the stored state and this {kind} disagree on "
                                 "having a random generator")
    if rng is not None:
        set_generator_state(rng, state["rng"], where=f"{where} generator")
    if "scores" in state:
        scores = getattr(sampler, "client_to_score", None)
        if isinstance(scores, dict):
            scores.clear()
            scores.update(state["scores"])
    children = getattr(sampler, "samplers", None)
    stored = state.get("samplers")
    if isinstance(children, list) and isinstance(stored, list):
        if len(children) != len(stored):
            raise StateMismatchError(f"{where}: {len(stored)} composed samplers stored, "
                                     f"{len(children)} in this one")
        for i, (child, child_state) in enumerate(zip(children, stored, strict=True)):
            restore_sampler(child, child_state, where=f"{where}.samplers[{i}]")


class ClientSet(set[str]):
    """A set of client names that iterates in sorted order (so do the sets its operators
    return).

    declearn's uniform and weighted samplers draw from ``list(clients)``: the order of a
    plain set of strings follows Python's string hashing, which differs from process to
    process (``PYTHONHASHSEED``) and, on collisions, with the order clients registered in.
    The same random draws would then pick other clients in a restarted server. Sorted
    iteration makes a sampler's choices a function of its generator alone.

    Example:
        >>> list(ClientSet({"c", "a", "b"})), list(ClientSet({"c", "a"}) - {"a"})
        (['a', 'b', 'c'], ['c'])
    """

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set.__iter__(self)))

    def __sub__(self, other: AbstractSet[Any]) -> ClientSet:
        return ClientSet(set.__sub__(self, other))

    def __and__(self, other: AbstractSet[Any]) -> ClientSet:
        return ClientSet(set.__and__(self, other))

    def __or__(self, other: AbstractSet[Any]) -> ClientSet:  # type: ignore[override]
        return ClientSet(set.__or__(self, other))

    def __xor__(self, other: AbstractSet[Any]) -> ClientSet:  # type: ignore[override]
        return ClientSet(set.__xor__(self, other))

    def difference(self, *others: Iterable[Any]) -> ClientSet:
        return ClientSet(set.difference(self, *others))

    def intersection(self, *others: Iterable[Any]) -> ClientSet:
        return ClientSet(set.intersection(self, *others))

    def union(self, *others: Iterable[Any]) -> ClientSet:  # type: ignore[override]
        return ClientSet(set.union(self, *others))

    def copy(self) -> ClientSet:
        return ClientSet(self)


def order_sampler_clients(sampler: object) -> None:
    """Make a declearn client sampler (and the samplers it composes) draw from its clients in
    sorted order (see :class:`ClientSet`)."""
    clients = getattr(sampler, "clients", None)
    if isinstance(clients, set):
        setattr(sampler, "clients", ClientSet(clients))  # noqa: B010  (any sampler class)
    for child in getattr(sampler, "samplers", None) or []:
        order_sampler_clients(child)
