"""Archives on a real S3 endpoint: moto's server on 127.0.0.1, through s3fs and aiobotocore.

Bytes transferred are counted from the replies the s3fs instance's own client receives
(``helpers_s3.GetCounter``); memory from ``tracemalloc`` (numpy and Python buffers), with a
control showing a whole-object download does exceed the bound.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_archives import write_test_archive
from helpers_cli import cli, run_cli, subprocess_env
from helpers_models import CASES, device_policy
from helpers_s3 import GetCounter, S3Server, s3_server

import hkstore
from hkstore import Trust
from hkstore.errors import DigestMismatchError
from hkstore.store import open_archive
from hkstore.store._remote import EDGE

TOYS = Trust(modules=["helpers_models"])
MiB = 1 << 20


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def counter(s3: S3Server) -> Iterator[GetCounter]:
    got = GetCounter(s3.fs())
    yield got
    got.close()


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


@pytest.fixture(scope="module")
def big(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A 48 MiB archive (12 tensors of 4 MiB) on the server, and its local copy."""
    rng = np.random.default_rng(1)
    tensors = {f"block_{i:02d}:w": rng.standard_normal(MiB).astype(np.float32)
               for i in range(12)}
    local = write_test_archive(tmp_path_factory.mktemp("big") / "big.hkz", tensors=tensors)
    s3.fs().put_file(str(local), f"{s3.bucket}/big.hkz")
    return s3.url("big.hkz"), local


def storage_args(s3: S3Server) -> list[str]:
    return [f"--storage-option={k}={v}" for k, v in s3.options.items()]


def test_save_load_verify_through_s3(s3: S3Server) -> None:
    model = CASES[0].build(seed=5)
    url = s3.url("runs/one/model.hkz")
    hkstore.save(model, url, storage_options=s3.options, metadata={"round": 1})
    loaded = hkstore.load(url, trust=TOYS, storage_options=s3.options)
    want, got = model.get_weights().coefs, loaded.get_weights().coefs
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
    # the command, in-process with --storage-option, and in a fresh process by AWS_* variables
    done = cli("verify", url, *storage_args(s3))
    assert done.returncode == 0, done.stderr
    fresh = subprocess.run([sys.executable, "-m", "hkstore", "inspect", "--json", url],
                           capture_output=True, text=True, timeout=120,
                           env={**subprocess_env(), **_aws(s3)})
    assert fresh.returncode == 0, fresh.stderr
    assert '"round": 1' in fresh.stdout
    missing = cli("verify", s3.url("runs/absent.hkz"), *storage_args(s3))
    assert missing.returncode == 2 and "no such object" in missing.stderr


def _aws(s3: S3Server) -> dict[str, str]:
    env = s3.env()
    return {k: env[k] for k in env if k.startswith("AWS_")}


def test_inspect_headers_only_reads_a_few_kib(
    s3: S3Server, big: tuple[str, Path], counter: GetCounter
) -> None:
    url, local = big
    done = cli("inspect", "--headers-only", url, *storage_args(s3))
    assert done.returncode == 0, done.stderr
    assert "block_11:w" in done.stdout
    size = local.stat().st_size
    assert size > 48 * MiB
    # of a 48 MiB object: its last and first 64 KiB, in two requests
    assert counter.bytes == 2 * EDGE and counter.requests == 2, counter.bytes
    # control: the full inspect checks every digest, so it reads every tensor byte once
    counter.reset()
    assert cli("inspect", url, *storage_args(s3)).returncode == 0
    assert size - (64 << 10) < counter.bytes < size + 2 * EDGE


def test_tensor_reads_only_its_bytes(
    s3: S3Server, big: tuple[str, Path], counter: GetCounter
) -> None:
    url, local = big
    with open_archive(url, storage_options=s3.options) as ar:
        entries = ar.tensor_entries()  # the safetensors header, checked against the manifest
        counter.reset()
        got = ar.tensor("block_07:w")
        assert counter.bytes == entries["block_07:w"].nbytes == 4 * MiB
    with open_archive(local) as ar:
        np.testing.assert_array_equal(got, ar.tensor("block_07:w"))


def test_verify_streams_in_bounded_memory(
    s3: S3Server, big: tuple[str, Path], counter: GetCounter
) -> None:
    url, local = big
    size = local.stat().st_size
    with open_archive(url, storage_options=s3.options, workers=1) as ar:
        tracemalloc.start()
        try:
            ar.verify()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * MiB, peak  # a 48 MiB archive: streamed, never held whole
    assert size - (64 << 10) < counter.bytes < size + 2 * EDGE
    assert counter.requests == 3  # the two edges, then the tensor data in one stream
    # control: the same measurement does see a whole-object download
    tracemalloc.start()
    try:
        whole = s3.fs().cat_file(f"{s3.bucket}/big.hkz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(whole) == size and peak >= size


def test_tampered_object_is_refused(s3: S3Server, big: tuple[str, Path]) -> None:
    _, local = big
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 1  # inside some tensor's bytes
    s3.fs().pipe_file(f"{s3.bucket}/tampered.hkz", bytes(data))
    with open_archive(s3.url("tampered.hkz"), storage_options=s3.options) as ar:
        with pytest.raises(DigestMismatchError, match="block_"):
            ar.verify()
    done = run_cli("verify", s3.url("tampered.hkz"), *storage_args(s3))
    assert done.returncode == 1, done.stderr


SAVER = """
import sys
import hkstore
from helpers_models import CASES
url, endpoint = sys.argv[1], sys.argv[2]
options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
model = CASES[0].build()
i = 0
while True:
    i += 1
    hkstore.save(model, url, storage_options=options, metadata={"i": i})
    print(i, flush=True)
"""


def test_killed_remote_saves_leave_a_complete_object(s3: S3Server, tmp_path: Path) -> None:
    """SIGKILL a process saving to one key over and over: the key always holds a whole,
    valid archive (the last completed upload), never a part."""
    url = s3.url("runs/killed/model.hkz")
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(SAVER))
    rng = random.Random(10)
    last = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), url, s3.endpoint],
                                stdout=subprocess.PIPE, text=True, env=subprocess_env())
        assert proc.stdout is not None
        proc.stdout.readline()  # one save done: kill during a later one
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with open_archive(url, storage_options=s3.options) as ar:
            ar.verify()
            assert ar.manifest.metadata["i"] >= 1
            last = ar.manifest.metadata["i"]
    assert last >= 1


def test_read_weights_holds_the_tensors_and_little_more(
    s3: S3Server, big: tuple[str, Path], counter: GetCounter
) -> None:
    """A verified read of every tensor (what ``load`` does) keeps the tensors it returns and
    a few buffers: never the archive a second time, whatever the number of workers."""
    url, local = big
    with open_archive(url, storage_options=s3.options) as ar:
        tracemalloc.start()
        try:
            arrays = ar.read_weights()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    held = sum(a.nbytes for a in arrays.values())
    assert held == 48 * MiB
    assert peak < held + 8 * MiB, peak - held
    assert counter.requests == 3
    with open_archive(local) as ar:
        np.testing.assert_array_equal(arrays["block_05:w"], ar.tensor("block_05:w"))
