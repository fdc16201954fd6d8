"""Kill trials: SIGKILL a process saving checkpoint rounds at random moments, then check.

Usage (from a checkout, in a venv with hkstore installed)::

    python tools/kill_trials.py --trials 100 [--seed 1] [--dir DIR] [--json FILE]
    python tools/kill_trials.py --trials 20 --dir s3://bucket/prefix \
        --storage-option endpoint_url=http://127.0.0.1:9000

``--dir`` may be an object-store URL (``s3://...``; the ``cloud`` extra): the writers then save
to that prefix (each round made visible by its record, uploaded last; the lock is a lease), and
the same checks run against it.

Each trial starts a new writer process on the same directory (forked from a server process
that has imported jax and hkstore, or with ``--spawn`` a fresh interpreter). The writer opens a
``Checkpointer`` (retention ``keep_last=2, keep_every=5, keep_best=("loss", "min", 1)``; in
every other trial ``background=True``), then saves round after round (now and then replacing
the previous one with ``overwrite=True``), printing each round once it is durable. After a
random delay the trial SIGKILLs it, and checks, before anything else touches the directory:

1. every round listed is complete and verifies (record, archive digests, state digests):
   nothing partial is ever listed;
2. every round the writer reported saved is still there, or was removed by retention while a
   newer round was kept (so retention never removed the only good round);
3. ``Checkpointer.restore()`` returns the newest round, with no round skipped (no warning);
4. ``history()`` lists every round reported saved;

and the next trial's writer takes the lock (a lock left by a killed process never blocks).
The last check of each trial also counts what the kill left behind (temp, removal and
replacement folders, rounds missing their history entry): evidence of where kills landed.

``tests/test_checkpoint_kill.py`` runs 20 trials in CI; this script's default is 100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

FEATURES, HIDDEN, CLASSES = 16, 32, 4


def forward(x: Any) -> Any:
    """The writer's model: a two-layer MLP (stored by reference ``kill_trials:forward``)."""
    import haiku as hk

    return hk.nets.MLP([HIDDEN, CLASSES], name="mlp")(x)


def loss(y_pred: Any, y_true: Any) -> Any:
    """Mean squared error per sample."""
    import jax.numpy as jnp

    return jnp.mean((y_pred - y_true) ** 2, axis=-1)


