"""docs/DECLEARN.md against the tests: every test it cites to pin a difference exists.

The page lists each difference from declearn with the regression test that pins it, in
brackets; a renamed or deleted test would leave a claim without its proof. The list of
declearn's own tests that fail by design is checked by ``tools/declearn_suite.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "DECLEARN.md"


def _cited() -> set[str]:
    brackets = re.findall(r"\[(`test_[^\]]+)\]", DOC.read_text(encoding="utf-8"))
    names = {name for group in brackets for name in re.findall(r"`(test_[\w.]+)`", group)}
    return names


def _defined() -> tuple[set[str], set[str]]:
    functions, files = set(), set()
    for path in (REPO / "tests").rglob("test_*.py"):
        files.add(path.name)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    return functions, files


def test_every_test_cited_in_declearn_md_exists() -> None:
    cited = _cited()
    assert len(cited) > 30
    functions, files = _defined()
    missing = sorted(name for name in cited if name not in functions and name not in files)
    assert missing == []


def test_the_suite_script_reads_the_documented_failures() -> None:
    spec = importlib.util.spec_from_file_location("declearn_suite", REPO / "tools" /
                                                  "declearn_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["declearn_suite"] = module
    spec.loader.exec_module(module)
    assert module.documented_failures() == {
        "test/vector/test_jaxnp_vector.py::TestJaxNumpyVector::test_build"}
