"""Model and loss functions in an archive: references to importable code, and the pickle blob.

A reference ``"module:qualname"`` plus JSON keyword arguments is derived automatically for a
function that a loader can import by that name; it is resolved only inside the modules the
loader allows, never through private or dunder names, and the allowlist is checked before
anything is imported. Functions that cannot be referenced (lambdas, closures, ``__main__``)
travel, only when the writer opts in, as a zstd-compressed cloudpickle blob.
:func:`unpickle_functions` is the one place in hkstore that unpickles anything.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

from hkstore.errors import (
    ArchiveFormatError,
    ManifestError,
    NotImportableError,
    RefusedCodeError,
    RuntimeMismatchError,
)
from hkstore.store._canonical import canonical_json
from hkstore.store._limits import DEFAULT_LIMITS
from hkstore.store._members import FUNCTIONS
from hkstore.store._trust import Trust
from hkstore.store._zstd import compress, decompress_bounded

__all__ = [
    "FUNCTION_KINDS",
    "PICKLE_PROTOCOL",
    "ROLES",
    "FunctionKind",
    "check_reference",
    "check_runtime",
    "current_runtime",
    "describe_functions",
    "function_reference",
    "pickle_functions",
    "pickle_runtime",
    "resolve_reference",
    "unpickle_functions",
]

PICKLE_PROTOCOL = 5
#: How a function is stored: imported by ``reference``, in the ``pickle`` member, or ``none``
#: (the loader supplies it).
FunctionKind = Literal["reference", "pickle", "none"]
FUNCTION_KINDS: tuple[FunctionKind, ...] = get_args(FunctionKind)
#: The functions a model needs, in the order they are described.
ROLES = ("model", "loss")
_WHAT = FUNCTIONS
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HINT = 'save it with functions="pickle" (opt-in, signed) or pass it to load() yourself'


def current_runtime() -> tuple[str, str]:
    """Return this interpreter's ``(major.minor, implementation)``: ``("3.11", "cpython")``."""
    return f"{sys.version_info.major}.{sys.version_info.minor}", sys.implementation.name.lower()


# --- references ---------------------------------------------------------------------------------


def function_reference(fn: Callable[..., Any]) -> dict[str, Any]:
    """Describe ``fn`` as an importable reference, if a loader can import it by name.

    ``fn`` must be reachable as ``module.qualname`` from a module that is already imported,
    giving back the very same object, through public names only (a function defined in a
    private module such as ``pkg._impl`` is recorded under the public package that re-exports
    it, e.g. ``pkg:fn``). A ``functools.partial`` of such a function with keyword arguments
    only, all JSON values, is recorded with those ``kwargs``. Nothing is imported.

    Args:
        fn: the function.

    Returns:
        ``{"kind": "reference", "ref": "module:qualname", "kwargs": {...}}``.

    Raises:
        NotImportableError: a lambda, a closure or other local function, a function of
            ``__main__``, a builtin without a module, a class or callable instance, a bound
            method, a private name, a partial with positional arguments or non-JSON keyword
            arguments; the message names the function and says why.

    Example:
        >>> import json
        >>> function_reference(json.dumps)
        {'kind': 'reference', 'ref': 'json:dumps', 'kwargs': {}}
    """
    kwargs: dict[str, Any] = {}
    target: Any = fn
    if type(fn) is functools.partial:
        target = fn.func
        if fn.args:
            raise NotImportableError(
                f"{_describe(fn)}: a functools.partial with positional arguments cannot be "
                f"stored by reference; bind keyword arguments only, or {_HINT}"
            )
        kwargs = dict(fn.keywords)
        try:
            canonical_json(kwargs, what="kwargs")
        except ManifestError as exc:
            raise NotImportableError(
                f"{_describe(fn)}: its keyword arguments are not JSON ({exc}); {_HINT}"
            ) from None
    ref = _reference_of(target)
    return {"kind": "reference", "ref": ref, "kwargs": kwargs}


