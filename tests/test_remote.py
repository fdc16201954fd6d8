"""Archives in object storage through fsspec, on fsspec's in-memory filesystem (fast).

The same entry points run against a real S3 server in ``test_remote_s3.py``. Bytes
transferred are counted by the filesystem object itself: a subclass of fsspec's
``MemoryFileSystem`` (the third-party transport, not hkstore) registered under the
``countmem://`` protocol adds up what each ranged read returns.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_archives import make_content, write_test_archive
from helpers_cli import cli, run_python
from helpers_fsspec import CountingMemoryFS, countmem_fs  # noqa: F401 (the fixture fs)
from helpers_models import CASES, device_policy, mlp_model, xent_loss

import hkstore
from hkstore import Trust
from hkstore.errors import (
    ContainerError,
    DigestMismatchError,
    ManifestError,
    MissingDependencyError,
    SignatureError,
)
from hkstore.store import HmacKey, destination, open_archive, write_archive
from hkstore.store._remote import EDGE
from hkstore.store._weights import _READ_CHUNK

TOYS = Trust(modules=["helpers_models"])


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield




def big_tensors(n: int = 6, size: int = 3 * _READ_CHUNK // 4) -> dict[str, np.ndarray]:
    """``n`` float32 tensors of ``size`` bytes each (random, so every byte counts)."""
    rng = np.random.default_rng(0)
    return {f"layer_{i}:w": rng.standard_normal(size // 4).astype(np.float32) for i in range(n)}


def upload(fs: CountingMemoryFS, local: Path, key: str) -> str:
    fs.put_file(str(local), key)
    fs.reset()
    return f"countmem://{key.lstrip('/')}"


def test_open_reads_only_the_index_and_manifest(fs: CountingMemoryFS, tmp_path: Path) -> None:
    tensors = big_tensors()
    url = upload(fs, write_test_archive(tmp_path / "a.hkz", tensors=tensors), "/b/a.hkz")
    size = (tmp_path / "a.hkz").stat().st_size
    with open_archive(url) as ar:
        opened = fs.transferred
        assert ar.names() == list(tensors)
        assert ar.url == url and ar.path is None
        # two requests: the last 64 KiB (end records, central directory, manifest) and the
        # first (the weights' local header and safetensors header), of a 4.5 MB file
        assert opened == 2 * EDGE and fs.requests == 2, (opened, fs.requests)
        assert size > 4 << 20
        # one tensor: its bytes, plus the safetensors header once (checked against the manifest)
        name = "layer_3:w"
        fs.reset()
        got = ar.tensor(name)
        header = ar.tensor_entries()  # already read: costs nothing more
        assert header[name].nbytes == tensors[name].nbytes
        np.testing.assert_array_equal(got, tensors[name])
        assert tensors[name].nbytes <= fs.transferred < tensors[name].nbytes + 4096
        fs.reset()
        again = ar.tensor("layer_5:w")
        assert fs.transferred == tensors["layer_5:w"].nbytes
        np.testing.assert_array_equal(again, tensors["layer_5:w"])


def test_verify_reads_each_byte_once_and_matches_a_local_verify(
    fs: CountingMemoryFS, tmp_path: Path
) -> None:
    local = write_test_archive(tmp_path / "a.hkz", tensors=big_tensors())
    url = upload(fs, local, "/b/a.hkz")
    with open_archive(local) as ar:
        expected = ar.verify()
    with open_archive(url) as ar:
        report = ar.verify()
    assert report == expected
    # every tensor byte once, plus the two edges read at open: never the file twice
    assert local.stat().st_size <= fs.transferred <= local.stat().st_size + 2 * EDGE


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_save_and_load_through_a_url(compression: str | None, fs: CountingMemoryFS) -> None:
    case = CASES[0]
    model = case.build(seed=3)
    url = "countmem://runs/r1/model.hkz"
    manifest = hkstore.save(model, url, compression=compression, metadata={"round": 1})
    assert fs.exists("/runs/r1/model.hkz")
    loaded = hkstore.load(url, trust=TOYS)
    assert loaded.export_state().model is case.model
    with open_archive(url) as ar:
        assert ar.manifest == manifest
    want = model.get_weights().coefs
    got = loaded.get_weights().coefs
    assert list(got) == list(want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value))


def test_file_url_takes_the_local_path(tmp_path: Path) -> None:
    model = CASES[0].build()
    path = tmp_path / "m.hkz"
    hkstore.save(model, f"file://{path}")
    assert path.is_file()
    with open_archive(f"file://{path}") as ar:
        assert ar.path == path and ar.url is None
    hkstore.load(f"file://{path}", model=mlp_model, loss=xent_loss)


def test_a_failed_remote_save_leaves_the_old_object(fs: CountingMemoryFS) -> None:
    """A save that fails half-way through writing (a tensor cannot be fetched) uploads
    nothing: the old object stays, byte for byte, and a new key never appears."""
    url = "countmem://runs/model.hkz"
    hkstore.save(CASES[0].build(), url)
    before = fs.cat_file("/runs/model.hkz")
    tensors = big_tensors(3)
    handles: list[Any] = []
    written: list[int] = []

    def fetch(name: str) -> np.ndarray:
        if name == "layer_2:w":  # the first two tensors are already written
            written.append(handles[-1].tell())
            raise OSError("the device went away")
        return tensors[name]

    content = make_content(tensors)
    content.fetch = fetch
    for target in (url, "countmem://runs/other.hkz"):
        fs.reset()
        with pytest.raises(OSError, match="went away"), destination(target) as handle:
            handles.append(handle)
            write_archive(handle, content)
        assert written[-1] > 2 * tensors["layer_0:w"].nbytes  # it had written that much
        assert fs.log == []  # and uploaded nothing
    assert fs.cat_file("/runs/model.hkz") == before
    assert not fs.exists("/runs/other.hkz")


def test_tampered_remote_tensor_is_refused(fs: CountingMemoryFS, tmp_path: Path) -> None:
    tensors = big_tensors(2)
    local = write_test_archive(tmp_path / "a.hkz", tensors=tensors)
    data = bytearray(local.read_bytes())
    at = bytes(data).find(tensors["layer_1:w"].tobytes()[:64])
    data[at + 10] ^= 1
    fs.pipe_file("/b/bad.hkz", bytes(data))
    with open_archive("countmem://b/bad.hkz") as ar:
        np.testing.assert_array_equal(ar.tensor("layer_0:w"), tensors["layer_0:w"])
        with pytest.raises(DigestMismatchError, match="layer_1:w"):
            ar.tensor("layer_1:w")
        with pytest.raises(DigestMismatchError, match="layer_1:w"):
            ar.verify()


def test_remote_signature_policy_is_the_local_one(fs: CountingMemoryFS, tmp_path: Path) -> None:
    key = HmacKey(b"k" * 32)
    signed = write_test_archive(tmp_path / "s.hkz", signer=key)
    unsigned = write_test_archive(tmp_path / "u.hkz")
    upload(fs, signed, "/b/s.hkz")
    upload(fs, unsigned, "/b/u.hkz")
    strict = Trust(keys=[key], require_signature=True)
    with open_archive("countmem://b/s.hkz") as ar:
        assert ar.verify(strict).signed_by == key.key_id
    with open_archive("countmem://b/u.hkz") as ar, pytest.raises(SignatureError):
        ar.verify(strict)
    # the signature covers the manifest: a manifest byte changed remotely fails like locally
    data = bytearray(signed.read_bytes())
    at = bytes(data).find(b'"data_info"')
    data[at + 2] ^= 0x20
    fs.pipe_file("/b/s2.hkz", bytes(data))
    with pytest.raises((SignatureError, ContainerError, ManifestError)):
        with open_archive("countmem://b/s2.hkz") as ar:
            ar.verify(strict)


def test_missing_or_odd_objects_are_clear_errors(fs: CountingMemoryFS) -> None:
    with pytest.raises(ContainerError, match="no such object"):
        open_archive("countmem://b/absent.hkz")
    fs.pipe_file("/b/empty.hkz", b"")
    with pytest.raises(ContainerError, match="empty object"):
        open_archive("countmem://b/empty.hkz")
    fs.pipe_file("/b/dir/x", b"x")
    with pytest.raises(ContainerError, match="not an object"):
        open_archive("countmem://b/dir")
    with pytest.raises(ContainerError, match="not a URL fsspec can open"):
        open_archive("nosuchproto://b/x.hkz")


def test_shrunk_object_is_a_container_error(fs: CountingMemoryFS, tmp_path: Path) -> None:
    local = write_test_archive(tmp_path / "a.hkz", tensors=big_tensors(2))
    upload(fs, local, "/b/a.hkz")
    with open_archive("countmem://b/a.hkz") as ar:
        fs.pipe_file("/b/a.hkz", local.read_bytes()[: 1 << 20])
        with pytest.raises(ContainerError, match="replaced since"):
            ar.verify()


def test_url_without_the_cloud_extra_names_it(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    (blocker / "fsspec").mkdir(parents=True)
    (blocker / "fsspec" / "__init__.py").write_text("raise ImportError('fsspec is blocked')\n")
    out = run_python(
        """
        import hkstore
        from hkstore.errors import MissingDependencyError
        try:
            hkstore.open_archive("s3://bucket/model.hkz")
        except MissingDependencyError as exc:
            print(exc)
        """,
        pythonpath=[blocker],
    ).stdout
    assert "pip install 'hkstore[cloud]'" in out and "s3://bucket/model.hkz" in out
    assert issubclass(MissingDependencyError, ImportError)


def test_plain_paths_never_import_fsspec(tmp_path: Path) -> None:
    path = write_test_archive(tmp_path / "a.hkz")
    out = run_python(
        f"""
        import sys
        import hkstore
        with hkstore.open_archive({str(path)!r}) as ar:
            ar.verify()
        print("fsspec" in sys.modules)
        """
    ).stdout
    assert out.strip() == "False"


def test_digest_of_remote_bytes_is_the_manifests(fs: CountingMemoryFS, tmp_path: Path) -> None:
    """Control for the byte counts: what came back is the archive's real bytes."""
    local = write_test_archive(tmp_path / "a.hkz", make_content(), digest="sha256")
    upload(fs, local, "/b/a.hkz")
    with open_archive("countmem://b/a.hkz") as ar:
        first = ar.names()[0]
        raw = ar.tensor(first).tobytes()
        assert hashlib.sha256(raw).hexdigest() == ar.manifest.digests[first]
    assert sys.modules.get("fsspec") is not None


def test_cli_signs_and_diffs_objects(fs: CountingMemoryFS, tmp_path: Path) -> None:
    secret = tmp_path / "ops.secret"
    secret.write_bytes(b"s" * 32)
    key = HmacKey(b"s" * 32)
    upload(fs, write_test_archive(tmp_path / "a.hkz"), "/b/a.hkz")
    done = cli("sign", "countmem://b/a.hkz", "--hmac-secret-file", secret,
               "--out", "countmem://b/signed.hkz")
    assert done.returncode == 0, done.stderr
    with open_archive("countmem://b/signed.hkz") as ar:
        assert ar.verify(Trust(keys=[key], require_signature=True)).signed_by == key.key_id
    ok = cli("verify", "countmem://b/signed.hkz", "--hmac-secret-file", secret,
             "--require-signature")
    assert ok.returncode == 0, ok.stderr
    unsigned = cli("verify", "countmem://b/a.hkz", "--hmac-secret-file", secret,
                   "--require-signature")
    assert unsigned.returncode == 1
    same = cli("diff", "countmem://b/a.hkz", "countmem://b/signed.hkz")
    assert same.returncode == 0, same.stderr
