"""Crash consistency: a SIGKILLed ``save`` or ``hkstore sign`` leaves the old or the new archive.

``tools/kill_save_sign.py`` (its long mode runs 100 trials of each kind) starts a fresh process
that overwrites an existing archive, SIGKILLs it at a random moment (half the trials while
its temp file exists, so mid-write), then checks that the archive's path holds exactly the
old or exactly the new archive, that it verifies, and that the next write to the folder
leaves no temp file. Here: 20 trials (4 ``save``, which each start jax, and 16 ``sign``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import kill_save_sign


def test_killed_writes_leave_the_old_or_the_new_archive_and_no_temp_file() -> None:
    outcomes = [kill_save_sign.run_trials("save", 4, seed=1), kill_save_sign.run_trials("sign", 16)]
    for outcome in outcomes:
        assert outcome.problems == [], outcome.problems
        assert outcome.old + outcome.new == outcome.trials
    assert sum(o.trials for o in outcomes) >= 20
    # the trials did kill writers mid-write (else they would prove nothing about crashes)
    assert sum(o.hits for o in outcomes) >= 1, [(o.kind, o.hits) for o in outcomes]
