"""Tests for hkstore.store._functions: references, the allowlist, and the pickle blob."""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import json
import pathlib
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import fnrefs
import pytest
import zstandard

from hkstore.errors import (
    ArchiveFormatError,
    LimitExceededError,
    NotImportableError,
    RefusedCodeError,
    RuntimeMismatchError,
)
from hkstore.store._functions import (
    check_runtime,
    current_runtime,
    function_reference,
    pickle_functions,
    pickle_runtime,
    resolve_reference,
    unpickle_functions,
)
from hkstore.store._trust import Trust
from hkstore.store._zstd import compress

_NOT_JSON: Any = object()
HINT = 'save it with functions="pickle" (opt-in, signed) or pass it to load() yourself'
PACKAGE = Path(__file__).resolve().parents[1] / "hkstore"


def _ref(ref: str, **kwargs: Any) -> dict[str, Any]:
    return {"kind": "reference", "ref": ref, "kwargs": kwargs}


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module on sys.path whose import creates a file: ``(module name, file)``."""
    name = f"hk_canary_{uuid.uuid4().hex[:12]}"
    flag = tmp_path / "imported.flag"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(flag)!r}).touch()\n\n"
        "def fn(x):\n    return x\n\n_fn = fn\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, flag
    sys.modules.pop(name, None)


class _TouchOnLoad:
    """Unpickling this creates ``path``: a canary for code that runs on load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


# --- deriving references --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "ref", "kwargs"),
    [
        (fnrefs.forward, "fnrefs:forward", {}),
        (fnrefs.Losses.l1, "fnrefs:Losses.l1", {}),
        (
            functools.partial(fnrefs.scaled_loss, scale=0.5, power=1),
            "fnrefs:scaled_loss",
            {"scale": 0.5, "power": 1},
        ),
        (fnrefs.l1_partial, "fnrefs:scaled_loss", {"power": 1}),
        (json.dumps, "json:dumps", {}),
        # defined in concurrent.futures._base, recorded under its public package
        (concurrent.futures.wait, "concurrent.futures:wait", {}),
    ],
)
def test_function_reference_round_trips(fn: Any, ref: str, kwargs: dict[str, Any]) -> None:
    spec = function_reference(fn)
    assert spec == {"kind": "reference", "ref": ref, "kwargs": kwargs}
    allowed = [ref.split(":")[0].split(".")[0]]
    resolved = resolve_reference(spec, Trust(modules=allowed, allow_stdlib=True))
    if kwargs:
        assert isinstance(resolved, functools.partial)
        assert resolved.func is getattr(fn, "func", fn) and resolved.keywords == kwargs
    else:
        assert resolved is fn


def test_resolved_partial_calls_with_its_kwargs() -> None:
    spec = function_reference(functools.partial(fnrefs.scaled_loss, scale=2.0, power=1))
    loss = resolve_reference(spec, Trust(modules=["fnrefs"]))
    assert loss(3.0, 1.0) == 4.0


def _main_function() -> Any:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def script_fn(x):\n    return x\n", namespace)
    return namespace["script_fn"]


def _orphan_function() -> Any:
    namespace: dict[str, Any] = {"__name__": "hk_never_imported"}
    exec("def orphan(x):\n    return x\n", namespace)
    return namespace["orphan"]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (
            lambda x: x,
            f"function test_functions.<lambda>: is a lambda, which has no importable name; {HINT}",
        ),
        (
            fnrefs.make_closure(1.0),
            "function fnrefs.make_closure.<locals>.shifted: is defined "
            "inside another function (a closure or local function), so it cannot be imported; "
            f"{HINT}",
        ),
        (
            _main_function(),
            "function __main__.script_fn: is defined in __main__ (a script), "
            f"which a loader cannot import; move it to a module, or {HINT}",
        ),
        ([].append, f"'list.append': has no module to import it from; {HINT}"),
        (
            fnrefs.Losses(),
            "fnrefs.Losses instance: only functions can be stored by reference, "
            f"not callable objects; {HINT}",
        ),
        (fnrefs.Losses().bound, f"function fnrefs.Losses.bound: is a bound method; {HINT}"),
        (fnrefs.Losses, "class fnrefs.Losses: is a class, not a function"),
        (
            fnrefs.private_alias,
            "function fnrefs._private_loss: '_private_loss' is a private "
            f"name, which loaders refuse to resolve; make it public, or {HINT}",
        ),
        (
            _orphan_function(),
            "function hk_never_imported.orphan: hk_never_imported.orphan is "
            "not the same object when looked up by name from its module or a public parent "
            f"package (private module, shadowed or rebound name?); {HINT}",
        ),
        (
            functools.partial(fnrefs.forward, 1.0),
            "functools.partial(function fnrefs.forward, "
            "...): a functools.partial with positional arguments cannot be stored by reference; "
            f"bind keyword arguments only, or {HINT}",
        ),
        (
            functools.partial(fnrefs.scaled_loss, scale=_NOT_JSON),
            "functools.partial(function "
            "fnrefs.scaled_loss, ...): its keyword arguments are not JSON (kwargs: $.scale: an "
            "object is not a JSON value (expected dict, list, str, int, float, bool or None)); "
            f"{HINT}",
        ),
        (
            functools.partial(lambda x, y: x, y=1),
            f"function test_functions.<lambda>: is a lambda, which has no importable name; {HINT}",
        ),
    ],
)
def test_function_reference_refuses(fn: Any, message: str) -> None:
    with pytest.raises(NotImportableError) as info:
        function_reference(fn)
    assert str(info.value) == message


