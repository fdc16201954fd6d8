"""GPU check: save from GPU memory, reload on CPU and back, staging speed, gradient throughput.

Usage (on a machine with a CUDA GPU that jax sees; exits 0 with a message elsewhere)::

    python tools/gpu_check.py [--params 100M] [--reps 3] [--json FILE]

What it does, in one process, in about 1-2 minutes on an H100/H200:

1. Staging. ``--stage-mb`` of float32 (default 1024) in one device array, made fresh before
   every repetition (jax caches an array's host copy, so a re-used array would time nothing):
   ``np.asarray(x)`` (what declearn and naive savers do) next to
   ``np.asarray(jax.device_put(x, SingleDeviceSharding(gpu, memory_kind="pinned_host")))``;
   then the same two copies over the weights of the model below, and hkstore's own staging
   stream (``hkstore.model._device.to_host_stream``: pinned copies started up to 256 MiB
   ahead of the one being consumed), which is what ``hkstore.save`` runs.
2. Save from the GPU. The MLP of ``tools/bench_models.py`` with ``--params`` float32 weights on
   the GPU, fresh device copies of its weights before each repetition: ``hkstore.save`` (file on
   tmpfs), raw ``safetensors.numpy.save_file`` of ``np.asarray`` of each weight, and declearn's
   ``Checkpointer.save_model`` (msgpack) of the same weights. Effective GB/s = weight bytes / time.
3. Round trip. The archive is loaded onto the CPU (``set_device_policy(gpu=False)``), compared
   bit for bit with the GPU weights, moved back (``update_device_policy``), compared again, and
   loaded straight onto the GPU and compared a third time. Placement is checked each time.
4. Load onto the GPU: ``hkstore.load`` (verified; each tensor's host-to-device copy issued as
   soon as its digest matched, ``early_placement``) against raw ``safetensors`` ``load_file``
   + ``jax.device_put`` of each array, both waited for with ``block_until_ready``; GB/s of
   weights. Also with ``workers=1``.
5. ``compute_batch_gradients`` steps/s, plain and clipped (``max_norm=1.0``) on the fast path
   (``clipping="auto"``) and on the per-sample path, hkstore vs declearn, on the MLP
   (``--grad-params`` 10M) and the small conv net of ``bench_models``, same weights and batch
   (``--grad-batch`` 256); then the device memory XLA assigns to one plain, fast-clipped and
   per-sample-clipped step at that batch.

hkstore parts are skipped with a printed reason while its API is missing; declearn parts while
declearn is not importable. The GPU image lacks dm-haiku, jmp, zstandard, blake3, jsonschema
(with referencing, rpds-py, jsonschema-specifications) and declearn (with fire, gmpy2,
termcolor): carry them as cp312 wheels (see the device tool's README) and put them on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import bench_models


def timed(fn: Callable[[], Any], reps: int, fresh: Callable[[], Any] | None = None
          ) -> list[float]:
    """Seconds per run of ``fn`` (after one warm-up); ``fresh()`` runs untimed before each."""
    out = []
    for i in range(reps + 1):
        if fresh is not None:
            fresh()
        gc.collect()
        t0 = time.perf_counter()
        bench.block(fn())
        dt = time.perf_counter() - t0
        if i:
            out.append(dt)
    return out


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / 1e9 / float(np.median(seconds))


def bits_equal(a: Any, b: Any) -> bool:
    x, y = np.asarray(a), np.asarray(b)
    return x.dtype == y.dtype and x.shape == y.shape and bool(
        np.array_equal(np.ascontiguousarray(x).view(np.uint8),
                       np.ascontiguousarray(y).view(np.uint8)))


def platforms(named: Mapping[str, Any]) -> set[str]:
    return {d.platform for v in named.values() for d in v.devices()}


def stage_check(gpu: Any, stage_mb: float, reps: int, weights: Mapping[str, Any],
                report: dict[str, Any]) -> None:
    """np.asarray vs pinned_host staging, on one big array and on the model's weights."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    kinds = {m.kind for m in gpu.addressable_memories()}
    report["memory_kinds"] = sorted(kinds)
    pinned = SingleDeviceSharding(gpu, memory_kind="pinned_host") if "pinned_host" in kinds \
        else None
    n = int(stage_mb * 1e6 / 4)
    holder: dict[str, Any] = {}

    def fresh_big() -> None:
        holder.clear()
        holder["x"] = jax.device_put(jnp.arange(n, dtype=jnp.float32), gpu) * 1.0
        holder["x"].block_until_ready()

    def fresh_weights() -> None:
        holder.clear()
        holder.update({k: jnp.array(v, copy=True) for k, v in weights.items()})
        bench.block(holder)

    def plain() -> Any:
        return {k: np.asarray(v) for k, v in holder.items()}

    def via_pinned() -> Any:
        return {k: np.asarray(jax.device_put(v, pinned)) for k, v in holder.items()}

    def via_stream() -> Any:
        from hkstore.model._device import to_host_stream

        return dict(to_host_stream(list(holder.items())))

    res: dict[str, Any] = {}
    for label, fresh, nbytes in (("array", fresh_big, 4 * n),
                                 ("weights", fresh_weights,
                                  sum(int(v.size) * v.dtype.itemsize for v in weights.values()))):
        res[label] = {"bytes": nbytes, "asarray_gbps": gbps(nbytes, timed(plain, reps, fresh))}
        if pinned is not None:
            res[label]["pinned_host_gbps"] = gbps(nbytes, timed(via_pinned, reps, fresh))
        try:
            res[label]["hkstore_stream_gbps"] = gbps(nbytes, timed(via_stream, reps, fresh))
        except ImportError as exc:
            res[label]["hkstore_stream_skipped"] = str(exc)
        print(f"  staging {label:<8} {nbytes / 1e6:8.0f} MB: np.asarray "
              f"{res[label]['asarray_gbps']:6.2f} GB/s; pinned_host "
              + (f"{res[label]['pinned_host_gbps']:6.2f} GB/s" if pinned else "not offered")
              + (f"; hkstore stream {res[label]['hkstore_stream_gbps']:6.2f} GB/s"
                 if "hkstore_stream_gbps" in res[label] else ""))
    holder.clear()
    report["staging"] = res


