"""Layering: ``hkstore.store`` (and ``import hkstore``) work where jax and haiku cannot be imported.

Each check runs in a fresh interpreter, so that what this test process imported does not count.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("jax", "jaxlib", "haiku")


def run_python(code: str, *, pythonpath: list[Path] | None = None) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (it must exit 0)."""
    paths = [*(pythonpath or []), REPO, REPO / "tests"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, paths)))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


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


def test_blocker_does_block(tmp_path: Path) -> None:
    """The control: in that interpreter, importing jax or haiku fails (and is recorded)."""
    folder, mark = blocker(tmp_path)
    out = run_python(
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
    out = run_python(
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
    out = run_python(
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
