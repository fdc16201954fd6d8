"""Time hkstore's reader of Flower ``Array`` values against numpy's own ``.npy`` reader.

Run in the Flower venv (``make test-flower`` creates it)::

    .venv-flower/bin/python tools/bench_flower_records.py [--mb 100] [--reps 7]

``array_to_numpy`` reads the ``.npy`` header itself (numpy's reader cannot return bfloat16 or
float8 items as such); this checks that it costs no more than ``np.load`` (what
``Array.numpy()`` calls) on a float32 tensor: medians of interleaved repetitions, with the
per-repetition ratio's median and range.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from flwr.app import Array

from hkstore.integrations.flower import array_to_numpy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="tensor size in MB (float32)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    value = np.random.default_rng(0).random(args.mb * 2**18, dtype=np.float32)
    array = Array(value)
    ours, numpys, ratios = [], [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        got = array_to_numpy(array, where="t")
        middle = time.perf_counter()
        ref = np.load(io.BytesIO(array.data), allow_pickle=False)
        end = time.perf_counter()
        assert got.tobytes() == ref.tobytes()
        ours.append(middle - start)
        numpys.append(end - middle)
        ratios.append((middle - start) / (end - middle))
    print(f"{args.mb} MB float32, {args.reps} reps: array_to_numpy "
          f"{statistics.median(ours) * 1e3:.1f} ms, np.load {statistics.median(numpys) * 1e3:.1f}"
          f" ms; ratio median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
