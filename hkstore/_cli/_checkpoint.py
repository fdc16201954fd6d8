"""``hkstore inspect DIR`` and ``hkstore verify DIR``: checkpoint directories, without jax.

A checkpoint directory (``docs/FORMAT.md`` section 13) is named on the command line as the
directory (every round, or one with ``--round N``) or as one round's folder
(``DIR/round-00000003``). ``inspect`` reads the round records only (and each archive's
manifest): round, time, size, metrics and which retention rule keeps each round. ``verify``
checks every round the way ``Checkpointer.restore()`` does: the record (schema, signature),
the model archive (its manifest digest, then every check of ``hkstore verify ARCHIVE``) and
the state (header and every tensor digest).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hkstore._cli._common import Progress, human_bytes
from hkstore._cli._status import ExitCode, UsageError, exit_code_for
from hkstore.errors import HkstoreError

if TYPE_CHECKING:
    from hkstore.store import ObjectRoundDirectory, Round, RoundDirectory, Trust

__all__ = [
    "INSPECT_FORMAT",
    "VERIFY_FORMAT",
    "CheckpointTarget",
    "inspect_checkpoint",
    "inspect_exit_code",
    "is_checkpoint_path",
    "render_inspect_checkpoint",
    "render_verify_checkpoint",
    "resolve_target",
    "verify_checkpoint",
]

INSPECT_FORMAT = "hkstore-inspect-checkpoint"
VERIFY_FORMAT = "hkstore-verify-checkpoint"
REPORT_VERSION = 1
CHECKS = ("record", "signature", "model", "state")


@dataclass(frozen=True)
class CheckpointTarget:
    """What the command line named: the directory and the rounds asked for (``None``: all)."""

    path: str
    directory: RoundDirectory | ObjectRoundDirectory
    rounds: list[int] | None


def is_checkpoint_path(path: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` names a folder (a checkpoint directory or one round of it), or, for an
    object-store URL, a prefix with objects under it and no object of its own."""
    from hkstore.store import is_url, local_path

    if is_url(path) and local_path(path) is None:
        from hkstore.errors import MissingDependencyError
        from hkstore.store import ObjectRoundDirectory

        try:
            prefix = ObjectRoundDirectory(path, storage_options)
            return not prefix.names_an_object() and prefix.exists()
        except MissingDependencyError as exc:
            raise UsageError(str(exc)) from None
    return os.path.isdir(local_path(path) or path)


def resolve_target(
    path: str, round_: int | None, storage_options: Mapping[str, Any] | None = None
) -> CheckpointTarget:
    """Turn ``DIR``, ``DIR --round N`` or ``DIR/round-N`` into a :class:`CheckpointTarget`.

    ``DIR`` may be an object-store prefix (``s3://bucket/runs/exp1``).

    Raises:
        UsageError: a round folder with ``--round``, a folder that is neither a checkpoint
            directory nor a round of one, or a ``--round`` the directory does not have.
    """
    from hkstore.store import (
        RECORD_MEMBER,
        RoundDirectory,
        is_url,
        local_path,
        parse_round_folder,
    )

    if is_url(path) and local_path(path) is None:
        return _resolve_remote(path, round_, storage_options)
    folder = Path(local_path(path) or path)
    number = parse_round_folder(folder.resolve().name)
    if number is not None and (folder / RECORD_MEMBER).exists():
        if round_ is not None and round_ != number:
            raise UsageError(f"{path}: is round {number}; --round {round_} names another")
        return CheckpointTarget(path, RoundDirectory(folder.resolve().parent), [number])
    return _whole(path, RoundDirectory(folder), round_, "is a folder, but neither a checkpoint "
                  "directory (no round-NNNNNNNN folders) nor an archive")


def _whole(path: str, directory: RoundDirectory | ObjectRoundDirectory, round_: int | None,
           not_one: str) -> CheckpointTarget:
    """The target for a whole directory (``--round`` picks one of its complete rounds)."""
    if not directory.rounds() and not directory.incomplete():
        raise UsageError(f"{path}: {not_one}")
    if round_ is not None:
        if round_ not in directory.rounds():
            listed = ", ".join(map(str, directory.rounds()[-10:])) or "none"
            raise UsageError(f"{path}: no complete round {round_} (complete: {listed})")
        return CheckpointTarget(path, directory, [round_])
    return CheckpointTarget(path, directory, None)


