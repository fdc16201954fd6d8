"""Benchmarks: hkstore against raw safetensors, numpy, declearn 2.9 and the memory-copy floor.

Usage::

    python tools/bench.py [--quick] [--sizes 100k,10M,100M] [--reps N] [--json FILE]
                          [--checkpoint-params 100M | --no-checkpoint]
                          [--workers N]

Method. For each size (a float32 parameter count; the model is the ReLU MLP of
``tools/bench_models.py`` sized to reach it) every case below runs side by side in the same
process and the same loop: one warm-up round (whose results are also checked against the source
weights, bit for bit), then ``--reps`` timed rounds, the order of the cases rotating from round
to round. Figures are medians in milliseconds. Anything jax returns is waited for with
``block_until_ready`` inside the timed region. Before each save the target file is removed
(untimed), and every output file is removed after its round, so no case pays for another's
pages. Files live on tmpfs (``/dev/shm`` when present; ``--tmpdir`` to change).

Cases (each skipped with a printed reason when its library or API is missing):

- ``st_save`` / ``st_load``: ``safetensors.numpy.save_file`` of ``np.asarray`` of each model
  weight / ``load_file`` then ``jax.device_put`` of each array.
- ``st_dumps`` / ``st_loads``: ``safetensors.numpy.save`` / ``load`` (bytes) + ``device_put``.
- ``npz_save`` / ``npz_load``: ``np.savez`` / ``np.load`` + ``device_put`` of each member.
- ``floor_save``: the write floor: the safetensors layout written by hand, one ``write`` per
  tensor straight from the weights' memory.
- ``floor_load`` (THE memcpy floor, denominator of ``load_vs_memcpy_floor``): for each tensor of
  the safetensors file, a *fresh* 64-byte-aligned numpy buffer (allocated inside the timed
  region, as any loader that returns new arrays must), filled by ``os.preadv`` of the tensor's
  bytes in 8 MiB pieces on a thread pool of one thread per usable core (the kernel's copy from
  the page cache is the only copy; page faults of the fresh buffers included), then
  ``jax.device_put`` of each. On CPU, jax aliases a 64-byte-aligned buffer (zero-copy), so this
  is one memory copy of the weights, spread over every core, and nothing else. No hashing.
- ``floor_load_1t``: the same on one thread, one ``preadv`` per tensor.
- ``floor_load_prealloc``: the threaded reads into buffers allocated and touched once before the
  loop (no page faults): pure copy bandwidth, below what any loader returning new arrays can do.
- ``floor_load_copy16``: one thread, fresh buffers 16 bytes off 64-byte alignment, which jax
  copies on ``device_put`` (as it does numpy's own large allocations): two copies (the issue's
  first "memcpy + put" figures, 74 / 456 ms, look like this case).
- ``dl_msgpack_save`` / ``dl_msgpack_load``: declearn's ``Checkpointer.save_model`` (config
  JSON + ``model_state_<ts>.mpk``: the weights vector through ``declearn.utils.serialize``'s
  msgpack codec) and ``Checkpointer.load_model(model=...)`` (msgpack load + ``set_weights``).
- ``dl_json_save`` / ``dl_json_load``: declearn's JSON-hex path: ``json_dump`` of
  ``{"config": model.get_config(), "weights": model.get_weights()}`` (hex joblib pickles and
  hex-encoded arrays) / ``json_load`` + ``set_weights`` into an existing model (the unpickling
  and re-initialisation ``from_config`` would add is NOT counted: declearn figures are lower
  bounds).
- ``dl_msgpack_dumps`` / ``dl_msgpack_loads``: declearn's message codec on the weights
  (``msgpack_serialize`` / ``msgpack_deserialize`` + ``set_weights``).
- ``hk_save``, ``hk_save_zstd``: ``hkstore.save(model, path, functions=..., compression=None |
  "zstd")``; ``hk_load_verified``, ``hk_load_zstd``: ``hkstore.load(path, model=fn, loss=fn)``
  (every digest checked); ``hk_load_noverify``: the same with ``verify=False`` when
  ``hkstore.load`` offers that parameter; ``hk_dumps`` / ``hk_loads``: bytes.

``--workers N`` passes ``workers=N`` to every hkstore call (default: hkstore's own default,
every core the process may use); ``--workers 1`` shows what one thread does.

``--hostile`` runs only the hostile-input costs (``tools/bench_hostile.py``): time and peak RSS
to open or verify archives that fill the default limits with the shapes that used to cost
minutes and gigabytes, for this checkout and, with ``--hostile-baseline DIR``, an older one.

Once per run: ``hkstore.open_archive(path).manifest`` on a ~1 GB archive (``--inspect-mb``);
``hkstore inspect --headers-only`` whole-process wall time (median of 5); ``Archive.verify()``
of that archive (every digest read and checked; median of 5, in GB/s of tensor data) and the
``hkstore verify`` process's wall time; peak RSS above baseline while
loading the largest size in a fresh subprocess (``/proc/self/clear_refs`` resets VmHWM);
``compute_batch_gradients`` steps/s on two nets, the MLP (``--grad-params``) and the small
conv net of ``bench_models``, same weights and batch (``--grad-batch``) for every case:
hkstore plain (``hk_plain``), clipped with ``max_norm=1.0`` on the path ``clipping="auto"``
picks (``hk_clipped``: the fast path on both nets; the JSON records the path and each
weight's method) and on the per-sample path (``hk_clipped_per_sample``), declearn plain and
clipped (``dl_plain``, ``dl_clipped``); then the peak memory of one plain, fast-clipped and
per-sample-clipped step at ``--mem-batch`` (256): XLA's compiled buffer assignment, and the RSS
above baseline of a warm step in a fresh process. Last, ``hkstore.Checkpointer`` against
Orbax's ``CheckpointManager`` on one model and its Adam state (``--checkpoint-params``;
``tools/bench_checkpoint.py`` describes the cases; Orbax comes with the ``bench`` extra).

Ratios (under ``"ratios"`` in the JSON; null when a case was skipped) are taken at the largest
size measured. Time ratios are hkstore time divided by the other's time (lower is better);
throughput ratios (``grads_*``) are hkstore steps/s divided by declearn's (higher is better).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for _p in (str(TOOLS), str(REPO)):  # bench_models, and hkstore from this checkout
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_checkpoint  # noqa: E402
import bench_models  # noqa: E402
from bench_memory import proc_status, reset_peak  # noqa: E402

RATIO_KEYS = (
    "save_vs_safetensors",
    "load_verified_vs_safetensors",
    "load_vs_memcpy_floor",
    "load_verified_vs_memcpy_floor",
    "load_verified_p90_vs_median",
    "verify_1gb_gbps",
    "cli_verify_1gb_gbps",
    "load_vs_declearn_msgpack",
    "load_vs_declearn_json",
    "inspect_1gb_ms",
    "cli_inspect_ms",
    "peak_rss_vs_weights",
    "grads_vs_declearn",
    "grads_clipped_vs_declearn",
    "clipped_vs_plain",
    "clipped_fast_vs_per_sample",
    "clipped_peak_vs_plain",
    "cnn_clipped_vs_declearn",
    "cnn_clipped_vs_plain",
    "cnn_clipped_peak_vs_plain",
    "checkpoint_save_vs_orbax",
    "checkpoint_background_block_vs_save",
    "checkpoint_restore_vs_orbax",
    "checkpoint_background_rss_vs_weights",
)

RATIO_DEFINITIONS = {
    "save_vs_safetensors": "hk_save / st_save (medians, largest size); target <= 1.1",
    "load_verified_vs_safetensors": "hk_load_verified / st_load; target <= 1.0",
    "load_vs_memcpy_floor": "min(hk_load_verified, hk_load_noverify) / floor_load; target <= 1.3",
    "load_verified_vs_memcpy_floor": "hk_load_verified / floor_load; target <= 1.2",
    "load_verified_p90_vs_median": "p90 / median of the hk_load_verified samples; target <= 1.3",
    "verify_1gb_gbps": "tensor GB / median s of Archive.verify() on the inspect archive; >= 2",
    "cli_verify_1gb_gbps": "tensor GB / median wall s of the `hkstore verify` process; >= 2",
    "load_vs_declearn_msgpack": "hk_load_verified / dl_msgpack_load; target <= 0.25 (4x faster)",
    "load_vs_declearn_json": "hk_load_verified / dl_json_load; target <= 0.0667 (15x faster)",
    "inspect_1gb_ms": "median ms of open_archive(path).manifest on the inspect archive; < 50",
    "cli_inspect_ms": "median wall ms of the `hkstore inspect --headers-only ARCHIVE` process; "
                      "< 300",
    "peak_rss_vs_weights": "(VmHWM during hkstore.load - VmRSS before) / weight bytes; <= 1.2",
    "grads_vs_declearn": "MLP: hkstore steps/s / declearn steps/s, plain; >= 1.0",
    "grads_clipped_vs_declearn": "MLP: the same with max_norm=1.0 (hkstore: clipping='auto'); "
                                 ">= 20",
    "clipped_vs_plain": "MLP: hk_clipped steps/s / hk_plain steps/s; >= 0.3",
    "clipped_fast_vs_per_sample": "MLP: hk_clipped / hk_clipped_per_sample steps/s (speed-up "
                                  "of the fast path over the per-sample path)",
    "clipped_peak_vs_plain": "MLP: compiled peak memory of a fast clipped step / a plain step, "
                             "at --mem-batch; <= 2",
    "cnn_clipped_vs_declearn": "conv net: hk_clipped / dl_clipped steps/s; >= 20",
    "cnn_clipped_vs_plain": "conv net: hk_clipped / hk_plain steps/s; >= 0.3",
    "cnn_clipped_peak_vs_plain": "conv net: as clipped_peak_vs_plain; <= 2",
    "checkpoint_save_vs_orbax": "Checkpointer.save (sync) / Orbax CheckpointManager.save + "
                                "wait_until_finished, model + Adam state; <= 1.0",
    "checkpoint_background_block_vs_save": "time save() blocks with background=True / a sync "
                                           "save; <= 0.05",
    "checkpoint_restore_vs_orbax": "Checkpointer.restore (every digest checked) / Orbax "
                                   "restore; <= 1.0",
    "checkpoint_background_rss_vs_weights": "(VmHWM during a background save - VmRSS before) / "
                                            "weight bytes; <= 1.2",
}

SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
DATA_INFO = {"data_type": "float32", "features_shape": [bench_models.FEATURES]}
MAX_NORM = 1.0


class BenchError(Exception):
    """A case produced a wrong result or could not run."""


# --------------------------------------------------------------------------- small helpers


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """Parse ``"100k,10M"`` into ``[("100k", 100000), ("10M", 10000000)]``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        num, suffix = item[:-1], item[-1].lower()
        if suffix.isdigit():
            num, suffix = item, ""
        if suffix not in SIZE_SUFFIXES:
            raise argparse.ArgumentTypeError(f"bad size {item!r} (use e.g. 100k, 10M)")
        value = int(float(num) * SIZE_SUFFIXES[suffix])
        if value < 1000:
            raise argparse.ArgumentTypeError(f"size {item!r} below 1000 parameters")
        out.append((item, value))
    if not out:
        raise argparse.ArgumentTypeError("no size given")
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aligned_empty(nbytes: int, align: int = 64, offset: int = 0) -> np.ndarray:
    """Uninitialised uint8 buffer whose start is ``offset`` bytes past an ``align`` boundary."""
    raw = np.empty(nbytes + align + offset, dtype=np.uint8)
    start = (-raw.ctypes.data) % align + offset
    return raw[start : start + nbytes]


def pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    """Fill ``buf`` with the file's bytes at ``offset`` (loops over short reads)."""
    view = buf.data.cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise BenchError(f"short read at offset {offset + done}")
        done += n


def write_all(fd: int, data: memoryview) -> None:
    view = data.cast("B") if data.format != "B" else data
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def unlink(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def named_arrays(obj: Any) -> dict[str, Any] | None:
    """The named weights in a case's result: a dict, a model, or a weights vector."""
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "get_weights"):
        obj = obj.get_weights()
    coefs = getattr(obj, "coefs", None)
    return dict(coefs) if isinstance(coefs, Mapping) else None


def block(obj: Any) -> None:
    """Wait for every jax array in a case's result (async dispatch hides cost otherwise)."""
    import jax

    named = named_arrays(obj)
    leaves = list(named.values()) if named is not None else jax.tree_util.tree_leaves(obj)
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()


def compare(obj: Any, expected: Mapping[str, np.ndarray]) -> str | None:
    """None when ``obj`` holds exactly the expected arrays, else what differs."""
    got = named_arrays(obj)
    if got is None:
        return f"result of type {type(obj).__name__} holds no named weights"
    if set(got) != set(expected):
        return f"names differ: missing {sorted(set(expected) - set(got))}, extra " + str(
            sorted(set(got) - set(expected))
        )
    for name, want in expected.items():
        have = np.asarray(got[name])
        if have.dtype != want.dtype or have.shape != want.shape:
            return f"{name}: {have.dtype}{have.shape} != {want.dtype}{want.shape}"
        if not np.array_equal(have, want):
            return f"{name}: values differ"
    return None


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings third-party code emits on every call (declearn's pickle notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def machine_description() -> dict[str, Any]:
    import jax

    model_name = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for dist in ("jax", "jaxlib", "dm-haiku", "numpy", "safetensors", "zstandard", "declearn",
                 "msgpack", "hkstore"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    try:
        import hkstore

        versions["hkstore"] = hkstore.__version__
    except Exception:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model_name,
        "memory_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": versions,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_enable_x64": bool(jax.config.read("jax_enable_x64")),
    }


# --------------------------------------------------------------------------- libraries


class Hk:
    """What of hkstore's public API exists yet (cases needing a missing name are skipped)."""

    NAMES = ("HaikuModel", "save", "load", "dumps", "loads", "open_archive",
             "get_device_policy", "set_device_policy")

    def __init__(self, enabled: bool = True) -> None:
        self.mod: Any = None
        self.missing: dict[str, str] = {}
        self.has_verify = False
        self.workers: int | None = None  # --workers; None: hkstore's default
        self.has_workers = False
        self.functions = "reference"
        self.functions_note: str | None = None
        if not enabled:
            self.missing = dict.fromkeys(self.NAMES, "hkstore disabled (--no-hkstore)")
            return
        try:
            import hkstore
        except Exception as exc:
            self.missing = {n: f"import hkstore failed: {type(exc).__name__}: {exc}"
                            for n in self.NAMES}
            return
        self.mod = hkstore
        for name in self.NAMES:
            try:
                getattr(hkstore, name)
            except Exception as exc:
                self.missing[name] = f"hkstore.{name} not available ({type(exc).__name__})"
        if "load" not in self.missing:
            try:
                params = inspect.signature(hkstore.load).parameters
                self.has_verify = "verify" in params
                self.has_workers = "workers" in params
            except (TypeError, ValueError):
                self.has_verify = False

    def kw(self) -> dict[str, Any]:
        """``workers=`` for hkstore calls, when given and supported."""
        return {"workers": self.workers} if self.workers is not None and self.has_workers else {}

    def why_not(self, *names: str) -> str | None:
        """None when all ``names`` exist, else the reason to skip."""
        reasons = [self.missing[n] for n in names if n in self.missing]
        return "; ".join(reasons) if reasons else None

    def model(self, widths: list[int]) -> Any:
        with quiet():  # (hkstore warns that a GPU-preferring policy falls back to the CPU)
            m = self.mod.HaikuModel(model=model_fn(widths), loss=bench_models.mse, seed=0)
            m.initialize(dict(DATA_INFO))
        return m

    def save(self, model: Any, path: Path, compression: str | None = None) -> Any:
        return self.mod.save(model, path, functions=self.functions, compression=compression,
                             **self.kw())

    def pick_functions(self, model: Any, path: Path) -> None:
        """Save by reference when hkstore accepts ``bench_models:mlp``; else functions="none"."""
        try:
            self.save(model, path)
        except Exception as exc:
            self.functions = "none"
            self.functions_note = f"functions='reference' refused ({type(exc).__name__}: {exc})"
            print(f"  note: {self.functions_note}; saving with functions='none'")
        finally:
            unlink(path)


class Dl:
    """declearn 2.9, imported when installed (the ``bench`` extra); otherwise a skip reason."""

    def __init__(self, enabled: bool, keep_x64: bool) -> None:
        self.reason: str | None = None
        self.version: str | None = None
        if not enabled:
            self.reason = "declearn disabled (--no-declearn)"
            return
        try:
            import jax

            x64_before = bool(jax.config.read("jax_enable_x64"))
            with quiet():
                import declearn
                from declearn.main.utils import Checkpointer
                from declearn.model.haiku import HaikuModel, JaxNumpyVector
                from declearn.utils import set_device_policy
                from declearn.utils.serialize import (
                    json_dump,
                    json_load,
                    msgpack_deserialize,
                    msgpack_serialize,
                )
            # Importing declearn.model.haiku turns jax_enable_x64 on process-wide.
            if not keep_x64 and not x64_before:
                jax.config.update("jax_enable_x64", False)
        except Exception as exc:
            self.reason = f"declearn not importable ({type(exc).__name__}: {exc}); " + (
                "install the `bench` extra"
            )
            return
        self.version = declearn.__version__
        self.Checkpointer = Checkpointer
        self.HaikuModel = HaikuModel
        self.Vector = JaxNumpyVector
        self.json_dump = json_dump
        self.json_load = json_load
        self.msgpack_serialize = msgpack_serialize
        self.msgpack_deserialize = msgpack_deserialize
        self.set_device_policy = set_device_policy

    def model(self, widths: list[int], weights: Mapping[str, Any]) -> Any:
        import jax

        with quiet():
            m = self.HaikuModel(model=model_fn(widths), loss=bench_models.mse, seed=0)
            m.initialize({"data_type": "float32", "features_shape": (bench_models.FEATURES,)})
            m.set_weights(self.Vector({k: jax.device_put(np.asarray(v))
                                       for k, v in weights.items()}))
        return m

    def grad_model(self, fn: Callable[..., Any], info: Mapping[str, Any],
                   weights: Mapping[str, Any] | None) -> Any:
        """A declearn model of ``fn``, with ``weights`` when given (else its own seed-0 init)."""
        import jax

        with quiet():
            m = self.HaikuModel(model=fn, loss=bench_models.mse, seed=0)
            m.initialize({"data_type": info["data_type"],
                          "features_shape": tuple(info["features_shape"])})
            if weights is not None:
                m.set_weights(self.Vector({k: jax.device_put(np.asarray(v))
                                           for k, v in weights.items()}))
        return m


def cpu_policy(hk: Hk, dl: Dl | None) -> None:
    """On a CPU-only jax, tell both wrappers so (each warns on every model otherwise)."""
    import jax

    if jax.default_backend() != "cpu":
        return
    if hk.why_not("set_device_policy") is None:
        hk.mod.set_device_policy(gpu=False)
    if dl is not None and dl.reason is None:
        dl.set_device_policy(gpu=False)


def model_fn(widths: list[int]) -> Callable[[Any], Any]:
    return functools.partial(bench_models.mlp, widths=list(widths))


def haiku_weights(widths: list[int], seed: int = 0) -> dict[str, Any]:
    """Initial weights straight from haiku (used when hkstore.HaikuModel is not there yet)."""
    import haiku as hk
    import jax
    import jax.numpy as jnp

    fn = hk.transform(model_fn(widths))
    x = jnp.zeros((1, bench_models.FEATURES), jnp.float32)
    params = jax.jit(fn.init)(jax.random.PRNGKey(seed), x)
    out = {f"{layer}:{name}": v for layer, d in params.items() for name, v in d.items()}
    block(out)
    return out


# --------------------------------------------------------------------------- the raw formats


ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
NP_TO_ST = {np.dtype(v): k for k, v in ST_DTYPES.items()}


def st_layout(path: Path) -> list[tuple[str, Any, tuple[int, ...], int, int]]:
    """(name, dtype, shape, absolute begin, end) of each tensor of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    out = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        out.append((name, ST_DTYPES[spec["dtype"]], tuple(spec["shape"]), base + begin, base + end))
    out.sort(key=lambda t: t[3])
    return out


FLOOR_CHUNK = 8 << 20  # bytes per pread when the floor reads on several threads
FLOOR_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else (os.cpu_count() or 1)))


def floor_load(path: Path, offset: int = 0, prealloc: dict[str, np.ndarray] | None = None,
               threads: int = 1) -> dict[str, Any]:
    """The memcpy floor (see the module docstring): pread each tensor, then device_put.

    With ``threads > 1`` the tensors are cut into ``FLOOR_CHUNK`` pieces read by a thread pool
    (``os.preadv`` releases the GIL), so every core copies; the buffers are the same.
    """
    import jax

    layout = st_layout(path)
    bufs = {name: prealloc[name] if prealloc is not None else aligned_empty(end - begin,
                                                                              offset=offset)
            for name, _, _, begin, end in layout}
    fd = os.open(path, os.O_RDONLY)
    try:
        if threads <= 1:
            for name, _, _, begin, end in layout:
                if end > begin:
                    pread_into(fd, bufs[name], begin)
        else:
            jobs = [(bufs[name][lo - begin : min(end, lo + FLOOR_CHUNK) - begin], lo)
                    for name, _, _, begin, end in layout
                    for lo in range(begin, end, FLOOR_CHUNK)]
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda job: pread_into(fd, job[0], job[1]), jobs))
    finally:
        os.close(fd)
    return {name: jax.device_put(bufs[name].view(dtype).reshape(shape))
            for name, dtype, shape, _, _ in layout}


def floor_save(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """The write floor: a safetensors layout, one write per tensor from the weights' memory."""
    header: dict[str, Any] = {}
    pos = 0
    for name, a in arrays.items():
        header[name] = {"dtype": NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(len(hb).to_bytes(8, "little") + hb))
        for a in arrays.values():
            if a.nbytes:
                write_all(fd, np.ascontiguousarray(a).data.cast("B"))
    finally:
        os.close(fd)


def put_all(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import jax

    return {k: jax.device_put(v) for k, v in arrays.items()}


# --------------------------------------------------------------------------- timing loop


@dataclass
class Case:
    """One timed operation; ``prepare``/``cleanup`` run untimed around each repetition."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], None] | None = None
    cleanup: Callable[[], None] | None = None
    check: bool = False


def run_interleaved(cases: list[Case], reps: int, expected: Mapping[str, np.ndarray],
                    warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Run every case once per round (rotating order); return samples in ms and failures."""
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    failed: dict[str, str] = {}
    for rnd in range(warmup + reps):
        k = rnd % len(cases) if cases else 0
        for case in cases[k:] + cases[:k]:
            if case.name in failed:
                continue
            try:
                if case.prepare is not None:
                    case.prepare()
                gc.collect()
                t0 = time.perf_counter()
                out = case.run()
                block(out)
                dt = (time.perf_counter() - t0) * 1e3
                if rnd < warmup and case.check:
                    problem = compare(out, expected)
                    if problem:
                        raise BenchError(f"wrong result: {problem}")
                del out
                if case.cleanup is not None:
                    case.cleanup()
            except Exception as exc:
                failed[case.name] = f"failed: {type(exc).__name__}: {exc}"
                print(f"  SKIP {case.name}: {failed[case.name]}", flush=True)
                continue
            if rnd >= warmup:
                samples[case.name].append(dt)
    return {k: v for k, v in samples.items() if k not in failed}, failed


# --------------------------------------------------------------------------- one size


def bench_size(label: str, params: int, args: argparse.Namespace, hk: Hk, dl: Dl,
               work: Path, rss: bool) -> dict[str, Any]:
    """Time every case at one model size; return the raw figures."""
    import jax

    widths = bench_models.widths_for(params)
    n_params = bench_models.param_count(widths)
    nbytes = 4 * n_params
    print(f"\n== {label}: {n_params:,} float32 params ({nbytes / 1e6:.1f} MB), "
          f"widths {widths}", flush=True)
    d = work / label
    d.mkdir()
    skipped: dict[str, str] = {}
    sizes_on_disk: dict[str, int] = {}

    # The model and its weights (hkstore's model when it exists, else haiku's init).
    hk_model = None
    reason = hk.why_not("HaikuModel")
    if reason is None:
        try:
            hk_model = hk.model(widths)
            weights = dict(hk_model.get_weights().coefs)
        except Exception as exc:
            reason = f"hkstore.HaikuModel failed: {type(exc).__name__}: {exc}"
            hk_model = None
    if hk_model is None:
        weights = haiku_weights(widths)
    block(weights)
    expected = {k: np.array(v) for k, v in weights.items()}  # host copy for checking
    fn = model_fn(widths)

    cases: list[Case] = []
    out = d / "out"

    def clean_out() -> None:
        unlink(out)

    # raw safetensors
    from safetensors.numpy import load as st_load_bytes
    from safetensors.numpy import load_file, save_file
    from safetensors.numpy import save as st_save_bytes

    st_in = d / "in.safetensors"
    save_file({k: np.asarray(v) for k, v in weights.items()}, str(st_in))
    sizes_on_disk["safetensors"] = st_in.stat().st_size
    st_blob = st_in.read_bytes()
    cases += [
        Case("st_save", lambda: save_file({k: np.asarray(v) for k, v in weights.items()},
                                          str(out)), clean_out, clean_out),
        Case("st_load", lambda: put_all(load_file(str(st_in))), check=True),
        Case("st_dumps", lambda: st_save_bytes({k: np.asarray(v) for k, v in weights.items()})),
        Case("st_loads", lambda: put_all(st_load_bytes(st_blob)), check=True),
    ]

    # numpy
    npz_in = d / "in.npz"
    savez: Any = np.savez  # (numpy's stub types **kwds as its own keyword arguments)
    savez(npz_in, **{k: np.asarray(v) for k, v in weights.items()})
    sizes_on_disk["npz"] = npz_in.stat().st_size

    def npz_load() -> dict[str, Any]:
        with np.load(npz_in) as z:
            return put_all({k: z[k] for k in z.files})

    npz_out = d / "out.npz"
    cases += [
        Case("npz_save", lambda: savez(npz_out, **{k: np.asarray(v)
                                                   for k, v in weights.items()}),
             lambda: unlink(npz_out), lambda: unlink(npz_out)),
        Case("npz_load", npz_load, check=True),
    ]

    # the floors
    layout = st_layout(st_in)
    prealloc = {name: aligned_empty(end - begin) for name, _, _, begin, end in layout}
    for buf in prealloc.values():
        buf.fill(0)  # touch every page once, outside the timed loop
    cases += [
        Case("floor_save", lambda: floor_save({k: np.asarray(v) for k, v in weights.items()},
                                              out), clean_out, clean_out),
        Case("floor_load", lambda: floor_load(st_in, threads=FLOOR_THREADS), check=True),
        Case("floor_load_1t", lambda: floor_load(st_in), check=True),
        Case("floor_load_prealloc", lambda: floor_load(st_in, prealloc=prealloc,
                                                       threads=FLOOR_THREADS), check=True),
        Case("floor_load_copy16", lambda: floor_load(st_in, offset=16), check=True),
    ]

    # declearn
    dl_model = None
    if dl.reason is not None:
        for name in ("dl_msgpack_save", "dl_msgpack_load", "dl_json_save", "dl_json_load",
                     "dl_msgpack_dumps", "dl_msgpack_loads"):
            skipped[name] = dl.reason
    else:
        dl_model = dl.model(widths, weights)
        ck_in = dl.Checkpointer(str(d / "dl_ckpt_in"))
        ck_out_dir = d / "dl_ckpt_out"
        with quiet():
            ck_in.save_model(dl_model, config=True, state=True, timestamp="bench")
        sizes_on_disk["declearn_msgpack"] = sum(p.stat().st_size
                                                for p in (d / "dl_ckpt_in").iterdir())
        json_in = d / "in.dl.json"
        json_out = d / "out.dl.json"

        def dl_json_save(path: Path) -> None:
            assert dl_model is not None
            with quiet():
                dl.json_dump({"config": dl_model.get_config(),
                              "weights": dl_model.get_weights()}, str(path))

        def dl_json_load() -> Any:
            assert dl_model is not None
            with quiet():
                obj = dl.json_load(str(json_in))
                dl_model.set_weights(obj["weights"])
            return dl_model

        def dl_mpk_save() -> None:
            assert dl_model is not None
            with quiet():
                dl.Checkpointer(str(ck_out_dir)).save_model(dl_model, config=True, state=True,
                                                            timestamp="bench")

        def dl_mpk_load() -> Any:
            with quiet():
                return ck_in.load_model(model=dl_model, timestamp="bench")

        def dl_mpk_loads() -> Any:
            assert dl_model is not None
            with quiet():
                dl_model.set_weights(dl.msgpack_deserialize(dl_blob))
            return dl_model

        dl_json_save(json_in)
        sizes_on_disk["declearn_json"] = json_in.stat().st_size
        with quiet():
            dl_blob = dl.msgpack_serialize(dl_model.get_weights())
        cases += [
            Case("dl_msgpack_save", dl_mpk_save, lambda: unlink(ck_out_dir),
                 lambda: unlink(ck_out_dir)),
            Case("dl_msgpack_load", dl_mpk_load, check=True),
            Case("dl_json_save", lambda: dl_json_save(json_out), lambda: unlink(json_out),
                 lambda: unlink(json_out)),
            Case("dl_json_load", dl_json_load, check=True),
            Case("dl_msgpack_dumps", lambda: dl.msgpack_serialize(dl_model.get_weights())),
            Case("dl_msgpack_loads", dl_mpk_loads, check=True),
        ]

    # hkstore
    hk_in = d / "in.hkz"
    hkz_in = d / "in.zst.hkz"
    why_load: str | None = reason or "no hkstore model"
    if hk_model is None:
        for name in ("hk_save", "hk_save_zstd", "hk_load_verified", "hk_load_noverify",
                     "hk_load_zstd", "hk_dumps", "hk_loads"):
            skipped[name] = reason or "no hkstore model"
    else:
        if hk.functions_note is None and hk.functions == "reference" and not hk.why_not("save"):
            hk.pick_functions(hk_model, d / "probe.hkz")
        why_save = hk.why_not("save")
        if why_save is None:
            try:
                hk.save(hk_model, hk_in)
                hk.save(hk_model, hkz_in, compression="zstd")
                sizes_on_disk["hkstore"] = hk_in.stat().st_size
                sizes_on_disk["hkstore_zstd"] = hkz_in.stat().st_size
            except Exception as exc:
                why_save = f"hkstore.save failed: {type(exc).__name__}: {exc}"
        why_load = why_save or hk.why_not("load")
        if why_save:
            skipped.update(hk_save=why_save, hk_save_zstd=why_save)
        else:
            cases += [
                Case("hk_save", lambda: hk.save(hk_model, out), clean_out, clean_out),
                Case("hk_save_zstd", lambda: hk.save(hk_model, out, compression="zstd"),
                     clean_out, clean_out),
            ]
        if why_load:
            skipped.update(hk_load_verified=why_load, hk_load_zstd=why_load,
                           hk_load_noverify=why_load)
        else:
            cases += [
                Case("hk_load_verified",
                     lambda: hk.mod.load(hk_in, model=fn, loss=bench_models.mse, **hk.kw()),
                     check=True),
                Case("hk_load_zstd",
                     lambda: hk.mod.load(hkz_in, model=fn, loss=bench_models.mse, **hk.kw()),
                     check=True),
            ]
            if hk.has_verify:
                cases.append(Case("hk_load_noverify",
                                  lambda: hk.mod.load(hk_in, model=fn, loss=bench_models.mse,
                                                      verify=False, **hk.kw()), check=True))
            else:
                skipped["hk_load_noverify"] = "hkstore.load has no `verify` parameter"
        why_dumps = hk.why_not("dumps")
        if why_dumps is None:
            try:
                hk_blob = hk.mod.dumps(hk_model, functions=hk.functions, **hk.kw())
                sizes_on_disk["hkstore_dumps"] = len(hk_blob)
            except Exception as exc:
                why_dumps = f"hkstore.dumps failed: {type(exc).__name__}: {exc}"
        why_loads = why_dumps or hk.why_not("loads")
        if why_dumps:
            skipped["hk_dumps"] = why_dumps
        else:
            cases.append(Case("hk_dumps", lambda: hk.mod.dumps(hk_model, functions=hk.functions,
                                                               **hk.kw())))
        if why_loads:
            skipped["hk_loads"] = why_loads
        else:
            cases.append(Case("hk_loads", lambda: hk.mod.loads(
                hk_blob, model=fn, loss=bench_models.mse, **hk.kw()), check=True))

    samples, failed = run_interleaved(cases, args.reps, expected)
    skipped.update(failed)
    for name, why in sorted(skipped.items()):
        if name not in failed:
            print(f"  SKIP {name}: {why}")
    result: dict[str, Any] = {
        "params": n_params,
        "weights_bytes": nbytes,
        "widths": widths,
        "tensors": len(weights),
        "file_bytes": sizes_on_disk,
        "median_ms": {k: median(v) for k, v in samples.items()},
        "samples_ms": samples,
        "skipped": skipped,
    }
    print_table(result)

    if rss:
        result["peak_rss"] = bench_rss(st_in, None if why_load else hk_in, widths, nbytes, hk)
    unlink(d)  # the models and buffers go with this frame; main() collects
    jax.clear_caches()
    return result


def print_table(res: Mapping[str, Any]) -> None:
    nbytes = res["weights_bytes"]
    print(f"  {'case':<22}{'median ms':>12}{'GB/s':>9}   samples (ms)")
    for name, ms in res["median_ms"].items():
        if ms is None:
            continue
        rate = nbytes / (ms * 1e6) if ms > 0 else float("inf")
        sample_text = " ".join(f"{s:.1f}" for s in res["samples_ms"][name])
        print(f"  {name:<22}{ms:>12.2f}{rate:>9.2f}   {sample_text}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- peak RSS


RSS_KINDS = ("hk_load_verified", "hk_load_noverify", "st_load", "floor_load")


def bench_rss(st_path: Path, hk_path: Path | None, widths: list[int], nbytes: int, hk: Hk
              ) -> dict[str, Any]:
    """Peak RSS above baseline of each loader, each in a fresh subprocess."""
    out: dict[str, Any] = {"weights_bytes": nbytes}
    print("  peak RSS during load (fresh subprocess each):")
    for kind in RSS_KINDS:
        path = st_path if kind in ("st_load", "floor_load") else hk_path
        if path is None:
            out[kind] = {"skipped": "no hkstore archive"}
            continue
        if kind == "hk_load_noverify" and not hk.has_verify:
            out[kind] = {"skipped": "hkstore.load has no `verify` parameter"}
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", kind,
               "--rss-path", str(path), "--rss-widths", ",".join(map(str, widths))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            out[kind] = {"skipped": f"child exited {proc.returncode}: {' '.join(tail)}"}
            print(f"    {kind:<20} SKIP {out[kind]['skipped']}")
            continue
        fig = json.loads(lines[-1])
        fig["ratio"] = fig["peak_above_baseline"] / nbytes
        out[kind] = fig
        print(f"    {kind:<20} +{fig['peak_above_baseline'] / 1e6:9.1f} MB "
              f"= {fig['ratio']:.2f}x weights ({fig['method']})")
    return out


def rss_child(kind: str, path: Path, widths: list[int]) -> int:
    """Child process: load once, print baseline and peak RSS as one JSON line."""
    import jax
    import jax.numpy as jnp

    jnp.zeros(8).block_until_ready()  # backend up before the baseline
    fn = model_fn(widths)
    load: Callable[[], Any]
    if kind.startswith("hk_"):
        import hkstore

        cpu_policy(Hk(), None)  # (also resolves the lazy names before the baseline)
        kwargs: dict[str, Any] = {"verify": False} if kind == "hk_load_noverify" else {}
        load = functools.partial(hkstore.load, path, model=fn, loss=bench_models.mse, **kwargs)
    elif kind == "st_load":
        from safetensors.numpy import load_file

        def load() -> Any:
            return put_all(load_file(str(path)))
    elif kind == "floor_load":
        load = functools.partial(floor_load, path, threads=FLOOR_THREADS)
    else:
        print(f"unknown kind {kind}", file=sys.stderr)
        return 2
    gc.collect()
    method = reset_peak()
    baseline = proc_status("VmRSS")
    result = load()
    block(result)
    peak = proc_status("VmHWM")
    if method != "clear_refs":
        import resource

        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak,
                      "peak_above_baseline": peak - baseline, "method": method,
                      "jax": jax.__version__}))
    return 0


