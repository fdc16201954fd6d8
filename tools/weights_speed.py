"""Time hkstore's weights codec against raw safetensors, side by side in one loop.

Usage: python tools/weights_speed.py [--tensors 24] [--rows 4096] [--cols 1024] [--reps 5]
                                     [--dir /dev/shm] [--workers N] [--digest blake3|sha256]
                                     [--breakdown] [--spread N]

Every case runs once per repetition, interleaved, after a warm-up; medians are printed with
the ratios hkstore / safetensors. "+put" cases also ``jax.device_put`` every array and block
until ready (jax on CPU aliases hkstore's 64-byte-aligned buffers, so that step is ~free).

``--spread N`` then runs the verified load N more times alone and prints, per sample, the wall
time, the process's CPU time, its involuntary context switches (preemption by other
processes), voluntary ones (waits: the GIL, futures) and minor page faults (fresh buffers),
and the machine-wide count of direct memory compactions during the sample (``compact_stall`` in
``/proc/vmstat``: a fresh buffer's huge-page fault that had to defragment memory first), then
p90 / median: what explains a slow sample.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import resource
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hkstore.store._crc32 import CRC32_IMPLEMENTATION
from hkstore.store._crc32 import crc32 as default_crc32
from hkstore.store._digests import digest_hex
from hkstore.store._weights import TensorSpec, WeightsReader, aligned_empty, write_weights


def _put(arrays: dict[str, np.ndarray]) -> Any:
    import jax

    out = {k: jax.device_put(v) for k, v in arrays.items()}
    jax.block_until_ready(out)
    return out


def _aligned_put_is_zero_copy(arrays: dict[str, np.ndarray]) -> bool:
    import jax

    return all(jax.device_put(a).unsafe_buffer_pointer() == a.ctypes.data for a in arrays.values())


def _compact_stalls() -> int:
    """Machine-wide direct compactions so far (0 where /proc/vmstat is unreadable)."""
    try:
        with open("/proc/vmstat", encoding="ascii") as f:
            for line in f:
                if line.startswith("compact_stall "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _parts(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Callable[[], object]]:
    """Each piece of work of a save or a verified load, alone, on the calling thread."""

    def write() -> None:
        with open(path, "wb") as f:
            for array in arrays.values():
                f.write(array.data)

    def read() -> list[np.ndarray]:
        out, pos = [], 0
        fd = os.open(path, os.O_RDONLY)
        try:
            for array in arrays.values():
                buf = aligned_empty(array.nbytes)
                for start in range(0, buf.size, 1 << 20):
                    os.preadv(fd, [buf[start : start + (1 << 20)].data], pos + start)
                pos += array.nbytes
                out.append(buf)
        finally:
            os.close(fd)
        return out

    return {
        "part sha256": lambda: [hashlib.sha256(a.data).digest() for a in arrays.values()],
        "part blake3": lambda: [digest_hex("blake3", a.data) for a in arrays.values()],
        f"part crc32 {CRC32_IMPLEMENTATION}": lambda: [
            default_crc32(a.data, 0) for a in arrays.values()
        ],
        "part write file": write,
        "part pread into aligned buffers": read,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=24)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--workers", type=int, default=None,
                        help="threads (default: every core this process may use)")
    parser.add_argument("--digest", choices=("blake3", "sha256"), default="blake3")
    parser.add_argument("--max-inflight", type=int, default=2)
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each part alone on one thread"
    )
    parser.add_argument("--spread", type=int, default=0, metavar="N",
                        help="then N verified loads alone, with per-sample CPU/ctx/fault counts")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    arrays = {
        f"layer_{i}:w": rng.standard_normal((args.rows, args.cols), dtype=np.float32)
        for i in range(args.tensors)
    }
    specs = [TensorSpec(k, "F32", v.shape) for k, v in arrays.items()]
    total = sum(v.nbytes for v in arrays.values())
    folder = Path(tempfile.mkdtemp(prefix="hkstore-speed-", dir=args.dir))
    st_path, hk_path = folder / "raw.safetensors", folder / "hk.safetensors"
    digests: dict[str, str] = {}

    def hk_save(crc: Callable[..., int] = default_crc32) -> None:
        with open(hk_path, "wb") as f:
            written = write_weights(
                f,
                specs,
                arrays.__getitem__,
                crc32=crc,
                workers=args.workers,
                max_inflight=args.max_inflight,
                digest=args.digest,
            )
            digests.update(written.tensor_digests)

    def hk_load(verify: bool) -> dict[str, np.ndarray]:
        fd = os.open(hk_path, os.O_RDONLY)
        try:
            return WeightsReader(fd).read_all(
                digests if verify else None, algorithm=args.digest, workers=args.workers
            )
        finally:
            os.close(fd)

    cases: dict[str, Callable[[], object]] = {
        "save safetensors.save_file": lambda: stn.save_file(arrays, st_path),
        f"save hkstore (crc {CRC32_IMPLEMENTATION})": hk_save,
        "save hkstore (crc zlib)": lambda: hk_save(zlib.crc32),
        "load safetensors.load_file": lambda: stn.load_file(st_path),
        "load hkstore verified": lambda: hk_load(True),
        "load hkstore unverified": lambda: hk_load(False),
        "load+put safetensors": lambda: _put(stn.load_file(st_path)),
        "load+put hkstore verified": lambda: _put(hk_load(True)),
        "load+put hkstore unverified": lambda: _put(hk_load(False)),
    }
    if args.breakdown:
        cases.update(_parts(arrays, folder / "part.bin"))
    times: dict[str, list[float]] = {name: [] for name in cases}
    spread: list[tuple[float, float, int, int, int, int]] = []
    try:
        hk_save()
        hk_bytes = hk_path.read_bytes()
        for rep in range(args.reps + 1):  # repetition 0 is the warm-up
            for name, case in cases.items():
                gc.collect()
                start = time.perf_counter()
                result = case()
                elapsed = time.perf_counter() - start
                del result
                if rep:
                    times[name].append(elapsed)
        for _ in range(args.spread):
            gc.collect()
            before, stalls = resource.getrusage(resource.RUSAGE_SELF), _compact_stalls()
            cpu, start = time.process_time(), time.perf_counter()
            result = hk_load(True)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            after, stalls = resource.getrusage(resource.RUSAGE_SELF), _compact_stalls() - stalls
            del result
            spread.append((elapsed * 1e3, cpu * 1e3, after.ru_nivcsw - before.ru_nivcsw,
                           after.ru_nvcsw - before.ru_nvcsw, after.ru_minflt - before.ru_minflt,
                           stalls))
    finally:
        for path in (st_path, hk_path, folder / "part.bin"):
            path.unlink(missing_ok=True)
        folder.rmdir()

    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    aliased = _aligned_put_is_zero_copy(WeightsReader(memoryview(hk_bytes)).read_all(None))
    print(
        f"{args.tensors} x float32[{args.rows}, {args.cols}] = {total / 1e6:.0f} MB, "
        f"folder {args.dir}, medians of {args.reps} (ms)"
    )
    for name, value in med.items():
        print(f"  {name:40s} {value:8.1f}")
    base = {
        "save": "save safetensors.save_file",
        "load": "load safetensors.load_file",
        "load+put": "load+put safetensors",
    }
    print(f"jax.device_put aliased hkstore's buffers (no copy): {aliased}")
    print("ratios (hkstore / safetensors):")
    for name, value in med.items():
        kind = name.split(" ")[0]
        if "hkstore" in name:
            print(f"  {name:40s} {value / med[base[kind]]:6.2f}x")
    if args.breakdown:
        sha = med[f"part {args.digest}"]
        save = sha + med[f"part crc32 {CRC32_IMPLEMENTATION}"] + med["part write file"]
        load = sha + med["part pread into aligned buffers"]
        print(
            f"one-thread work: save {save:.1f} ms ({args.digest} + crc32 + write), verified "
            f"load {load:.1f} ms ({args.digest} + pread); split perfectly over 2 cores: "
            f"{save / 2:.1f} / {load / 2:.1f} ms"
        )
    if spread:
        print(f"verified load alone x{len(spread)}: wall ms, cpu ms, involuntary / voluntary "
              "context switches, minor faults, machine-wide compaction stalls")
        for row in spread:
            wall, cpu_ms, invol, vol, faults, stalls = row
            print(f"  {wall:8.1f} {cpu_ms:8.1f} {invol:6d} {vol:6d} {faults:7d} {stalls:5d}")
        walls = sorted(row[0] for row in spread)
        p90 = walls[max(0, -(-len(walls) * 9 // 10) - 1)]
        mid = statistics.median(walls)
        print(f"  median {mid:.1f} ms, p90 {p90:.1f} ms, p90/median {p90 / mid:.2f}; load "
              "average " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