def _weights(step: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(step)
    shapes = {"mlp/~/linear_0:b": (HIDDEN,), "mlp/~/linear_0:w": (FEATURES, HIDDEN),
              "mlp/~/linear_1:b": (CLASSES,), "mlp/~/linear_1:w": (HIDDEN, CLASSES)}
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def writer(directory: str, background: bool, seed: int,
           report: Callable[[str], None] = lambda line: print(line, flush=True),
           storage_options: dict[str, Any] | None = None) -> int:
    """The process that gets killed: save rounds until killed, reporting each durable one."""
    import numpy as np

    from hkstore import Checkpointer, ModelState, RngState

    ckpt = Checkpointer(directory, keep_last=2, keep_every=5, keep_best=("loss", "min", 1),
                        background=background, functions="none",
                        storage_options=storage_options)
    start = (ckpt.latest() or 0) + 1
    rng = random.Random(seed)
    report(f"ready {start}")
    pending: int | None = None
    round_ = start
    while True:
        weights = _weights(round_)
        model = ModelState(model=forward, loss=loss, seed=0,
                           data_info={"data_type": "float32", "features_shape": [FEATURES]},
                           weights=weights, trainable=tuple(weights),
                           rng=RngState("threefry2x32", (0, round_)))
        state = {"step": round_, "momentum": {k: v * 0.5 for k, v in weights.items()},
                 "scale": np.float32(round_)}
        again = round_ > start and rng.random() < 0.15
        number = round_ - 1 if again else round_
        ckpt.save(model, number, state=state, metrics={"loss": rng.random()}, overwrite=again)
        if background:  # durable once the next save (or wait) has returned
            if pending is not None:
                report(f"saved {pending}")
            pending = number
            if rng.random() < 0.3:
                ckpt.wait()
                report(f"saved {pending}")
                pending = None
        else:
            report(f"saved {number}")
        if not again:
            round_ += 1


@dataclass
class TrialReport:
    """What the trials found."""

    trials: int = 0
    failures: list[str] = field(default_factory=list)
    saved: int = 0
    left_behind: Counter[str] = field(default_factory=Counter)
    background_trials: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON."""
        return {"trials": self.trials, "failures": self.failures,
                "rounds_reported_saved": self.saved, "left_behind": dict(self.left_behind),
                "background_trials": self.background_trials, "seconds": round(self.seconds, 1)}


class _Writer:
    """A writer process: a fresh interpreter (``spawn``) or a fork of a server that has
    already imported jax and hkstore (``fork``: ~20 ms to start instead of ~1.5 s; the server
    never initialises a jax backend, and neither does the writer, which saves numpy arrays)."""

    def __init__(self, mode: str, directory: Path | str, background: bool, seed: int,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.mode = mode
        if mode == "spawn":
            import hkstore  # the writer imports the hkstore this process does

            package = Path(hkstore.__file__).resolve().parents[1]
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                [str(package), str(REPO / "tools"), os.environ.get("PYTHONPATH", "")]))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--writer", str(directory),
                   "--seed", str(seed)] + (["--background"] if background else []) + [
                   f"--storage-option={k}={v}" for k, v in (storage_options or {}).items()]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=env)
            return
        context = _fork_context()
        self.conn, child = context.Pipe(duplex=False)
        self.process = context.Process(target=_forked_writer,
                                       args=(child, str(directory), background, seed,
                                             storage_options))
        self.process.start()
        child.close()

    def next_line(self, timeout: float = 120.0) -> str:
        """The writer's next report ("" once it is gone)."""
        if self.mode == "spawn":
            assert self.proc.stdout is not None
            return self.proc.stdout.readline().strip()
        try:
            if self.conn.poll(timeout):
                return str(self.conn.recv())
        except (EOFError, OSError):
            pass
        return ""

    def kill(self) -> tuple[list[str], int | None, str]:
        """SIGKILL it; return its remaining reports, its exit status and its stderr."""
        if self.mode == "spawn":
            self.proc.send_signal(signal.SIGKILL)
            out, err = self.proc.communicate()
            return [line for line in out.splitlines() if line], self.proc.returncode, err
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        lines = list(self._drain())
        self.conn.close()
        return lines, self.process.exitcode, ""

    def _drain(self) -> Iterator[str]:
        while True:
            try:
                yield str(self.conn.recv())
            except (EOFError, OSError):
                return


_CONTEXT: Any = None


def _fork_context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["numpy", "jax", "haiku", "hkstore.model",
                                         "hkstore.checkpoint", "hkstore.store._rounds",
                                         "kill_trials"])
    return _CONTEXT


def _forked_writer(conn: Any, directory: str, background: bool, seed: int,
                   storage_options: dict[str, Any] | None) -> None:
    writer(directory, background, seed, report=conn.send, storage_options=storage_options)


def _check(directory: Path | str, reported: set[int], report: TrialReport, trial: int,
           storage_options: dict[str, Any] | None = None) -> None:
    """The checks after a kill (see the module docstring)."""
    from hkstore import Checkpointer
    from hkstore.errors import CheckpointWarning, HkstoreError
    from hkstore.store import open_round, round_directory

    def fail(message: str) -> None:
        report.failures.append(f"trial {trial}: {message}")

    folder = round_directory(str(directory), storage_options)
    for name in folder.incomplete():
        report.left_behind[name[:5] if name.startswith(".") else "round without record"] += 1
    logged = set(folder.history())
    listed = folder.rounds()
    report.left_behind["round without history entry"] += len(set(listed) - logged)
    for number in listed:  # 1. nothing partial is listed
        try:
            open_round(folder, number).verify()
        except (HkstoreError, OSError) as exc:
            fail(f"listed round {number} does not verify: {type(exc).__name__}: {exc}")
    if reported and not listed:
        fail(f"rounds {sorted(reported)} were reported saved, none is on disk")
    newest = max(listed, default=-1)
    for number in reported:  # 2. durable, and removed only under a newer kept round
        if number not in listed and number > newest:
            fail(f"round {number} was reported saved but is gone (newest on disk {newest})")
    if not listed:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        try:  # 3. restore() gives the newest round, skipping nothing
            got = Checkpointer(directory, storage_options=storage_options).restore(
                model=forward, loss=loss)
        except (HkstoreError, CheckpointWarning) as exc:
            fail(f"restore() failed: {type(exc).__name__}: {exc}")
            return
    if got.round != newest:
        fail(f"restore() returned round {got.round}, the newest complete round is {newest}")
    history = {entry["round"] for entry in
               Checkpointer(directory, storage_options=storage_options).history()}
    if reported - history:  # 4.
        fail(f"history() lacks rounds reported saved: {sorted(reported - history)}")


