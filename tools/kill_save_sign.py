"""Crash consistency: SIGKILL ``hkstore.save`` and ``hkstore sign`` mid-write, over and over.

Usage::

    python tools/kill_save_sign.py --trials 100          # 100 of each kind (save, sign)
    python tools/kill_save_sign.py --trials 20 --kind sign --json out.json

Each trial starts a fresh process that overwrites an existing archive: ``hkstore.save`` of a
4 MB model over an archive of another model (kind ``save``), or ``hkstore sign`` of a 4 MB
archive in place (kind ``sign``). The process says when it is ready (imports done); the trial
sends SIGKILL after a random delay: on even trials drawn from zero to 1.5 times the write's
duration (measured once per kind), on odd trials after the writer's temp file appeared (so
the kill lands mid-write). Then:

1. the archive's path holds exactly the old archive or exactly the new one (SHA-256 of the
   whole file), and it opens and verifies (the new signed one with the signer's key);
2. the next write to the same folder (``atomic_write`` of a small file) leaves no temp file
   there (``.*.hkstore-tmp``): a killed writer's temp file is removed, never renamed.

A trial *hit* when the kill found a temp file in the folder (the writer was mid-write).
``tests/test_crash.py`` runs 20 trials in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TEMP_GLOB = ".*.hkstore-tmp"

#: The model of the trials: 4 features -> 1024 -> 1024 -> 3 (about 1.1 M float32, 4 MB).
_MODEL = """
import haiku as hk, jax, sys
sys.path.append({tests!r})
import hkstore
from helpers_models import mse_loss

def wide(x):
    return hk.nets.MLP([1024, 1024, 3], name="wide")(x)

def make(seed):
    model = hkstore.HaikuModel(wide, mse_loss, seed=seed)
    model.initialize({{"data_type": "float32", "features_shape": [4]}})
    return model
"""


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _env() -> dict[str, str]:
    """Children import the test helpers, and hkstore from this checkout unless the suite runs
    against an installed hkstore (``HKSTORE_TEST_INSTALLED=1``, as ``tools/wheel_check.py``
    sets)."""
    installed = os.environ.get("HKSTORE_TEST_INSTALLED") == "1"
    paths = ([] if installed else [str(REPO)]) + [str(REPO / "tests")]
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(paths))


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@dataclass
class Outcome:
    """What the trials of one kind found."""

    kind: str
    trials: int = 0
    old: int = 0
    new: int = 0
    hits: int = 0  # killed while a temp file existed (mid-write)
    problems: list[str] = field(default_factory=list)
    write_seconds: float = 0.0  # from "ready" to the end
    temp_seconds: float = 0.0  # how long the temp file existed


def _setup(kind: str, folder: Path) -> tuple[Path, str, str, list[str], Any]:
    """Write the old archive; return (path, old sha, new sha, child command, verifier)."""
    path = folder / "round.hkz"
    key = folder / "signer"
    if kind == "sign":  # no jax needed: an archive of numpy arrays, written by the store
        code = f"""
import sys
sys.path.append({str(REPO / "tests")!r})
import numpy as np
from helpers_archives import write_test_archive
from hkstore.store import generate_ed25519_keypair
generate_ed25519_keypair({str(key)!r})
rng = np.random.default_rng(1)
tensors = {{f"layer_{{i}}:w": rng.standard_normal((1024, 256)).astype("f4") for i in range(4)}}
write_test_archive({str(path)!r}, tensors=tensors)
"""
        subprocess.run(_python(code), env=_env(), check=True, timeout=300)
        old = _sha(path)
        scratch = folder / "scratch.hkz"
        subprocess.run([sys.executable, "-m", "hkstore", "sign", str(path), "--key",
                        f"{key}.key", "--out", str(scratch)], env=_env(), check=True,
                       timeout=300, capture_output=True)  # fmt: skip
        new = _sha(scratch)
        scratch.unlink()
        child = _python(f"""
import sys
from hkstore.cli import main
print("ready", flush=True)
sys.exit(main(["sign", {str(path)!r}, "--key", {str(key) + ".key"!r}]))
""")
        verify = ["--key", f"{key}.pub", "--require-signature"]
    else:
        code = _MODEL.format(tests=str(REPO / "tests")) + f"""
