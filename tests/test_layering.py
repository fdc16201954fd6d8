"""Layering: ``hkstore.store`` (and ``import hkstore``) work where jax and haiku cannot be imported.

Each check runs in a fresh interpreter, so that what this test process imported does not count.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import INSTALLED, REPO, run_python

BLOCKED = ("jax", "jaxlib", "haiku")


def python_stdout(code: str, *, pythonpath: list[Path] | None = None) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (it must exit 0)."""
    return run_python(code, pythonpath=pythonpath or ()).stdout


def blocker(tmp_path: Path) -> tuple[Path, Path]:
    """A folder whose jax/jaxlib/haiku packages raise ImportError (and leave a mark if tried)."""
    folder, mark = tmp_path / "blocker", tmp_path / "import-attempted"
    for name in BLOCKED:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            "import pathlib\n"
            f"with pathlib.Path({str(mark)!r}).open('a') as f:\n    f.write({name!r})\n"
            f"raise ImportError('{name} is blocked in this test')\n"
        )
    return folder, mark


def block_package(folder: Path, mark: Path, name: str) -> None:
    """Add to ``folder`` a package ``name`` that raises ImportError (and leaves a mark)."""
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(
        "import pathlib\n"
        f"with pathlib.Path({str(mark)!r}).open('a') as f:\n    f.write({name!r})\n"
        f"raise ImportError('{name} is blocked in this test')\n"
    )


def test_blocker_does_block(tmp_path: Path) -> None:
    """The control: in that interpreter, importing jax or haiku fails (and is recorded)."""
    folder, mark = blocker(tmp_path)
    out = python_stdout(
        """
        for name in ("jax", "haiku"):
            try:
                __import__(name)
            except ImportError as exc:
                print(exc)
        """,
        pythonpath=[folder],
    )
    assert out.splitlines() == ["jax is blocked in this test", "haiku is blocked in this test"]
    assert mark.read_text() == "jaxhaiku"


def test_store_writes_opens_and_verifies_archives_without_jax(tmp_path: Path) -> None:
    folder, mark = blocker(tmp_path)
    out = python_stdout(
        f"""
        import sys
        from pathlib import Path

        import numpy as np
        from helpers_archives import make_content, write_test_archive

        import hkstore
        import hkstore.store
        from hkstore.store import Ed25519Signer, HmacKey, Trust, open_archive

        signer, hmac_key = Ed25519Signer.generate(), HmacKey.generate()
        tensors = {{"lin:w": np.arange(6, dtype=np.float32).reshape(2, 3),
                   "lin:b": np.zeros(3, np.float32)}}
        path = write_test_archive(Path({str(tmp_path / "a.hkz")!r}),
                                  make_content(tensors), signer=signer)
        zst = write_test_archive(Path({str(tmp_path / "b.hkz")!r}),
                                 make_content(tensors), signer=hmac_key, compression="zstd")
        with open_archive(path) as archive:
            report = archive.verify(Trust(keys=[signer.verifier()], require_signature=True))
            assert report.signed_by == signer.key_id
            assert np.array_equal(archive.tensor("lin:w"), tensors["lin:w"])
            fns = archive.functions(Trust(modules=["fnrefs"]))
            assert fns["model"](1.0) == 3.0
        with hkstore.open_archive(zst) as archive:  # the package's lazy name, too
            assert archive.verify(Trust(keys=[hmac_key])).signed_by == hmac_key.key_id
            assert archive.names() == ["lin:w", "lin:b"]
        with open_archive(path.read_bytes()) as archive:
            with open({str(tmp_path / "c.hkz")!r}, "wb") as out:
                archive.copy_with_signature(out, hmac_key)
        with open_archive({str(tmp_path / "c.hkz")!r}) as archive:
            assert archive.verify(Trust(keys=[hmac_key])).signed_by == hmac_key.key_id
        heavy = [m for m in ("jax", "jaxlib", "haiku", "hkstore.model",
                             "hkstore.saving") if m in sys.modules]
        print("ok", heavy)
        """,
        pythonpath=[folder],
    )
    assert out.strip() == "ok []"
    assert not mark.exists()  # nothing even tried to import them