def run_trials(directory: Path | str, trials: int, *, seed: int = 0, window: float = 0.5,
               mode: str = "fork", progress: bool = False,
               storage_options: dict[str, Any] | None = None) -> TrialReport:
    """Run ``trials`` kill trials in ``directory`` (created if missing); return the report.

    ``mode``: ``"fork"`` (writers forked from a server that imported jax and hkstore once)
    or ``"spawn"`` (a fresh interpreter per writer). ``directory`` may be an object-store URL
    (then ``storage_options`` are the filesystem's options).
    """
    if isinstance(directory, Path):
        directory.mkdir(parents=True, exist_ok=True)
    chooser = random.Random(seed)
    report = TrialReport()
    reported: set[int] = set()
    began = time.perf_counter()
    for trial in range(trials + 1):  # the extra run only checks that the lock is free
        background = trial % 2 == 1
        proc = _Writer(mode, directory, background, chooser.randrange(2**31), storage_options)
        first = proc.next_line()
        if not first.startswith("ready"):
            _, _, err = proc.kill()
            report.failures.append(f"trial {trial}: the writer did not start: {first!r} "
                                   f"{err[-2000:]}")
            break
        if trial == trials:  # the lock left by the last kill is free: the writer saves
            line = proc.next_line()
            _, _, err = proc.kill()
            if not line.startswith("saved "):
                report.failures.append(f"last run: the writer could not save: {line!r} "
                                       f"{err[-2000:]}")
            break
        time.sleep(chooser.uniform(0.0, window))
        lines, status, err = proc.kill()
        if status != -signal.SIGKILL:
            report.failures.append(f"trial {trial}: the writer ended by itself ({status}) "
                                   f"before the kill: {err[-2000:]}")
        done = {int(line.split()[1]) for line in lines if line.startswith("saved ")}
        report.trials += 1
        report.background_trials += background
        report.saved += len(done)
        reported |= done
        _check(directory, reported, report, trial, storage_options)
        if progress:
            print(f"trial {trial + 1}/{trials}: {len(done)} rounds saved before the kill, "
                  f"{len(report.failures)} failure(s) so far", flush=True)
    report.seconds = time.perf_counter() - began
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=0.5,
                        help="kill at a uniform random moment in [0, WINDOW] s after start-up")
    parser.add_argument("--dir", default=None,
                        help="where the trials write, a folder or an object-store URL "
                             "(default: a new temp folder, removed)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the object store's filesystem; repeatable")
    parser.add_argument("--json", type=Path, default=None, help="write the report there")
    parser.add_argument("--spawn", action="store_true",
                        help="start each writer as a fresh interpreter (slower; the default "
                             "forks it from a server that has imported jax and hkstore)")
    parser.add_argument("--writer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = dict(item.split("=", 1) for item in args.storage_option) or None
    if args.writer:
        return writer(args.writer, args.background, args.seed, storage_options=options)
    from hkstore.model import set_device_policy

    set_device_policy(gpu=False)
    with tempfile.TemporaryDirectory(prefix="hkstore-kill-") as tmp:
        target = args.dir if args.dir and "://" in args.dir else Path(args.dir or tmp)
        report = run_trials(target, args.trials, seed=args.seed,
                            window=args.window, mode="spawn" if args.spawn else "fork",
                            progress=True, storage_options=options)
    result = report.to_dict()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
