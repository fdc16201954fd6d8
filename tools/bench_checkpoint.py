"""Checkpoint benchmarks: ``hkstore.Checkpointer`` against Orbax's ``CheckpointManager``.

Run by ``tools/bench.py`` (section "checkpoint"), or alone::

    python tools/bench_checkpoint.py [--params 100M] [--reps 5] [--tmpdir DIR] [--json FILE]

The same model and optimizer state go to both: the ReLU MLP of ``tools/bench_models.py`` sized
to ``--params`` float32 parameters (an hkstore ``HaikuModel``), and an optax Adam state after
one update on random gradients (``mu`` and ``nu`` hold random floats, as after training: a
fresh Adam state is all zeros, which Orbax's default zstd compression would shrink to nothing).
Every round runs each case once, in rotating order; figures are medians in milliseconds, with
every sample kept, and the CPU time of the process (all threads) next to the wall time. On a
shared machine the wall times move with the load; ``extra_ratios`` adds the per-round ratios
(both cases of a round ran under the same load) and the ratio of median CPU times. Files go
to tmpfs (``/dev/shm``) unless ``--tmpdir`` says otherwise, so the figures are CPU costs:
hkstore fsyncs every file and folder, Orbax fsyncs nothing, and on a disk that difference is
hkstore's to pay.

Cases:

- ``hk_save``: ``Checkpointer(dir).save(model, 1, state=opt_state, metrics=...)`` (synchronous:
  every tensor hashed, every file fsynced, the round renamed into place);
- ``hk_save_background``: the time ``save()`` blocks with ``background=True``; and
  ``hk_save_background_total``: until ``wait()`` returns;
- ``orbax_save``: ``CheckpointManager.save(1, args=Composite(params=StandardSave(params),
  opt_state=StandardSave(opt_state)))`` + ``wait_until_finished()``; ``orbax_save_block``: the
  time ``save()`` alone blocks;
- ``hk_restore``: ``Checkpointer(dir).restore(model=fn, loss=fn, state_like=opt_state)``, every
  digest checked, into a new model and the state on the device;
- ``orbax_restore``: ``CheckpointManager.restore(1, args=Composite(StandardRestore(abstract
  params), StandardRestore(abstract state)))`` (no digest exists to check).

The warm-up round checks both restores against the source, bit for bit. Peak RSS of a
background save (above the RSS before it) is measured once in a fresh subprocess
(``/proc/self/clear_refs`` resets the high-water mark).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models
from bench_memory import proc_status, reset_peak

DATA_INFO = {"data_type": "float32", "features_shape": (bench_models.FEATURES,)}
CASES = ("hk_save", "hk_save_background", "orbax_save", "hk_restore", "orbax_restore")


def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _quiet() -> Any:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def build(params: int, seed: int = 0) -> tuple[Any, Callable[..., Any], Any, list[int]]:
    """The model (hkstore HaikuModel), its forward function, an Adam state, the widths."""
    import jax
    import optax

    import hkstore
    from hkstore.model import set_device_policy

    set_device_policy(gpu=jax.default_backend() == "gpu")
    widths = bench_models.widths_for(params)
    fn = functools.partial(bench_models.mlp, widths=widths)
    model = hkstore.HaikuModel(fn, bench_models.mse, seed=seed)
    model.initialize(dict(DATA_INFO))
    weights = model.get_weights().coefs
    opt = optax.adam(1e-3)
    keys = jax.random.split(jax.random.key(seed + 1), len(weights))
    grads = {name: jax.random.normal(k, w.shape, w.dtype) * 1e-2
             for k, (name, w) in zip(keys, weights.items(), strict=True)}
    _, state = opt.update(grads, opt.init(weights), weights)
    jax.block_until_ready(state)
    return model, fn, state, widths


def _bits(tree: Any) -> list[bytes]:
    import jax

    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


class Bench:
    """The cases, sharing one model and state."""

    def __init__(self, params: int, work: Path) -> None:
        import jax

        self.jax = jax
        self.model, self.fn, self.state, self.widths = build(params)
        self.weights = self.model.get_weights().coefs
        self.work = work
        self.count = 0
        self.skipped: dict[str, str] = {}
        try:
            import orbax.checkpoint as ocp

            self.ocp: Any = ocp
            self.orbax_version = getattr(ocp, "__version__", None)
        except Exception as exc:
            self.ocp = None
            self.orbax_version = None
            reason = f"orbax-checkpoint not importable ({type(exc).__name__}); install the " \
                     "`bench` extra"
            for case in ("orbax_save", "orbax_restore"):
                self.skipped[case] = reason
        self.hk_dir: Path | None = None
        self.orbax_dir: Path | None = None

    def _fresh(self, prefix: str) -> Path:
        self.count += 1
        return self.work / f"{prefix}{self.count}"

    # -- hkstore -------------------------------------------------------------------------

    def hk_save(self) -> dict[str, float]:
        from hkstore import Checkpointer

        folder = self._fresh("hk")
        ckpt = Checkpointer(folder, functions="none")
        start = _clock()
        ckpt.save(self.model, 1, state=self.state, metrics={"loss": 0.5})
        wall, cpu = _since(start)
        ckpt.close()
        self._keep("hk_dir", folder)
        return {"hk_save": wall, "hk_save_cpu": cpu}

    def hk_save_background(self) -> dict[str, float]:
        from hkstore import Checkpointer

        folder = self._fresh("hkb")
        ckpt = Checkpointer(folder, functions="none", background=True)
        t0 = time.perf_counter()
        ckpt.save(self.model, 1, state=self.state, metrics={"loss": 0.5})
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        ckpt.close()
        shutil.rmtree(folder)
        return {"hk_save_background": t1 - t0, "hk_save_background_total": t2 - t0}

    def hk_restore(self, check: bool = False) -> dict[str, float]:
        from hkstore import Checkpointer

        assert self.hk_dir is not None
        ckpt = Checkpointer(self.hk_dir)
        start = _clock()
        got = ckpt.restore(model=self.fn, loss=bench_models.mse, state_like=self.state)
        self.jax.block_until_ready((got.model.get_weights().coefs, got.state))
        wall, cpu = _since(start)
        if check:
            assert _bits(got.model.get_weights().coefs) == _bits(self.weights), "hk weights"
            assert _bits(got.state) == _bits(self.state), "hk state"
        return {"hk_restore": wall, "hk_restore_cpu": cpu}

    # -- Orbax ---------------------------------------------------------------------------

    def orbax_save(self) -> dict[str, float]:
        ocp = self.ocp
        folder = self._fresh("ob")
        manager = ocp.CheckpointManager(folder)
        args = ocp.args.Composite(params=ocp.args.StandardSave(self.weights),
                                  opt_state=ocp.args.StandardSave(self.state))
        start = _clock()
        manager.save(1, args=args)
        block = time.perf_counter() - start[0]
        manager.wait_until_finished()
        wall, cpu = _since(start)
        manager.close()
        self._keep("orbax_dir", folder)
        return {"orbax_save": wall, "orbax_save_block": block, "orbax_save_cpu": cpu}

    def orbax_restore(self, check: bool = False) -> dict[str, float]:
        ocp = self.ocp
        assert self.orbax_dir is not None
        manager = ocp.CheckpointManager(self.orbax_dir)
        abstract = functools.partial(self.jax.tree_util.tree_map, ocp.utils.to_shape_dtype_struct)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract(self.weights)),
                                  opt_state=ocp.args.StandardRestore(abstract(self.state)))
        start = _clock()
        got = manager.restore(1, args=args)
        self.jax.block_until_ready((got.params, got.opt_state))
        wall, cpu = _since(start)
        manager.close()
        if check:
            assert _bits(got.params) == _bits(self.weights), "orbax params"
            assert _bits(got.opt_state) == _bits(self.state), "orbax state"
        return {"orbax_restore": wall, "orbax_restore_cpu": cpu}

    def _keep(self, attr: str, folder: Path) -> None:
        """Keep the newest checkpoint of a kind for the restore cases; drop the older one."""
        old = getattr(self, attr)
        setattr(self, attr, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def du(self, folder: Path | None) -> int | None:
        if folder is None:
            return None
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_checkpoint(params: int, reps: int, work: Path, *, rss: bool = True,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every case ``1 + reps`` times (rotating order); return medians, samples, ratios."""
    quiet = _quiet()
    try:
        bench = Bench(params, work)
    finally:
        quiet.__exit__(None, None, None)
    nparams = bench_models.param_count(bench.widths)
    state_bytes = sum(np.asarray(x).nbytes for x in bench.jax.tree_util.tree_leaves(bench.state))
    log(f"\n== checkpoint: {nparams:,} float32 params ({4 * nparams / 1e6:.1f} MB) + Adam "
        f"state ({state_bytes / 1e6:.1f} MB); orbax-checkpoint {bench.orbax_version}")
    samples: dict[str, list[float]] = {}
    order = [c for c in CASES if c not in bench.skipped]
    for rnd in range(1 + reps):
        k = rnd % len(order)
        # a restore needs its save first: rotate within saves, then within restores
        saves = [c for c in order if "save" in c]
        restores = [c for c in order if "restore" in c]
        for case in saves[k % len(saves):] + saves[:k % len(saves)] \
                + restores[k % len(restores):] + restores[:k % len(restores)]:
            if case in bench.skipped:
                continue
            gc.collect()
            quiet = _quiet()
            try:
                method = getattr(bench, case)
                out = method(check=True) if rnd == 0 and "restore" in case else method()
            except Exception as exc:
                bench.skipped[case] = f"failed: {type(exc).__name__}: {exc}"
                log(f"  SKIP {case}: {bench.skipped[case]}")
                continue
            finally:
                quiet.__exit__(None, None, None)
            if rnd > 0:
                for name, seconds in out.items():
                    samples.setdefault(name, []).append(seconds * 1e3)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    for name, v in samples.items():
        log(f"  {name:<26}{medians[name]:9.1f} ms   (samples {', '.join(f'{x:.0f}' for x in v)})")
    result: dict[str, Any] = {
        "extra_ratios": extra_ratios(samples),
        "params": nparams,
        "weights_bytes": 4 * nparams,
        "state_bytes": state_bytes,
        "orbax_checkpoint": bench.orbax_version,
        "median_ms": medians,
        "samples_ms": samples,
        "skipped": dict(bench.skipped),
        "bytes_on_disk": {"hkstore": bench.du(bench.hk_dir), "orbax": bench.du(bench.orbax_dir)},
        "rss": None,
    }
    for folder in (bench.hk_dir, bench.orbax_dir):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    del bench
    gc.collect()
    if rss:
        result["rss"] = background_rss(params, work)
        fig = result["rss"]
        if "peak_above_baseline" in fig:
            log(f"  peak RSS of a background save: +{fig['peak_above_baseline'] / 1e6:.1f} MB "
                f"= {fig['vs_weights']:.3f}x the weights, the first of the process; "
                f"+{fig['next_round_peak_above_baseline'] / 1e6:.1f} MB the next "
                f"({fig['method']})")
        else:
            log(f"  peak RSS: SKIP {fig.get('skipped')}")
    return result


