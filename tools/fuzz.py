"""Fuzz every parser of untrusted input: only HkstoreError may come out, and nothing may hang.

Usage::

    python tools/fuzz.py --inputs 100000              # Hypothesis, spread over every target
    python tools/fuzz.py --engine atheris --inputs 100000   # libFuzzer via atheris (coverage
                                                            # guided; pip install atheris)
    python tools/fuzz.py --target manifest --inputs 5000 --json out.json

Targets (each takes bytes):

- ``container``: :func:`read_container` (the one ZIP parser);
- ``manifest``: :func:`decode_manifest` (strict JSON, schema, cross-field rules);
- ``header``: :func:`parse_header` (the safetensors header) and a :class:`WeightsReader`;
- ``zstd``: :func:`decompress_bounded` and :class:`BoundedReader` (content declared by the
  input's first byte, so both honest and lying declarations are tried);
- ``signature``: :func:`read_signature_document`;
- ``pickle``: :func:`pickle_globals` (the static opcode walk);
- ``config``: ``json.loads`` then :func:`parse_config` (the config's transport is JSON);
- ``archive``: :func:`open_archive` on the bytes, then ``verify()``.

Inputs start from valid seeds (a small archive, its members, a config, pickles, frames) and
the committed corpus, mutated: bytes overwritten, inserted, deleted, cut, repeated, and for
the JSON targets whole values replaced inside the parsed document. An input *fails* when it
raises anything but :class:`~hkstore.errors.HkstoreError` (a ``ValueError`` from numpy, a
``KeyError``, a ``MemoryError``...), and *hangs* when one call takes longer than
``--hang-seconds``. The run exits 1 on any failure or hang and prints the first of each.
``tests/test_fuzz.py`` runs the same targets for about a minute in CI.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))
if importlib.util.find_spec("hkstore") is None:  # run from a checkout without an install
    sys.path.append(str(REPO))

import make_corpus as corpus  # noqa: E402

from hkstore.errors import HkstoreError  # noqa: E402
from hkstore.store import Limits  # noqa: E402
from hkstore.store._archive import open_archive  # noqa: E402
from hkstore.store._config import parse_config  # noqa: E402
from hkstore.store._container import read_container  # noqa: E402
from hkstore.store._manifest import decode_manifest  # noqa: E402
from hkstore.store._pickle_scan import pickle_globals  # noqa: E402
from hkstore.store._signing import read_signature_document  # noqa: E402
from hkstore.store._weights import WeightsReader, parse_header  # noqa: E402
from hkstore.store._zstd import BoundedReader, decompress_bounded  # noqa: E402

#: Small limits, so that a mutated size field is refused quickly rather than honoured.
LIMITS = Limits(
    max_manifest_bytes=1 << 20, max_header_bytes=1 << 20, max_tensors=10_000,
    max_json_values=100_000, max_member_bytes=64 << 20, max_total_bytes=64 << 20,
    max_functions_bytes=4 << 20, max_pickle_ops=100_000, max_zstd_window_bytes=8 << 20,
)  # fmt: skip


def _container(data: bytes) -> None:
    read_container(data, LIMITS)


def _manifest(data: bytes) -> None:
    decode_manifest(data, LIMITS)


def _header(data: bytes) -> None:
    parse_header(data, LIMITS)
    with WeightsReader(data, limits=LIMITS) as reader:
        reader.read_all(None, workers=1)


def _zstd(data: bytes) -> None:
    declared = int.from_bytes(data[:2] or b"\0", "little")  # honest for some, lying for most
    frame = data[2:]
    decompress_bounded(frame, declared_size=declared, cap=1 << 20, what="fuzz",
                       max_window=LIMITS.max_zstd_window_bytes)  # fmt: skip
    with BoundedReader(frame, declared_size=declared, cap=1 << 20, what="fuzz") as reader:
        while reader.remaining:
            reader.read(4096)


def _signature(data: bytes) -> None:
    read_signature_document(data, LIMITS)


def _pickle(data: bytes) -> None:
    pickle_globals(data, max_ops=LIMITS.max_pickle_ops)


def _config(data: bytes) -> None:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return  # not JSON: the transport's problem, before hkstore sees a config
    parse_config(document, limits=LIMITS)


def _archive(data: bytes) -> None:
    with open_archive(data, limits=LIMITS) as archive:
        archive.verify()


@dataclass
class Target:
    """A parser, its seed inputs, and what the run found."""

    name: str
    call: Callable[[bytes], None]
    seeds: list[bytes] = field(default_factory=list)
    json_seeds: list[Any] = field(default_factory=list)  # documents mutated as JSON too
    runs: int = 0
    refused: int = 0
    failures: list[tuple[bytes, str]] = field(default_factory=list)
    hangs: list[tuple[bytes, float]] = field(default_factory=list)
    slowest: float = 0.0


def targets() -> dict[str, Target]:
    """Every target with its seeds (built in memory by the corpus generator's helpers)."""
    signed = corpus.archive(corpus.with_pickle(corpus.BENIGN_PICKLE), signer=corpus.TRUSTED)
    zst = corpus.archive(corpus._zstd_parts())
    plain = corpus.archive()
    manifest = corpus.read_member(signed, "manifest.json")
    weights = corpus.safetensors()
    configs = {case.name: case for case in corpus.config_cases()}
    config = configs["config/valid"].build()
    pickled_config = configs["config/pickle-approved"].build()
    frames = [corpus.zstd_frame(weights), corpus.zstd_frame(corpus.BENIGN_PICKLE),
              corpus.read_member(zst, "weights.safetensors.zst")]  # fmt: skip
    out = {
        "container": Target("container", _container, [signed, zst, plain]),
        "manifest": Target("manifest", _manifest, [manifest],
                           [json.loads(manifest)]),
        "header": Target("header", _header, [weights, corpus.safetensors(
            header={"__metadata__": {"a": "b"}, "x": {"data_offsets": [0, 4], "dtype": "F32",
                                                      "shape": [1]}}, tensors=[])]),
        "zstd": Target("zstd", _zstd, [len(weights).to_bytes(2, "little") + frames[0],
                                       len(corpus.BENIGN_PICKLE).to_bytes(2, "little")
                                       + frames[1]]),
        "signature": Target("signature", _signature, [corpus.read_member(
            signed, "signature.json")], [json.loads(corpus.read_member(
                signed, "signature.json"))]),
        "pickle": Target("pickle", _pickle, [corpus.BENIGN_PICKLE, corpus.canary_pickle()]),
        "config": Target("config", _config, [corpus._canonical(config),
                                             corpus._canonical(pickled_config)],
                         [config, pickled_config]),
        "archive": Target("archive", _archive, [signed, zst]),
    }
    committed = corpus.OUT / "archives"
    if committed.is_dir():  # the corpus's own archives are good starting points too
        out["archive"].seeds += [p.read_bytes() for p in sorted(committed.glob("*.hkz"))
                                 if p.stat().st_size < 64 << 10]  # fmt: skip
    return out


# --- mutation -----------------------------------------------------------------------------------

_INTERESTING: list[bytes] = [b"\x00", b"\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\x7f",
                b"PK\x01\x02", b"PK\x03\x04", b"PK\x05\x06", b"\x28\xb5\x2f\xfd", b"{", b"}",
                b"[", b"]", b'"', b",", b"\\u0000", b"NaN", b"1e999", b"-0", b"99999999999",
                b"__metadata__", b"\x80\x05", b"."]  # fmt: skip


#: One byte-level edit: (operation 0-7, position, value); positions wrap around the input.
Op = tuple[int, int, int]


def random_ops(rng: random.Random) -> list[Op]:
    return [(rng.randrange(8), rng.randrange(1 << 20), rng.randrange(1 << 16))
            for _ in range(rng.choice((1, 1, 1, 2, 3, 8)))]  # fmt: skip


def apply_ops(data: bytes, ops: list[Op]) -> bytes:
    """Apply AFL-style edits: overwrite, insert, delete, cut, flip, edge integers, repeat,
    splice. Deterministic in ``ops`` (so Hypothesis can draw and shrink them)."""
    out = bytearray(data)
    for op, position, value in ops:
        at = position % (len(out) + 1)
        if op == 0 and out:  # overwrite a byte
            out[min(at, len(out) - 1)] = value & 0xFF
        elif op == 1:  # insert interesting bytes
            out[at:at] = _INTERESTING[value % len(_INTERESTING)]
        elif op == 2 and out:  # delete a run
            del out[at : at + (1, 1, 2, 4, 16, 64)[value % 6]]
        elif op == 3:  # cut
            del out[at:]
        elif op == 4 and out:  # flip a bit
            out[min(at, len(out) - 1)] ^= 1 << (value % 8)
        elif op == 5 and out:  # overwrite a little-endian integer with an edge value
            width = (2, 4, 8)[value % 3]
            edge = (0, 1, 2 ** (8 * width) - 1, 2 ** (8 * width - 1), 1 << 15)[value // 3 % 5]
            out[at : at + width] = (edge % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == 6 and out:  # repeat a slice
            end = min(len(out), at + (1, 8, 64, 512)[value % 4])
            out[at:at] = out[at:end] * (2, 16, 256)[value // 4 % 3]
        elif op == 7 and out:  # splice in a slice from elsewhere
            start = value % len(out)
            out[at:at] = out[start : start + 1 + value % 64]
    return bytes(out[: 4 << 20])


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of ``data`` (see :func:`apply_ops`)."""
    return apply_ops(data, random_ops(rng))


_VALUES: list[Any] = [None, True, 0, -1, 2**64, 2**1000, 1.5, "", "x" * 300, "\u202e",
                      [], {}, [[[[]]]], {"": {}}, "F32", [1, 2], {"kind": "pickle"}]


def mutate_json(document: Any, choices: tuple[int, int, int]) -> bytes:
    """Replace, drop or add a value inside ``document`` (picked by ``choices``), encoded
    canonically (so that a canonical-bytes check passes and the deeper checks run)."""
    where, what, value = choices
    doc = json.loads(json.dumps(document))
    paths: list[list[Any]] = []

    def walk(item: Any, path: list[Any]) -> None:
        paths.append(path)
        if isinstance(item, dict):
            for key, inner in item.items():
                walk(inner, [*path, key])
        elif isinstance(item, list):
            for i, inner in enumerate(item[:8]):
                walk(inner, [*path, i])

    walk(doc, [])
    path = paths[where % len(paths)]
    new = _VALUES[value % len(_VALUES)]
    if not path:
        return corpus._canonical(new)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if what % 4 == 0 and isinstance(parent, dict):
        parent.pop(path[-1])
    elif what % 4 == 1 and isinstance(parent, dict):
        parent[("extra", "", "__proto__", f"{path[-1]}x")[value % 4]] = new
    else:
        parent[path[-1]] = new
    try:
        return corpus._canonical(doc)
    except ValueError:
        return json.dumps(doc).encode()


def rebuilt_archive(part: int, ops: list[Op], choices: tuple[int, int, int]) -> bytes:
    """A valid container whose one member is mutated (manifest digests kept consistent
    where they can be), so the checks past the container run too."""
    kind = part % 5
    if kind == 0:  # the manifest, as JSON
        document = corpus.Parts().manifest()
        return corpus.archive(manifest=mutate_json(document, choices), signer=None)
    if kind == 1:  # the safetensors file (digests recomputed from it)
        return corpus.archive(corpus.Parts(weights=apply_ops(corpus.safetensors(), ops)))
    if kind == 2:  # the pickle (a valid frame of mutated opcodes)
        return corpus.archive(corpus.with_pickle(apply_ops(corpus.BENIGN_PICKLE, ops)))
    if kind == 3:  # the zstd frame of the weights
        frame = apply_ops(corpus.zstd_frame(corpus.safetensors()), ops)
        return corpus.archive(corpus._zstd_parts(frame, len(corpus.safetensors())))
    signed = corpus.archive(signer=corpus.TRUSTED)  # the signature document
    signature = json.loads(corpus.read_member(signed, "signature.json"))
    return corpus.archive(manifest=corpus.read_member(signed, "manifest.json"),
                          signature=mutate_json(signature, choices))  # fmt: skip


def one_input(target: Target, rng: random.Random) -> bytes:
    choices = (rng.randrange(1 << 16), rng.randrange(4), rng.randrange(1 << 16))
    if target.name == "archive" and rng.random() < 0.5:
        return rebuilt_archive(rng.randrange(5), random_ops(rng), choices)
    if target.json_seeds and rng.random() < 0.3:
        return mutate_json(rng.choice(target.json_seeds), choices)
    return mutate(rng.choice(target.seeds), rng)


def run_one(target: Target, data: bytes, hang_seconds: float) -> None:
    """Run one input; record a failure (not an HkstoreError) or a hang."""
    start = time.perf_counter()
    try:
        target.call(data)
    except HkstoreError:
        target.refused += 1
    except Exception as exc:  # the finding: anything else escaped the parser
        target.failures.append((data, f"{type(exc).__name__}: {exc}"[:300]))
    elapsed = time.perf_counter() - start
    target.runs += 1
    target.slowest = max(target.slowest, elapsed)
    if elapsed > hang_seconds:
        target.hangs.append((data, elapsed))


def run_random(names: list[str], inputs: int, seed: int, hang_seconds: float) -> dict[str, Target]:
    """The mutation loop: ``inputs`` inputs spread evenly over ``names``."""
    found = targets()
    rng = random.Random(seed)
    chosen = [found[name] for name in names]
    for target in chosen:
        for data in target.seeds:  # the seeds themselves first
            run_one(target, data, hang_seconds)
    for i in range(inputs - sum(t.runs for t in chosen)):
        target = chosen[i % len(chosen)]
        run_one(target, one_input(target, rng), hang_seconds)
    return {t.name: t for t in chosen}


def run_atheris(name: str, inputs: int, hang_seconds: float, out: Path) -> None:
    """Coverage-guided fuzzing of one target with atheris (libFuzzer), seeds as its corpus.

    libFuzzer ends the process itself (it never returns), so the results are written to
    ``out`` as they go: every 1000 inputs and at the first finding.
    """
    import tempfile

    import atheris  # type: ignore[import-not-found]

    target = targets()[name]
    atheris.instrument_all()  # coverage of every loaded Python function guides libFuzzer

    def save() -> None:
        out.write_text(json.dumps({"engine": "atheris", "targets": report({name: target})}))

    def test_one(data: bytes) -> None:
        run_one(target, data, hang_seconds)
        if target.failures or target.hangs:
            save()
            raise RuntimeError("finding")  # stops libFuzzer; the details are saved above
        if target.runs % 100 == 0:
            save()

    seeds_dir = Path(tempfile.mkdtemp(prefix=f"hkstore-fuzz-{name}-"))
    for i, data in enumerate(target.seeds):
        (seeds_dir / f"seed{i}").write_bytes(data)
    save()
    atheris.Setup([sys.argv[0], f"-runs={inputs}", "-max_len=262144", str(seeds_dir)],
                  test_one)  # fmt: skip
    atheris.Fuzz()


def report(found: dict[str, Target]) -> dict[str, Any]:
    return {
        name: {
            "inputs": t.runs, "refused": t.refused, "failures": len(t.failures),
            "hangs": len(t.hangs), "slowest_s": round(t.slowest, 4),
            "first_failure": None if not t.failures else {
                "error": t.failures[0][1],
                "input_b64": base64.b64encode(t.failures[0][0][:4096]).decode()},
            "first_hang": None if not t.hangs else {
                "seconds": round(t.hangs[0][1], 3),
                "input_b64": base64.b64encode(t.hangs[0][0][:4096]).decode()},
        }
        for name, t in found.items()
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="inputs in all (default 100000)")
    p.add_argument("--target", action="append", default=None,
                   help="fuzz only this target (repeatable); default: every target")
    p.add_argument("--engine", choices=("random", "atheris"), default="random",
                   help="random: seeded mutations (the Hypothesis test's strategies, without "
                        "shrinking); atheris: coverage guided, one subprocess per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=5.0,
                   help="a call slower than this counts as a hang")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.target or list(targets())
    start = time.perf_counter()
    if args.engine == "random":
        found = run_random(names, args.inputs, args.seed, args.hang_seconds)
    elif args.atheris_child:
        run_atheris(names[0], args.inputs, args.hang_seconds, args.json)
        return 0  # not reached: libFuzzer exits the process
    else:
        found = _atheris_children(args, names)
    results = {"engine": args.engine, "seconds": round(time.perf_counter() - start, 1),
               "targets": report(found)}  # fmt: skip
    total = sum(t["inputs"] for t in results["targets"].values())
    bad = sum(t["failures"] + t["hangs"] for t in results["targets"].values())
    print(f"{args.engine}: {total} inputs in {results['seconds']} s; "
          f"{bad} failure(s) or hang(s)")
    for name, r in results["targets"].items():
        print(f"  {name:10} {r['inputs']:8} inputs  {r['refused']:8} refused  "
              f"{r['failures']} failures  {r['hangs']} hangs  slowest {r['slowest_s']} s")
        if r["first_failure"]:
            print(f"    first failure: {r['first_failure']['error']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if bad else 0


def _atheris_children(args: argparse.Namespace, names: list[str]) -> dict[str, Target]:
    """libFuzzer owns its process: one child per target, results read back as JSON."""
    import subprocess
    import tempfile

    out: dict[str, Target] = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--engine", "atheris", "--atheris-child",
                            "--target", name, "--inputs", str(args.inputs // len(names)),
                            "--hang-seconds", str(args.hang_seconds), "--json",
                            str(result_path)],
                           check=False, cwd=tmp, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                result = json.loads(result_path.read_text())["targets"][name]
            except (OSError, ValueError, KeyError):
                result = {"inputs": 0, "refused": 0, "failures": 1, "hangs": 0,
                          "slowest_s": 0.0, "first_failure": {"error": "the child died"}}
        target = Target(name, lambda data: None)
        target.runs, target.refused = result["inputs"], result["refused"]
        first = (result.get("first_failure") or {}).get("error", "")
        target.failures = [(b"", first)] * result["failures"]
        target.hangs = [(b"", 0.0)] * result["hangs"]
        target.slowest = result["slowest_s"]
        out[name] = target
    return out


if __name__ == "__main__":
    raise SystemExit(main())