# --------------------------------------------------------------------------- inspect, CLI


def bench_inspect(args: argparse.Namespace, hk: Hk, work: Path) -> dict[str, Any]:
    """Header-only inspect of a big archive, and the `hkstore inspect` process."""
    res: dict[str, Any] = {}
    why = hk.why_not("HaikuModel", "save", "open_archive")
    cli_why = hk.why_not("HaikuModel", "save")
    if why and cli_why:
        print(f"\n== inspect: SKIP {why}")
        return {"skipped": why, "cli": {"skipped": cli_why}}
    params = int(args.inspect_mb * 1e6 / 4)
    widths = bench_models.widths_for(max(params, 1000))
    path = work / "inspect.hkz"
    print(f"\n== inspect: archive of {bench_models.param_count(widths) * 4 / 1e6:.0f} MB",
          flush=True)
    try:
        model = hk.model(widths)
        if hk.functions_note is None and hk.functions == "reference":
            hk.pick_functions(model, work / "probe.hkz")
        hk.save(model, path)
        del model
        gc.collect()
    except Exception as exc:
        reason = f"building the archive failed: {type(exc).__name__}: {exc}"
        print(f"  SKIP {reason}")
        return {"skipped": reason, "cli": {"skipped": reason}}
    res["archive_bytes"] = path.stat().st_size
    if why is None:
        def manifest() -> Any:
            with hk.mod.open_archive(path) as ar:
                return ar.manifest

        try:
            for _ in range(2):
                manifest()
            samples = []
            for _ in range(max(20, args.reps)):
                t0 = time.perf_counter()
                manifest()
                samples.append((time.perf_counter() - t0) * 1e3)
            res["manifest_ms"] = median(samples)
            res["samples_ms"] = samples
            print(f"  open_archive(...).manifest  {res['manifest_ms']:.3f} ms (median)")
        except Exception as exc:
            res["skipped"] = f"open_archive failed: {type(exc).__name__}: {exc}"
            print(f"  SKIP inspect: {res['skipped']}")
    else:
        res["skipped"] = why
        print(f"  SKIP inspect: {why}")
    res["cli"] = bench_cli(path)
    res["verify"] = bench_verify(path, hk, args.reps)
    unlink(path)
    return res