def extra_ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Figures that resist a busy machine: per-round ratios (both cases ran in the same round,
    under the same load; median, min, max) and the ratio of median CPU times."""
    out: dict[str, Any] = {}
    for name, (a, b) in {"save_vs_orbax": ("hk_save", "orbax_save"),
                         "restore_vs_orbax": ("hk_restore", "orbax_restore")}.items():
        if a in samples and b in samples:
            per_round = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
            out[f"{name}_per_round"] = {"median": statistics.median(per_round),
                                        "min": min(per_round), "max": max(per_round)}
            out[f"{name}_cpu"] = (statistics.median(samples[f"{a}_cpu"])
                                  / statistics.median(samples[f"{b}_cpu"]))
    return out


def ratios(result: dict[str, Any] | None) -> dict[str, float | None]:
    """The checkpoint ratios (hkstore time / other time; RSS / weights bytes)."""
    m = (result or {}).get("median_ms", {})

    def ratio(a: str, b: str) -> float | None:
        return m[a] / m[b] if m.get(a) is not None and m.get(b) else None

    rss = (result or {}).get("rss") or {}
    return {
        "checkpoint_save_vs_orbax": ratio("hk_save", "orbax_save"),
        "checkpoint_background_block_vs_save": ratio("hk_save_background", "hk_save"),
        "checkpoint_restore_vs_orbax": ratio("hk_restore", "orbax_restore"),
        "checkpoint_background_rss_vs_weights": rss.get("vs_weights"),
    }


def background_rss(params: int, work: Path) -> dict[str, Any]:
    """Peak RSS above baseline of one background save, in a fresh subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(work / "rss"),
           "--params", str(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"skipped": f"child exited {proc.returncode}: {' '.join(tail)}"}
    return dict(json.loads(lines[-1]))