def test_import_hkstore_does_not_import_jax() -> None:
    out = python_stdout(
        """
        import sys

        import hkstore
        import hkstore.errors

        names = [hkstore.Trust, hkstore.open_archive, hkstore.HmacKey, hkstore.Limits,
                 hkstore.HkstoreError, hkstore.errors.WeightsMismatchError]
        print(sorted(m for m in ("jax", "jaxlib", "haiku", "hkstore.model") if m in sys.modules))
        hkstore.HaikuModel  # touching a model name does import jax
        print("jax" in sys.modules)
        """
    )
    assert out.splitlines() == ["[]", "True"]


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import``, ``from ... import`` or ``import_module("...")`` names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) in ("import_module", "__import__"):
            names |= {arg.value for arg in node.args
                      if isinstance(arg, ast.Constant) and isinstance(arg.value, str)}
    return names


def test_store_source_never_imports_jax_or_the_model_layer() -> None:
    """Not even lazily, inside a function: a static look at every module of hkstore.store."""
    forbidden = ("jax", "jaxlib", "haiku", "hkstore.model", "hkstore.saving")
    offenders = {}
    sources = sorted((REPO / "hkstore" / "store").rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        bad = sorted(name for name in _imported_modules(path)
                     if any(name == f or name.startswith(f + ".") for f in forbidden))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


# --- the rule of the layers, from the import graph (tools/import_graph.py) ------------------

def _graph_tool() -> Any:
    """Load ``tools/import_graph.py`` (stdlib only) as a module."""
    path = REPO / "tools" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_package_import_graph_has_no_cycle_and_no_forbidden_arrow() -> None:
    tool = _graph_tool()
    graph = tool.build_graph(REPO)
    assert len(graph.modules) > 40
    assert "hkstore.saving" in graph.modules and "hkstore.store._config" in graph.modules
    assert tool.problems(graph) == []
    assert all(tool.layer(m) != "unknown" for m in graph.modules)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the package's source to break on purpose (the checkout is never touched)."""
    shutil.copytree(REPO / "hkstore", tmp_path / "hkstore")
    return tmp_path


#: (module to edit, line to add, a fragment of the problem it must cause)
VIOLATIONS = [
    ("hkstore/store/_limits.py", "from hkstore.store import _archive",
     "import cycle: hkstore.store._archive"),
    ("hkstore/model/_fit.py", "import hkstore.model._model",
     "import cycle: hkstore.model._fit <-> hkstore.model._model"),
    ("hkstore/store/_limits.py", "from hkstore.model import HaikuModel",
     "store imports a higher layer (model): hkstore.store._limits -> hkstore.model"),
    ("hkstore/model/_fit.py", "from hkstore import saving",
     "model imports a higher layer (saving): hkstore.model._fit -> hkstore.saving"),
    ("hkstore/model/_fit.py", "from hkstore.store._weights import TensorSpec",
     "private store module used outside the store: hkstore.model._fit -> hkstore.store._weights"),
    ("hkstore/integrations/declearn/_convert.py", "from hkstore import saving",
     "integrations imports its sibling layer saving"),
    ("hkstore/integrations/declearn/_convert.py", "from hkstore import cli",
     "integrations imports a higher layer (cli)"),
    ("hkstore/_cli/_common.py", "from hkstore.model import HaikuModel",
     "the CLI imports the model layer (jax): hkstore._cli._common -> hkstore.model"),
    ("hkstore/store/_limits.py", "import jax", "store imports jax: hkstore.store._limits"),
    ("hkstore/store/_limits.py", "import hkstore", "store imports the public package"),
]


@pytest.mark.parametrize(("module", "line", "problem"), VIOLATIONS,
                         ids=[v[2].split(":")[0] + f"-{i}" for i, v in enumerate(VIOLATIONS)])
def test_the_layering_check_catches_each_forbidden_import(
    package_copy: Path, module: str, line: str, problem: str
) -> None:
    """The control: one import added on purpose (inside a function too) is reported."""
    tool = _graph_tool()
    assert tool.problems(tool.build_graph(package_copy)) == []
    path = package_copy / module
    path.write_text(path.read_text() + f"\n\ndef _planted() -> None:\n    {line}\n")
    found = tool.problems(tool.build_graph(package_copy))
    assert any(problem in p for p in found), found


def test_imports_under_type_checking_are_not_arrows(package_copy: Path) -> None:
    tool = _graph_tool()
    path = package_copy / "hkstore" / "store" / "_limits.py"
    path.write_text(path.read_text() + "\nif TYPE_CHECKING:\n    from hkstore.model import X\n")
    assert tool.problems(tool.build_graph(package_copy)) == []


def test_version_matches_the_package_metadata() -> None:
    """``hkstore.__version__`` is what pip installed (pyproject's version), not a stale copy."""
    from importlib.metadata import version

    import hkstore

    assert hkstore.__version__ == version("hkstore")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert f'\nversion = "{hkstore.__version__}"\n' in pyproject


def test_the_suite_imports_the_hkstore_it_means_to() -> None:
    """Against the wheel (HKSTORE_TEST_INSTALLED=1) hkstore comes from the venv, else from here."""
    import hkstore

    from_checkout = Path(hkstore.__file__).resolve().is_relative_to(REPO / "hkstore")
    assert from_checkout is not INSTALLED


def test_declearn_integration_package_without_declearn_or_jax(tmp_path: Path) -> None:
    """The conversion part works with neither; the engine names ask for the extra."""
    folder, mark = blocker(tmp_path)
    block_package(folder, mark, "declearn")
    out = python_stdout(
        """
        import sys

        import hkstore.integrations.declearn as integration
        from hkstore.errors import MissingDependencyError

        assert callable(integration.convert) and callable(integration.read_declearn)
        print(sorted(m for m in ("declearn", "jax", "haiku") if m in sys.modules))
        for name in ("DeclearnHaikuModel", "DeclearnJaxVector", "harden", "set_receive_policy"):
            try:
                getattr(integration, name)
            except MissingDependencyError as exc:
                print(name, "pip install 'hkstore[declearn]'" in str(exc))
        try:
            integration.no_such_name
        except AttributeError:
            print("AttributeError")
        """,
        pythonpath=[folder],
    )
    assert out.splitlines() == [
        "[]",
        "DeclearnHaikuModel True",
        "DeclearnJaxVector True",
        "harden True",
        "set_receive_policy True",
        "AttributeError",
    ]
    assert "declearn" in mark.read_text()  # the engine names did try, and were refused


def test_flower_integration_package_without_flwr(tmp_path: Path) -> None:
    """Importing the package needs neither flwr nor jax; every name asks for the extra."""
    folder, mark = blocker(tmp_path)
    block_package(folder, mark, "flwr")
    out = python_stdout(
        """
        import sys

        import hkstore.integrations.flower as integration
        from hkstore.errors import MissingDependencyError

        print(sorted(m for m in ("flwr", "jax", "haiku") if m in sys.modules))
        for name in integration.__all__:
            try:
                getattr(integration, name)
            except MissingDependencyError as exc:
                print(name, "pip install 'hkstore[flower]'" in str(exc))
        try:
            integration.no_such_name
        except AttributeError:
            print("AttributeError")
        """,
        pythonpath=[folder],
    )
    names = ["CheckpointedStrategy", "STATE_FORMAT", "STATE_TABLE", "StateSpec",
             "array_to_numpy", "from_arrayrecord", "resume", "to_arrayrecord"]
    assert out.splitlines() == ["[]", *(f"{n} True" for n in names), "AttributeError"]
    assert "flwr" in mark.read_text()  # the names did try to import flwr, and were refused
