"""Write a > 4 GiB (ZIP64) container from a generator, read it back, and check interoperability.

Usage: python tools/big_archive_check.py [--size-gib 4.5] [--dir DIR] [--keep]

The weights member is streamed in 16 MiB chunks from a generator (one reused buffer, so memory
stays small) with per-chunk CRCs combined by ``crc32_combine``; a second member then starts
beyond 4 GiB, so sizes and offsets both need ZIP64. The file is read back with the strict reader
(over an mmap), checked byte for byte against the generator, then read with Python's zipfile
and, where installed, ``unzip -l`` / ``unzip -t``. Prints timings and peak memory; deletes the
file unless --keep.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from hkstore.store._container import (
    CRC32_IMPLEMENTATION,
    ContainerWriter,
    crc32,
    crc32_combine,
    read_container,
)

CHUNK = 16 << 20
GiB = 1 << 30


@cache
def _block() -> bytearray:
    return bytearray(os.urandom(CHUNK))


def chunks(total: int) -> Iterator[memoryview]:
    """Deterministic data: one random block (reused: no allocation), stamped with the index."""
    block = _block()
    view = memoryview(block)
    for index, start in enumerate(range(0, total, CHUNK)):
        struct.pack_into("<Q", block, 0, index)
        yield view[: min(CHUNK, total - start)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.5, help="weights member size")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the archive")
    args = parser.parse_args(argv)
    total = int(args.size_gib * GiB)
    folder = Path(tempfile.mkdtemp(prefix="hkstore-big-", dir=args.dir))
    path = folder / "big.hkz"
    print(f"crc32 implementation: {CRC32_IMPLEMENTATION}")
    print(f"peak RSS before writing: {peak_rss_mib():.0f} MiB")
    try:
        # -- write --
        t0 = time.perf_counter()
        with path.open("wb") as out:
            writer = ContainerWriter(out)
            stream = writer.begin_member("weights.safetensors", compute_crc=False)
            crc = 0
            for piece in chunks(total):
                stream.write(piece)
                crc = crc32_combine(crc, crc32(piece), piece.nbytes)
            weights = stream.finish(crc32=crc)
            functions = writer.add_member("functions.pkl.zst", b"f" * 1000)
            writer.add_member("manifest.json", b'{"big":true}')
            writer.close()
            out.flush()
            os.fsync(out.fileno())
        t_write = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"wrote {size:,} bytes ({size / GiB:.2f} GiB) in {t_write:.1f} s "
              f"({size / t_write / 1e9:.2f} GB/s, incl. CRC + fsync)")  # fmt: skip
        print(f"peak RSS after writing: {peak_rss_mib():.0f} MiB (chunk {CHUNK >> 20} MiB)")
        print(f"functions.pkl.zst local header at offset {functions.header_offset:,}")

        # -- strict reader over an mmap --
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            t0 = time.perf_counter()
            members = read_container(mapped)
            t_parse = time.perf_counter() - t0
            tail = mapped[-22 - 9 - 20 :][:4]
        assert members["weights.safetensors"] == weights, members
        assert members["functions.pkl.zst"] == functions
        has_zip64 = tail == b"PK\x06\x07"
        assert has_zip64 == (functions.header_offset >= 0xFFFFFFFF), "ZIP64 records wrong"
        print(f"strict reader: {len(members)} members, parsed in {t_parse * 1e3:.2f} ms; "
              f"weights size {weights.size:,}, crc {weights.crc32:#010x}, data offset "
              f"{weights.data_offset} (% 64 = {weights.data_offset % 64}); "
              f"ZIP64 end records: {has_zip64}")  # fmt: skip

        # -- byte-for-byte against the generator, and the CRC by a single pass --
        t0 = time.perf_counter()
        check = bytearray(CHUNK)
        crc_again = 0
        with path.open("rb", buffering=0) as raw:
            raw.seek(weights.data_offset)
            for expected in chunks(total):
                n = expected.nbytes
                assert raw.readinto(memoryview(check)[:n]) == n
                # bytearray == is a memcmp; memoryview == compares item by item (~10x slower)
                same = check == _block() if n == CHUNK else check[:n] == _block()[:n]
                assert same, "data differs from the generator"
                crc_again = crc32(memoryview(check)[:n], crc_again)
        assert crc_again == weights.crc32
        print(f"content + CRC re-check: {time.perf_counter() - t0:.1f} s")

        # -- Python's zipfile --
        t0 = time.perf_counter()
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            assert list(infos) == list(members)
            for name, info in infos.items():
                ours = members[name]
                assert (info.header_offset, info.file_size, info.CRC) == (
                    ours.header_offset,
                    ours.size,
                    ours.crc32,
                ), name
                crc_zip = 0
                with zf.open(info) as member:  # zipfile checks the CRC at the end
                    while block := member.read(CHUNK):
                        crc_zip = crc32(block, crc_zip)
                assert crc_zip == ours.crc32
        print(f"zipfile: {len(infos)} members match, full read + CRC in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

        # -- Info-ZIP --
        unzip = shutil.which("unzip")
        if unzip is None:
            print("unzip: not installed; skipped")
        else:
            listed = subprocess.run([unzip, "-l", str(path)], capture_output=True, text=True)
            print("unzip -l:\n" + listed.stdout.rstrip())
            assert listed.returncode == 0
            t0 = time.perf_counter()
            tested = subprocess.run([unzip, "-t", str(path)], capture_output=True, text=True)
            print("unzip -t:\n" + tested.stdout.rstrip())
            assert tested.returncode == 0 and "No errors detected" in tested.stdout
            print(f"unzip -t took {time.perf_counter() - t0:.1f} s")
        print(f"peak RSS at the end: {peak_rss_mib():.0f} MiB")
        print("OK")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
