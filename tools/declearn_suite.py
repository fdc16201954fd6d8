"""Run declearn's own unit tests for its HaikuModel and JaxNumpyVector against hkstore's.

Usage (in a venv with ``hkstore[declearn,test]`` and declearn 2.9.1, e.g. ``make
test-declearn``)::

    python tools/declearn_suite.py [--version 2.9.1] [--keep DIR] [-- PYTEST ARGS...]

What it does, every run (nothing of declearn's is kept in this repository):

1. downloads declearn's source distribution with pip (``pip download --no-deps --no-binary
   :all: declearn==VERSION``) into a temporary folder;
2. extracts ``test/model/test_haiku_model.py``, ``test/model/model_testing.py``,
   ``test/vector/test_jaxnp_vector.py`` and what they import (``test/vector/
   vector_testing.py``, the ``conftest.py`` files, ``test/testing_utils/``, the package
   ``__init__`` files);
3. swaps only the imports of declearn's ``HaikuModel`` / ``JaxNumpyVector`` for
   ``hkstore.integrations.declearn``'s ``DeclearnHaikuModel`` / ``DeclearnJaxVector`` (each
   expected line must be found exactly once);
4. adds a ``conftest.py`` beside ``test/`` that sets the receive policy: the test module's
   functions may be imported (``Trust(modules=["test.model.test_haiku_model"])``) -- what
   any receiving process must declare, since hkstore imports nothing from the wire by
   default;
5. runs pytest there on the CPU (``JAX_PLATFORMS=cpu``: the 111 CPU cases), and checks that
   the failures are exactly the tests listed in ``docs/DECLEARN.md`` (section "declearn's
   own tests"), each pinned to a declearn behaviour hkstore deliberately does not copy.

Exit status: 0 when the failure set equals the documented list and every test ran (no skip,
no error), 1 otherwise (the differences are printed), 2 when the download or the extraction
fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "DECLEARN.md"
#: Files of declearn's sdist the suite needs (paths under ``test/``).
FILES = (
    "__init__.py",
    "conftest.py",
    "model/__init__.py",
    "model/model_testing.py",
    "model/test_haiku_model.py",
    "vector/__init__.py",
    "vector/conftest.py",
    "vector/vector_testing.py",
    "vector/test_jaxnp_vector.py",
)
FOLDERS = ("testing_utils/",)
#: The only edits: (file, declearn's import line, hkstore's).
SWAPS = (
    (
        "model/test_haiku_model.py",
        "from declearn.model.haiku import HaikuModel, JaxNumpyVector",
        "from hkstore.integrations.declearn import DeclearnHaikuModel as HaikuModel\n"
        "from hkstore.integrations.declearn import DeclearnJaxVector as JaxNumpyVector",
    ),
    (
        "vector/test_jaxnp_vector.py",
        "from declearn.model.haiku import JaxNumpyVector",
        "from hkstore.integrations.declearn import DeclearnJaxVector as JaxNumpyVector",
    ),
)
HARNESS = '''"""Added by hkstore's tools/declearn_suite.py: the receiving process's trust policy."""

import hkstore
from hkstore.integrations.declearn import set_receive_policy

# The models under test travel by reference to this module's functions; hkstore imports
# nothing from the wire unless the receiver trusts it.
set_receive_policy(trust=hkstore.Trust(modules=["test.model.test_haiku_model"]))
'''
EXPECTED_TOTAL = 111
#: A documented failure in docs/DECLEARN.md: "- `test/...::Class::test[...]`" in the section.
SECTION = "## declearn's own tests"
_ITEM = re.compile(r"^- `(test/[^`]+)`")


def documented_failures(doc: Path = DOC) -> set[str]:
    """Return the test ids listed under :data:`SECTION` in ``doc``.

    Example:
        >>> all(name.startswith("test/") for name in documented_failures())
        True
    """
    lines = doc.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        raise SystemExit(f"{doc}: no section {SECTION!r}") from None
    found = set()
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        match = _ITEM.match(line)
        if match:
            found.add(match.group(1))
    return found


def fetch_sdist(version: str, into: Path) -> Path:
    """Download declearn's sdist with pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--no-binary", ":all:", "--dest", str(into), f"declearn=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(into.glob(f"declearn-{version}.tar.gz"))
    if done.returncode != 0 or not found:
        raise SystemExit(f"pip download failed ({done.returncode}): {done.stderr[-2000:]}")
    return found[0]