def _resolve_remote(
    url: str, round_: int | None, storage_options: Mapping[str, Any] | None
) -> CheckpointTarget:
    from hkstore.store import ObjectRoundDirectory, parse_round_folder

    head, _, leaf = url.rstrip("/").rpartition("/")
    number = parse_round_folder(leaf)
    if number is not None:
        parent = ObjectRoundDirectory(head, storage_options)
        if number in parent.rounds():
            if round_ is not None and round_ != number:
                raise UsageError(f"{url}: is round {number}; --round {round_} names another")
            return CheckpointTarget(url, parent, [number])
    return _whole(url, ObjectRoundDirectory(url, storage_options), round_,
                  "neither a checkpoint prefix (no round-NNNNNNNN/ objects) nor an archive")


# --- inspect ----------------------------------------------------------------------------------


def inspect_checkpoint(target: CheckpointTarget, trust: Trust | None) -> dict[str, Any]:
    """Build the ``hkstore-inspect-checkpoint`` v1 document (its schema is in ``schemas/``).

    Records are read, never the tensor data: sizes come from the files, tensor counts and
    bytes from the manifests and records. A round whose record or archive cannot be read is
    listed with its ``error``.
    """
    from hkstore.store import (
        Retention,
        open_round,
        round_folder_name,
        round_history,
    )

    directory = target.directory
    numbers = directory.rounds()
    opened: dict[int, Round] = {}
    errors: dict[int, str] = {}
    for number in numbers:  # every round: keep_best ranks them all
        try:
            opened[number] = open_round(directory, number)
        except HkstoreError as exc:
            errors[number] = f"{type(exc).__name__}: {exc}"
    rules = opened[max(opened)].record.retention if opened else Retention()
    reasons = rules.reasons({n: opened[n].record.metrics if n in opened else {}
                             for n in numbers})
    rows = []
    for number in numbers if target.rounds is None else target.rounds:
        if number in opened:
            rows.append(_round_row(opened[number], reasons.get(number, []), trust))
        else:
            rows.append({"round": number, "folder": round_folder_name(number), "time": None,
                         "size": None, "metrics": None, "kept_by": reasons.get(number, []),
                         "signature": None, "model": None, "state": None,
                         "error": errors.get(number, "not a complete round")})
    lock = directory.writer()
    return {
        "format": INSPECT_FORMAT,
        "version": REPORT_VERSION,
        "path": target.path,
        "directory": str(directory.path),
        "rounds": rows,
        "retention": rules.to_dict(),
        "history": [{"round": e.round, "time": e.time, "metrics": e.metrics}
                    for e in round_history(directory)] if target.rounds is None else None,
        "incomplete": directory.incomplete(),
        "writer": None if lock is None else {k: lock.get(k) for k in ("pid", "host", "since")},
    }


def _round_row(round_: Round, kept_by: list[str], trust: Trust | None) -> dict[str, Any]:
    record = round_.record
    row: dict[str, Any] = {
        "round": record.round,
        "folder": round_.name,
        "time": record.time,
        "size": round_.size(),
        "metrics": record.metrics,
        "kept_by": kept_by,
        "signature": _signature(round_, trust),
        "model": None,
        "state": None,
        "error": None,
    }
    try:
        with round_.open_model() as archive:
            manifest = archive.manifest
            row["model"] = {"tensors": len(manifest.tensors), "bytes": manifest.weights.size,
                            "trainable": len(manifest.trainable)}
    except HkstoreError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    if record.state is not None:
        row["state"] = {
            "tensors": len(record.state.tensors),
            "bytes": record.state.size,
            "structure": _summary(record.state.structure),
        }
    return row


def _signature(round_: Round, trust: Trust | None) -> dict[str, Any]:
    sig = round_.record.signature
    if sig is None:
        return {"state": "unsigned", "key_id": None}
    if trust is None or not trust.verifiers:
        return {"state": "unverified", "key_id": sig.key_id}
    try:
        round_.record.check_signature(trust)
    except HkstoreError as exc:
        return {"state": "failed", "key_id": sig.key_id, "error": str(exc)}
    return {"state": "verified", "key_id": sig.key_id}