# --- resolving: the allowlist is checked before anything is imported ------------------------


def test_resolve_imports_an_allowed_module(canary: tuple[str, Path]) -> None:
    name, flag = canary  # positive control: the canary does fire when imported
    fn = resolve_reference(_ref(f"{name}:fn"), Trust(modules=[name]))
    assert fn(3) == 3
    assert flag.exists()


@pytest.mark.parametrize(
    ("ref", "allowed", "message"),
    [
        (
            "{m}:fn",
            ["mypkg"],
            "reference '{m}:fn': module '{m}' is not in the allowed modules "
            "('mypkg'); add it to Trust(modules=[...]) if you trust its code",
        ),
        (
            "{m}:fn",
            [],
            "reference '{m}:fn': module '{m}' is not in the allowed modules (none); "
            "add it to Trust(modules=[...]) if you trust its code",
        ),
        (
            "{m}:fn",
            ["{m}x", "{m}.sub"],
            "reference '{m}:fn': module '{m}' is not in the allowed "
            "modules ('{m}x', '{m}.sub'); add it to Trust(modules=[...]) if you trust its code",
        ),
        (
            "{m}:_fn",
            ["{m}"],
            "reference '{m}:_fn': '_fn' is a private or dunder name; "
            "references may only name public modules and attributes",
        ),
        (
            "{m}:fn.__globals__",
            ["{m}"],
            "reference '{m}:fn.__globals__': '__globals__' is a "
            "private or dunder name; references may only name public modules and attributes",
        ),
        (
            "{m}._impl:fn",
            ["{m}"],
            "reference '{m}._impl:fn': '_impl' is a private or dunder "
            "name; references may only name public modules and attributes",
        ),
        ("{m}", ["{m}"], "reference '{m}' is not 'module:qualname'"),
        ("{m}:fn:fn", ["{m}"], "reference '{m}:fn:fn' is not 'module:qualname'"),
        (
            "{m}:fn x",
            ["{m}"],
            "reference '{m}:fn x' is not 'dotted.module:dotted.name' made of ASCII identifiers",
        ),
        (
            "{m}:fn\n",
            ["{m}"],
            "reference '{m}:fn\\n' is not 'dotted.module:dotted.name' made of ASCII identifiers",
        ),
        (
            "{m}..x:fn",
            ["{m}"],
            "reference '{m}..x:fn' is not 'dotted.module:dotted.name' made of ASCII identifiers",
        ),
        (
            "{m}:",
            ["{m}"],
            "reference '{m}:' is not 'dotted.module:dotted.name' made of ASCII identifiers",
        ),
        (
            "{m}:fné",
            ["{m}"],
            "reference '{m}:fné' is not 'dotted.module:dotted.name' made of ASCII identifiers",
        ),
    ],
)
def test_resolve_refuses_before_importing(
    canary: tuple[str, Path], ref: str, allowed: list[str], message: str
) -> None:
    name, flag = canary
    with pytest.raises(RefusedCodeError) as info:
        resolve_reference(
            _ref(ref.format(m=name)), Trust(modules=[a.format(m=name) for a in allowed])
        )
    assert str(info.value) == message.format(m=name)
    assert name not in sys.modules
    assert not flag.exists()


