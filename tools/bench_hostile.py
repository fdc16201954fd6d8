"""What hostile archives cost to open and verify: time and peak memory, one fresh process each.

Usage::

    python tools/bench_hostile.py [--tree DIR] [--reps N] [--json FILE] [--cases PREFIX,...]
    python tools/bench.py --hostile ...            (the same, from the main benchmark)

Each case is an archive built to fill a limit of the hkstore under test at its *default*
value (the manifest cap for the manifest shapes, the header cap for the safetensors header
shapes), written to a temp folder, then opened (``open_archive``) or verified
(``Archive.verify``) in a fresh subprocess with ``--tree`` first on ``sys.path``: pass an older
checkout as ``--tree`` to measure it with the same files (the "before" figures of SECURITY.md).
The child imports hkstore and opens a small valid archive first (so imports and schema loading
are not counted), resets its peak-RSS counter (``/proc/self/clear_refs``), then times the one
operation; the figure is the peak resident memory above the resident memory before it
(``VmHWM - VmRSS``), and the wall time. Medians of ``--reps`` children; a child that runs past
``--timeout`` seconds is killed and reported as such.

Shapes (each canonical JSON, so that a reader's canonical check passes and the deeper checks
run):

- ``manifest_tensors``: ``$.tensors`` with as many valid entries as the cap holds (capped at
  ``max_tensors``): the per-entry validation cost.
- ``manifest_empty_arrays``: ``$.metadata`` = ``{"a": [[], [], ...]}`` filling the cap (JSON
  that expands about 20 times in memory).
- ``manifest_small_objects``: ``$.metadata`` = ``{"a": [{"": 0}, ...]}`` filling the cap.
- ``manifest_ints``, ``manifest_objects_at_value_limit``, ``manifest_arrays_at_value_limit``:
  ``$.metadata`` = ``{"a": [...]}`` of ``0``, ``{"": 0}`` or ``[]`` with as many values as
  ``max_json_values`` allows (or the cap holds): the worst cases a reader must accept.
- ``manifest_trainable_objects``: ``$.trainable`` = 10,000 distinct objects ``{"": i}``
  (110 KB): JSON Schema's ``uniqueItems`` compares them pairwise.
- ``header_empty_arrays`` (verify): a weights member whose safetensors header is
  ``{"__metadata__": {}, "x": [[], [], ...]}`` filling the header cap.
- ``record_state_tensors`` (parse): a checkpoint round record (FORMAT.md 13.3) listing
  ``max_tensors`` state tensors (or as many as the cap holds), each referenced by a tensor
  node; ``record_nodes_at_value_limit``: a state tree of ``{"type": "json", "value": null}``
  nodes, as many as ``max_json_values`` allows. Parsed with ``parse_record`` (a tree without
  checkpoints reports the import error).
- ``valid_100mb_open`` / ``valid_100mb_verify``: a valid 100 MB archive (25 tensors of 4 MB),
  opened, and verified (every digest): the cost of reading with ``pread`` into owned buffers
  instead of through a memory map.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
H0 = "0" * 64

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import hkstore
from hkstore.store import open_archive

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

if sys.argv[4] == "record":  # a checkpoint round record (FORMAT.md 13.3)
    from hkstore.store._round_record import parse_record
    parse_record(open(sys.argv[3], "rb").read(), where="round.json")
else:
    with open_archive(sys.argv[3]) as warm:
        warm.verify()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS")
t0 = time.perf_counter()
outcome = "ok"
try:
    if sys.argv[4] == "record":
        parse_record(open(sys.argv[2], "rb").read(), where="round.json")
    else:
        with open_archive(sys.argv[2]) as archive:
            if sys.argv[4] == "verify":
                archive.verify()
except Exception as exc:
    outcome = type(exc).__name__
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_bytes": max(status("VmHWM") - base, 0),
                  "outcome": outcome, "version": hkstore.__version__}))
"""


def _limits(tree: Path) -> dict[str, int]:
    code = (
        "import sys, dataclasses; sys.path.insert(0, sys.argv[1]); "
        "from hkstore.store import DEFAULT_LIMITS as L; import json; "
        "print(json.dumps(dataclasses.asdict(L)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True,
                         text=True, check=True)
    return dict(json.loads(out.stdout))


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _manifest(weights_size: int, header_sha: str, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "data_info": {"data_type": "float32", "features_shape": [4]},
        "format": "hkstore", "format_version": 1,
        "functions": {"loss": {"kind": "none"}, "model": {"kind": "none"}},
        "metadata": {}, "pickle": None, "seed": 0, "tensors": [], "trainable": [],
        "weights": {"compression": None, "header_sha256": header_sha, "member":
                    "weights.safetensors", "size": weights_size},
        "writer": {"hkstore": "0.1.0", "numpy": "2.0.0", "python": "3.11",
                   "python_implementation": "cpython"},
    }  # fmt: skip
    doc.update(fields)
    return doc


