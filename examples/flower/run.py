"""Run the example with Flower's simulation engine: ``python run.py [--rounds N] [--dir D]``.

Needs ``pip install 'hkstore[flower-simulation]'`` (Flower with Ray). Two simulated clients;
stop it at any moment (Ctrl-C, kill -9) and run the same command again: it resumes after the
last saved round. ``flwr.simulation.run_simulation`` is the entry point used (flwr 1.42 marks
it deprecated in favour of ``flwr run``, which needs this folder packaged as a Flower app).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds in all (default 5)")
    parser.add_argument("--dir", default="runs/flower", help="checkpoint directory")
    parser.add_argument("--nodes", type=int, default=2, help="simulated clients (default 2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's and Ray's usage reports
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's workers import client_app from this folder
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(HERE))
    import client_app
    import server_app
    from flwr.simulation import run_simulation

    run_simulation(server_app.make_app(num_rounds=args.rounds, directory=args.dir),
                   client_app.app, num_supernodes=args.nodes,
                   backend_config={"client_resources": {"num_cpus": 1}})


if __name__ == "__main__":
    main()
