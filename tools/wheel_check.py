"""Check the built wheel the way users get it: no extras (no jax), and the test suite against it.

Usage (from a checkout, with a Python that has ``build`` or at least pip)::

    python tools/wheel_check.py            # build, then both checks; exit 0 when all pass
    python tools/wheel_check.py --bare-only

1. Builds the wheel (``python -m build --wheel``) into a temp folder and checks that it ships
   every schema and ``py.typed``.
2. **Bare install**: a fresh venv with ``pip install hkstore-*.whl`` and no extras must not have
   jax, haiku or cryptography; there, an archive written through ``hkstore.store`` is inspected
   and verified with the ``hkstore`` command (exit 0), a tampered copy fails ``verify`` (exit 1),
   and touching ``hkstore.HaikuModel`` raises an ImportError naming the ``haiku`` extra.
3. **Test suite against the wheel**: a second fresh venv with ``hkstore[test]`` from the wheel
   runs ``pytest tests`` with ``HKSTORE_TEST_INSTALLED=1``, so that every import of hkstore
   (in the tests and in their subprocesses) comes from the installed wheel, never from this
   checkout. A wheel missing a schema or a module fails here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``, echoing it; raise on a non-zero exit unless ``check=False``."""
    print("+", " ".join(map(str, cmd)), flush=True)
    check = bool(kwargs.pop("check", True))
    result = subprocess.run(cmd, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise SystemExit(f"wheel_check: command failed with exit {result.returncode}")
    return result


def clean_copy(dest: Path) -> Path:
    """Copy the checkout's files (tracked, and untracked but not ignored) to ``dest``.

    The wheel is built from this copy, never from the checkout itself: build leftovers there
    (``*.egg-info/SOURCES.txt`` of an editable install) can smuggle files into a wheel whose
    configuration forgot them.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def build_wheel(out: Path) -> Path:
    """Build the wheel from a clean copy of the checkout into ``out``; return its path."""
    source = clean_copy(out.parent / "source")
    try:
        import build  # noqa: F401
        run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)],
            stdout=subprocess.DEVNULL)
    except ImportError:
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
             str(source)])
    wheels = sorted(out.glob("hkstore-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"wheel_check: expected one wheel in {out}, found {wheels}")
    return wheels[0]


def check_contents(wheel: Path) -> None:
    """The wheel ships every schema of the checkout and the typing marker."""
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"hkstore/schemas/{p.name}" for p in (REPO / "hkstore" / "schemas").glob("*.json")}
    wanted.add("hkstore/py.typed")
    missing = sorted(wanted - names)
    if missing:
        raise SystemExit(f"wheel_check: {wheel.name} lacks {missing}")
    print(f"wheel contents ok: {len(wanted)} schema/marker files in {wheel.name}")


def new_venv(path: Path) -> Path:
    """Create a venv and return its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


BARE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, subprocess, sys
    from pathlib import Path

    import numpy as np

    import hkstore
    from hkstore.store import ArchiveContent, TensorSpec, open_archive, write_archive

    absent = [m for m in ("jax", "jaxlib", "haiku", "cryptography")
              if importlib.util.find_spec(m) is not None]
    assert absent == [], f"installed without extras, yet present: {absent}"
    folder = Path(sys.argv[1])
    tensors = {"lin:w": np.arange(6, dtype=np.float32).reshape(2, 3),
               "lin:b": np.zeros(3, np.float32)}
    content = ArchiveContent(
        specs=[TensorSpec(n, "F32", a.shape) for n, a in tensors.items()],
        fetch=tensors.__getitem__, trainable=["lin:w"],
        data_info={"data_type": "float32", "features_shape": [2]}, seed=0,
        functions={"model": {"kind": "none"}, "loss": {"kind": "none"}},
    )
    path = folder / "bare.hkz"
    with open(path, "wb") as handle:
        write_archive(handle, content)
    cli = [str(Path(sys.executable).with_name("hkstore"))]
    for verb in ("inspect", "verify"):
        result = subprocess.run([*cli, verb, str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (verb, result.stdout, result.stderr)
        print(f"hkstore {verb}: exit 0")
    data = bytearray(path.read_bytes())
    with open_archive(bytes(data)) as archive:
        offset = archive.members["weights.safetensors"].data_offset
        size = archive.members["weights.safetensors"].size
    data[offset + size - 1] ^= 0xFF  # the last byte of the last tensor
    bad = folder / "tampered.hkz"
    bad.write_bytes(bytes(data))
    result = subprocess.run([*cli, "verify", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1, (result.stdout, result.stderr)
    print("hkstore verify of a tampered copy: exit 1")
    try:
        hkstore.HaikuModel
    except ImportError as exc:
        assert "hkstore[haiku]" in str(exc), exc
        assert isinstance(exc, hkstore.HkstoreError)
        print("hkstore.HaikuModel without the extra:", exc)
    else:
        raise AssertionError("hkstore.HaikuModel imported without jax")
    assert Path(hkstore.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())
    """
)


def bare_check(wheel: Path, work: Path) -> None:
    python = new_venv(work / "venv-bare")
    run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    (work / "bare").mkdir()
    script = work / "bare_check.py"
    script.write_text(BARE_SCRIPT, encoding="utf-8")
    run([str(python), str(script), str(work / "bare")], cwd=work)
    print("bare install ok: no jax, inspect and verify work, the model names its extra")


def suite_check(wheel: Path, work: Path, pytest_args: list[str]) -> None:
    python = new_venv(work / "venv-test")
    run([str(python), "-m", "pip", "install", "-q", f"{wheel}[test]"])
    env = dict(os.environ, HKSTORE_TEST_INSTALLED="1")
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    # the venv's pytest script (not `python -m pytest`, which would put the checkout on
    # sys.path); --confcutdir keeps conftest lookup inside tests/
    run([str(python.with_name("pytest")), "-p", "no:cacheprovider", "--confcutdir",
         str(REPO / "tests"), str(REPO / "tests"), *pytest_args], cwd=work, env=env)
    print(f"test suite against the wheel ok ({time.monotonic() - start:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bare-only", action="store_true", help="skip the test-suite run")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hkstore-wheel-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work / "dist")
        check_contents(wheel)
        bare_check(wheel, work)
        if not args.bare_only:
            suite_check(wheel, work, args.pytest_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