def save_check(args: argparse.Namespace, hk: bench.Hk, dl: bench.Dl, work: Path,
               report: dict[str, Any]) -> None:
    """Save from the GPU (hkstore, raw safetensors, declearn) and the CPU/GPU round trip."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    widths = bench_models.widths_for(args.params)
    nbytes = 4 * bench_models.param_count(widths)
    print(f"\n== save from GPU: {nbytes / 1e6:.0f} MB of weights, widths {widths}", flush=True)
    res: dict[str, Any] = {"weights_bytes": nbytes, "skipped": {}}
    report["save"] = res
    why = hk.why_not("HaikuModel")
    model = hk.model(widths) if why is None else None
    weights = dict(model.get_weights().coefs) if model is not None else \
        bench.haiku_weights(widths)
    res["weights_platforms"] = sorted(platforms(weights))
    current: dict[str, Any] = {}

    def refresh() -> None:
        """New device buffers (no cached host copy) with the same bits, in the model too."""
        current.clear()
        current.update({k: jnp.array(v, copy=True) for k, v in weights.items()})
        bench.block(current)
        if model is not None:
            model.set_weights(type(model.get_weights())(dict(current)))

    out = work / "out"
    figures: dict[str, list[float]] = {}
    figures["st_save_asarray"] = timed(
        lambda: save_file({k: np.asarray(v) for k, v in current.items()}, str(out)),
        args.reps, refresh)
    if why is None and not hk.why_not("save"):
        try:
            figures["hk_save"] = timed(lambda: hk.save(model, out), args.reps, refresh)
        except Exception as exc:
            res["skipped"]["hk_save"] = f"failed: {type(exc).__name__}: {exc}"
    else:
        res["skipped"]["hk_save"] = why or hk.why_not("save")
    if dl.reason is None:
        dl_model = dl.model(widths, weights)

        def dl_refresh() -> None:
            with bench.quiet():
                dl_model.set_weights(dl.Vector({k: jnp.array(v, copy=True)
                                                for k, v in weights.items()}))
            bench.block(dl_model)

        def dl_save() -> None:
            with bench.quiet():
                dl.Checkpointer(str(work / "dl")).save_model(dl_model, config=True, state=True,
                                                             timestamp="gpu")

        figures["dl_msgpack_save"] = timed(dl_save, args.reps, dl_refresh)
        res["declearn_weights_platforms"] = sorted(platforms(dl_model.get_weights().coefs))
        del dl_model
    else:
        res["skipped"]["dl_msgpack_save"] = dl.reason
    for name, secs in figures.items():
        res[name] = {"median_ms": float(np.median(secs)) * 1e3, "gbps": gbps(nbytes, secs),
                     "samples_ms": [s * 1e3 for s in secs]}
        print(f"  {name:<18}{res[name]['median_ms']:9.1f} ms  {res[name]['gbps']:6.2f} GB/s")
    if "hk_save" in res and "dl_msgpack_save" in res:
        res["hk_speedup_vs_declearn"] = res["dl_msgpack_save"]["median_ms"] / \
            res["hk_save"]["median_ms"]
        print(f"  hkstore save speed-up over declearn's msgpack save: "
              f"{res['hk_speedup_vs_declearn']:.2f}x (target >= 3)")
    for name, why_skip in res["skipped"].items():
        print(f"  SKIP {name}: {why_skip}")

    # round trip GPU -> file -> CPU -> GPU, bit-exact
    trip: dict[str, Any] = {}
    report["round_trip"] = trip
    reason = hk.why_not("HaikuModel", "save", "load", "get_device_policy", "set_device_policy")
    if reason or model is None or "hk_save" not in figures:
        trip["skipped"] = reason or res["skipped"].get("hk_save", "no hkstore model")
        print(f"  SKIP round trip: {trip['skipped']}")
        return
    expected = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    path = work / "trip.hkz"
    hk.save(model, path)
    fn = bench.model_fn(widths)
    policy = hk.mod.get_device_policy()
    problems: list[str] = []

    accel = sorted(platforms(weights))[0]  # "gpu" (or "cpu" with --allow-cpu)

    def check(stage: str, m: Any, want_platform: str) -> None:
        want_platform = accel if want_platform == "gpu" else want_platform
        got = dict(m.get_weights().coefs)
        bad = [k for k in expected if k not in got or not bits_equal(got[k], expected[k])]
        where = platforms(got)
        trip[stage] = {"bit_exact": not bad, "platforms": sorted(where)}
        if bad:
            problems.append(f"{stage}: {len(bad)} tensors differ (e.g. {bad[0]})")
        if where != {want_platform}:
            problems.append(f"{stage}: weights on {sorted(where)}, expected {want_platform}")
        print(f"  {stage:<22} bit-exact={not bad}  on {sorted(where)}")

    try:
        with bench.quiet():
            hk.mod.set_device_policy(gpu=False)
            on_cpu = hk.mod.load(path, model=fn, loss=bench_models.mse)
        check("loaded_on_cpu", on_cpu, "cpu")
        with bench.quiet():
            hk.mod.set_device_policy(gpu=True)
            on_cpu.update_device_policy()
        check("cpu_then_back_to_gpu", on_cpu, "gpu")
        with bench.quiet():
            on_gpu = hk.mod.load(path, model=fn, loss=bench_models.mse)
        check("loaded_on_gpu", on_gpu, "gpu")
    except Exception as exc:
        problems.append(f"round trip failed: {type(exc).__name__}: {exc}")
    finally:
        hk.mod.set_device_policy(gpu=policy.gpu, idx=policy.idx)
    trip["problems"] = problems
    for p in problems:
        print(f"  PROBLEM {p}")
    load_check(args, hk, path, widths, nbytes, report)


def load_check(args: argparse.Namespace, hk: bench.Hk, path: Path, widths: list[int],
               nbytes: int, report: dict[str, Any]) -> None:
    """Verified hkstore.load straight onto the GPU against safetensors load_file + device_put."""
    import jax
    from safetensors.numpy import load_file, save_file

    res: dict[str, Any] = {"weights_bytes": nbytes}
    report["load_to_gpu"] = res
    fn = bench.model_fn(widths)
    policy = hk.mod.get_device_policy()
    st_path = path.with_suffix(".safetensors")
    with hk.mod.open_archive(path) as archive:
        save_file(archive.read_weights(), str(st_path))
    gpu = jax.devices()[0]
    cases: dict[str, Callable[[], Any]] = {
        "st_load_put": lambda: {k: jax.device_put(v, gpu)
                                for k, v in load_file(str(st_path)).items()},
        "hk_load": lambda: hk.mod.load(path, model=fn, loss=bench_models.mse),
    }
    if hk.has_workers:
        cases["hk_load_workers1"] = lambda: hk.mod.load(path, model=fn, loss=bench_models.mse,
                                                        workers=1)
    try:
        with bench.quiet():
            hk.mod.set_device_policy(gpu=True)
            for name, case in cases.items():
                secs = timed(case, args.reps)
                res[name] = {"median_ms": float(np.median(secs)) * 1e3,
                             "gbps": gbps(nbytes, secs), "samples_ms": [s * 1e3 for s in secs]}
                print(f"  load to GPU {name:<18}{res[name]['median_ms']:9.1f} ms  "
                      f"{res[name]['gbps']:6.2f} GB/s")
    except Exception as exc:
        res["failed"] = f"{type(exc).__name__}: {exc}"
        print(f"  PROBLEM load to GPU: {res['failed']}")
    finally:
        hk.mod.set_device_policy(gpu=policy.gpu, idx=policy.idx)
        st_path.unlink(missing_ok=True)
    if "hk_load" in res and "st_load_put" in res:
        res["hk_vs_safetensors"] = res["hk_load"]["median_ms"] / res["st_load_put"]["median_ms"]
        print(f"  verified hkstore load / safetensors load+put on the GPU: "
              f"{res['hk_vs_safetensors']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=bench.parse_sizes, default=bench.parse_sizes("100M"))
    p.add_argument("--stage-mb", type=float, default=1024.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--grad-params", type=bench.parse_sizes, default=bench.parse_sizes("10M"))
    p.add_argument("--grad-batch", type=int, default=256)
    p.add_argument("--grad-seconds", type=float, default=1.0)
    p.add_argument("--no-declearn", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--allow-cpu", action="store_true",
                   help="dry run of this script on the CPU (use small --params/--stage-mb)")
    args = p.parse_args(argv)
    args.params = args.params[0][1]
    args.grad_params = args.grad_params[0][1]
    try:
        import jax
    except ImportError as exc:
        print(f"gpu_check: skipped: jax is not importable ({exc})")
        return 0
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus and not args.allow_cpu:
        print(f"gpu_check: skipped: no GPU visible to jax (backend {jax.default_backend()!r})")
        return 0
    gpu = gpus[0] if gpus else jax.devices()[0]
    t0 = time.perf_counter()
    dl = bench.Dl(enabled=not args.no_declearn, keep_x64=False)
    hk = bench.Hk()
    for name, why in hk.missing.items():
        print(f"note: {name}: {why}")
    if dl.reason:
        print(f"note: {dl.reason}")
    report: dict[str, Any] = {"machine": bench.machine_description(), "gpu": str(gpu),
                              "gpu_kind": getattr(gpu, "device_kind", None)}
    print(f"gpu_check on {gpu} ({report['gpu_kind']}), jax {jax.__version__}, "
          f"declearn {dl.version}")
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="hkstore-gpu-", dir=base))
    status = 0
    try:
        print("\n== staging device -> host", flush=True)
        weights = bench.haiku_weights(bench_models.widths_for(args.params))
        stage_check(gpu, args.stage_mb, args.reps, weights, report)
        del weights
        save_check(args, hk, dl, work, report)
        if report.get("round_trip", {}).get("problems"):
            status = 1
        grad_args = argparse.Namespace(grad_params=args.grad_params, grad_batch=args.grad_batch,
                                       grad_seconds=args.grad_seconds, reps=args.reps,
                                       grad_cnn=[32, 64, 128], mem_batch=args.grad_batch,
                                       grad_rss=False)
        report["grads"] = bench.bench_grads(grad_args, hk, dl)
        mlp = report["grads"]["nets"]["mlp"]["steps_per_s"]
        cnn = report["grads"]["nets"]["cnn"]["steps_per_s"]
        memory = report["grads"]["memory"]
        report["grads_vs_declearn"] = bench.ratio(mlp.get("hk_plain"), mlp.get("dl_plain"))
        report["grads_clipped_vs_declearn"] = bench.ratio(mlp.get("hk_clipped"),
                                                          mlp.get("dl_clipped"))
        report["clipped_vs_plain"] = bench.ratio(mlp.get("hk_clipped"), mlp.get("hk_plain"))
        report["cnn_clipped_vs_plain"] = bench.ratio(cnn.get("hk_clipped"), cnn.get("hk_plain"))
        report["clipped_peak_vs_plain"] = memory.get("mlp", {}).get("fast_vs_plain_compiled")
        for key in ("grads_vs_declearn", "grads_clipped_vs_declearn", "clipped_vs_plain",
                    "cnn_clipped_vs_plain", "clipped_peak_vs_plain"):
            value = report[key]
            print(f"  {key:<28}{'skipped' if value is None else f'{value:.3f}'}")
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal {report['wall_s']:.1f} s; exit {status}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