def test_resolve_refuses_a_module_that_only_shares_a_prefix() -> None:
    with pytest.raises(RefusedCodeError, match=r"module 'fnrefsx' is not in the allowed modules"):
        resolve_reference(_ref("fnrefsx:forward"), Trust(modules=["fnrefs"]))
    assert "fnrefsx" not in sys.modules


def test_resolve_refuses_a_name_imported_from_elsewhere() -> None:
    # fnrefs does `from math import sqrt`: allowing fnrefs must not allow math.
    with pytest.raises(RefusedCodeError) as info:
        resolve_reference(_ref("fnrefs:sqrt"), Trust(modules=["fnrefs"]))
    assert str(info.value) == (
        "reference 'fnrefs:sqrt': fnrefs:sqrt is defined in module 'math', which is not in the "
        "allowed modules"
    )
    both = Trust(modules=["fnrefs", "math"], allow_stdlib=True)
    assert resolve_reference(_ref("fnrefs:sqrt"), both)(4) == 2


def test_resolve_refuses_to_walk_through_a_module() -> None:
    with pytest.raises(RefusedCodeError) as info:
        resolve_reference(_ref("fnrefs:functools.partial"), Trust(modules=["fnrefs"]))
    assert str(info.value) == (
        "reference 'fnrefs:functools.partial': fnrefs:functools is a module; the name after ':' "
        "must lead to a function, not through modules"
    )


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("fnrefs:nope", "reference 'fnrefs:nope': fnrefs:nope does not exist"),
        ("fnrefs:Losses.nope", "reference 'fnrefs:Losses.nope': fnrefs:Losses.nope does not exist"),
        (
            "fnrefs:NOT_CALLABLE",
            "reference 'fnrefs:NOT_CALLABLE': fnrefs:NOT_CALLABLE is 'int', not callable",
        ),
    ],
)
def test_resolve_reports_missing_or_uncallable_names(ref: str, message: str) -> None:
    with pytest.raises(NotImportableError) as info:
        resolve_reference(_ref(ref), Trust(modules=["fnrefs"]))
    assert str(info.value) == message


def test_resolve_reports_an_allowed_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"hk_broken_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(NotImportableError) as info:
        resolve_reference(_ref(f"{name}:fn"), Trust(modules=[name]))
    assert str(info.value) == (
        f"reference '{name}:fn': cannot import module '{name}' (RuntimeError: broken on purpose)"
    )
    with pytest.raises(NotImportableError, match=r"\(ModuleNotFoundError: No module named"):
        resolve_reference(_ref("hk_missing_module:fn"), Trust(modules=["hk_missing_module"]))


def test_resolve_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"^resolve_reference: expected a Trust, got list$"):
        resolve_reference(_ref("fnrefs:forward"), ["fnrefs"])  # type: ignore[arg-type]
    with pytest.raises(RefusedCodeError, match=r"is not a reference$"):
        resolve_reference({"kind": "pickle"}, Trust(modules=["fnrefs"]))
    with pytest.raises(RefusedCodeError, match=r"kwargs must be a JSON object"):
        resolve_reference(
            {"kind": "reference", "ref": "fnrefs:forward", "kwargs": [1]},
            Trust(modules=["fnrefs"]),
        )


def test_resolve_uses_the_rules_trust_documents() -> None:
    """The gate's allowlist is Trust's own: allows_module to import, allows_definition_in after."""
    trust = Trust(modules=["fnrefs"])
    assert trust.allows_module("fnrefs") and not trust.allows_module("fnrefsx")
    assert trust.allows_definition_in("fnrefs") and not trust.allows_definition_in("math")
    assert resolve_reference(_ref("fnrefs:forward"), trust) is fnrefs.forward
    with pytest.raises(RefusedCodeError, match="defined in module 'math'"):
        resolve_reference(_ref("fnrefs:sqrt"), trust)


# --- the pickle blob ------------------------------------------------------------------------


def test_pickle_round_trip_of_lambda_and_closure() -> None:
    blob, raw_size = pickle_functions(
        {"model": lambda x: 3 * x, "loss": fnrefs.make_closure(10.0), "other": None}
    )
    assert zstandard.frame_content_size(blob) == raw_size
    functions = unpickle_functions(blob, raw_size=raw_size, cap=1 << 20)
    assert set(functions) == {"model", "loss", "other"}
    assert functions["model"](2) == 6  # type: ignore[misc]
    assert functions["loss"](1.0) == 11.0  # type: ignore[misc]
    assert functions["other"] is None