def bench_verify(path: Path, hk: Hk, reps: int) -> dict[str, Any]:
    """``Archive.verify()`` in process and the ``hkstore verify`` process, in GB/s of tensors."""
    why = hk.why_not("open_archive")
    if why:
        print(f"  SKIP verify: {why}")
        return {"skipped": why}
    kw = hk.kw() if "workers" in inspect.signature(hk.mod.open_archive).parameters else {}
    with hk.mod.open_archive(path) as ar:
        nbytes = sum(e.nbytes for e in ar.tensor_entries().values())
    samples = []
    for i in range(max(5, reps) + 1):
        t0 = time.perf_counter()
        with hk.mod.open_archive(path, **kw) as ar:
            ar.verify()
        if i:  # the first run warms the page cache
            samples.append((time.perf_counter() - t0) * 1e3)
    ms = median(samples)
    assert ms is not None
    res: dict[str, Any] = {"tensor_bytes": nbytes, "ms": ms, "samples_ms": samples,
                           "gbps": nbytes / (ms * 1e6)}
    print(f"  Archive.verify()               {ms:.1f} ms = {res['gbps']:.2f} GB/s "
          f"(median of {len(samples)}; " + " ".join(f"{v:.0f}" for v in samples) + ")")
    cmd = [*cli_command(), "verify", str(path)]
    if hk.workers is not None:
        cmd += ["--workers", str(hk.workers)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    wall = []
    for i in range(6):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env, timeout=300, check=False)
        dt = (time.perf_counter() - t0) * 1e3
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
            res["cli"] = {"skipped": f"`hkstore verify` exited {proc.returncode}: {tail}"}
            print(f"  SKIP cli verify: {res['cli']['skipped']}")
            return res
        if i:
            wall.append(dt)
    cli_ms = median(wall)
    assert cli_ms is not None
    res["cli"] = {"ms": cli_ms, "samples_ms": wall, "gbps": nbytes / (cli_ms * 1e6),
                  "command": [*cmd[:2], "ARCHIVE", *cmd[3:]]}
    print(f"  `hkstore verify` process       {cli_ms:.1f} ms = {res['cli']['gbps']:.2f} GB/s "
          "(whole process, median of 5)")
    return res


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "hkstore"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "hkstore"]


