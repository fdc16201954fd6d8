"""Remote benchmarks: archives on an S3 endpoint (moto's server on loopback) through s3fs.

Run by ``tools/bench.py --remote``, or alone::

    python tools/bench_remote.py [--inspect-mb 1024] [--load-params 100M] [--reps 5]
                                 [--json FILE]

Needs ``moto[server]`` and the ``cloud`` extra. A moto server is started on 127.0.0.1 (a free
port) and stopped at the end; files go to ``--tmpdir`` (tmpfs by default). Each case runs once
per round, in rotating order, after one warm-up round; figures are medians in milliseconds with
every sample kept. Bytes are counted from the ``GetObject`` replies the s3fs client receives.

Cases:

- ``inspect_remote``: ``hkstore inspect --headers-only s3://...`` (the verb run in this process)
  on an archive of ``--inspect-mb`` MB: time and bytes transferred;
- ``download_object``: ``fs.get_file`` of the same object to a local file (what inspecting it
  would cost without ranged reads): time and bytes (s3fs first opens a GetObject of the whole
  object, reads its headers, drops it and downloads in concurrent parts: the counted
  Content-Length is then twice the object, the bytes transferred about once);
  ``download_object_one_stream``: the same with ``max_concurrency=1`` (one streamed GET);
- ``ranged_get_100_bytes``: one ``fs.cat_file`` of 100 bytes of that object: the cost of one
  request (moto's server reads the whole object to answer a ranged GET, so on moto this grows
  with the object's size; a real S3 endpoint does not);
- ``load_remote``: ``hkstore.load("s3://...", model=fn, loss=fn)`` of the ReLU MLP of
  ``tools/bench_models.py`` sized to ``--load-params`` (every digest checked; tensors streamed
  and hashed as they arrive on every core);
- ``get_then_load``: ``fs.get_file`` of that archive to a local file, then ``hkstore.load`` of
  the file (every digest checked): the baseline; ``get_one_stream_then_load``: the same with
  ``max_concurrency=1``.

Ratios (of medians): ``inspect_time_vs_download`` (and ``_one_stream``) and
``inspect_bytes_vs_object`` (lower is better), ``load_remote_vs_get_then_load`` (and
``_one_stream_``; target <= 1.0); ``per_round_ratios`` gives the one-stream ratios round by
round (both cases of a round ran under the same load).

The server is a Python process on the same machine: its throughput, not a network, bounds
both sides, and both sides pay it alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models
from moto_s3 import GetCounter, S3Server, s3_server

DATA_INFO = {"data_type": "float32", "features_shape": (bench_models.FEATURES,)}


def _parse_params(text: str) -> int:
    scale = {"k": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def _inspect_archive(path: Path, megabytes: float) -> None:
    """An archive of ``megabytes`` MB of float32 tensors of 16 MiB (random bytes)."""
    from hkstore.store import ArchiveContent, TensorSpec, write_archive

    n = max(1, int(megabytes * 1e6) // (16 << 20))
    rng = np.random.default_rng(0)
    block = rng.standard_normal(4 << 20).astype(np.float32)
    specs = [TensorSpec(f"layer_{i:04d}:w", "F32", (4 << 20,)) for i in range(n)]
    content = ArchiveContent(
        specs=specs, fetch=lambda name: block, trainable=[s.name for s in specs],
        data_info={"data_type": "float32", "features_shape": [bench_models.FEATURES]}, seed=0,
        functions={"model": {"kind": "none"}, "loss": {"kind": "none"}},
    )
    with open(path, "wb") as handle:
        write_archive(handle, content)


@contextmanager
def _timed(samples: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    samples.append((time.perf_counter() - start) * 1e3)


def _rounds(cases: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    names = list(cases)
    for name in names:  # warm-up
        cases[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            with _timed(out[name]):
                cases[name]()
    return out


def _summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                   "samples_ms": [round(x, 2) for x in v]} for name, v in samples.items()}


def bench_remote(inspect_mb: float, load_params: int, reps: int, work: Path) -> dict[str, Any]:
    """Run every case against a fresh moto server; return the figures."""
    import hkstore
    from hkstore.cli import main as cli_main

    with s3_server() as s3:
        fs = s3.fs()
        counter = GetCounter(fs)
        result: dict[str, Any] = {"endpoint": "moto on 127.0.0.1", "reps": reps}
        # -- inspect against downloading the object
        local = work / "inspect.hkz"
        _inspect_archive(local, inspect_mb)
        size = local.stat().st_size
        fs.put_file(str(local), f"{s3.bucket}/inspect.hkz")
        local.unlink()
        url = s3.url("inspect.hkz")
        options = [f"--storage-option={k}={v}" for k, v in s3.options.items()]
        got = work / "got.hkz"
        traffic: dict[str, int] = {}

        def inspect() -> None:
            counter.reset()
            with redirect_stdout(StringIO()):
                code = cli_main(["inspect", "--headers-only", url, *options])
            assert code == 0, code
            traffic["inspect_remote"] = counter.bytes

        def download() -> None:
            counter.reset()
            fs.get_file(f"{s3.bucket}/inspect.hkz", str(got))
            traffic["download_object"] = counter.bytes
            got.unlink()

        def download_one_stream() -> None:
            counter.reset()
            fs.get_file(f"{s3.bucket}/inspect.hkz", str(got), max_concurrency=1)
            traffic["download_object_one_stream"] = counter.bytes
            got.unlink()

        def ranged_get() -> None:
            fs.cat_file(f"{s3.bucket}/inspect.hkz", start=0, end=100)

        times = _rounds({"inspect_remote": inspect, "download_object": download,
                         "download_object_one_stream": download_one_stream,
                         "ranged_get_100_bytes": ranged_get}, reps)
        result["inspect"] = {"object_bytes": size, "bytes": dict(traffic), **_summary(times)}
        fs.rm_file(f"{s3.bucket}/inspect.hkz")
        # -- verified load against get + local verified load
        widths = bench_models.widths_for(load_params)
        fn = functools.partial(bench_models.mlp, widths=widths)
        model = hkstore.HaikuModel(fn, bench_models.mse, seed=0)
        model.initialize(DATA_INFO)
        archive = work / "model.hkz"
        hkstore.save(model, archive, functions="none")
        want = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
        del model
        load_size = archive.stat().st_size
        fs.put_file(str(archive), f"{s3.bucket}/model.hkz")
        archive.unlink()
        load_url = s3.url("model.hkz")

        def check(loaded: Any) -> None:
            name = next(iter(want))
            assert np.array_equal(np.asarray(loaded.get_weights().coefs[name]), want[name])

        def load_remote() -> None:
            counter.reset()
            check(hkstore.load(load_url, model=fn, loss=bench_models.mse,
                               storage_options=s3.options))
            traffic["load_remote"] = counter.bytes

        def get_then_load() -> None:
            counter.reset()
            fs.get_file(f"{s3.bucket}/model.hkz", str(got))
            check(hkstore.load(got, model=fn, loss=bench_models.mse))
            got.unlink()
            traffic["get_then_load"] = counter.bytes

        def get_one_stream_then_load() -> None:
            fs.get_file(f"{s3.bucket}/model.hkz", str(got), max_concurrency=1)
            check(hkstore.load(got, model=fn, loss=bench_models.mse))
            got.unlink()

        times = _rounds({"load_remote": load_remote, "get_then_load": get_then_load,
                         "get_one_stream_then_load": get_one_stream_then_load}, reps)
        result["load"] = {"object_bytes": load_size, "params": load_params,
                          "bytes": {k: traffic[k] for k in ("load_remote", "get_then_load")},
                          **_summary(times)}
        counter.close()
    ins, ld = result["inspect"], result["load"]

    def per_round(section: dict[str, Any], a: str, b: str) -> list[float]:
        """Ratios of the two cases round by round (each pair ran under the same load)."""
        return [x / y for x, y in zip(section[a]["samples_ms"], section[b]["samples_ms"],
                                      strict=True)]

    result["per_round_ratios"] = {
        "inspect_time_vs_download_one_stream": per_round(ins, "inspect_remote",
                                                         "download_object_one_stream"),
        "load_remote_vs_get_one_stream_then_load": per_round(ld, "load_remote",
                                                             "get_one_stream_then_load"),
    }
    result["ratios"] = {
        "inspect_time_vs_download": ins["inspect_remote"]["median_ms"]
        / ins["download_object"]["median_ms"],
        "inspect_bytes_vs_object": ins["bytes"]["inspect_remote"] / ins["object_bytes"],
        "inspect_time_vs_download_one_stream": ins["inspect_remote"]["median_ms"]
        / ins["download_object_one_stream"]["median_ms"],
        "load_remote_vs_get_then_load": ld["load_remote"]["median_ms"]
        / ld["get_then_load"]["median_ms"],
        "load_remote_vs_get_one_stream_then_load": ld["load_remote"]["median_ms"]
        / ld["get_one_stream_then_load"]["median_ms"],
    }
    return result


def print_results(result: dict[str, Any]) -> None:
    """Print the figures as a short table."""
    ins, ld = result["inspect"], result["load"]
    print(f"inspect --headers-only of a {ins['object_bytes'] / 1e6:.0f} MB object: "
          f"{ins['inspect_remote']['median_ms']:.1f} ms, {ins['bytes']['inspect_remote']} bytes; "
          f"download: {ins['download_object']['median_ms']:.1f} ms (one stream: "
          f"{ins['download_object_one_stream']['median_ms']:.1f} ms); one ranged GET of 100 "
          f"bytes: {ins['ranged_get_100_bytes']['median_ms']:.1f} ms")
    print(f"verified load of a {ld['object_bytes'] / 1e6:.0f} MB archive: remote "
          f"{ld['load_remote']['median_ms']:.0f} ms "
          f"[{ld['load_remote']['min_ms']:.0f}-{ld['load_remote']['max_ms']:.0f}], get + local "
          f"{ld['get_then_load']['median_ms']:.0f} ms "
          f"[{ld['get_then_load']['min_ms']:.0f}-{ld['get_then_load']['max_ms']:.0f}], one-stream "
          f"get + local {ld['get_one_stream_then_load']['median_ms']:.0f} ms")
    for key, value in result["ratios"].items():
        print(f"  {key:<42}{value:.4g}")
    for key, values in result["per_round_ratios"].items():
        print(f"  {key} per round: " + " ".join(f"{v:.2f}" for v in values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inspect-mb", type=float, default=1024)
    parser.add_argument("--load-params", type=_parse_params, default=100_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from hkstore.model import set_device_policy

    set_device_policy(gpu=False)
    base = args.tmpdir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    work = Path(tempfile.mkdtemp(prefix="hkstore-remote-", dir=base))
    try:
        result = bench_remote(args.inspect_mb, args.load_params, args.reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_results(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


__all__ = ["S3Server", "bench_remote", "main", "print_results"]

if __name__ == "__main__":
    raise SystemExit(main())
