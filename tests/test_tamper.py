"""Tamper sweep: every change of a signed archive is refused by every entry point.

The archive is the corpus's ``valid/pickle-caller-functions`` (signed with Ed25519, weights and
a pickle member; 2862 bytes). Every single-byte change with two masks (``0x01`` and ``0xFF``),
every truncation and a few extensions are run, under a trust that requires the signature,
through ``hkstore.load`` (path), ``hkstore.loads`` (bytes), ``open_archive(...).verify()``,
``hkstore verify`` and ``hkstore inspect``: each must refuse each variant. The unchanged
archive passes all five (the control). No canary can fire: the loaders are given the
functions (and the pickle member holds references only).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_cli import cli
from helpers_models import device_policy, mlp_model, mse_loss

import hkstore
from hkstore.errors import HkstoreError
from hkstore.store import Trust, load_verifier, open_archive

CORPUS = Path(__file__).parent / "corpus" / "hostile"
ARCHIVE = (CORPUS / "archives" / "valid-pickle-caller-functions.hkz").read_bytes()
KEY = CORPUS / "keys" / "trusted-ed25519.pub"
MASKS = (0x01, 0xFF)


def variants(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Every single-byte change (two masks), every truncation, and extensions."""
    for offset in range(len(data)):
        for mask in MASKS:
            changed = bytearray(data)
            changed[offset] ^= mask
            yield f"byte {offset} ^ {mask:#04x}", bytes(changed)
    for end in range(len(data)):
        yield f"truncated to {end}", data[:end]
    for name, extra in (("one zero byte", b"\x00"), ("a copy of the end record",
                                                     data[-31:]), ("64 bytes", bytes(64))):
        yield f"extended by {name}", data + extra
    yield "prefixed by a zero byte", b"\x00" + data


def refuses(call: Callable[[], object]) -> bool:
    try:
        call()
    except HkstoreError:
        return True
    return False


@pytest.fixture()
def trust() -> Trust:
    return Trust(keys=[load_verifier(KEY)], require_signature=True)


def write(path: Path, data: bytes) -> None:
    """Replace the file's content in place (cheaper than a new file per variant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def entry_points(path: Path, data: bytes, trust: Trust) -> dict[str, bool]:
    """Whether each entry point accepts ``data`` (written to ``path`` for the path ones)."""
    write(path, data)
    given = {"model": mlp_model, "loss": mse_loss}

    def verify() -> None:
        with open_archive(data) as archive:
            archive.verify(trust)

    options = ["--key", str(KEY), "--require-signature"]
    return {
        "load": not refuses(lambda: hkstore.load(path, trust=trust, **given)),
        "loads": not refuses(lambda: hkstore.loads(data, trust=trust, **given)),
        "Archive.verify": not refuses(verify),
        "hkstore verify": cli("verify", path, *options).returncode == 0,
        "hkstore inspect": cli("inspect", path, *options).returncode == 0,
    }


def test_the_untouched_archive_passes_every_entry_point(tmp_path: Path, trust: Trust) -> None:
    with device_policy(gpu=False):
        accepted = entry_points(tmp_path / "a.hkz", ARCHIVE, trust)
    assert accepted == dict.fromkeys(accepted, True)


def test_every_change_is_refused_by_every_entry_point(tmp_path: Path, trust: Trust) -> None:
    start = time.perf_counter()
    accepted: dict[str, list[str]] = {}
    count = 0
    with device_policy(gpu=False):
        for what, data in variants(ARCHIVE):
            count += 1
            for entry, ok in entry_points(tmp_path / "a.hkz", data, trust).items():
                if ok:
                    accepted.setdefault(entry, []).append(what)
    elapsed = time.perf_counter() - start
    assert accepted == {}, {entry: whats[:5] for entry, whats in accepted.items()}
    assert count == 2 * len(ARCHIVE) * 1 + len(ARCHIVE) + 4  # every offset, both masks
    print(f"tamper sweep: {count} variants x 5 entry points refused in {elapsed:.1f} s")