def _reference_of(fn: Any) -> str:
    name = _describe(fn)
    if isinstance(fn, type):
        raise NotImportableError(f"{name}: is a class, not a function")
    if isinstance(fn, types.MethodType):
        raise NotImportableError(f"{name}: is a bound method; {_HINT}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        raise NotImportableError(
            f"{name}: only functions can be stored by reference, not callable objects; {_HINT}"
        )
    if not isinstance(module, str) or not module:
        raise NotImportableError(f"{name}: has no module to import it from; {_HINT}")
    if "<lambda>" in qualname:
        raise NotImportableError(f"{name}: is a lambda, which has no importable name; {_HINT}")
    if "<locals>" in qualname:
        raise NotImportableError(
            f"{name}: is defined inside another function (a closure or local function), "
            f"so it cannot be imported; {_HINT}"
        )
    if module == "__main__":
        raise NotImportableError(
            f"{name}: is defined in __main__ (a script), which a loader cannot import; "
            f"move it to a module, or {_HINT}"
        )
    parts = qualname.split(".")
    if not all(_IDENT.fullmatch(p) for p in [*module.split("."), *parts]):
        raise NotImportableError(f"{name}: {module}:{qualname} is not a dotted Python name")
    if any(p.startswith("_") for p in parts):
        raise NotImportableError(
            f"{name}: {qualname!r} is a private name, which loaders refuse to resolve; "
            f"make it public, or {_HINT}"
        )
    segments = module.split(".")
    # the defining module first, then its public parents (``pkg._impl`` -> ``pkg``).
    for cut in range(len(segments), 0, -1):
        candidate = ".".join(segments[:cut])
        if any(s.startswith("_") for s in segments[:cut]):
            continue
        if _walk(sys.modules.get(candidate), parts) is fn:
            return f"{candidate}:{qualname}"
    raise NotImportableError(
        f"{name}: {module}.{qualname} is not the same object when looked up by name from "
        "its module or a public parent package (private module, shadowed or rebound name?); "
        f"{_HINT}"
    )


