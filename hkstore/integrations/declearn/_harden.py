"""Hardening declearn's decoders: peers' model payloads outside an allow-list are refused.

declearn's msgpack decoder (messages on either side, the server's handling of action frames
*before* it checks that the peer registered, ``.mpk`` files) rebuilds any nested
``{"__type__": name, "dump": ...}`` map with the decoder registered under ``name``. For a
``Model`` type that decoder is ``from_config(dump, allow_bin=True)``, which for declearn's own
``HaikuModel`` and ``TorchModel`` unpickles the dump; for a type that is only *lazily*
registered, declearn first imports the module named for it. JSON configs reach
``Model.from_config``, which dispatches on the config's ``typekey``.

:func:`harden` (run when the declearn-engine part of this integration is imported) puts a
guard in front of declearn's msgpack and JSON object hooks and of ``Model.from_config``:

- a payload naming a registered ``Model`` type that is not on the allow-list
  (:class:`~hkstore.integrations.declearn.DeclearnHaikuModel` and its subclasses, plus what
  ``harden(allow=...)`` adds) is refused before its decoder runs;
- a payload naming a type that is only lazily registered is refused before any module is
  imported;
- a JSON config whose ``typekey`` names a ``Model`` type off the allow-list is refused.

Refusals raise :class:`~hkstore.errors.RefusedPayloadError` (a ``TypeError``: declearn then
rejects the message as it does any undecodable one, and a server keeps serving) and log a
warning naming the type. Everything else (vectors, optimizers, aggregators, metrics) decodes as
before.

The guard replaces private declearn functions that declearn looks up when it decodes;
:func:`check_declearn_internals` checks they are where declearn 2.9 keeps them and refuses to
run otherwise (:class:`~hkstore.errors.FrameworkVersionError`, naming the version).
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FunctionType, ModuleType
from typing import Any

import declearn
from declearn.model.api import Model
from declearn.utils import access_registered

from hkstore.errors import FrameworkVersionError, RefusedPayloadError, UnsafeTrustWarning

__all__ = ["check_declearn_internals", "harden", "is_hardened", "refusal_in", "unharden"]

_LOG = logging.getLogger("hkstore.integrations.declearn")
_SERIALIZE = "declearn.utils.serialize"
#: (module, object hook, the functions that must look the hook up when they run)
_HOOKS = {
    "msgpack": ("_msgpack", "_msgpack_decode", ("msgpack_deserialize", "msgpack_load")),
    "json": ("_json", "_json_decode", ("json_deserialize", "json_load")),
}


@dataclass(frozen=True)
class _Internals:
    """declearn's private objects the guard replaces or reads."""

    modules: dict[str, ModuleType]  # "msgpack"/"json" -> the module holding the hook
    deserial_registry: dict[str, dict[str, Any]]  # fmt -> {type name: spec with .cls}
    lazy_registry: dict[str, str]  # type name -> module declearn would import


@dataclass(frozen=True)
class _Installed:
    originals: dict[str, Callable[[Any], Any]]  # fmt -> declearn's own object hook
    from_config: classmethod  # declearn's own Model.from_config
    guards: dict[str, Callable[[Any], Any]]
    guarded_from_config: classmethod


_INSTALLED: _Installed | None = None
_ALLOWED: tuple[type, ...] = ()


def _fail(problems: list[str]) -> FrameworkVersionError:
    version = getattr(declearn, "__version__", "unknown")
    return FrameworkVersionError(
        f"declearn {version}: the internals hkstore's hardening relies on have moved "
        f"({'; '.join(problems)}); hkstore.integrations.declearn supports declearn 2.9 "
        "(tested with 2.9.1) and will not run unguarded"
    )


def _uses(function: object, name: str) -> bool:
    """Whether ``function`` reads the global ``name`` when it runs."""
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names


def check_declearn_internals() -> None:
    """Check that declearn's decoding still goes where the guard stands.

    Checks: the msgpack and JSON object hooks exist and are read at call time by the
    functions that decode messages and files; the type and lazy registries exist and the
    decoder consults the lazy one; ``Model.from_config`` is a classmethod; the message,
    action-frame and checkpoint readers call those functions.

    Raises:
        FrameworkVersionError: something moved (every problem listed, the version named).
    """
    _internals()