def test_pickle_functions_refuses_what_cannot_be_pickled() -> None:
    lock = threading.Lock()

    def holds_a_lock(x: float) -> float:
        with lock:
            return x

    with pytest.raises(NotImportableError, match=r"^cannot pickle functions 'model' \(TypeError"):
        pickle_functions({"model": holds_a_lock})
    with pytest.raises(NotImportableError, match=r"^functions\['loss'\]: int is not callable"):
        pickle_functions({"loss": 3})  # type: ignore[dict-item]


def test_pickle_runtime_names_this_interpreter() -> None:
    assert pickle_runtime() == {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "python_implementation": sys.implementation.name,
        "cloudpickle": cloudpickle.__version__,
    }


def _canary_blob(flag: Path) -> tuple[bytes, int]:
    raw = cloudpickle.dumps({"model": _TouchOnLoad(flag)}, protocol=5)
    return compress(raw), len(raw)


def test_canary_blob_fires_only_in_unpickle_functions(tmp_path: Path) -> None:
    flag = tmp_path / "unpickled.flag"
    blob, raw_size = _canary_blob(flag)
    python, implementation = current_runtime()
    other = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
    with pytest.raises(RuntimeMismatchError):
        check_runtime(other, implementation)
    with pytest.raises(RuntimeMismatchError):
        check_runtime(python, "pypy" if implementation != "pypy" else "cpython")
    with pytest.raises(LimitExceededError):  # the frame says more than the manifest
        unpickle_functions(blob, raw_size=raw_size - 1, cap=1 << 20)
    with pytest.raises(ArchiveFormatError):  # the manifest says more than the frame
        unpickle_functions(blob, raw_size=raw_size + 1, cap=1 << 20)
    with pytest.raises(LimitExceededError):
        unpickle_functions(blob, raw_size=raw_size, cap=raw_size - 1)
    with pytest.raises(ArchiveFormatError):
        unpickle_functions(blob + b"\x00", raw_size=raw_size, cap=1 << 20)
    assert not flag.exists()
    check_runtime(python, implementation)  # positive control: the canary does run on load
    assert unpickle_functions(blob, raw_size=raw_size, cap=1 << 20) == {"model": None}
    assert flag.exists()


def test_check_runtime_message() -> None:
    python, implementation = current_runtime()
    with pytest.raises(RuntimeMismatchError) as info:
        check_runtime("3.9", "cpython")
    assert str(info.value) == (
        f"functions.pkl.zst: pickled under cpython 3.9, but this is {implementation} {python}; "
        "a cloudpickle only loads on the same Python major.minor and implementation (loading "
        "it could crash the interpreter). Load it with the matching Python, re-save it with "
        "functions='reference', or override with Trust(allow_python_mismatch=True) at your "
        "own risk"
    )


def test_unpickle_functions_reports_bad_payloads() -> None:
    raw = cloudpickle.dumps([1, 2], protocol=5)
    with pytest.raises(ArchiveFormatError) as info:
        unpickle_functions(compress(raw), raw_size=len(raw), cap=1 << 20)
    assert str(info.value) == (
        "functions.pkl.zst: expected a dict of name -> function or None, got list"
    )
    raw = b"\x80\x05\x95garbage"
    with pytest.raises(ArchiveFormatError, match=r"^functions\.pkl\.zst: cannot unpickle \("):
        unpickle_functions(compress(raw), raw_size=len(raw), cap=1 << 20)


def _unpickling_calls(tree: ast.AST) -> list[str]:
    """``function: call`` for every pickle loader used in ``tree`` (code only, not text)."""
    modules = {"pickle", "cloudpickle", "_pickle", "dill", "joblib"}
    found: list[str] = []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            where = node.name
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            found.extend(
                f"{where}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in ("load", "loads", "Unpickler")
            )
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr in ("load", "loads", "Unpickler")
        ):
            found.append(f"{where}: {node.value.id}.{node.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, "<module>")
    return found


def test_only_unpickle_functions_unpickles() -> None:
    """No module but _functions.py calls a pickle loader, and it does so in one function."""
    found = {
        str(path.relative_to(PACKAGE)): calls
        for path in sorted(PACKAGE.rglob("*.py"))
        if (calls := _unpickling_calls(ast.parse(path.read_text("utf-8"))))
    }
    assert found == {"store/_functions.py": ["unpickle_functions: cloudpickle.loads"]}
