"""The federated run, every party in its own process: ``examples/declearn/demo.py``.

declearn's ``FederatedServer`` and two ``FederatedClient`` s (the resumable subclasses), one
process each, websockets on 127.0.0.1, an hkstore model whose encoder is frozen, 4 rounds. The
server process gets SIGKILL once it has saved round 2 and both clients have trained round 3;
a new server process resumes from its latest round and the run finishes. Beside it, the same
run never interrupted. The demo compares the two; this test checks its report, and checks the
final weights and the frozen ones itself, from the checkpoint directories.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

import hkstore

DEMO = Path(__file__).resolve().parents[3] / "examples" / "declearn"
PARTIES = ("server", "client-1", "client-2")
ROUNDS = 4


def nets() -> ModuleType:
    """The demo's model functions (``examples/declearn/nets.py``)."""
    spec = importlib.util.spec_from_file_location("declearn_demo_nets", DEMO / "nets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_bits(a: object, b: object) -> bool:
    x, y = np.asarray(a), np.asarray(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_a_server_killed_after_round_2_resumes_and_ends_bit_equal_to_a_straight_run(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    # generous: every stage of the demo has its own 600 s limit; a 2-core machine under load
    # takes about a minute
    done = subprocess.run(
        [sys.executable, str(DEMO / "demo.py"), "--workdir", str(tmp_path), "--rounds",
         str(ROUNDS), "--json", str(report_path)],
        cwd=DEMO, capture_output=True, text=True, timeout=1200, check=False)
    print(done.stdout)  # the merged log of every process (pytest -s; shown on failure)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-8000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    # the kill came after round 2 and before the run's end; the new process resumed from it
    resumed_from = report["resumed_from"]
    assert 2 <= resumed_from < ROUNDS, report["at_kill"]
    assert report["at_kill"]["server"] == list(range(resumed_from + 1))
    assert "SIGKILL server" in done.stdout
    restarted = (tmp_path / "logs" / "server-restarted.log").read_text()
    assert f"resuming from round {resumed_from} of" in restarted
    assert f"resume: 2 clients restored their state of round {resumed_from}" in restarted
    for name in ("client-1", "client-2"):
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert "lost the connection to the server" in log
        assert f"{name}: resumed from round {resumed_from}" in log

    # checked here too, from the files: final weights bit for bit, frozen ones untouched
    functions = nets()
    hkstore.set_device_policy(gpu=False)

    def restore(run: str, party: str, number: int) -> hkstore.HaikuModel:
        return hkstore.Checkpointer(tmp_path / run / party).restore(
            number, model=functions.forward, loss=functions.loss).model

    initial = restore("straight", "server", 0)
    trainable = set(initial.get_weight_names(trainable=True))
    frozen = {name: value for name, value in initial.get_weights().coefs.items()
              if name not in trainable}
    assert sorted(frozen) == ["encoder:b", "encoder:w"]
    for party in PARTIES:
        straight, resumed = restore("straight", party, ROUNDS), restore("resumed", party, ROUNDS)
        a, b = straight.get_weights().coefs, resumed.get_weights().coefs
        assert sorted(a) == sorted(b)
        assert [n for n in a if not same_bits(a[n], b[n])] == [], party
        assert [n for n in trainable if same_bits(a[n], initial.get_weights().coefs[n])] == []
        for run, model in (("straight", straight), ("resumed", resumed)):
            coefs = model.get_weights().coefs
            assert all(same_bits(coefs[n], v) for n, v in frozen.items()), (run, party)