def _internals() -> _Internals:
    problems: list[str] = []
    modules: dict[str, ModuleType] = {}
    names = {*(spec[0] for spec in _HOOKS.values()), "_base", "_lazy"}
    loaded: dict[str, ModuleType] = {}
    for short in sorted(names):
        try:
            loaded[short] = importlib.import_module(f"{_SERIALIZE}.{short}")
        except ImportError:
            problems.append(f"module {_SERIALIZE}.{short} is gone")
    if problems:
        raise _fail(problems)
    for fmt, (short, hook, readers) in _HOOKS.items():
        module = modules[fmt] = loaded[short]
        if not isinstance(getattr(module, hook, None), FunctionType):
            problems.append(f"{module.__name__}.{hook} is not a function")
        for reader in readers:
            function = getattr(module, reader, None)
            if not _uses(function, hook) or getattr(function, "__globals__", None) is not vars(
                module
            ):
                problems.append(f"{module.__name__}.{reader} no longer reads {hook} when it runs")
    base, lazy = loaded["_base"], loaded["_lazy"]
    registry = getattr(base, "_DESERIAL_REGISTRY", None)
    if not isinstance(registry, dict) or not all(
        isinstance(registry.get(fmt), dict) for fmt in _HOOKS
    ):
        problems.append(f"{base.__name__}._DESERIAL_REGISTRY is not a dict per format")
    lazy_registry = getattr(lazy, "_LAZY_SERIAL_REGISTRY", None)
    if not isinstance(lazy_registry, dict):
        problems.append(f"{lazy.__name__}._LAZY_SERIAL_REGISTRY is not a dict")
    if not _uses(getattr(base, "_decode", None), "_LAZY_SERIAL_REGISTRY"):
        problems.append(f"{base.__name__}._decode no longer consults the lazy registry")
    if not isinstance(Model.__dict__.get("from_config"), classmethod):
        problems.append("declearn.model.api.Model.from_config is not a classmethod")
    problems.extend(_reader_problems())
    if problems:
        raise _fail(problems)
    assert isinstance(registry, dict) and isinstance(lazy_registry, dict)
    return _Internals(modules, registry, lazy_registry)


def _reader_problems() -> list[str]:
    """The paths peers' bytes take must still call the guarded functions."""
    readers = [
        ("declearn.messaging", "SerializedMessage", "deserialize", "msgpack_deserialize"),
        ("declearn.communication.api.backend.actions", "ActionMessage", "deserialize",
         "msgpack_deserialize"),
        ("declearn.main.utils", "Checkpointer", "load_model", "from_config"),
    ]
    problems = []
    for module_name, owner, method, callee in readers:
        try:
            function = getattr(getattr(importlib.import_module(module_name), owner), method)
        except (ImportError, AttributeError):
            problems.append(f"{module_name}.{owner}.{method} is gone")
            continue
        if not _uses(function, callee):
            problems.append(f"{module_name}.{owner}.{method} no longer calls {callee}")
    return problems


def _refuse(what: str) -> RefusedPayloadError:
    allowed = ", ".join(sorted(cls.__name__ for cls in _ALLOWED))
    message = (
        f"declearn payload refused: {what} (hkstore.integrations.declearn.harden; allowed "
        f"model types: {allowed})"
    )
    _LOG.warning("%s", message)
    return RefusedPayloadError(message)


def refusal_in(exc: BaseException) -> RefusedPayloadError | None:
    """Return the :class:`~hkstore.errors.RefusedPayloadError` behind ``exc``, or ``None``.

    declearn reports any error its message decoding raises as a ``ValueError`` ("Failed to
    decode ...") chained to it: a refusal is found by following the chain.

    Example:
        >>> try:
        ...     try:
        ...         raise RefusedPayloadError("no")
        ...     except RefusedPayloadError as inner:
        ...         raise ValueError("Failed to decode") from inner
        ... except ValueError as outer:
        ...     str(refusal_in(outer)), refusal_in(ValueError("other"))
        ('no', None)
    """
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        if isinstance(found, RefusedPayloadError):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def _check_payload(obj: object, fmt: str, internals: _Internals) -> None:
    """Refuse a serialized-object map naming a model type off the allow-list, or a lazy type."""
    if not isinstance(obj, dict) or obj.keys() != {"__type__", "dump"}:
        return
    name = obj["__type__"]
    if not isinstance(name, str):
        raise _refuse(f"a payload type name must be a string, got {type(name).__name__}")
    spec = internals.deserial_registry[fmt].get(name)
    if spec is None:
        module = internals.lazy_registry.get(name)
        if module is not None:
            raise _refuse(
                f"type {name!r} is only lazily registered: decoding it would import "
                f"{module!r} first"
            )
        return
    cls = getattr(spec, "cls", None)
    if isinstance(cls, type) and issubclass(cls, Model) and not issubclass(cls, _ALLOWED):
        raise _refuse(
            f"model type {name!r} ({cls.__module__}.{cls.__qualname__}) is not on the "
            "allow-list; its decoder would run the payload's code"
        )