def _walk(obj: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def _describe(fn: Any) -> str:
    if type(fn) is functools.partial:
        return f"functools.partial({_describe(fn.func)}, ...)"
    if isinstance(fn, type):
        return f"class {fn.__module__}.{fn.__qualname__}"
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if isinstance(qualname, str):
        return f"function {module}.{qualname}" if isinstance(module, str) else repr(qualname)
    return f"{type(fn).__module__}.{type(fn).__qualname__} instance"


def _parse_ref(ref: Any) -> tuple[str, list[str]]:
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise RefusedCodeError(f"reference {ref!r} is not 'module:qualname'")
    module, qualname = ref.split(":")
    segments = [*module.split("."), *qualname.split(".")]
    if not all(_IDENT.fullmatch(s) for s in segments):
        raise RefusedCodeError(
            f"reference {ref!r} is not 'dotted.module:dotted.name' made of ASCII identifiers"
        )
    private = [s for s in segments if s.startswith("_")]
    if private:
        raise RefusedCodeError(
            f"reference {ref!r}: {private[0]!r} is a private or dunder name; references may "
            "only name public modules and attributes"
        )
    return module, qualname.split(".")


def check_reference(spec: Mapping[str, Any], trust: Trust) -> str:
    """Run the checks of :func:`resolve_reference` that come before the import; import nothing.

    The reference's form, its segments (no private or dunder name), its ``kwargs`` (a JSON
    object of JSON values: what an archive or a config may pass to the function), and
    :meth:`Trust.allows_module`.

    Returns:
        The module the reference would import.

    Raises:
        RefusedCodeError: any of the checks above fails.
        TypeError: ``trust`` is not a :class:`Trust`.
    """
    if not isinstance(trust, Trust):
        raise TypeError(f"resolve_reference: expected a Trust, got {type(trust).__name__}")
    if spec.get("kind") != "reference":
        raise RefusedCodeError(f"function spec {dict(spec)!r} is not a reference")
    ref = spec.get("ref")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise RefusedCodeError(f"reference {ref!r}: kwargs must be a JSON object")
    try:
        canonical_json(dict(kwargs), what=f"reference {ref!r}: kwargs")
    except ManifestError as exc:
        raise RefusedCodeError(f"{exc} (a reference's kwargs are JSON values only)") from None
    module_name, _ = _parse_ref(ref)
    if not trust.allows_module(module_name):
        allowed = ", ".join(map(repr, trust.modules)) or "none"
        raise RefusedCodeError(
            f"reference {ref!r}: module {module_name!r} is not in the allowed modules "
            f"({allowed}); add it to Trust(modules=[...]) if you trust its code"
        )
    return module_name


def resolve_reference(spec: Mapping[str, Any], trust: Trust) -> Callable[..., Any]:
    """Import the function a reference names, only if ``trust`` allows its module.

    Order of checks, all before anything is imported: the reference is
    ``"dotted.module:dotted.name"`` of ASCII identifiers; no segment starts with ``_``; the
    module is allowed by :meth:`Trust.allows_module` (``Trust(modules=["mypkg"])`` allows
    ``"mypkg"`` and ``"mypkg.sub"``, not ``"mypkgx"``). Then the module is imported, the name
    is looked up attribute by attribute (never through a module, and every object on the way
    must be defined where :meth:`Trust.allows_definition_in` says, so ``mypkg:run`` is refused
    when ``mypkg`` merely imported ``subprocess.run``), and the result must be callable.

    Args:
        spec: ``{"kind": "reference", "ref": "module:qualname", "kwargs": {...}}``.
        trust: the caller's policy (its ``modules``).

    Returns:
        The function, or ``functools.partial(function, **kwargs)`` when kwargs is not empty.

    Raises:
        RefusedCodeError: the reference is malformed, names a private or dunder segment, or
            leads outside the allowed modules.
        NotImportableError: the allowed module cannot be imported, lacks the name, or the name
            is not callable.
        TypeError: ``trust`` is not a :class:`Trust`.
    """
    module_name = check_reference(spec, trust)
    ref = spec["ref"]
    kwargs = spec.get("kwargs", {})
    _, parts = _parse_ref(ref)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # an allowed module's own import error: say so, plainly
        raise NotImportableError(
            f"reference {ref!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for i, part in enumerate(parts):
        where = f"{module_name}:{'.'.join(parts[: i + 1])}"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise NotImportableError(f"reference {ref!r}: {where} does not exist") from None
        if isinstance(obj, types.ModuleType):
            raise RefusedCodeError(
                f"reference {ref!r}: {where} is a module; the name after ':' must lead to a "
                "function, not through modules"
            )
        if i == len(parts) - 1 and not callable(obj):
            raise NotImportableError(
                f"reference {ref!r}: {where} is {type(obj).__name__!r}, not callable"
            )
        # what a name leads to must be defined in an allowed module, not merely imported there
        origin = getattr(obj, "__module__", None)
        if not isinstance(origin, str) or not trust.allows_definition_in(origin):
            raise RefusedCodeError(
                f"reference {ref!r}: {where} is defined in module {origin!r}, which is not "
                "in the allowed modules"
            )
    return functools.partial(obj, **kwargs) if kwargs else obj


def describe_functions(
    functions: Mapping[str, Callable[..., Any]], kind: FunctionKind
) -> tuple[dict[str, dict[str, Any]], bytes | None, int]:
    """Describe every function the same way, as the manifest and the config record them.

    Args:
        functions: ``{"model": fn, "loss": fn}``.
        kind: ``"reference"`` (importable ``module:qualname``), ``"pickle"`` (one cloudpickle
            blob holding them all, opt-in) or ``"none"`` (the loader supplies them).

    Returns:
        ``(specs, blob, raw_size)``: ``{role: spec}`` (see :func:`function_reference`), the
        zstd pickle blob (``None`` unless pickled) and its decompressed size (0 if none).

    Raises:
        NotImportableError: a function cannot be stored that way (the message says why).
        ValueError: ``kind`` is not one of :data:`FUNCTION_KINDS`.

    Example:
        >>> import json
        >>> describe_functions({"model": json.dumps, "loss": json.loads}, "none")
        ({'model': {'kind': 'none'}, 'loss': {'kind': 'none'}}, None, 0)
    """
    if kind == "reference":
        return {role: function_reference(fn) for role, fn in functions.items()}, None, 0
    if kind == "pickle":
        blob, raw_size = pickle_functions(functions)
        return {role: {"kind": "pickle"} for role in functions}, blob, raw_size
    if kind == "none":
        return {role: {"kind": "none"} for role in functions}, None, 0
    raise ValueError(
        f"functions: expected one of {', '.join(map(repr, FUNCTION_KINDS))}, got {kind!r}"
    )


# --- the pickle blob ----------------------------------------------------------------------------


def pickle_runtime() -> dict[str, str]:
    """The runtime a pickle is tied to: ``{"python", "python_implementation", "cloudpickle"}``."""
    import cloudpickle

    python, implementation = current_runtime()
    return {
        "python": python,
        "python_implementation": implementation,
        "cloudpickle": cloudpickle.__version__,
    }


def pickle_functions(functions: Mapping[str, Callable[..., Any] | None]) -> tuple[bytes, int]:
    """Pickle functions by value with cloudpickle, as one zstd frame.

    Lambdas, closures and ``__main__`` functions are pickled by value (their code travels);
    functions of importable modules are pickled by reference and imported when unpickled.

    Args:
        functions: e.g. ``{"model": forward_fn, "loss": None}``.

    Returns:
        ``(blob, raw_size)``: the zstd frame and the pickle's size before compression.

    Raises:
        NotImportableError: a function (or something it captures) cannot be pickled.
    """
    import cloudpickle

    for key, fn in functions.items():
        if fn is not None and not callable(fn):
            raise NotImportableError(f"functions[{key!r}]: {type(fn).__name__} is not callable")
    try:
        raw = cloudpickle.dumps(dict(functions), protocol=PICKLE_PROTOCOL)
    except Exception as exc:  # cloudpickle raises PicklingError, TypeError, ... by payload
        names = ", ".join(map(repr, functions))
        raise NotImportableError(
            f"cannot pickle functions {names} ({type(exc).__name__}: {exc})"
        ) from exc
    return compress(raw), len(raw)


def check_runtime(recorded_python: str, recorded_impl: str) -> None:
    """Refuse a pickle written by another Python ``major.minor`` or implementation.

    cloudpickle only supports loading under the exact Python that wrote the blob; across
    minor versions bytecode differs and loading can crash the interpreter rather than raise.
    Call this before :func:`unpickle_functions`.

    Raises:
        RuntimeMismatchError: the recorded runtime differs from this interpreter.
    """
    python, implementation = current_runtime()
    if (recorded_python, recorded_impl) != (python, implementation):
        raise RuntimeMismatchError(
            f"{_WHAT}: pickled under {recorded_impl} {recorded_python}, but this is "
            f"{implementation} {python}; a cloudpickle only loads on the same Python "
            "major.minor and implementation (loading it could crash the interpreter). "
            "Load it with the matching Python, re-save it with functions='reference', or "
            "override with Trust(allow_python_mismatch=True) at your own risk"
        )


def unpickle_functions(
    blob: bytes | bytearray | memoryview,
    *,
    raw_size: int,
    cap: int,
    max_window: int = DEFAULT_LIMITS.max_zstd_window_bytes,
) -> dict[str, Callable[..., Any] | None]:
    """Unpickle the functions blob: THIS RUNS CODE FROM THE ARCHIVE.

    The only unpickling in hkstore. Call it only after the trust gate has passed: the trust
    policy allows pickles, the blob's size and SHA-256 match the manifest, the manifest's
    signature verified with a trusted key (or the caller explicitly allowed unsigned), and
    :func:`check_runtime` accepted the recorded runtime. The frame is checked and
    decompressed within ``cap`` before a byte is unpickled.

    Args:
        blob: the ``functions.pkl.zst`` member.
        raw_size: the decompressed size recorded in the manifest.
        cap: the largest decompressed size accepted (``Limits.max_functions_bytes``).
        max_window: the largest zstd window accepted.

    Returns:
        The dict that :func:`pickle_functions` was given.

    Raises:
        LimitExceededError, ArchiveFormatError: the frame fails its checks, unpickling fails,
            or the result is not a dict of str -> callable or None.
    """
    raw = decompress_bounded(
        blob, declared_size=raw_size, cap=cap, what=_WHAT, max_window=max_window
    )
    import cloudpickle

    try:
        loaded = cloudpickle.loads(raw)
    except Exception as exc:  # whatever the payload raises, report it as a bad member
        raise ArchiveFormatError(f"{_WHAT}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and (v is None or callable(v)) for k, v in loaded.items()
    ):
        raise ArchiveFormatError(
            f"{_WHAT}: expected a dict of name -> function or None, got {type(loaded).__name__}"
        )
    return loaded
