"""Checkpointer on an object-store prefix: record-last visibility, retention order, the lease,
cleaning what a killed writer left, and kill trials against moto's S3 server.

The fast cases run on fsspec's memory filesystem (``helpers_fsspec``: the transport logs each
write and delete in order); the kill trials run ``tools/kill_trials.py`` against a real S3
endpoint on loopback (``helpers_s3``).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import cli
from helpers_fsspec import CountingMemoryFS, countmem_fs  # noqa: F401 (the fixture fs)
from helpers_models import CASES, device_policy
from helpers_s3 import s3_server

import hkstore
from hkstore.errors import CheckpointExistsError, CheckpointLockedError
from hkstore.store import ObjectRoundDirectory, round_directory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import kill_trials  # noqa: E402

CASE = CASES[0]
PREFIX = "countmem://ckpt/run"
KEY = "/ckpt/run"


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


def state(r: int) -> dict[str, object]:
    return {"step": r, "m": np.full(6, float(r), dtype=np.float32)}


def restore(ckpt: hkstore.Checkpointer) -> hkstore.checkpoint.Restored:
    return ckpt.restore(model=CASE.model, loss=CASE.loss, state_like=state(0))


def test_rounds_are_written_record_last_and_restored(fs: CountingMemoryFS) -> None:
    model = CASE.build(seed=1)
    with hkstore.Checkpointer(PREFIX, keep_last=2) as ckpt:
        for r in (1, 2, 3):
            ckpt.save(model, r, state=state(r), metrics={"loss": 1 / r})
        assert ckpt.rounds() == [2, 3]
        assert str(ckpt.directory) == PREFIX
    puts = [key for op, key in fs.log if op == "put" and "/round-00000003/" in key]
    assert puts[-1] == f"{KEY}/round-00000003/round.json"  # the record, last
    assert set(puts[:-1]) == {f"{KEY}/round-00000003/model.hkz",
                              f"{KEY}/round-00000003/state.safetensors"}
    got = restore(hkstore.Checkpointer(PREFIX))
    assert got.round == 3 and got.state["step"] == 3
    np.testing.assert_array_equal(got.state["m"], state(3)["m"])
    assert [h["round"] for h in hkstore.Checkpointer(PREFIX).history()] == [1, 2, 3]
    assert not fs.exists(f"{KEY}/.lease")  # released by close()


def test_retention_deletes_the_record_first(fs: CountingMemoryFS) -> None:
    model = CASE.build()
    with hkstore.Checkpointer(PREFIX, keep_last=1) as ckpt:
        ckpt.save(model, 1, state=state(1))
        fs.log.clear()
        ckpt.save(model, 2, state=state(2))
    removed = [key for op, key in fs.log if op == "rm" and "/round-00000001/" in key]
    assert removed[0] == f"{KEY}/round-00000001/round.json", removed
    assert len(removed) == 3
    assert fs.find(f"{KEY}/round-00000001") == []


def test_a_round_without_its_record_is_invisible_and_cleaned(fs: CountingMemoryFS) -> None:
    """What a writer killed before the record leaves: files of round 3, no record."""
    model = CASE.build()
    with hkstore.Checkpointer(PREFIX) as ckpt:
        ckpt.save(model, 1, state=state(1))
        ckpt.save(model, 2, state=state(2))
    leftover = f"{KEY}/round-00000003/model.hkz"
    fs.pipe_file(leftover, fs.cat_file(f"{KEY}/round-00000002/model.hkz"))
    fs.pipe_file(f"{KEY}/round-00000002/round.json.partial", b"x")  # stray object too
    directory = ObjectRoundDirectory(PREFIX)
    assert directory.rounds() == [1, 2] and directory.incomplete() == ["round-00000003"]
    assert restore(hkstore.Checkpointer(PREFIX)).round == 2
    assert not fs.exists(leftover)  # opening the prefix with no writer at work cleaned it
    assert directory.incomplete() == []
    with hkstore.Checkpointer(PREFIX) as ckpt:
        ckpt.save(model, 3, state=state(3))
    assert restore(hkstore.Checkpointer(PREFIX)).round == 3


def test_overwrite_and_existing_rounds(fs: CountingMemoryFS) -> None:
    model = CASE.build()
    with hkstore.Checkpointer(PREFIX) as ckpt:
        ckpt.save(model, 1, state=state(1))
        with pytest.raises(CheckpointExistsError, match="round 1"):
            ckpt.save(model, 1, state=state(1))
        ckpt.save(model, 1, state=state(7), overwrite=True)
    assert restore(hkstore.Checkpointer(PREFIX)).state["step"] == 7


def test_two_writers_are_refused_by_the_lease(fs: CountingMemoryFS) -> None:
    model = CASE.build()
    first = hkstore.Checkpointer(PREFIX)
    first.save(model, 1)
    second = hkstore.Checkpointer(PREFIX)
    with pytest.raises(CheckpointLockedError, match=f"pid .* on host {socket.gethostname()}"):
        second.save(model, 2)
    assert first.rounds() == [1]
    first.close()
    second.save(model, 2)  # released: the other writer may go on
    second.close()
    assert hkstore.Checkpointer(PREFIX).rounds() == [1, 2]


def _lease(fs: CountingMemoryFS, **fields: object) -> None:
    doc = {"expires": time.time() + 600, "host": "elsewhere", "owner": "someone",
           "pid": 1, "since": "2026-01-01T00:00:00Z", **fields}
    fs.pipe_file(f"{KEY}/.lease", json.dumps(doc).encode())


def test_live_leases_refuse_stale_ones_are_taken_over(fs: CountingMemoryFS) -> None:
    model = CASE.build()
    _lease(fs)  # another host, not expired
    with pytest.raises(CheckpointLockedError, match="on host elsewhere"):
        hkstore.Checkpointer(PREFIX).save(model, 1)
    _lease(fs, expires=time.time() - 1)  # expired
    with hkstore.Checkpointer(PREFIX) as ckpt:
        ckpt.save(model, 1)
    dead = 2**22 + 12345  # above the default pid_max: no such process on this host
    _lease(fs, host=socket.gethostname(), pid=dead)
    with hkstore.Checkpointer(PREFIX) as ckpt:
        ckpt.save(model, 2)
    assert hkstore.Checkpointer(PREFIX).rounds() == [1, 2]


def test_a_writer_whose_lease_was_taken_stops(fs: CountingMemoryFS) -> None:
    model = CASE.build()
    ckpt = hkstore.Checkpointer(PREFIX)
    ckpt.save(model, 1)
    _lease(fs)  # another writer took it over (ours had expired)
    with pytest.raises(CheckpointLockedError, match="taken over"):
        ckpt.save(model, 2)
    assert not any("round-00000002" in key for _, key in fs.log)
    ckpt.close()
    assert fs.exists(f"{KEY}/.lease")  # not ours: left alone


def test_file_urls_and_paths_get_the_local_directory(tmp_path: Path) -> None:
    local = round_directory(f"file://{tmp_path}/ck")
    assert type(local).__name__ == "RoundDirectory" and str(local.path) == f"{tmp_path}/ck"
    assert isinstance(round_directory("memory://x/y"), ObjectRoundDirectory)


def test_kill_trials_against_s3() -> None:
    """Ten writers SIGKILLed at random moments while saving to a prefix on a real S3 server:
    every listed round verifies, restore() returns the newest, history keeps every round,
    and the next writer takes over the dead writer's lease and cleans its leftovers."""
    with s3_server() as s3:
        report = kill_trials.run_trials(s3.url("kill"), 10, seed=10, window=0.8,
                                        storage_options=s3.options)
        assert report.failures == [], report.failures
        assert report.trials == 10 and report.saved > 0
        # the control: the same checks do see a listed round whose archive is cut short
        directory = ObjectRoundDirectory(s3.url("kill"), s3.options)
        newest = directory.rounds()[-1]
        key = f"{s3.bucket}/kill/round-{newest:08d}/model.hkz"
        s3.fs().pipe_file(key, s3.fs().cat_file(key)[:100])
        found = kill_trials.TrialReport()
        kill_trials._check(s3.url("kill"), {10**6}, found, 0, s3.options)
        assert any("does not verify" in f for f in found.failures), found.failures
        assert any("reported saved but is gone" in f for f in found.failures), found.failures


