"""Cost: hostile inputs at the default limits are refused (or read) in bounded time and memory.

A child process limits its address space (``resource.setrlimit(RLIMIT_AS)``) to what the
store needs plus ``BUDGET`` and opens, then verifies, each hostile archive: manifests and a
safetensors header built to fill the default caps with the shapes that used to cost minutes
and gigabytes (``tools/bench_hostile.py``: 6.3 GiB and two to six minutes each at 64 MiB
before), the corpus's small archives that claim huge sizes, and checkpoint round records at
the defaults (parsed). Each must end in ``ok`` or an
``HkstoreError`` (a ``MemoryError`` under the limit would be a failure), within ``SECONDS``
(generous: a loaded CI machine; they take well under two seconds here). The measured figures
are in ``tools/bench.py --hostile`` and SECURITY.md.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from helpers_cli import subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_hostile

from hkstore.store import DEFAULT_LIMITS

CORPUS = Path(__file__).parent / "corpus" / "hostile" / "archives"
BUDGET = 768 << 20  # bytes of address space above the child's own after its imports
SECONDS = 60.0
CORPUS_CASES = ["zstd-declares-200GiB.hkz", "zstd-rle-bomb.hkz", "pickle-opcode-bomb.hkz",
                "manifest-trainable-objects.hkz", "header-length-huge.hkz",
                "pickle-raw-size-over-cap.hkz", "zstd-claims-more-than-blocks.hkz"]  # fmt: skip

_CHILD = r"""
import json, resource, sys, time
from hkstore.errors import HkstoreError
from hkstore.store import open_archive
from hkstore.store._round_record import parse_record

def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
limit = peak() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for path in sys.argv[2:]:
    start = time.perf_counter()
    try:
        if path.endswith(".json"):  # a checkpoint round record
            parse_record(open(path, "rb").read(), where=path)
        else:
            with open_archive(path) as archive:
                archive.verify()
        outcome = "ok"
    except HkstoreError as exc:
        outcome = type(exc).__name__
    except MemoryError:
        outcome = "MemoryError"
    results[path] = [outcome, time.perf_counter() - start]
print(json.dumps(results))
"""


def test_hostile_archives_cost_bounded_time_and_memory(tmp_path: Path) -> None:
    cases = bench_hostile.build_cases(tmp_path, dataclasses.asdict(DEFAULT_LIMITS))
    cases.pop("_warm")
    cases.pop("_warm_record")
    paths = [str(path) for path, _ in cases.values()]
    paths += [str(CORPUS / name) for name in CORPUS_CASES]
    done = subprocess.run([sys.executable, "-c", _CHILD, str(BUDGET), *paths],
                          capture_output=True, text=True, env=subprocess_env(),
                          timeout=SECONDS * len(paths), check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    report = {Path(p).name: (outcome, round(seconds, 2)) for p, (outcome, seconds) in
              results.items()}  # fmt: skip
    assert not [name for name, (outcome, _) in report.items() if outcome == "MemoryError"], report
    assert not [name for name, (_, seconds) in report.items() if seconds > SECONDS], report
    # the manifest of 100,000 valid tensors (the default max_tensors) is read, not refused
    assert report["manifest_tensors.hkz"][0] in ("ok", "WeightsFormatError"), report
    # checkpoint round records at the defaults are read, not refused
    assert report["record_state_tensors.json"][0] == "ok", report
    assert report["record_nodes_at_value_limit.json"][0] == "ok", report
