"""Save and verify a > 4 GiB archive through the store API, streaming tensor by tensor.

Usage: python tools/big_model_check.py [--size-gib 4.5] [--tensor-mib 256] [--dir DIR]

Writes an archive of ``size-gib`` of float32 tensors with ``write_archive`` (each tensor made
by ``fetch`` when the codec asks for it, so at most a couple of tensors are alive at a time),
then opens it with ``open_archive``, runs ``Archive.verify()`` (container, manifest, header and
every tensor's SHA-256) and reads the first and last tensors back with ``Archive.tensor``
and compares them with what was written. Prints timings and peak RSS (which must stay near the
size of a few tensors, not of the model), then deletes the file.

No jax is needed: the store layer alone writes and reads archives.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hkstore.store import ArchiveContent, open_archive, write_archive
from hkstore.store._atomic import atomic_write
from hkstore.store._weights import TensorSpec

MiB = 1 << 20
GiB = 1 << 30


def tensor_values(index: int, elements: int) -> np.ndarray:
    """The deterministic content of tensor ``index``: cheap to make, different per tensor."""
    out = np.arange(elements, dtype=np.float32)
    out += np.float32(index)
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the check; return 0 when everything matched."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.5)
    parser.add_argument("--tensor-mib", type=int, default=256)
    parser.add_argument("--dir", default=None, help="folder for the archive (default: temp)")
    args = parser.parse_args(argv)

    elements = args.tensor_mib * MiB // 4
    count = max(1, int(args.size_gib * GiB) // (elements * 4) + 1)
    specs = [TensorSpec(f"layer_{i:03d}:w", "F32", (elements,)) for i in range(count)]
    index = {spec.name: i for i, spec in enumerate(specs)}
    content = ArchiveContent(
        specs=specs,
        fetch=lambda name: tensor_values(index[name], elements),
        trainable=[spec.name for spec in specs],
        data_info={"data_type": "float32", "features_shape": [elements]},
        seed=0,
        functions={"model": {"kind": "none"}, "loss": {"kind": "none"}},
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.hkz"
        start = time.perf_counter()
        with atomic_write(path) as handle:
            write_archive(handle, content)
        written = time.perf_counter() - start
        size = path.stat().st_size
        rss_after_write = peak_rss_mib()
        print(f"wrote {size:,} bytes ({size / GiB:.2f} GiB, {count} tensors of "
              f"{args.tensor_mib} MiB) in {written:.1f} s; peak RSS {rss_after_write:.0f} MiB")
        if size <= 4 * GiB:
            print("archive is not over 4 GiB: ZIP64 not exercised", file=sys.stderr)
            return 1
        start = time.perf_counter()
        with open_archive(path) as archive:
            member = archive.members["weights.safetensors"]
            print(f"opened in {1000 * (time.perf_counter() - start):.1f} ms; weights member "
                  f"{member.size:,} bytes at offset {member.data_offset}")
            start = time.perf_counter()
            report = archive.verify()
            print(f"verified {report.tensors} tensor digests in "
                  f"{time.perf_counter() - start:.1f} s")
            for name in (specs[0].name, specs[-1].name):
                same = np.array_equal(archive.tensor(name), tensor_values(index[name], elements))
                print(f"tensor {name}: read back equal {same}")
                if not same:
                    return 1
        print(f"peak RSS overall {peak_rss_mib():.0f} MiB (tensors are {args.tensor_mib} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
