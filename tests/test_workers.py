"""The store's one scheduler: worker counts, inline and threaded runs, and the split paths.

Tensors above the split threshold are real multi-MiB arrays, so a big tensor's copy really is
cut into pieces for several threads and hashed by BLAKE3's own threads; every path is checked
against the same bytes with a flipped bit.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_archives import make_content, write_test_archive

from hkstore.cli import main as cli_main
from hkstore.errors import DigestMismatchError, WeightsFormatError
from hkstore.store import _weights
from hkstore.store._archive import open_archive
from hkstore.store._weights import TensorSpec, WeightsReader, write_weights
from hkstore.store._workers import INLINE_BYTES, Scheduler, available_cores, resolve_workers

# --- the policy -----------------------------------------------------------------------------------


def test_default_is_every_core_this_process_may_use() -> None:
    assert available_cores() == len(os.sched_getaffinity(0))
    assert resolve_workers(None) == available_cores()
    assert Scheduler().workers == available_cores()


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-2, ValueError),
                                              (True, TypeError), ("2", TypeError),
                                              (2.0, TypeError)])
def test_bad_worker_counts_are_refused(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="workers must be"):
        resolve_workers(value)  # type: ignore[arg-type]
    with pytest.raises(error, match="workers must be"):
        open_archive(b"", workers=value)  # type: ignore[arg-type]


def test_small_work_runs_on_the_calling_thread() -> None:
    assert Scheduler(8, work_bytes=INLINE_BYTES - 1).workers == 1
    assert Scheduler(8, work_bytes=INLINE_BYTES).workers == 8
    caller = threading.get_ident()
    with Scheduler(1) as pool:
        assert pool.map(lambda _: threading.get_ident(), range(3)) == [caller] * 3
    with Scheduler(3) as pool:
        assert caller not in pool.map(lambda _: threading.get_ident(), range(6))


@pytest.mark.parametrize("workers", [1, 3])
def test_errors_reach_the_caller_and_later_jobs_still_finish_or_are_cancelled(
    workers: int,
) -> None:
    def job(i: int) -> int:
        if i == 2:
            raise KeyError("job 2")
        return i

    with Scheduler(workers) as pool, pytest.raises(KeyError, match="job 2"):
        pool.map(job, range(5))


def test_window_keeps_at_most_size_jobs_ahead() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002)
        return i

    with Scheduler(4) as pool:
        out = []
        for value in pool.window(job, range(20), 3):
            with lock:
                running -= 1
            out.append(value)
    assert out == list(range(20))
    assert 1 <= peak <= 3


# --- the split paths, on real multi-MiB tensors ------------------------------------------------

BIG = 5 << 20  # bytes per big tensor; the threshold is patched down to 2 MiB below


@pytest.fixture()
def small_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_weights, "_SPLIT_MIN", 2 << 20)
    monkeypatch.setattr(_weights, "_SPLIT_CHUNK", 1 << 20)
    monkeypatch.setattr(_weights, "_SEGMENT", 3 << 20)


def _member(digest: str = "blake3") -> tuple[bytes, dict[str, np.ndarray], dict[str, str]]:
    rng = np.random.default_rng(5)
    arrays = {
        "big": rng.standard_normal(BIG // 4).astype(np.float32),
        "mid": rng.standard_normal((256, 1024)).astype(np.float32),
        "flags": rng.integers(0, 2, 4096).astype(np.bool_),
        "tiny": np.arange(3, dtype=np.int64),
    }
    specs = [TensorSpec(n, {"float32": "F32", "bool": "BOOL", "int64": "I64"}[str(a.dtype)],
                        a.shape) for n, a in arrays.items()]
    import io

    buf = io.BytesIO()
    written = write_weights(buf, specs, arrays.__getitem__, workers=3, digest=digest)
    return buf.getvalue(), arrays, written.tensor_digests


def _flip(member: bytes, name: str, at: int) -> bytes:
    reader = WeightsReader(member)
    entry = reader.entries[name]
    data = bytearray(member)
    data[reader.header_size + entry.begin + at] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("digest", ["blake3", "sha256"])
def test_every_path_reads_the_same_bytes(small_split: None, workers: int, digest: str) -> None:
    member, arrays, digests = _member(digest)
    reader = WeightsReader(member)
    loaded = reader.read_all(digests, algorithm=digest, workers=workers)
    for name, array in arrays.items():
        assert np.array_equal(loaded[name], array)
        assert loaded[name].ctypes.data % 64 == 0 or loaded[name].nbytes == 0
        one = reader.tensor(name, expected=digests[name], algorithm=digest, workers=workers)
        assert np.array_equal(one, array)
    total = sum(a.nbytes for a in arrays.values())
    seen: list[int] = []
    assert reader.check_digests(digests, algorithm=digest, workers=workers,
                                progress=seen.append) == total
    assert sum(seen) == total


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("at", [0, BIG - 1, (3 << 20) + 7])
def test_a_flipped_bit_in_a_split_tensor_is_caught_everywhere(
    small_split: None, workers: int, at: int
) -> None:
    member, _, digests = _member()
    bad = WeightsReader(_flip(member, "big", at))
    with pytest.raises(DigestMismatchError, match="'big': expected"):
        bad.read_all(digests, workers=workers)
    with pytest.raises(DigestMismatchError, match="'big': expected"):
        bad.tensor("big", expected=digests["big"], workers=workers)
    with pytest.raises(DigestMismatchError, match="'big': expected"):
        bad.check_digests(digests, workers=workers)
    bad.read_all(None, workers=workers)  # unverified reads do not look


@pytest.mark.parametrize("workers", [1, 3])
def test_check_digests_finds_a_bad_bool_byte(small_split: None, workers: int) -> None:
    member, _, _ = _member()
    tampered = _flip(member, "flags", 100)  # 0/1 becomes 0x10/0x11
    digests = {}
    reader = WeightsReader(tampered)
    from hkstore.store._digests import digest_hex

    for name, entry in reader.entries.items():
        start = reader.header_size + entry.begin
        digests[name] = digest_hex("blake3", tampered[start : start + entry.nbytes])
    with pytest.raises(WeightsFormatError, match="'flags': a BOOL byte other than 0 or 1"):
        reader.check_digests(digests, workers=workers)
    with pytest.raises(WeightsFormatError, match=r"'flags': BOOL byte 1[67] at element 100"):
        reader.read_all(digests, workers=workers)


@pytest.mark.parametrize("workers", [1, 3])
def test_ready_sees_only_good_tensors_each_once(small_split: None, workers: int) -> None:
    member, arrays, digests = _member()
    got: list[str] = []
    WeightsReader(member).read_all(digests, workers=workers,
                                   ready=lambda name, array: got.append(name))
    assert sorted(got) == sorted(arrays)
    got.clear()
    with pytest.raises(DigestMismatchError):
        WeightsReader(_flip(member, "big", 9)).read_all(
            digests, workers=workers, ready=lambda name, array: got.append(name))
    assert "big" not in got
    assert sorted(got) == sorted(set(arrays) - {"big"})


# --- the entry points take workers= -----------------------------------------------------------


def test_archive_and_cli_take_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_test_archive(tmp_path / "a.hkz", make_content())
    with open_archive(path, workers=1) as archive:
        assert archive.workers == 1
        archive.verify()
    with open_archive(path) as archive:
        assert archive.workers is None  # every available core, decided per call
    assert cli_main(["verify", str(path), "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["verify", str(path), "--workers", "0"]) == 2
    assert "argument --workers: 0 is below 1" in capsys.readouterr().err
    out = tmp_path / "signed.hkz"
    key = tmp_path / "k"
    assert cli_main(["keygen", str(key)]) == 0
    assert cli_main(["sign", str(path), "--key", f"{key}.key", "--out", str(out),
                     "--workers", "2"]) == 0
    assert cli_main(["verify", str(out), "--key", f"{key}.pub", "--require-signature"]) == 0