def bench_cli(path: Path, reps: int = 5) -> dict[str, Any]:
    # --headers-only: the header-only inspection this figure has always measured (plain
    # `inspect` now runs verify's checks, every digest of the 1 GB archive included)
    cmd = [*cli_command(), "inspect", "--headers-only", str(path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    samples = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
        dt = (time.perf_counter() - t0) * 1e3
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
            reason = f"`hkstore inspect` exited {proc.returncode}: {' '.join(tail)}"
            print(f"  SKIP cli: {reason}")
            return {"skipped": reason, "command": cmd[:-1]}
        if i:  # the first run warms the page cache and bytecode caches
            samples.append(dt)
    ms = median(samples)
    print(f"  `hkstore inspect` process      {ms:.1f} ms (median of {reps})")
    return {"ms": ms, "samples_ms": samples, "command": [*cmd[:-1], "ARCHIVE"]}


# --------------------------------------------------------------------------- gradients


GRAD_NETS = ("mlp", "cnn")
#: Gradient cases: (name, max_norm, clipping switch); declearn's have no switch.
HK_GRAD_CASES = (("hk_plain", None, None), ("hk_clipped", MAX_NORM, "auto"),
                 ("hk_clipped_per_sample", MAX_NORM, "per-sample"))


def grad_net(net: str, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """The function, data info and batch of a gradient-bench net (``mlp`` or ``cnn``)."""
    if net == "mlp":
        widths = bench_models.widths_for(args.grad_params)
        x, y = bench_models.batch(batch)
        return {"fn": model_fn(widths), "info": dict(DATA_INFO), "x": x, "y": y,
                "widths": widths}
    x, y = bench_models.cnn_batch(batch)
    channels, dense = args.grad_cnn[:2], args.grad_cnn[2]
    fn = functools.partial(bench_models.cnn, channels=channels, dense=dense)
    return {"fn": fn, "x": x, "y": y, "cnn": args.grad_cnn,
            "info": {"data_type": "float32", "features_shape": list(bench_models.CNN_SHAPE)}}


def hk_grad_model(hk: Hk, spec: Mapping[str, Any]) -> Any:
    with quiet():
        m = hk.mod.HaikuModel(model=spec["fn"], loss=bench_models.mse, seed=0)
        m.initialize(dict(spec["info"]))
    return m


def bench_grad_net(net: str, args: argparse.Namespace, hk: Hk, dl: Dl) -> dict[str, Any]:
    """compute_batch_gradients steps/s of one net: hkstore (plain, clipped on the path
    ``clipping="auto"`` picks, clipped per-sample) and declearn (plain, clipped)."""
    import jax

    spec = grad_net(net, args, args.grad_batch)
    x, y = spec["x"], spec["y"]
    res: dict[str, Any] = {"batch": args.grad_batch, "max_norm": MAX_NORM, "steps_per_s": {},
                           "skipped": {}}
    steps: dict[str, Callable[[], Any]] = {}
    weights = None
    why = hk.why_not("HaikuModel")
    if why is None:
        try:
            hk_model = hk_grad_model(hk, spec)
            weights = dict(hk_model.get_weights().coefs)
            res["params"] = int(sum(np.size(v) for v in weights.values()))
            for name, bound, switch in HK_GRAD_CASES:
                kwargs = {} if switch is None else {"max_norm": bound, "clipping": switch}
                steps[name] = functools.partial(hk_model.compute_batch_gradients, (x, y, None),
                                                **kwargs)
            steps["hk_clipped"]()
            report = hk_model.last_clipping
            res["hk_clipped_path"] = report.path
            res["hk_clipped_methods"] = report.methods
            res["hk_clipped_fallbacks"] = report.fallbacks
        except Exception as exc:
            why = f"hkstore.HaikuModel failed: {type(exc).__name__}: {exc}"
            steps.clear()
    if why:
        res["skipped"].update(dict.fromkeys((c for c, _, _ in HK_GRAD_CASES), why))
    if dl.reason is None:
        dl_model = dl.grad_model(spec["fn"], spec["info"], weights)

        def dl_step(max_norm: float | None) -> Any:
            with quiet():
                return dl_model.compute_batch_gradients((x, y, None), max_norm=max_norm)

        steps["dl_plain"] = lambda: dl_step(None)
        steps["dl_clipped"] = lambda: dl_step(MAX_NORM)
    else:
        res["skipped"].update(dl_plain=dl.reason, dl_clipped=dl.reason)
    print(f"\n== gradients, {net}: {res.get('params', '?'):,} params, batch {args.grad_batch}, "
          f"max_norm {MAX_NORM}; hk_clipped path: {res.get('hk_clipped_path')}", flush=True)
    # warm-up (compiles) and calibration: each round of a variant lasts ~args.grad_seconds
    count: dict[str, int] = {}
    for name, step in list(steps.items()):
        try:
            block(step())
            t0 = time.perf_counter()
            block(step())
            one = time.perf_counter() - t0
            count[name] = max(2, min(200, int(args.grad_seconds / max(one, 1e-6))))
        except Exception as exc:
            res["skipped"][name] = f"failed: {type(exc).__name__}: {exc}"
            print(f"  SKIP {name}: {res['skipped'][name]}")
            del steps[name]
    rates: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for rnd in range(args.reps):
        k = rnd % len(names) if names else 0
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            for _ in range(count[name]):
                block(steps[name]())
            rates[name].append(count[name] / (time.perf_counter() - t0))
    for name in names:
        res["steps_per_s"][name] = median(rates[name])
        print(f"  {name:<22}{res['steps_per_s'][name]:>10.2f} steps/s   "
              f"({count[name]} steps/round; " + " ".join(f"{r:.1f}" for r in rates[name]) + ")")
    res["samples_steps_per_s"] = rates
    res["steps_per_round"] = count
    for name, why in res["skipped"].items():
        if not why.startswith("failed:"):  # failures were printed when they happened
            print(f"  SKIP {name}: {why}")
    steps.clear()
    jax.clear_caches()
    return res


def step_memory(model: Any, x: np.ndarray, y: np.ndarray, clipping: str | None) -> int:
    """Peak bytes of one compiled step (arguments + outputs + temporaries - aliased), from
    XLA's buffer assignment (``compile().memory_analysis()``); nothing runs.

    Reaches into the model's compiled steps (private): the public API runs steps, it does not
    hand out their executables.
    """
    from hkstore.model._batch import place_batch

    fns = model._functions()
    trainable, frozen = model._split()
    inputs, yy, ww = place_batch((x, y, None), model._device, where="bench")
    if clipping is None:
        lowered = fns.grads.lower(trainable, frozen, model._rng, inputs, yy, ww)
    elif clipping == "per-sample":
        lowered = fns.clipped_grads.lower(trainable, frozen, model._rng, inputs, yy, ww,
                                          MAX_NORM)
    else:
        plan = fns.plan(trainable, frozen, inputs, yy, ww)
        lowered = fns.fast_clipped_grads.lower(plan, trainable, frozen, model._rng, inputs, yy,
                                               ww, MAX_NORM)
    ma = lowered.compile().memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


def bench_grad_memory(args: argparse.Namespace, hk: Hk) -> dict[str, Any]:
    """Peak memory of a plain, a fast-clipped and a per-sample-clipped step at
    ``--mem-batch``: XLA's compiled figure, and RSS above baseline of a fresh process."""
    res: dict[str, Any] = {"batch": args.mem_batch}
    why = hk.why_not("HaikuModel")
    if why:
        res["skipped"] = why
        return res
    print(f"\n== peak memory of one step, batch {args.mem_batch} (compiled: XLA buffer "
          "assignment; rss: fresh process, VmHWM above baseline)", flush=True)
    for net in GRAD_NETS:
        spec = grad_net(net, args, args.mem_batch)
        model = hk_grad_model(hk, spec)
        fig: dict[str, Any] = {"compiled_bytes": {}, "rss_bytes": {}}
        for case, switch in (("plain", None), ("fast", "fast"), ("per_sample", "per-sample")):
            fig["compiled_bytes"][case] = step_memory(model, spec["x"], spec["y"], switch)
            fig["rss_bytes"][case] = grad_rss(net, args, switch) if args.grad_rss else None
        plain_c, plain_r = fig["compiled_bytes"]["plain"], fig["rss_bytes"]["plain"]
        fig["fast_vs_plain_compiled"] = ratio(fig["compiled_bytes"]["fast"], plain_c)
        fig["fast_vs_plain_rss"] = ratio(fig["rss_bytes"]["fast"], plain_r)
        for kind in ("compiled", "rss"):
            row = fig[f"{kind}_bytes"]
            print(f"  {net} {kind:<9}" + "  ".join(
                f"{k} {v / 1e6:8.2f} MB" if v is not None else f"{k} n/a"
                for k, v in row.items()))
        rss = fig["fast_vs_plain_rss"]
        print(f"  {net} fast / plain: compiled {fig['fast_vs_plain_compiled']:.2f}x, rss "
              + ("n/a" if rss is None else f"{rss:.2f}x"))
        res[net] = fig
    return res


def grad_rss(net: str, args: argparse.Namespace, clipping: str | None) -> int | None:
    """Peak RSS above baseline of one warm step in a fresh process (None if unavailable)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", "grad",
           "--rss-widths", f"{net},{args.grad_params},{'-'.join(map(str, args.grad_cnn))},"
           f"{args.mem_batch},{clipping or 'none'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise BenchError(f"grad RSS child ({net}, {clipping}) exited {proc.returncode}: "
                         + " ".join(tail))
    fig = json.loads(lines[-1])
    return int(fig["peak_above_baseline"]) if fig["method"] == "clear_refs" else None


def grad_rss_child(what: str) -> int:
    """Child process: one warm step (compiled and run once before), then VmHWM of a second."""
    net, params, cnn, batch, clipping = what.split(",")
    args = argparse.Namespace(grad_params=int(params), grad_cnn=[int(v) for v in cnn.split("-")])
    spec = grad_net(net, args, int(batch))
    hk = Hk()
    cpu_policy(hk, None)
    model = hk_grad_model(hk, spec)
    kwargs = {} if clipping == "none" else {"max_norm": MAX_NORM, "clipping": clipping}

    def step() -> Any:
        return model.compute_batch_gradients((spec["x"], spec["y"], None), **kwargs)

    block(step())
    gc.collect()
    method = reset_peak()
    baseline = proc_status("VmRSS")
    block(step())
    peak = proc_status("VmHWM")
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak,
                      "peak_above_baseline": peak - baseline, "method": method}))
    return 0


def bench_grads(args: argparse.Namespace, hk: Hk, dl: Dl) -> dict[str, Any]:
    """Gradient steps/s on each net (see :func:`bench_grad_net`) and step peak memory."""
    out: dict[str, Any] = {"max_norm": MAX_NORM, "nets": {}}
    for net in GRAD_NETS:
        out["nets"][net] = bench_grad_net(net, args, hk, dl)
    out["memory"] = bench_grad_memory(args, hk) if args.mem_batch else {"skipped": "--mem-batch 0"}
    return out


# --------------------------------------------------------------------------- ratios, main


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def compute_ratios(sizes: Mapping[str, Any], inspect_res: Mapping[str, Any],
                   grads: Mapping[str, Any], checkpoint: Mapping[str, Any] | None = None
                   ) -> dict[str, float | None]:
    last = list(sizes.values())[-1] if sizes else {"median_ms": {}}
    m: Mapping[str, float | None] = last["median_ms"]
    loads = [v for v in (m.get("hk_load_verified"), m.get("hk_load_noverify")) if v is not None]
    verified = sorted(last.get("samples_ms", {}).get("hk_load_verified", []))
    p90 = verified[max(0, -(-len(verified) * 9 // 10) - 1)] if verified else None
    verify = inspect_res.get("verify", {})
    rss = last.get("peak_rss", {}).get("hk_load_verified", {})
    nets = grads.get("nets", {})
    sps = nets.get("mlp", {}).get("steps_per_s", {})
    cnn = nets.get("cnn", {}).get("steps_per_s", {})
    memory = grads.get("memory", {})
    out: dict[str, float | None] = {
        "save_vs_safetensors": ratio(m.get("hk_save"), m.get("st_save")),
        "load_verified_vs_safetensors": ratio(m.get("hk_load_verified"), m.get("st_load")),
        "load_vs_memcpy_floor": ratio(min(loads) if loads else None, m.get("floor_load")),
        "load_verified_vs_memcpy_floor": ratio(m.get("hk_load_verified"), m.get("floor_load")),
        "load_verified_p90_vs_median": ratio(p90, m.get("hk_load_verified")),
        "verify_1gb_gbps": verify.get("gbps"),
        "cli_verify_1gb_gbps": verify.get("cli", {}).get("gbps"),
        "load_vs_declearn_msgpack": ratio(m.get("hk_load_verified"), m.get("dl_msgpack_load")),
        "load_vs_declearn_json": ratio(m.get("hk_load_verified"), m.get("dl_json_load")),
        "inspect_1gb_ms": inspect_res.get("manifest_ms"),
        "cli_inspect_ms": inspect_res.get("cli", {}).get("ms"),
        "peak_rss_vs_weights": rss.get("ratio"),
        "grads_vs_declearn": ratio(sps.get("hk_plain"), sps.get("dl_plain")),
        "grads_clipped_vs_declearn": ratio(sps.get("hk_clipped"), sps.get("dl_clipped")),
        "clipped_vs_plain": ratio(sps.get("hk_clipped"), sps.get("hk_plain")),
        "clipped_fast_vs_per_sample": ratio(sps.get("hk_clipped"),
                                            sps.get("hk_clipped_per_sample")),
        "clipped_peak_vs_plain": memory.get("mlp", {}).get("fast_vs_plain_compiled"),
        "cnn_clipped_vs_declearn": ratio(cnn.get("hk_clipped"), cnn.get("dl_clipped")),
        "cnn_clipped_vs_plain": ratio(cnn.get("hk_clipped"), cnn.get("hk_plain")),
        "cnn_clipped_peak_vs_plain": memory.get("cnn", {}).get("fast_vs_plain_compiled"),
        **bench_checkpoint.ratios(dict(checkpoint) if checkpoint else None),
    }
    assert tuple(out) == RATIO_KEYS
    return out


def bench_checkpoint_section(args: argparse.Namespace, hk: Hk, work: Path
                             ) -> dict[str, Any] | None:
    """``hkstore.Checkpointer`` against Orbax (``tools/bench_checkpoint.py``)."""
    if args.no_checkpoint:
        print("\n== checkpoint: skipped (--no-checkpoint)")
        return None
    reason = hk.why_not("HaikuModel")
    if reason is not None or not hasattr(hk.mod, "Checkpointer"):
        print(f"\n== checkpoint: skipped ({reason or 'hkstore.Checkpointer not available'})")
        return None
    folder = work / "checkpoint"
    folder.mkdir()
    return bench_checkpoint.bench_checkpoint(args.checkpoint_params, args.reps, folder)


def pick_tmpdir(requested: str | None) -> Path:
    if requested:
        return Path(requested)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def hostile(args: argparse.Namespace) -> int:
    """``--hostile``: this checkout's costs on hostile archives (and a baseline's, if given)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_hostile

    reps = args.reps if args.reps is not None else 3
    trees = {"after": Path(__file__).resolve().parents[1]}
    if args.hostile_baseline is not None:
        trees = {"before": args.hostile_baseline.resolve(), **trees}
    report: dict[str, Any] = {"machine": machine_description(), "hostile": {}}
    for label, tree in trees.items():
        print(f"== hostile inputs, {label}")
        result = bench_hostile.bench_hostile(tree, reps if label == "after" else 1, 600.0)
        bench_hostile.print_results(result)
        report["hostile"][label] = result
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and fewer reps (< 2 min on 2 cores); same JSON keys")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated float32 param counts (default 100k,10M,100M; "
                        "quick: 100k,10M)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; quick 3)")
    p.add_argument("--json", type=Path, default=None, help="write every figure to FILE")
    p.add_argument("--tmpdir", default=None, help="where files go (default /dev/shm)")
    p.add_argument("--inspect-mb", type=float, default=None,
                   help="size of the inspect archive in MB (default 1024; quick 256)")
    p.add_argument("--grad-params", type=parse_sizes, default=None,
                   help="param count of the gradient model (default 1M; quick 200k)")
    p.add_argument("--grad-batch", type=int, default=None, help="default 64; quick 32")
    p.add_argument("--grad-seconds", type=float, default=None,
                   help="target seconds per variant per round (default 0.5; quick 0.2)")
    p.add_argument("--grad-cnn", type=lambda t: [int(v) for v in t.split(",")],
                   default=[32, 64, 128],
                   help="conv net's two conv widths and dense width (default 32,64,128)")
    p.add_argument("--no-grad-rss", dest="grad_rss", action="store_false",
                   help="step memory from XLA's figures only (no fresh process per case)")
    p.add_argument("--mem-batch", type=int, default=256,
                   help="batch of the step-memory figures (default 256; 0 skips them)")
    p.add_argument("--grads-only", action="store_true",
                   help="only the gradient and step-memory figures (no save/load, inspect)")
    p.add_argument("--checkpoint-params", type=parse_sizes, default=None,
                   help="param count of the Checkpointer-vs-Orbax model (default 100M; quick "
                        "1M); an Adam state of twice its size goes with it")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="skip the Checkpointer-vs-Orbax section")
    p.add_argument("--workers", type=int, default=None,
                   help="workers= for every hkstore call (default: hkstore's own, every core)")
    p.add_argument("--no-declearn", action="store_true", help="skip the declearn cases")
    p.add_argument("--no-hkstore", action="store_true",
                   help="skip the hkstore cases (baselines only)")
    p.add_argument("--keep-x64", action="store_true",
                   help="leave jax_enable_x64 on after importing declearn (declearn turns it "
                        "on process-wide; by default it is turned back off)")
    p.add_argument("--hostile", action="store_true",
                   help="only the hostile-input costs (tools/bench_hostile.py): time and peak "
                        "RSS to open or verify archives that fill the default limits")
    p.add_argument("--hostile-baseline", type=Path, default=None, metavar="DIR",
                   help="with --hostile, also measure this hkstore checkout (the 'before')")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-path", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-widths", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hostile:
        return hostile(args)
    if args.rss_child == "grad":
        return grad_rss_child(args.rss_widths)
    if args.rss_child:
        return rss_child(args.rss_child, args.rss_path,
                         [int(w) for w in args.rss_widths.split(",")])
    q = args.quick
    args.sizes = args.sizes or parse_sizes("100k,10M" if q else "100k,10M,100M")
    args.reps = args.reps if args.reps is not None else (3 if q else 5)
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")
    args.inspect_mb = args.inspect_mb if args.inspect_mb is not None else (256 if q else 1024)
    args.grad_params = (args.grad_params or parse_sizes("200k" if q else "1M"))[0][1]
    args.grad_batch = args.grad_batch or (32 if q else 64)
    args.grad_seconds = args.grad_seconds or (0.2 if q else 0.5)
    args.checkpoint_params = (args.checkpoint_params or parse_sizes("1M" if q else "100M"))[0][1]

    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    import jax

    dl = Dl(enabled=not args.no_declearn, keep_x64=args.keep_x64)
    hk = Hk(enabled=not args.no_hkstore)
    hk.workers = args.workers
    if args.workers is not None and not hk.has_workers:
        print("note: this hkstore takes no workers=; --workers ignored")
    cpu_policy(hk, dl)
    for name, why in hk.missing.items():
        print(f"note: {why}" if why.startswith(("hkstore.", "hkstore disabled"))
              else f"note: {name}: {why}")
    if dl.reason:
        print(f"note: {dl.reason}")
    machine = machine_description()
    print(f"machine: {machine['cpu_count']} cpu, {machine['cpu_model']}, python "
          f"{machine['python']}, jax {jax.__version__} ({machine['jax_backend']}), "
          f"declearn {dl.version}, x64={machine['jax_enable_x64']}, load average "
          + " ".join(f"{v:.2f}" for v in load_start))
    base = pick_tmpdir(args.tmpdir)
    work = Path(tempfile.mkdtemp(prefix="hkstore-bench-", dir=base))
    print(f"files under {work}")
    sizes: dict[str, Any] = {}
    try:
        largest = max(range(len(args.sizes)), key=lambda i: args.sizes[i][1])
        for i, (label, params) in enumerate([] if args.grads_only else args.sizes):
            sizes[label] = bench_size(label, params, args, hk, dl, work, rss=(i == largest))
            gc.collect()
        if sizes and largest != len(args.sizes) - 1:  # ratios come from the largest size
            lab = args.sizes[largest][0]
            sizes[lab] = sizes.pop(lab)
        inspect_res = {"skipped": "--grads-only"} if args.grads_only else bench_inspect(
            args, hk, work)
        grads = bench_grads(args, hk, dl)
        checkpoint = None if args.grads_only else bench_checkpoint_section(args, hk, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = compute_ratios(sizes, inspect_res, grads, checkpoint)
    report = {
        "machine": machine,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                      else sys.argv[1:])]),
        "config": {"quick": q, "sizes": [s for s, _ in args.sizes], "reps": args.reps,
                   "warmup_rounds": 1, "tmpdir": str(base), "inspect_mb": args.inspect_mb,
                   "grad_params": args.grad_params, "grad_batch": args.grad_batch,
                   "mem_batch": args.mem_batch, "grad_cnn": args.grad_cnn,
                   "checkpoint_params": args.checkpoint_params,
                   "declearn": dl.version, "declearn_skip_reason": dl.reason,
                   "hkstore_missing": hk.missing, "hkstore_functions": hk.functions,
                   "hkstore_functions_note": hk.functions_note,
                   "hkstore_load_has_verify": hk.has_verify, "workers": args.workers,
                   "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "sizes": sizes,
        "inspect": inspect_res,
        "grads": grads,
        "checkpoint": checkpoint,
        "ratios_size": list(sizes)[-1] if sizes else None,
        "ratios": ratios,
        "ratio_definitions": RATIO_DEFINITIONS,
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"\n== ratios (at {report['ratios_size']}; hkstore time / other time, "
          "grads: hkstore steps/s / declearn's)")
    for key, value in ratios.items():
        print(f"  {key:<30}{'skipped' if value is None else f'{value:.3f}'}")
    print(f"total wall time {report['wall_s']:.1f} s; load average at the end "
          + " ".join(f"{v:.2f}" for v in report["config"]["loadavg_end"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
