"""Kill a declearn federated server mid-run, restart it, and check it finishes as if nothing
had happened.

Usage::

    python demo.py [--workdir DIR] [--rounds 4] [--json results.json]

Two runs of the same federated training (``federated.py``: an hkstore model with a frozen
layer, Adam on the server, momentum on the clients, shuffled client data, dropout), each with
a server and two clients talking over websockets on 127.0.0.1:

- **straight**: server and clients in one process, never interrupted (the reference);
- **resumed**: server and clients each in its own process. Once the server has saved round 2
  and both clients have trained round 3, the server gets SIGKILL; it is started again on the
  same directory, resumes after its latest round, the clients (still running) reconnect and
  restore their own state of that round, and the run finishes.

Then every final weight, optimizer state, loss history and best model of the resumed run is
compared with the straight run's, bit for bit, and every party's frozen weights (every round
on disk) with their initial values. The merged log of all processes is printed. Exit status 0
when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLIENTS = ("client-1", "client-2")
TIMEOUT = 600.0  # seconds any one stage may take (a loaded 2-core machine is slow)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rounds_on_disk(folder: Path) -> list[int]:
    """The complete rounds of a checkpoint directory (``round-N/round.json``, FORMAT.md 13.1)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(name[6:]) for name in names
                  if name.startswith("round-") and name[6:].isdigit()
                  and (folder / name / "round.json").is_file())


@dataclass
class Party:
    """One process of the demo."""

    name: str
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "federated.py"), *self.args],
                stdout=subprocess.DEVNULL, stderr=handle, cwd=HERE)

    def exited_badly(self) -> bool:
        code = None if self.process is None else self.process.poll()
        return code not in (None, 0)


@dataclass
class Timeline:
    """What the demo itself reports, in the processes' log format."""

    lines: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        line = f"{stamp} {'demo':<8} {text}"
        self.lines.append(line)
        print(line, flush=True)