def extract(sdist: Path, version: str, into: Path) -> Path:
    """Extract the suite's files (regular files only, no path outside ``into``)."""
    prefix = f"declearn-{version}/test/"
    wanted = {prefix + name for name in FILES}
    root = into / "suite"
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            inside = name in wanted or any(
                name.startswith(prefix + folder) and name.endswith(".py") for folder in FOLDERS
            )
            if not inside or not member.isfile() or ".." in Path(name).parts:
                continue
            target = root / "test" / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            wanted.discard(name)
    if wanted:
        raise SystemExit(f"{sdist.name} lacks {sorted(wanted)}")
    return root


def swap_imports(root: Path) -> None:
    """Replace declearn's model/vector imports by hkstore's (each exactly once)."""
    for name, old, new in SWAPS:
        path = root / "test" / name
        text = path.read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise SystemExit(f"{name}: expected the line {old!r} once, found {text.count(old)}")
        path.write_text(text.replace(old, new), encoding="utf-8")
    (root / "conftest.py").write_text(HARNESS, encoding="utf-8")
    (root / "pytest.ini").write_text("[pytest]\npythonpath = .\n", encoding="utf-8")


def run_suite(root: Path, extra: list[str]) -> tuple[dict[str, str], int]:
    """Run pytest in ``root``; return ``{test id: outcome}`` and pytest's exit code."""
    report = root / "report.xml"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as declearn's own CI has
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
           str(root / "pytest.ini"), "--rootdir", str(root), f"--junitxml={report}",
           "test/model/test_haiku_model.py", "test/vector/test_jaxnp_vector.py", *extra]
    code = subprocess.run(cmd, cwd=root, env=env, check=False).returncode
    outcomes: dict[str, str] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)
        path = module[0].replace(".", "/") + ".py" if len(module) == 2 else "?"
        test_id = f"{path}::{module[-1]}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcomes[test_id] = next(
            (tag for tag in ("failure", "error", "skipped") if tag in tags), "passed"
        )
    return outcomes, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="2.9.1", help="declearn version (default 2.9.1)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    expected = documented_failures()
    with tempfile.TemporaryDirectory(prefix="hkstore-declearn-suite-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root = extract(fetch_sdist(args.version, work), args.version, work)
        swap_imports(root)
        outcomes, _ = run_suite(root, args.pytest_args)
    failed = {t for t, o in outcomes.items() if o == "failure"}
    other = {t: o for t, o in outcomes.items() if o in ("error", "skipped")}
    passed = sum(o == "passed" for o in outcomes.values())
    print(f"declearn {args.version} suite against hkstore: {passed} passed, {len(failed)} "
          f"failed, {len(other)} errors/skips, {len(outcomes)} in all")
    problems = []
    if len(outcomes) != EXPECTED_TOTAL and not args.pytest_args:
        problems.append(f"{len(outcomes)} tests ran, expected {EXPECTED_TOTAL}")
    problems += [f"{t}: {o}" for t, o in sorted(other.items())]
    problems += [f"fails but is not in {DOC.name}: {t}" for t in sorted(failed - expected)]
    if not args.pytest_args:
        problems += [f"listed in {DOC.name} but did not fail: {t}"
                     for t in sorted(expected - failed)]
    for test_id in sorted(failed & expected):
        print(f"  documented failure: {test_id}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
