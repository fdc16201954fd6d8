"""The fresh process of the resume tests: resumes a checkpointed run and runs more rounds.

Usage: ``python resume_child.py STRATEGY DIRECTORY ROUNDS OUT.json [--controls]``. Python's
random is first seeded with another seed than the run's, so only a restored state can make
the rounds match. With ``--controls`` it first runs the two controls (on copies of the
directory) and writes their final arrays too.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import tempfile
from pathlib import Path

import runs

import hkstore


def main() -> None:
    name, directory, rounds, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    logging.getLogger("flwr").setLevel(logging.WARNING)
    hkstore.set_device_policy(gpu=False)
    report: dict[str, object] = {}
    if "--controls" in sys.argv[5:]:
        with tempfile.TemporaryDirectory() as scratch:
            random.seed(4321)
            copy = Path(scratch) / "a"
            shutil.copytree(directory, copy)
            report["nothing_restored"] = runs.exact(
                runs.control_nothing_restored(name, copy, rounds).arrays)
            copy = Path(scratch) / "b"
            shutil.copytree(directory, copy)
            report["rounds_restart"] = runs.exact(
                runs.control_rounds_restart(name, copy, rounds).arrays)
    random.seed(98765)
    last, result = runs.run(name, directory, rounds, resumed=True)
    report.update(last_round=last, arrays=runs.exact(result.arrays), metrics=runs.metrics(result))
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
