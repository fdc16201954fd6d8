"""Smoke test of tools/bench.py: a --quick run on tiny sizes writes every ratio key."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATIO_KEYS = {
    "save_vs_safetensors",
    "load_verified_vs_safetensors",
    "load_vs_memcpy_floor",
    "load_vs_declearn_msgpack",
    "load_vs_declearn_json",
    "inspect_1gb_ms",
    "cli_inspect_ms",
    "peak_rss_vs_weights",
    "grads_vs_declearn",
    "grads_clipped_vs_declearn",
}


def test_quick_bench_on_tiny_sizes_writes_every_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--sizes", "10k",
        "--reps", "1", "--inspect-mb", "1", "--grad-params", "2k", "--grad-batch", "4",
        "--grad-seconds", "0.02", "--tmpdir", str(tmp_path), "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))

    assert set(report["ratios"]) == RATIO_KEYS
    for key, value in report["ratios"].items():
        assert value is None or (isinstance(value, float) and value > 0), (key, value)
    # the baselines that need neither hkstore's API nor declearn always run
    size = report["sizes"]["10k"]
    for case in ("st_save", "st_load", "npz_save", "npz_load", "floor_save", "floor_load"):
        assert size["median_ms"][case] > 0, case
        assert len(size["samples_ms"][case]) == 1
    assert size["params"] > 9000
    # every case that did not run says why
    skipped = set(size["skipped"])
    ran = set(size["median_ms"])
    assert not skipped & ran
    for case in ("dl_msgpack_load", "dl_json_load"):  # declearn: only in the bench venv
        assert case in ran | skipped, case
    # hkstore's own cases always run here: a skipped one would make the bench report nothing
    hkstore_cases = ("hk_save", "hk_save_zstd", "hk_load_verified", "hk_load_noverify",
                     "hk_load_zstd", "hk_dumps", "hk_loads")
    assert {case: size["skipped"].get(case) for case in hkstore_cases if case in skipped} == {}
    for case in hkstore_cases:
        assert size["median_ms"][case] > 0, case
    for key in ("save_vs_safetensors", "load_verified_vs_safetensors", "load_vs_memcpy_floor",
                "inspect_1gb_ms", "cli_inspect_ms", "peak_rss_vs_weights"):
        assert report["ratios"][key] is not None, key
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["versions"]["jax"]
    assert report["ratios_size"] == "10k"
    # the tool cleaned up after itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
