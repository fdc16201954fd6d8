"""Running hkstore in a fresh interpreter, and its command in this one: the one CLI test helper.

``HKSTORE_TEST_INSTALLED=1`` (set by ``tools/wheel_check.py``) runs the suite against an
installed hkstore (the wheel in a fresh venv): subprocesses then import hkstore from the
environment, never from this checkout.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from hkstore.cli import main

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
#: True when the suite runs against an installed hkstore rather than this checkout.
INSTALLED = os.environ.get("HKSTORE_TEST_INSTALLED") == "1"


def subprocess_env(pythonpath: Sequence[Path] = ()) -> dict[str, str]:
    """The environment of a child interpreter: ``pythonpath`` first, then the test helpers
    (and this checkout's package, unless the suite runs against an installed hkstore)."""
    paths = [*pythonpath, *([] if INSTALLED else [REPO]), TESTS]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, paths)))


def run_python(code: str, *, pythonpath: Sequence[Path] = (),
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; with ``check``, it must exit 0."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, env=subprocess_env(pythonpath), timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_cli(*args: object, pythonpath: Sequence[Path] = (),
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hkstore ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "hkstore", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=subprocess_env(pythonpath),
                          timeout=120, check=False)


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    """Run ``hkstore.cli.main(ARGS)`` in this process (the fast path for detailed checks)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
