"""One simulated run of examples/flower (Flower's simulation engine, Ray), for the test.

Usage: ``python sim_child.py DIRECTORY ROUNDS HOLD_AT``: runs the example's server (resuming
whatever DIRECTORY holds) to ROUNDS rounds with 2 simulated clients. With HOLD_AT > 0 the
centralized evaluation of round HOLD_AT never returns -- that round is never saved -- so the
parent can kill the run after round HOLD_AT - 1 was saved, whatever the timing.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "flower"


def main() -> None:
    directory, rounds, hold_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLE), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(EXAMPLE))
    import client_app
    import server_app
    from flwr.simulation import run_simulation

    def evaluate_fn(server_round: int, arrays: object) -> None:
        if server_round == hold_at:
            time.sleep(3600)

    run_simulation(server_app.make_app(num_rounds=rounds, directory=directory,
                                       evaluate_fn=evaluate_fn if hold_at else None),
                   client_app.app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})


if __name__ == "__main__":
    main()
