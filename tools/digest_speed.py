"""Throughput of the tensor-digest candidates, side by side on one buffer, one and all threads.

Usage: python tools/digest_speed.py [--mb 400] [--reps 7] [--threads N] [--json FILE]

Every case hashes the same ``--mb`` MB float32 buffer (already in memory: no I/O), once per
round, the cases interleaved and their order rotating, after one warm-up round. Printed:
median GB/s, and the spread (min-max) of the samples. ``--threads`` defaults to the cores this
process may use (``os.sched_getaffinity``).

Cases:

- ``sha256``: ``hashlib.sha256`` of the whole buffer on one thread (today's tensor digest).
- ``sha256-chunked <c> x<t>``: the buffer cut into ``c``-byte chunks, each hashed with
  ``hashlib.sha256`` on a pool of ``t`` threads (hashlib releases the GIL), then SHA-256 over
  the concatenated chunk digests: what a "chunk-digest tree" scheme would cost.
- ``blake3 x1``: the ``blake3`` package, one thread (``max_threads=1``).
- ``blake3 x<t>``: the same with ``max_threads=t`` (the Rust crate's own thread pool).
- ``memcpy x1``: ``np.copyto`` into a buffer touched once before (the memory-bandwidth
  yardstick, one thread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def chunked_sha256(view: memoryview, chunk: int, pool: ThreadPoolExecutor | None) -> bytes:
    pieces = [view[i : i + chunk] for i in range(0, len(view), chunk)]
    if pool is None:
        digests = [hashlib.sha256(p).digest() for p in pieces]
    else:
        digests = list(pool.map(lambda p: hashlib.sha256(p).digest(), pieces))
    return hashlib.sha256(b"".join(digests)).digest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400.0)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import blake3

    n = int(args.mb * 1e6) // 4
    data = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    view = memoryview(data).cast("B")
    nbytes = view.nbytes
    target = np.empty_like(data)
    target.fill(0)
    t = args.threads
    pool = ThreadPoolExecutor(t) if t > 1 else None
    cases: dict[str, Callable[[], Any]] = {
        "sha256": lambda: hashlib.sha256(view).digest(),
    }
    for chunk in (1 << 20, 4 << 20, 16 << 20):
        label = f"{chunk >> 20} MiB"
        cases[f"sha256-chunked {label} x1"] = lambda c=chunk: chunked_sha256(view, c, None)
        if pool is not None:
            cases[f"sha256-chunked {label} x{t}"] = lambda c=chunk: chunked_sha256(view, c, pool)
    cases["blake3 x1"] = lambda: blake3.blake3(view, max_threads=1).digest()
    if t > 1:
        cases[f"blake3 x{t}"] = lambda: blake3.blake3(view, max_threads=t).digest()
    cases["memcpy x1"] = lambda: np.copyto(target, data)

    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for rnd in range(args.reps + 1):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - start
            if rnd:
                samples[name].append(elapsed)
    if pool is not None:
        pool.shutdown()

    load = os.getloadavg()
    print(f"{nbytes / 1e6:.0f} MB float32 in memory, {t} thread(s) usable, medians of "
          f"{args.reps}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"  {'case':<30}{'GB/s':>8}{'ms':>9}   spread (ms)")
    report: dict[str, Any] = {"bytes": nbytes, "threads": t, "reps": args.reps,
                              "loadavg": load, "cases": {}}
    for name, values in samples.items():
        med = statistics.median(values)
        rate = nbytes / med / 1e9
        report["cases"][name] = {"gbps": rate, "median_ms": med * 1e3,
                                 "samples_ms": [v * 1e3 for v in values]}
        print(f"  {name:<30}{rate:>8.2f}{med * 1e3:>9.1f}   "
              f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