def _fill(doc: dict[str, Any], key: str, item: bytes, cap: int, count: int | None = None) -> bytes:
    """Canonical manifest whose ``$.metadata[key]`` list of ``item`` fills ``cap`` bytes."""
    doc = dict(doc, metadata={key: []})
    empty = _canonical(doc)
    room = cap - len(empty)
    n = room // (len(item) + 1) if count is None else min(count, room // (len(item) + 1))
    body = b",".join([item] * n)
    marker = f'"{key}":[]'.encode()
    out = empty.replace(marker, f'"{key}":['.encode() + body + b"]", 1)
    assert len(out) <= cap, (len(out), cap)
    return out


def _weights(header_obj: dict[str, Any] | None = None, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else _canonical(header_obj or {})
    body += b" " * (-(8 + len(body)) % 64)
    return len(body).to_bytes(8, "little") + body


def _importable() -> None:
    """Make this checkout's hkstore importable when no hkstore is installed."""
    if importlib.util.find_spec("hkstore") is None:
        sys.path.append(str(REPO))


def _archive(path: Path, weights: bytes, manifest: bytes) -> None:
    _importable()
    from hkstore.store._container import ContainerWriter

    with open(path, "wb") as f:
        writer = ContainerWriter(f)
        stream = writer.begin_member("weights.safetensors")
        stream.write(weights)
        stream.finish()
        writer.add_member("manifest.json", manifest)
        writer.close()


def build_cases(work: Path, limits: dict[str, int]) -> dict[str, tuple[Path, str]]:
    """Write every case's archive under ``work``; return name -> (path, operation)."""
    cap = limits["max_manifest_bytes"]
    empty_weights = _weights({})
    sha = hashlib.sha256(empty_weights).hexdigest()
    base = _manifest(len(empty_weights), sha)
    cases: dict[str, bytes | tuple[bytes, bytes]] = {}
    # valid tensor entries, as many as fit (the header will not match: open does not read it)
    entry = {"dtype": "F32", "name": "layer_000000/~/linear:w", "sha256": H0, "shape": [1]}
    per = len(_canonical(entry)) + 1
    count = min(limits["max_tensors"], (cap - len(_canonical(base))) // per)
    tensors = [dict(entry, name=f"layer_{i:06d}/~/linear:w") for i in range(count)]
    cases["manifest_tensors"] = _canonical(dict(base, tensors=tensors))
    cases["manifest_empty_arrays"] = _fill(base, "a", b"[]", cap)
    cases["manifest_small_objects"] = _fill(base, "a", b'{"":0}', cap)
    values = limits.get("max_json_values", 10**9) - 64
    cases["manifest_ints"] = _fill(base, "a", b"0", cap, count=values)
    cases["manifest_objects_at_value_limit"] = _fill(base, "a", b'{"":0}', cap,
                                                     count=values // 2)
    cases["manifest_arrays_at_value_limit"] = _fill(base, "a", b"[]", cap, count=values // 2)
    cases["manifest_trainable_objects"] = _canonical(
        dict(base, trainable=[{"": i} for i in range(10_000)])
    )
    out: dict[str, tuple[Path, str]] = {}
    for name, manifest in cases.items():
        path = work / f"{name}.hkz"
        _archive(path, empty_weights, manifest)  # type: ignore[arg-type]
        out[name] = (path, "open")
    # a safetensors header that fills the header cap with empty arrays (in __metadata__-free
    # junk: refused as a format error, but only after the JSON is parsed)
    hcap = limits["max_header_bytes"]
    raw = b'{"x":[' + b",".join([b"[]"] * ((hcap - 16) // 3)) + b"]}"
    header = _weights(raw=raw)
    manifest = _canonical(_manifest(len(header), hashlib.sha256(header).hexdigest()))
    path = work / "header_empty_arrays.hkz"
    _archive(path, header, manifest)
    out["header_empty_arrays"] = (path, "verify")
    # a valid 100 MB archive: what reading with pread into owned buffers costs against the
    # memory map of before (the same file for both trees)
    big = work / "valid_100mb.hkz"
    _valid_archive(big)
    out["valid_100mb_open"] = (big, "open")
    out["valid_100mb_verify"] = (big, "verify")
    out.update(_record_cases(work, limits))
    small = work / "small.hkz"
    _archive(small, empty_weights, _canonical(base))
    out["_warm"] = (small, "open")
    return out


def _record(state: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": "hkstore-checkpoint-round", "version": 1, "round": 1,
            "time": "2026-01-01T00:00:00.000000Z", "metrics": {},
            "model": {"member": "model.hkz", "size": 1, "manifest_sha256": H0},
            "state": state, "retention": {"keep_best": None, "keep_every": None,
                                          "keep_last": None},
            "signature": None}  # fmt: skip


def _record_cases(work: Path, limits: dict[str, int]) -> dict[str, tuple[Path, str]]:
    """Checkpoint round records (``round.json``) at the defaults: the most state tensors
    (``max_tensors``, or what the cap holds), and the largest tree of state nodes that
    ``max_json_values`` lets through."""
    cap = limits["max_manifest_bytes"]
    entry = {"dtype": "F32", "name": "opt/mu/layer_000000:w", "sha256": H0, "shape": [1]}
    node = {"array": "numpy", "name": "opt/mu/layer_000000:w", "type": "tensor"}
    per = len(_canonical(entry)) + len(_canonical(node)) + 2
    count = min(limits["max_tensors"], cap // per - 10)
    names = [f"opt/mu/layer_{i:06d}:w" for i in range(count)]
    tensors = {
        "member": "state.safetensors", "size": 8, "header_sha256": H0,
        "tensors": [dict(entry, name=n) for n in names],
        "structure": {"type": "list", "items": [dict(node, name=n) for n in names]},
    }  # fmt: skip
    nodes = (limits.get("max_json_values", 10**9) - 200) // 3
    nodes = min(nodes, (cap - 1000) // len(b'{"type":"json","value":null},'))
    tree = {"member": "state.safetensors", "size": 8, "header_sha256": H0, "tensors": [],
            "structure": {"type": "list", "items": [{"type": "json", "value": None}] * nodes}}
    out = {}
    for name, state in (("record_state_tensors", tensors), ("record_nodes_at_value_limit", tree),
                        ("_warm_record", None)):
        path = work / f"{name}.json"
        path.write_bytes(_canonical(_record(state)))
        out[name] = (path, "record")
    return out


def _valid_archive(path: Path) -> None:
    _importable()
    import numpy as np

    from hkstore.store._archive import ArchiveContent, write_archive
    from hkstore.store._weights import TensorSpec

    rng = np.random.default_rng(0)
    arrays = {f"layer_{i:02d}:w": rng.standard_normal((1024, 1024)).astype("f4")
              for i in range(25)}  # fmt: skip
    content = ArchiveContent(
        specs=[TensorSpec(name, "F32", (1024, 1024)) for name in arrays],
        fetch=arrays.__getitem__, trainable=list(arrays),
        data_info={"data_type": "float32", "features_shape": [1024]}, seed=0,
        functions={"model": {"kind": "none"}, "loss": {"kind": "none"}},
    )  # fmt: skip
    with open(path, "wb") as handle:
        write_archive(handle, content)


def run_case(tree: Path, path: Path, warm: Path, op: str, timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tree), str(path), str(warm), op],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "peak_bytes": None, "outcome": f"timeout after {timeout} s"}
    if done.returncode != 0:
        return {"seconds": None, "peak_bytes": None,
                "outcome": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bench_hostile(
    tree: Path, reps: int, timeout: float, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run every case (or those named ``only*``) ``reps`` times against ``tree``; medians,
    spread and outcomes."""
    limits = _limits(tree)
    results: dict[str, Any] = {"tree": str(tree), "limits": limits, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="hkstore-hostile-") as tmp:
        cases = build_cases(Path(tmp), limits)
        warm = cases.pop("_warm")[0]
        warm_record = cases.pop("_warm_record")[0]
        for name, (path, op) in cases.items():
            if only and not name.startswith(only):
                continue
            first = warm_record if op == "record" else warm
            runs = [run_case(tree, path, first, op, timeout) for _ in range(reps)]
            seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
            peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
            results["cases"][name] = {
                "operation": op,
                "file_bytes": path.stat().st_size,
                "seconds_median": statistics.median(seconds) if seconds else None,
                "seconds_min": min(seconds) if seconds else None,
                "seconds_max": max(seconds) if seconds else None,
                "peak_mib_median": statistics.median(peaks) / 2**20 if peaks else None,
                "outcome": runs[0]["outcome"],
            }
    return results


def print_results(results: dict[str, Any]) -> None:
    print(f"tree {results['tree']}")
    print(f"{'case':28} {'op':6} {'file':>9} {'median s':>9} {'min-max s':>14} "
          f"{'peak MiB':>9}  outcome")
    for name, r in results["cases"].items():
        sec = "-" if r["seconds_median"] is None else f"{r['seconds_median']:.3f}"
        spread = ("-" if r["seconds_min"] is None
                  else f"{r['seconds_min']:.3f}-{r['seconds_max']:.3f}")
        peak = "-" if r["peak_mib_median"] is None else f"{r['peak_mib_median']:.0f}"
        print(f"{name:28} {r['operation']:6} {r['file_bytes'] / 2**20:8.1f}M {sec:>9} "
              f"{spread:>14} {peak:>9}  {r['outcome']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=REPO,
                   help="hkstore checkout to measure (default: this one)")
    p.add_argument("--reps", type=int, default=3, help="children per case (default 3)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    p.add_argument("--json", type=Path, default=None, help="write the figures to FILE")
    p.add_argument("--cases", default="", metavar="PREFIX,...",
                   help="only the cases whose names start with one of these (e.g. record_)")
    args = p.parse_args(argv)
    only = tuple(filter(None, args.cases.split(",")))
    results = bench_hostile(args.tree.resolve(), args.reps, args.timeout, only)
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
