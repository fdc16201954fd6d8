"""Kill trials in CI: SIGKILL processes saving checkpoint rounds at random moments.

The trials themselves (and the checks after each kill) are ``tools/kill_trials.py``; CI runs
22 of them (the script's default is 100): 20 writers forked from a server that has imported
jax and hkstore (so that a trial costs its kill window, not an interpreter start), and 2
fresh interpreters. See the script's docstring for what is checked after each kill.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_models import device_policy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import kill_trials  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


def test_twenty_kills_of_forked_writers_never_leave_a_partial_or_lost_round(
    tmp_path: Path,
) -> None:
    report = kill_trials.run_trials(tmp_path / "ck", 20, seed=20, window=0.4)
    assert report.failures == []
    assert report.trials == 20 and report.background_trials == 10
    assert report.saved > 0  # the writers did save between kills (the lock never blocked)


def test_kills_of_fresh_interpreters(tmp_path: Path) -> None:
    report = kill_trials.run_trials(tmp_path / "ck", 2, seed=2, window=1.0, mode="spawn")
    assert report.failures == [] and report.trials == 2


def test_the_checks_catch_a_partial_round(tmp_path: Path) -> None:
    """The control: a round folder that looks complete but whose archive is cut short is
    reported (and so is a reported round that is gone)."""
    report = kill_trials.run_trials(tmp_path / "ck", 1, seed=1, window=0.8)
    assert report.failures == []
    rounds = sorted((tmp_path / "ck").glob("round-*"))
    assert rounds, "the writer saved no round in 0.8 s"
    archive = rounds[-1] / "model.hkz"
    archive.write_bytes(archive.read_bytes()[:100])
    found = kill_trials.TrialReport()
    kill_trials._check(tmp_path / "ck", {10**6}, found, 0)
    assert any("does not verify" in f for f in found.failures), found.failures
    assert any("reported saved but is gone" in f for f in found.failures), found.failures