def rss_child(folder: Path, params: int) -> int:
    """Child: build the model and state, then two background saves; print the RSS figures.

    The first save of a process also pays one-time costs (imports, schemas, thread pools);
    the second shows what every later round costs.
    """
    quiet = _quiet()
    model, _, state, widths = build(params)
    from hkstore import Checkpointer

    quiet.__exit__(None, None, None)
    weights = 4 * bench_models.param_count(widths)
    ckpt = Checkpointer(folder, functions="none", background=True)
    peaks = []
    for round_ in (1, 2):
        gc.collect()
        method = reset_peak()
        baseline = proc_status("VmRSS")
        ckpt.save(model, round_, state=state)
        ckpt.wait()
        peaks.append((baseline, proc_status("VmHWM")))
    ckpt.close()
    shutil.rmtree(folder, ignore_errors=True)
    (baseline, peak), (baseline2, peak2) = peaks
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak,
                      "peak_above_baseline": peak - baseline, "weights_bytes": weights,
                      "vs_weights": (peak - baseline) / weights,
                      "next_round_peak_above_baseline": peak2 - baseline2,
                      "next_round_vs_weights": (peak2 - baseline2) / weights, "method": method}))
    return 0


def _size(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}
    if text[-1].lower() in scale:
        return int(float(text[:-1]) * scale[text[-1].lower()])
    return int(float(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=_size, default=_size("100M"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tmpdir", default=None, help="default /dev/shm")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rss-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        return rss_child(args.rss_child, args.params)
    base = Path(args.tmpdir) if args.tmpdir else (
        Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="hkstore-ckpt-bench-", dir=base))
    try:
        result = bench_checkpoint(args.params, args.reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["ratios"] = ratios(result)
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    print(json.dumps({**result["ratios"], **result["extra_ratios"]}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