hkstore.save(make(1), {str(path)!r}, functions="none")
hkstore.save(make(2), {str(folder / "new.hkz")!r}, functions="none")
"""
        subprocess.run(_python(code), env=_env(), check=True, timeout=300)
        old, new = _sha(path), _sha(folder / "new.hkz")
        (folder / "new.hkz").unlink()
        child = _python(_MODEL.format(tests=str(REPO / "tests")) + f"""
model = make(2)
print("ready", flush=True)
hkstore.save(model, {str(path)!r}, functions="none")
""")
        verify = []
    assert old and new and old != new
    return path, old, new, child, verify


def _start(child: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(child, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"child did not start: {line!r} {err[-2000:]}")
    return proc


def _check_and_clean(path: Path, old: str, new: str, verify: list[str], out: Outcome) -> None:
    if importlib.util.find_spec("hkstore") is None:
        sys.path.append(str(REPO))
    from hkstore.store import atomic_write

    folder = path.parent
    digest = _sha(path)
    if digest == old:
        out.old += 1
    elif digest == new:
        out.new += 1
    else:
        out.problems.append(f"trial {out.trials}: the archive is neither the old nor the new one")
    check = subprocess.run([sys.executable, "-m", "hkstore", "verify", str(path), *verify],
                           env=_env(), capture_output=True, text=True, timeout=300)
    if check.returncode != 0 and not (digest == old and verify):  # old one: unsigned
        out.problems.append(f"trial {out.trials}: verify failed: {check.stdout[-300:]}")
    with atomic_write(folder / "next.bin") as handle:  # the next write to the folder
        handle.write(b"next")
    left = sorted(p.name for p in folder.glob(TEMP_GLOB))
    if left:
        out.problems.append(f"trial {out.trials}: temp files survived the next write: {left}")


def _wait_for_temp(folder: Path, proc: subprocess.Popen[str], limit: float) -> None:
    """Poll until a temp file appears in ``folder`` (or the child ends, or ``limit`` s)."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end and proc.poll() is None:
        if any(folder.glob(TEMP_GLOB)):
            return
        time.sleep(0.001)


def run_trials(kind: str, trials: int, seed: int = 0) -> Outcome:
    """``trials`` kill trials of ``kind`` ("save" or "sign") in a temp folder."""
    rng = random.Random(seed)
    out = Outcome(kind)
    with tempfile.TemporaryDirectory(prefix=f"hkstore-kill-{kind}-") as tmp:
        folder = Path(tmp)
        path, old, new, child, verify = _setup(kind, folder)
        old_bytes = path.read_bytes()
        proc = _start(child)  # one unkilled run: how long it takes after "ready", and how
        start = time.perf_counter()  # long its temp file exists (the write itself)
        _wait_for_temp(folder, proc, limit=300)
        seen = time.perf_counter()
        while proc.poll() is None and any(folder.glob(TEMP_GLOB)):
            time.sleep(0.001)
        out.temp_seconds = max(time.perf_counter() - seen, 0.001)
        proc.communicate(timeout=300)
        out.write_seconds = time.perf_counter() - start
        for trial in range(trials):
            out.trials = trial + 1
            path.write_bytes(old_bytes)  # the old archive again, for every trial
            for stale in folder.glob(TEMP_GLOB):
                stale.unlink()
            proc = _start(child)
            if trial % 2:  # half the trials: wait for the temp file, so the kill lands mid-write
                _wait_for_temp(folder, proc, limit=out.write_seconds * 3)
                time.sleep(rng.uniform(0, 0.5 * out.temp_seconds))
            else:  # the other half: any time from "ready" on
                time.sleep(rng.uniform(0, 1.5 * out.write_seconds))
            temps_before = list(folder.glob(TEMP_GLOB))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)  # reaps it and closes its pipes
            if temps_before or list(folder.glob(TEMP_GLOB)):
                out.hits += 1
            _check_and_clean(path, old, new, verify, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100, help="trials of each kind (default 100)")
    p.add_argument("--kind", choices=("save", "sign", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    kinds = ["save", "sign"] if args.kind == "both" else [args.kind]
    results = [run_trials(kind, args.trials, args.seed) for kind in kinds]
    for r in results:
        print(f"{r.kind}: {r.trials} trials, final file old {r.old} / new {r.new}, killed "
              f"mid-write {r.hits}, run {r.write_seconds:.2f} s (temp file {r.temp_seconds:.3f}"
              f" s), problems {len(r.problems)}")
        for problem in r.problems[:5]:
            print("  " + problem)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