def _summary(node: dict[str, Any], depth: int = 0) -> str:
    """A one-line sketch of a state tree: ``tuple(ScaleByAdamState(count, mu{4}, nu{4}), ...)``."""
    kind = node["type"]
    if kind == "tensor":
        return "array"
    if kind in ("json", "float"):
        return "scalar"
    if kind == "dict":
        return f"dict{{{len(node['keys'])}}}"
    if depth >= 3:
        return "..."
    name = kind if kind in ("list", "tuple") else node["class"].rpartition(":")[2]
    items = node["items"]
    inner = ", ".join(_summary(c, depth + 1) for c in items[:4])
    return f"{name}({inner}{', ...' if len(items) > 4 else ''})"


def render_inspect_checkpoint(report: dict[str, Any]) -> str:
    """Render the inspect report for a terminal: one line per round, then the directory."""
    rows = [("round", "time", "size", "kept by", "metrics")]
    for r in report["rounds"]:
        if r["time"] is None:
            rows.append((str(r["round"]), "-", "-", "-", f"UNREADABLE: {r['error']}"))
            continue
        kept = ", ".join(r["kept_by"]) or "(removed by the next save)"
        metrics = json.dumps(r["metrics"], ensure_ascii=False, separators=(", ", ": "))
        if r["error"]:
            metrics += f"  ERROR: {r['error']}"
        rows.append((str(r["round"]), r["time"].replace("T", " ")[:19], human_bytes(r["size"]),
                     kept, metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"checkpoint {report['directory']} ({len(report['rounds'])} round(s) listed)"]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths,
                                                                        strict=True))
                     + "  " + row[4])
    for r in report["rounds"]:
        if r["time"] is None:
            continue
        parts = []
        if r["model"] is not None:
            parts.append(f"model {r['model']['tensors']} tensors")
        if r["state"] is not None:
            parts.append(f"state {r['state']['tensors']} tensors, "
                         f"{human_bytes(r['state']['bytes'])}: {r['state']['structure']}")
        sig = r["signature"]
        parts.append("unsigned" if sig["state"] == "unsigned" else
                     f"signed by {sig['key_id']} ({sig['state']})")
        lines.append(f"  round {r['round']}: " + "; ".join(parts))
    rules = {k: v for k, v in report["retention"].items() if v is not None}
    lines.append(f"retention  {json.dumps(rules) if rules else 'keep every round'}")
    if report["history"] is not None:
        lines.append(f"history    {len(report['history'])} round(s) ever saved")
    if report["incomplete"]:
        lines.append(f"incomplete {', '.join(report['incomplete'])} (cleaned by the next writer)")
    writer = report["writer"]
    lines.append("writer     none" if writer is None else
                 f"writer     pid {writer['pid']} on {writer['host']} since {writer['since']}")
    return "\n".join(lines)


# --- verify -----------------------------------------------------------------------------------


def verify_checkpoint(
    target: CheckpointTarget, trust: Trust, *, workers: int | None = None
) -> tuple[dict[str, Any], int]:
    """Verify every round asked for (hashing on ``workers`` threads, ``None``: every usable
    core); return the ``hkstore-verify-checkpoint`` v1 document and the exit status (0 all
    verified, 1 a round failed a check, 2 only for a round of a newer format)."""
    directory = target.directory
    numbers = directory.rounds() if target.rounds is None else target.rounds
    rounds = [_verify_round(directory, n, trust, workers) for n in numbers]
    incomplete = directory.incomplete() if target.rounds is None else []
    codes = {r.pop("exit_code") for r in rounds}
    if ExitCode.CHECK_FAILED in codes or not numbers:
        code = ExitCode.CHECK_FAILED
    else:  # 2 only when every failure is a round this reader cannot judge (a newer version)
        code = ExitCode.USAGE if ExitCode.USAGE in codes else ExitCode.OK
    report = {
        "format": VERIFY_FORMAT,
        "version": REPORT_VERSION,
        "path": target.path,
        "directory": str(directory.path),
        "ok": code == ExitCode.OK,
        "rounds": rounds,
        "incomplete": incomplete,
    }
    return report, int(code)


