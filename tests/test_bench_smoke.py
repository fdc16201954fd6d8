"""Smoke test of tools/bench.py: a --quick run on tiny sizes writes every ratio key.

The hkstore gradient cases (plain, fast-clipped, per-sample-clipped, on both nets) and their
step-memory figures must run: a skip of any of them fails the test. declearn's cases run when
declearn is importable here and are skipped, saying so, when it is not.
"""

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
}
HK_GRAD_CASES = {"hk_plain", "hk_clipped", "hk_clipped_per_sample"}
DL_GRAD_CASES = {"dl_plain", "dl_clipped"}


def declearn_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import declearn.model.haiku"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def test_quick_bench_on_tiny_sizes_writes_every_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--sizes", "10k",
        "--reps", "1", "--inspect-mb", "1", "--grad-params", "2k", "--grad-batch", "4",
        "--grad-seconds", "0.02", "--grad-cnn", "4,8,8", "--mem-batch", "8", "--no-grad-rss",
        "--checkpoint-params", "20k", "--tmpdir", str(tmp_path), "--json", str(out),
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
    # the Checkpointer's own cases always run (Orbax only with the bench extra)
    checkpoint = report["checkpoint"]
    for case in ("hk_save", "hk_save_background", "hk_restore"):
        assert checkpoint["median_ms"][case] > 0, case
    assert report["ratios"]["checkpoint_background_block_vs_save"] is not None
    assert report["ratios"]["checkpoint_background_rss_vs_weights"] is not None
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["versions"]["jax"]
    assert report["ratios_size"] == "10k"
    # gradients: every hkstore case ran on both nets, the clipped one on the fast path
    with_declearn = declearn_importable()
    for net in ("mlp", "cnn"):
        grads = report["grads"]["nets"][net]
        assert set(grads["steps_per_s"]) >= HK_GRAD_CASES, (net, grads["skipped"])
        assert not HK_GRAD_CASES & set(grads["skipped"]), (net, grads["skipped"])
        assert all(grads["steps_per_s"][c] > 0 for c in HK_GRAD_CASES)
        assert grads["hk_clipped_path"] == "fast" and not grads["hk_clipped_fallbacks"]
        assert grads["batch"] == 4 and grads["params"] > 1000
        for case in DL_GRAD_CASES:
            if with_declearn:
                assert grads["steps_per_s"][case] > 0, (net, case, grads["skipped"])
            else:
                assert "declearn not importable" in grads["skipped"][case]
        memory = report["grads"]["memory"][net]
        assert set(memory["compiled_bytes"]) == {"plain", "fast", "per_sample"}
        assert all(v > 0 for v in memory["compiled_bytes"].values())
        assert memory["fast_vs_plain_compiled"] > 0
    for key in ("clipped_vs_plain", "clipped_fast_vs_per_sample", "clipped_peak_vs_plain",
                "cnn_clipped_vs_plain", "cnn_clipped_peak_vs_plain"):
        assert report["ratios"][key] is not None, key
    for key in ("grads_clipped_vs_declearn", "cnn_clipped_vs_declearn"):
        assert (report["ratios"][key] is not None) == with_declearn, key
    verify = report["inspect"]["verify"]
    assert verify["gbps"] > 0 and verify["cli"]["gbps"] > 0, verify
    # the tool cleaned up after itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