def _guard(fmt: str, original: Callable[[Any], Any], internals: _Internals) -> Callable[..., Any]:
    def guarded_decode(obj: Any) -> Any:
        _check_payload(obj, fmt, internals)
        return original(obj)

    guarded_decode.__qualname__ = f"hkstore_guarded_{fmt}_decode"
    return guarded_decode


def _guard_from_config(original: classmethod) -> classmethod:
    def from_config(cls: type, config: Any, allow_bin: bool = False) -> Any:
        typekey = config.get("typekey") if isinstance(config, dict) else None
        if typekey is not None:
            if not isinstance(typekey, str):
                raise _refuse(f"a config typekey must be a string, got {type(typekey).__name__}")
            try:
                target = access_registered(typekey, group="Model")
            except KeyError:  # unknown: declearn's own error says so
                target = None
            if isinstance(target, type) and not issubclass(target, _ALLOWED):
                raise _refuse(
                    f"model config of typekey {typekey!r} ({target.__module__}."
                    f"{target.__qualname__}) is not on the allow-list"
                )
        return original.__func__(cls, config, allow_bin)

    return classmethod(from_config)


def harden(*, allow: Iterable[type] = ()) -> None:
    """Guard declearn's decoders (idempotent; also run on importing the engine part).

    Args:
        allow: declearn ``Model`` classes to accept besides
            :class:`~hkstore.integrations.declearn.DeclearnHaikuModel` (replaces an earlier
            call's list). Their decoders run on peers' payloads: add only types whose
            ``from_config`` executes nothing from its input.

    Raises:
        FrameworkVersionError: declearn's internals moved (nothing is changed).
        TypeError: ``allow`` holds something that is not a declearn ``Model`` class.

    Example:
        >>> from hkstore.integrations.declearn import harden, is_hardened
        >>> harden()
        >>> is_hardened()
        True
    """
    global _INSTALLED, _ALLOWED
    from hkstore.integrations.declearn._model import DeclearnHaikuModel

    extra = tuple(allow)
    bad = [repr(c) for c in extra if not (isinstance(c, type) and issubclass(c, Model))]
    if bad:
        raise TypeError(f"harden(allow=...) takes declearn Model classes, got {', '.join(bad)}")
    internals = _internals()
    _ALLOWED = (DeclearnHaikuModel, *extra)
    if is_hardened():
        return
    originals = {fmt: getattr(internals.modules[fmt], _HOOKS[fmt][1]) for fmt in _HOOKS}
    guards = {fmt: _guard(fmt, originals[fmt], internals) for fmt in _HOOKS}
    from_config = Model.__dict__["from_config"]
    guarded = _guard_from_config(from_config)
    for fmt, guard in guards.items():
        setattr(internals.modules[fmt], _HOOKS[fmt][1], guard)
    Model.from_config = guarded
    _INSTALLED = _Installed(originals, from_config, guards, guarded)


def is_hardened() -> bool:
    """Whether the guard is in place (every hook and ``Model.from_config``)."""
    if _INSTALLED is None:
        return False
    for fmt, (short, hook, _) in _HOOKS.items():
        module = importlib.import_module(f"{_SERIALIZE}.{short}")
        if getattr(module, hook, None) is not _INSTALLED.guards[fmt]:
            return False
    return Model.__dict__.get("from_config") is _INSTALLED.guarded_from_config


def unharden() -> None:
    """Put declearn's own decoders back (for a control experiment; warns).

    Peers' model payloads then run their code again in this process, as in plain declearn.
    """
    global _INSTALLED
    if _INSTALLED is None:
        return
    warnings.warn(
        "hkstore.integrations.declearn.unharden(): declearn decodes peers' model payloads "
        "unchecked again (their code can run in this process)",
        UnsafeTrustWarning,
        stacklevel=2,
    )
    for fmt, (short, hook, _) in _HOOKS.items():
        setattr(importlib.import_module(f"{_SERIALIZE}.{short}"), hook, _INSTALLED.originals[fmt])
    Model.from_config = _INSTALLED.from_config
    _INSTALLED = None
