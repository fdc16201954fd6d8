"""Fuzzing every parser of untrusted input with Hypothesis: only HkstoreError, never a hang.

The targets, seeds and mutations are ``tools/fuzz.py``'s (its long mode runs 100,000 inputs and
more, with or without atheris); here Hypothesis draws the mutations, so a failure shrinks to
a small edit of a valid input. About a minute in all (``EXAMPLES`` per target). A call slower
than ``HANG_SECONDS`` counts as a hang: generous, for a loaded CI machine, where every input
here takes milliseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import fuzz

EXAMPLES = 2500
HANG_SECONDS = 10.0
TARGETS = fuzz.targets()

ops = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 1 << 20), st.integers(0, (1 << 16) - 1)),
    min_size=1, max_size=8,
)  # fmt: skip
choices = st.tuples(st.integers(0, 1 << 16), st.integers(0, 3), st.integers(0, 1 << 16))
fuzz_settings = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def check(target: fuzz.Target, data: bytes) -> None:
    before = (len(target.failures), len(target.hangs))
    fuzz.run_one(target, data, HANG_SECONDS)
    assert target.failures[before[0]:] == [], target.failures[before[0]:][0][1]
    assert target.hangs[before[1]:] == [], f"a call took {target.hangs[-1][1]:.1f} s"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_are_handled(name: str) -> None:
    target = TARGETS[name]
    for data in target.seeds:
        check(target, data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@fuzz_settings
@given(seed=st.integers(0, 1 << 16), edits=ops, json_edit=choices, as_json=st.booleans(),
       rebuilt=st.integers(0, 4))
def test_mutated_inputs_raise_only_hkstore_errors(
    name: str, seed: int, edits: list[fuzz.Op], json_edit: tuple[int, int, int],
    as_json: bool, rebuilt: int,
) -> None:
    target = TARGETS[name]
    if name == "archive" and as_json:
        data = fuzz.rebuilt_archive(rebuilt, edits, json_edit)
    elif target.json_seeds and as_json:
        data = fuzz.mutate_json(target.json_seeds[seed % len(target.json_seeds)], json_edit)
    else:
        data = fuzz.apply_ops(target.seeds[seed % len(target.seeds)], edits)
    check(target, data)
