"""A checkpoint's state (any pytree of arrays and scalars) as named tensors plus a JSON tree.

Never pickled. :func:`flatten_state` walks the caller's state and returns the tree as the
round record's ``structure`` (``docs/FORMAT.md`` 13.4) with the arrays to store, each named by
its path (``$[0].mu["lin:w"]``); :func:`rebuild_state` turns the stored tree and the tensors
read back into the value again.

What comes back as it went in, with no template: plain ``dict`` (string or integer keys),
``list``, ``tuple``, ``None``, Python ``bool``/``int``/``float``/``str`` (NaN and infinities
included), numpy arrays and scalars (bfloat16 and the float8 kinds included), jax arrays
and jax PRNG key arrays (placed on the given device). Any other node of jax's pytree registry
(optax's named tuples, registered dataclasses...) is stored with its class name and child
keys, and rebuilt only from a template (``state_like=``) of the same structure, because
building it from the record would mean importing a class the record names.

Example:
    >>> flat = flatten_state({"step": 3, "m": [np.zeros(2, np.float32)]})
    >>> sorted(flat.arrays)
    ['$.m[0]']
    >>> rebuild_state(flat.structure, flat.arrays)
    {'m': [array([0., 0.], dtype=float32)], 'step': 3}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from hkstore.errors import StateMismatchError
from hkstore.store import TensorSpec, code_for_dtype

__all__ = ["FlatState", "flatten_state", "rebuild_state"]

_MAX_LISTED = 20


@dataclass
class FlatState:
    """A flattened state: the JSON tree, and the arrays it names (in tree order).

    Attributes:
        structure: the tree, as the round record's ``$.state.structure``.
        arrays: ``{tensor name: array}`` (numpy or jax; PRNG keys as their ``uint32`` data).
        specs: the tensors to write, in ``arrays`` order.
    """

    structure: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)
    specs: list[TensorSpec] = field(default_factory=list)

    def host(self, name: str) -> np.ndarray:
        """One tensor as a host numpy array (device arrays copied now, one at a time)."""
        value = self.arrays[name]
        return np.asarray(jax.device_get(value)) if isinstance(value, jax.Array) else value


def _segment(key: Any) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    if key.isascii() and key.isidentifier():
        return f".{key}"
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def _where(path: str) -> str:
    return "$" + path


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def _custom_children(value: Any) -> list[tuple[str, Any]] | None:
    """The children of a registered pytree node with their key strings, or ``None`` (a leaf)."""
    if jax.tree_util.default_registry.flatten_one_level(value) is None:
        return None
    pairs, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda y: y is not value)
    return [(jax.tree_util.keystr(tuple(path)), child) for path, child in pairs]


def flatten_state(state: Any, *, copy_numpy: bool = False) -> FlatState:
    """Flatten ``state`` into a JSON tree and named arrays.

    Args:
        state: the state (see the module docstring for what it may hold).
        copy_numpy: copy numpy arrays (numpy arrays are mutable: a background save copies
            them so that the caller may change them right after ``save()``; jax arrays are
            immutable and never copied).

    Returns:
        The :class:`FlatState`.

    Raises:
        StateMismatchError: naming every path that holds something the format cannot store
            (an object that is not a pytree node, a dict with keys other than strings or
            integers, an array dtype outside the dtype table).
    """
    problems: list[str] = []
    flat = FlatState(structure={})
    flat.structure = _flatten(state, "", flat, problems, copy_numpy)
    if problems:
        raise StateMismatchError(_listing("state: cannot store", problems))
    return flat


def _flatten(value: Any, path: str, flat: FlatState, problems: list[str], copy: bool
             ) -> dict[str, Any]:
    where = _where(path)
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return _tensor(value, path, flat, problems, copy)
    if value is None or isinstance(value, bool | int | str):
        return {"type": "json", "value": value}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"type": "json", "value": float(value)}
        return {"type": "float", "value": "nan" if math.isnan(value) else
                ("inf" if value > 0 else "-inf")}
    if type(value) is dict:
        keys = list(value)
        if not all(type(k) is str for k in keys) and not all(type(k) is int for k in keys):
            kinds = sorted({type(k).__name__ for k in keys})
            problems.append(f"{where}: dict keys must be all strings or all integers, got "
                            f"{', '.join(kinds)}")
            return {"type": "json", "value": None}
        keys.sort()
        return {"type": "dict", "keys": keys,
                "values": [_flatten(value[k], path + _segment(k), flat, problems, copy)
                           for k in keys]}
    if type(value) in (list, tuple):
        return {"type": type(value).__name__,
                "items": [_flatten(v, f"{path}[{i}]", flat, problems, copy)
                          for i, v in enumerate(value)]}
    if _is_namedtuple(value):
        fields = list(type(value)._fields)
        return {"type": "namedtuple", "class": _class_name(type(value)), "keys": fields,
                "items": [_flatten(v, path + _segment(f), flat, problems, copy)
                          for f, v in zip(fields, value, strict=True)]}
    children = _custom_children(value)
    if children is None:
        problems.append(f"{where}: {type(value).__module__}.{type(value).__qualname__} is "
                        "neither an array, a JSON scalar nor a pytree node")
        return {"type": "json", "value": None}
    return {"type": "custom", "class": _class_name(type(value)),
            "keys": [k for k, _ in children],
            "items": [_flatten(v, path + k, flat, problems, copy) for k, v in children]}


def _tensor(value: Any, path: str, flat: FlatState, problems: list[str], copy: bool
            ) -> dict[str, Any]:
    name = _where(path)
    node: dict[str, Any] = {"type": "tensor", "name": name}
    if isinstance(value, jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            node.update(array="jax-key", impl=str(jax.random.key_impl(value)))
            value = jax.random.key_data(value)
        else:
            node["array"] = "jax"
    elif isinstance(value, np.generic):
        node["array"] = "numpy-scalar"
        value = np.asarray(value)
    else:
        node["array"] = "numpy"
        value = np.array(value, copy=True) if copy else value
    try:
        code = code_for_dtype(np.dtype(value.dtype), where=f"state {name}")
    except Exception as exc:  # UnsupportedDtypeError names the dtype
        problems.append(f"{name}: {exc}")
        return node
    if name in flat.arrays:
        problems.append(f"{name}: two leaves have this name")
        return node
    flat.arrays[name] = value
    flat.specs.append(TensorSpec(name=name, dtype=code, shape=tuple(int(d) for d in value.shape)))
    return node


def _listing(head: str, problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    return (f"{head} ({len(problems)} problem(s)):\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else ""))


# --- rebuilding -------------------------------------------------------------------------------


def rebuild_state(
    structure: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    like: Any = None,
    device: jax.Device | None = None,
) -> Any:
    """Rebuild a state from its stored tree and tensors (read back as numpy arrays).

    Args:
        structure: the record's ``$.state.structure`` (already checked by the store).
        tensors: ``{name: numpy array}``.
        like: a template of the same structure (``state_like=``): required when the stored
            tree has named tuples or other registered nodes; its nodes are rebuilt with the
            template's types. ``None``: plain containers only.
        device: where jax arrays go (default: jax's default device).

    Returns:
        The state: numpy leaves as numpy, jax leaves as jax arrays on ``device``.

    Raises:
        StateMismatchError: the template's structure differs from the stored one (every
            difference named by its path: missing or extra keys, lengths, node types, array
            shapes and dtypes), or the stored tree needs a template and none was given.
    """
    problems: list[str] = []
    if like is None:
        _needs_template(structure, "", problems)
        if problems:
            raise StateMismatchError(_listing(
                "restore: the stored state has named tuples or other registered pytree nodes; "
                "pass state_like= a template of the same structure (e.g. optimizer.init(params))",
                problems))
    else:
        _compare(structure, like, "", tensors, problems)
        if problems:
            raise StateMismatchError(_listing(
                "restore: state_like does not have the stored state's structure", problems))
    return _build(structure, tensors, like, device)


def _needs_template(node: Mapping[str, Any], path: str, problems: list[str]) -> None:
    kind = node["type"]
    if kind in ("namedtuple", "custom"):
        problems.append(f"{_where(path)}: {node['class']}")
        return
    if kind == "dict":
        for key, child in zip(node["keys"], node["values"], strict=True):
            _needs_template(child, path + _segment(key), problems)
    elif kind in ("list", "tuple"):
        for i, child in enumerate(node["items"]):
            _needs_template(child, f"{path}[{i}]", problems)


def _describe(value: Any) -> str:
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return f"an array {np.dtype(value.dtype)}{list(np.shape(value))}"
    if type(value) in (dict, list, tuple):
        return f"a {type(value).__name__}"
    if value is None or isinstance(value, bool | int | float | str):
        return f"a {type(value).__name__} ({value!r})"[:80]
    return f"a {type(value).__qualname__}"


def _compare(node: Mapping[str, Any], like: Any, path: str,
             tensors: Mapping[str, np.ndarray], problems: list[str]) -> None:
    where = _where(path)
    kind = node["type"]
    if kind == "tensor":
        stored = tensors[node["name"]]
        shape, dtype = stored.shape, stored.dtype
        if node["array"] == "jax-key":
            if not (isinstance(like, jax.Array)
                    and jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key)):
                problems.append(f"{where}: stored a PRNG key array, the template has "
                                f"{_describe(like)}")
            return
        if not isinstance(like, jax.Array | np.ndarray | np.generic):
            problems.append(f"{where}: stored an array {dtype}{list(shape)}, the template has "
                            f"{_describe(like)}")
        elif (np.dtype(like.dtype), tuple(np.shape(like))) != (dtype, shape):
            problems.append(f"{where}: stored {dtype}{list(shape)}, the template has "
                            f"{np.dtype(like.dtype)}{list(np.shape(like))}")
        return
    if kind in ("json", "float"):
        if not (like is None or isinstance(like, bool | int | float | str)):
            problems.append(f"{where}: stored a scalar, the template has {_describe(like)}")
        return
    if kind == "dict":
        if type(like) is not dict:
            problems.append(f"{where}: stored a dict, the template has {_describe(like)}")
            return
        stored_keys = list(node["keys"])
        missing = [k for k in stored_keys if k not in like]
        extra = [k for k in like if k not in set(stored_keys)]
        if missing or extra:
            problems.append(f"{where}: dict keys differ: stored only {missing!r}, template "
                            f"only {extra!r}")
        for key, child in zip(stored_keys, node["values"], strict=True):
            if key in like:
                _compare(child, like[key], path + _segment(key), tensors, problems)
        return
    if kind in ("list", "tuple"):
        if type(like).__name__ != kind or type(like) not in (list, tuple):
            problems.append(f"{where}: stored a {kind}, the template has {_describe(like)}")
            return
        _compare_items(node, list(like), path, [f"[{i}]" for i in range(len(like))],
                       tensors, problems)
        return
    cls = node["class"].rpartition(":")[2]
    if kind == "namedtuple":
        if not _is_namedtuple(like) or type(like).__qualname__ != cls:
            problems.append(f"{where}: stored a named tuple {cls}, the template has "
                            f"{_describe(like)}")
            return
        if list(type(like)._fields) != list(node["keys"]):
            problems.append(f"{where}: {cls} fields differ: stored {node['keys']}, template "
                            f"{list(type(like)._fields)}")
            return
        _compare_items(node, list(like), path, [_segment(f) for f in node["keys"]], tensors,
                       problems)
        return
    children = None if _is_namedtuple(like) else _custom_children(like)
    if children is None or type(like).__qualname__ != cls:
        problems.append(f"{where}: stored a {cls} node, the template has {_describe(like)}")
        return
    keys = [k for k, _ in children]
    if keys != list(node["keys"]):
        problems.append(f"{where}: {cls} children differ: stored {node['keys']}, template {keys}")
        return
    _compare_items(node, [c for _, c in children], path, keys, tensors, problems)


def _compare_items(node: Mapping[str, Any], likes: list[Any], path: str, segments: list[str],
                   tensors: Mapping[str, np.ndarray], problems: list[str]) -> None:
    items = node["items"]
    if len(items) != len(likes):
        problems.append(f"{_where(path)}: stored {len(items)} items, the template has "
                        f"{len(likes)}")
        return
    for child, like, segment in zip(items, likes, segments, strict=True):
        _compare(child, like, path + segment, tensors, problems)


def _build(node: Mapping[str, Any], tensors: Mapping[str, np.ndarray], like: Any,
           device: jax.Device | None) -> Any:
    kind = node["type"]
    if kind == "tensor":
        array = tensors[node["name"]]
        flavour = node["array"]
        if flavour == "numpy":
            return array
        if flavour == "numpy-scalar":
            return array[()]
        placed = jax.device_put(array, device)
        if flavour == "jax-key":
            return jax.random.wrap_key_data(placed, impl=node["impl"])
        return placed
    if kind == "json":
        return node["value"]
    if kind == "float":
        return float(node["value"])
    if kind == "dict":
        return {key: _build(child, tensors, None if like is None else like[key], device)
                for key, child in zip(node["keys"], node["values"], strict=True)}
    items = node["items"]
    if kind in ("list", "tuple"):
        likes = [None] * len(items) if like is None else list(like)
        built = [_build(c, tensors, lk, device) for c, lk in zip(items, likes, strict=True)]
        return built if kind == "list" else tuple(built)
    # namedtuple or custom: rebuilt with the template's own node type (checked by _compare)
    likes = list(like) if kind == "namedtuple" else [c for _, c in _custom_children(like) or []]
    built = [_build(c, tensors, lk, device) for c, lk in zip(items, likes, strict=True)]
    treedef = jax.tree_util.tree_structure(like, is_leaf=lambda y: y is not like)
    return jax.tree_util.tree_unflatten(treedef, built)