def test_cli_inspects_and_verifies_a_prefix(fs: CountingMemoryFS) -> None:
    model = CASE.build()
    with hkstore.Checkpointer(PREFIX, keep_last=2) as ckpt:
        for r in (1, 2, 3):
            ckpt.save(model, r, state=state(r), metrics={"loss": 1 / r})
    done = cli("verify", PREFIX)
    assert done.returncode == 0, done.stderr
    listing = cli("inspect", "--json", PREFIX)
    assert listing.returncode == 0, listing.stderr
    doc = json.loads(listing.stdout)
    assert [r["round"] for r in doc["rounds"]] == [2, 3]
    assert [h["round"] for h in doc["history"]] == [1, 2, 3]
    one = cli("verify", f"{PREFIX}/round-00000003")
    assert one.returncode == 0, one.stderr
    # a flipped state byte fails that round's verify (exit 1), and restore() skips it
    key = f"{KEY}/round-00000003/state.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 1
    fs.pipe_file(key, bytes(data))
    bad = cli("verify", PREFIX)
    assert bad.returncode == 1 and "round 3" in bad.stderr
    with pytest.warns(hkstore.errors.CheckpointWarning, match="round 3"):
        assert restore(hkstore.Checkpointer(PREFIX)).round == 2
    assert cli("verify", "countmem://ckpt/none").returncode == 2


def test_an_interrupted_replacement_keeps_one_complete_round(fs: CountingMemoryFS) -> None:
    """A writer killed while replacing round 1 (``overwrite=True``) after the old record was
    deleted: round 1 is read from the complete replacement, then put in place by the next
    writer."""
    model = CASE.build()
    with hkstore.Checkpointer(PREFIX) as ckpt:
        ckpt.save(model, 1, state=state(1))
    with hkstore.Checkpointer(f"{PREFIX}-new") as ckpt:
        ckpt.save(model, 1, state=state(7))
    temp = f"{KEY}/.tmp-round-00000001-0a1b2c3d"
    for member in ("model.hkz", "state.safetensors", "round.json"):
        fs.pipe_file(f"{temp}/{member}", fs.cat_file(f"{KEY}-new/round-00000001/{member}"))
    fs.rm_file(f"{KEY}/round-00000001/round.json")  # the kill came right after this
    directory = ObjectRoundDirectory(PREFIX)
    assert directory.rounds() == [1]
    assert directory.member_path(1, "model.hkz").endswith(".tmp-round-00000001-0a1b2c3d/model.hkz")
    with hkstore.Checkpointer(PREFIX) as ckpt:  # no writer at work: it finishes the job
        assert restore(ckpt).state["step"] == 7
    assert fs.exists(f"{KEY}/round-00000001/round.json") and not fs.find(temp)
    assert restore(hkstore.Checkpointer(PREFIX)).state["step"] == 7
    # and a replacement left incomplete (no record) is dropped, the old round kept
    fs.pipe_file(f"{KEY}/.tmp-round-00000001-99/model.hkz", b"partial")
    assert hkstore.Checkpointer(PREFIX).rounds() == [1]
    assert not fs.find(f"{KEY}/.tmp-round-00000001-99")
