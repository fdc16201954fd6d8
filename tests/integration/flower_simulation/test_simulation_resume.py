"""examples/flower through Flower's simulation engine (Ray): a run killed with SIGKILL after
round 2 and started again ends with the same arrays, bit for bit, as a run never stopped.

Two simulated clients, every client in every round (``fraction_train=1``): Flower's
simulation draws new random node ids in each process and the replies arrive in completion
order, and with two clients neither the sample nor FedAvg's sum depends on them; the grid
double of tests/integration/flower covers node sampling. Wall times are printed (``-s``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import hkstore

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[2] / "examples" / "flower"
ROUNDS = 4
LIMIT_S = 300


def environment() -> dict[str, str]:
    return dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0",
                PYTHONPATH=os.pathsep.join([str(EXAMPLE), *filter(
                    None, [os.environ.get("PYTHONPATH")])]))


def launch(directory: Path, log: Path, hold_at: int = 0) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(HERE / "sim_child.py"), str(directory),
                                 str(ROUNDS), str(hold_at)], stdout=out, stderr=out,
                                env=environment(), start_new_session=True)


def finish(process: subprocess.Popen[bytes], log: Path) -> None:
    code = process.wait(timeout=LIMIT_S)
    assert code == 0, log.read_text()[-4000:]


def group_alive(pgid: int) -> list[str]:
    """Processes of the group that are not zombies (``/proc``), as ``pid:name``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        fields = text[name_end + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{stat.parent.name}:{text[text.index('(') + 1:name_end]}")
    return alive


def final_arrays(directory: Path) -> tuple[int, dict[str, Any], dict[int, Any]]:
    """What resume() hands a next run: the last round, its exact arrays, the train history."""
    sys.path.insert(0, str(EXAMPLE))
    import server_app
    import task

    from hkstore.integrations.flower import CheckpointedStrategy, array_to_numpy, resume

    model = task.make_model()
    strategy = CheckpointedStrategy(server_app.make_strategy(), hkstore.Checkpointer(directory),
                                    like=model)
    last, arrays = resume(strategy.checkpointer, strategy, like=model)
    exact = {}
    for name in arrays:
        value = array_to_numpy(arrays[name], where=name)
        exact[name] = (str(value.dtype), value.shape, np.ascontiguousarray(value).tobytes())
    history = {r: dict(m) for r, m in strategy.history().train_metrics_clientapp.items()}
    return last, exact, history


def test_simulated_run_killed_after_round_two_resumes_bit_for_bit(tmp_path: Path) -> None:
    log = tmp_path / "simulation.log"
    t0 = time.monotonic()
    finish(launch(tmp_path / "straight", log), log)
    t1 = time.monotonic()

    interrupted = tmp_path / "interrupted"
    process = launch(interrupted, log, hold_at=3)
    deadline = time.monotonic() + LIMIT_S
    while 2 not in hkstore.Checkpointer(interrupted).rounds():
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "round 2 never appeared"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    time.sleep(1.0)
    assert group_alive(process.pid) == []  # Ray's processes went with it
    assert hkstore.Checkpointer(interrupted).rounds() == [1, 2]
    t2 = time.monotonic()

    finish(launch(interrupted, log), log)
    t3 = time.monotonic()

    straight = final_arrays(tmp_path / "straight")
    resumed = final_arrays(interrupted)
    assert straight[0] == resumed[0] == ROUNDS
    assert {n: v[:2] for n, v in straight[1].items()} == {
        n: ("float64", v[1]) for n, v in resumed[1].items()}  # FedAdam's float64, kept
    assert resumed[1] == straight[1]  # every byte
    assert resumed[2] == straight[2] and sorted(resumed[2]) == [1, 2, 3, 4]
    print(f"simulation wall times: uninterrupted {ROUNDS} rounds {t1 - t0:.1f} s; "
          f"run killed after round 2 {t2 - t1:.1f} s; resumed rounds 3-{ROUNDS} {t3 - t2:.1f} s; "
          f"total {t3 - t0:.1f} s")