def wait_until(check: Callable[[], bool], parties: list[Party], what: str) -> None:
    """Poll ``check`` until it holds; fail if a party dies first or ``TIMEOUT`` passes."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        bad = [party for party in parties if party.exited_badly()]
        if bad:
            raise RuntimeError(f"while waiting for {what}: {bad[0].name} exited with status "
                               f"{bad[0].process.returncode if bad[0].process else '?'}:\n"
                               + bad[0].log.read_text(errors="replace")[-4000:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {TIMEOUT:.0f} s")
        time.sleep(0.02)


def finish(parties: list[Party]) -> None:
    """Wait for every party to exit; fail as soon as one exits badly, or after ``TIMEOUT``."""
    wait_until(lambda: all(p.process is not None and p.process.poll() is not None
                           for p in parties), parties, "the runs to finish")


def stop_all(parties: list[Party]) -> None:
    for party in parties:
        if party.process is not None and party.process.poll() is None:
            party.process.kill()
            party.process.wait(timeout=60)


# --- comparing the runs ---------------------------------------------------------------------


def same_bits(a: Any, b: Any) -> bool:
    """Whether two arrays (or scalars) have the same dtype, shape and bytes."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def tree_differences(a: Any, b: Any, path: str = "$") -> list[str]:
    """Every path where two restored states differ (arrays and floats bit for bit)."""
    import numpy as np

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for key in sorted(a) for d in tree_differences(a[key], b[key],
                                                                  f"{path}[{key!r}]")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in tree_differences(x, y, f"{path}[{i}]")]
    if hasattr(a, "dtype") or hasattr(b, "dtype") or isinstance(a, float):
        arrays = np.asarray(a), np.asarray(b)
        return [] if same_bits(*arrays) else [f"{path}: {arrays[0]!r} vs {arrays[1]!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def differing(a: Any, b: Any) -> list[str]:
    """The weights of two models that are not bit-equal."""
    wa, wb = a.get_weights().coefs, b.get_weights().coefs
    return [name for name in wa if not same_bits(wa[name], wb[name])]


def compare(workdir: Path, rounds: int) -> dict[str, Any]:
    """Compare the resumed run with the straight one; check every party's frozen weights."""
    import nets

    import hkstore

    hkstore.set_device_policy(gpu=False)

    def restore(folder: Path, number: int) -> Any:
        return hkstore.Checkpointer(folder).restore(number, model=nets.forward, loss=nets.loss)

    initial = restore(workdir / "straight" / "server", 0).model
    frozen_names = [n for n in initial.get_weight_names()
                    if n not in initial.get_weight_names(trainable=True)]
    frozen = {n: initial.get_weights().coefs[n] for n in frozen_names}
    report: dict[str, Any] = {"rounds": rounds, "frozen_names": frozen_names, "parties": {}}
    for party in ("server", *CLIENTS):
        straight = restore(workdir / "straight" / party, rounds)
        resumed = restore(workdir / "resumed" / party, rounds)
        best = [hkstore.load(workdir / run / party / "model-best.hkz",
                             model=nets.forward, loss=nets.loss) for run in ("straight", "resumed")]
        frozen_bad = []
        for run in ("straight", "resumed"):
            folder = workdir / run / party
            models = {f"round {n}": restore(folder, n).model for n in rounds_on_disk(folder)}
            models["model-best.hkz"] = hkstore.load(folder / "model-best.hkz",
                                                    model=nets.forward, loss=nets.loss)
            frozen_bad += [f"{run} {where}: {name}" for where, model in models.items()
                           for name, value in frozen.items()
                           if not same_bits(model.get_weights().coefs[name], value)]
        report["parties"][party] = {
            "weights_compared": len(straight.model.get_weight_names()),
            "weights_differing": differing(straight.model, resumed.model),
            "rng_equal": straight.model.rng_state == resumed.model.rng_state,
            "state_differences": tree_differences(straight.state, resumed.state),
            "metrics_equal": straight.metrics == resumed.metrics,
            "best_differing": differing(*best),
            "frozen_checked": len(rounds_on_disk(workdir / "resumed" / party)) + 1,
            "frozen_differing": frozen_bad,
        }
    report["ok"] = all(
        not p["weights_differing"] and p["rng_equal"] and not p["state_differences"]
        and p["metrics_equal"] and not p["best_differing"] and not p["frozen_differing"]
        for p in report["parties"].values())
    return report


def merged_log(timeline: Timeline, logs: list[Path]) -> list[str]:
    """Every party's log lines and the demo's, in time order (tracebacks kept in place)."""
    entries = [(line[:23], i, line) for i, line in enumerate(timeline.lines)]
    for log in logs:
        last = "0000"
        for i, line in enumerate(log.read_text(errors="replace").splitlines()):
            if line[:4].isdigit():
                last = line[:23]
            entries.append((last, len(entries) + i, line))
    return [line for _, _, line in sorted(entries)]


# --- the demo -------------------------------------------------------------------------------


def run(workdir: Path, rounds: int, timeline: Timeline) -> dict[str, Any]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port, straight_port = free_port(), free_port()
    resumed = workdir / "resumed"
    straight = Party("straight", ["straight", "--dir", str(workdir / "straight"), "--port",
                                  str(straight_port), "--rounds", str(rounds)],
                     logs / "straight.log")
    server = Party("server", ["server", "--dir", str(resumed / "server"), "--port", str(port),
                              "--rounds", str(rounds)], logs / "server.log")
    clients = [Party(name, ["client", "--name", name, "--dir", str(resumed / name), "--port",
                            str(port)], logs / f"{name}.log") for name in CLIENTS]
    parties = [straight, server, *clients]
    started = time.monotonic()
    try:
        timeline.say(f"straight run (server and clients in one process) on port {straight_port}; "
                     f"resumed run (one process each) on port {port}; files in {workdir}")
        for party in parties:
            party.start()

        def ready_to_kill() -> bool:
            done = rounds_on_disk(resumed / "server")
            trained = [rounds_on_disk(resumed / name) for name in CLIENTS]
            return (2 in done and all(3 in r for r in trained)) or bool(done and done[-1] >= 3)

        wait_until(ready_to_kill, parties, "the server's round 2 and the clients' round 3")
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=60)
        at_kill = {"server": rounds_on_disk(resumed / "server"),
                   **{name: rounds_on_disk(resumed / name) for name in CLIENTS}}
        timeline.say(f"SIGKILL server (pid {server.process.pid}): server rounds "
                     f"{at_kill['server']}, " + ", ".join(f"{name} rounds {at_kill[name]}"
                                                          for name in CLIENTS))
        restarted = Party("server", server.args, logs / "server-restarted.log")
        restarted.start()
        timeline.say(f"server restarted (pid {restarted.process.pid if restarted.process else '?'})"
                     f" on the same directory; clients still running")
        parties.append(restarted)
        finish([straight, restarted, *clients])
        elapsed = time.monotonic() - started
        timeline.say(f"both runs finished in {elapsed:.1f} s; comparing")
    finally:
        stop_all(parties)
    report = compare(workdir, rounds)
    report["at_kill"] = at_kill
    report["resumed_from"] = at_kill["server"][-1]
    report["seconds"] = round(elapsed, 1)
    report["logs"] = [str(p.log) for p in parties]
    return report


def summary(report: dict[str, Any], timeline: Timeline) -> None:
    for party, found in report["parties"].items():
        frozen = "yes" if not found["frozen_differing"] else found["frozen_differing"][:3]
        timeline.say(
            f"{party}: {found['weights_compared'] - len(found['weights_differing'])}/"
            f"{found['weights_compared']} weights bit-equal to the straight run's, random state "
            f"{'equal' if found['rng_equal'] else 'DIFFERENT'}, saved state "
            f"{'equal' if not found['state_differences'] else found['state_differences'][:3]}, "
            f"metrics {'equal' if found['metrics_equal'] else 'DIFFERENT'}, best model "
            f"{'equal' if not found['best_differing'] else found['best_differing']}; frozen "
            f"{report['frozen_names']} equal to the initial values in every round and best "
            f"model of both runs: {frozen}")
    timeline.say("RESUMED RUN == STRAIGHT RUN, bit for bit" if report["ok"] else
                 "MISMATCH between the resumed run and the straight run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the runs write (default: a new temp folder, kept)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.rounds < 4:
        parser.error("--rounds must be at least 4 (the server is killed after round 2)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hkstore-declearn-demo-"))
    timeline = Timeline()
    report = run(workdir, args.rounds, timeline)
    summary(report, timeline)
    print("\n--- merged log of every process ---")
    for line in merged_log(timeline, [Path(p) for p in report["logs"]]):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