def _verify_round(
    directory: RoundDirectory | ObjectRoundDirectory, number: int, trust: Trust,
    workers: int | None,
) -> dict[str, Any]:
    from hkstore.store import open_round, round_folder_name

    checks: list[dict[str, str]] = []
    result: dict[str, Any] = {"round": number, "folder": round_folder_name(number), "ok": False,
                              "checks": checks, "failed": None, "exit_code": ExitCode.OK}
    step = "record"
    try:
        found = open_round(directory, number)
        record = found.record
        checks.append({"name": "record", "status": "ok",
                       "detail": f"round.json canonical, schema valid, {record.time}"})
        step = "signature"
        key_id = record.check_signature(trust)
        checks.append({"name": "signature", "status": "ok", "detail": _signed(record, key_id)})
        step = "model"
        with found.open_model(workers=workers) as archive:
            archive.check_signature(trust)
            total = sum(e.nbytes for e in archive.tensor_entries().values())
            progress = Progress(f"round {number}: model", total)
            try:
                archive.check_digests(progress=progress.advance)
            finally:
                progress.close()
            if archive.manifest.pickle is not None:
                archive.pickle_globals()
            checks.append({"name": "model", "status": "ok",
                           "detail": f"model.hkz: manifest matches the record; "
                                     f"{len(archive.manifest.tensors)} tensors, "
                                     f"{human_bytes(total)}, digests match"})
        step = "state"
        if record.state is None:
            checks.append({"name": "state", "status": "ok", "detail": "no state"})
        else:
            progress = Progress(f"round {number}: state", record.state.size)
            try:
                checked = found.check_state(progress=progress.advance, workers=workers)
            finally:
                progress.close()
            checks.append({"name": "state", "status": "ok",
                           "detail": f"state.safetensors: {len(record.state.tensors)} tensors, "
                                     f"{human_bytes(checked)}, sha256 match"})
    except (HkstoreError, OSError) as exc:
        checks.append({"name": step, "status": "failed", "detail": str(exc)})
        for rest in CHECKS[CHECKS.index(step) + 1 :]:
            checks.append({"name": rest, "status": "not run", "detail": ""})
        result["failed"] = {"check": step, "error": type(exc).__name__, "message": str(exc)}
        code = exit_code_for(exc)
        result["exit_code"] = code if code == ExitCode.USAGE else ExitCode.CHECK_FAILED
        return result
    result["ok"] = True
    return result


def _signed(record: Any, key_id: str | None) -> str:
    if record.signature is None:
        return "unsigned"
    if key_id is None:
        return f"signed by {record.signature.key_id}; not verified (no --key given)"
    return f"verified with {key_id}"


def render_verify_checkpoint(report: dict[str, Any]) -> str:
    """Render the verify report: each round's checks, then one verdict per round."""
    lines = []
    for r in report["rounds"]:
        lines.append(f"round {r['round']} ({r['folder']})")
        for check in r["checks"]:
            status = {"ok": "ok", "failed": "FAILED", "not run": "-"}[check["status"]]
            detail = check["detail"].replace("\n", "\n" + " " * 20)
            lines.append(f"  {check['name']:<10} {status:<7} {detail}".rstrip())
    for name in report["incomplete"]:
        lines.append(f"incomplete {name} (not a round; cleaned by the next writer)")
    failed = [r for r in report["rounds"] if not r["ok"]]
    verdict = ("OK" if report["ok"] else
               "FAILED (" + ", ".join(f"round {r['round']}: {r['failed']['check']}"
                                      for r in failed) + ")" if failed else
               "FAILED (no complete round)")
    lines.append(f"{report['path']}: {len(report['rounds'])} round(s), {verdict}")
    return "\n".join(lines)


def inspect_exit_code(report: dict[str, Any]) -> int:
    """1 when a listed round is unreadable or its signature fails with the given keys, else 0."""
    for row in report["rounds"]:
        if row["error"] is not None or (row["signature"] or {}).get("state") == "failed":
            return int(ExitCode.CHECK_FAILED)
    return int(ExitCode.OK)
