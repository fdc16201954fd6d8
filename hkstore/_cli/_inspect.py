"""``hkstore inspect``: what an archive holds, checked exactly as ``verify`` checks it.

Sizes come from dtypes and shapes. The archive goes through the same checks as ``verify``
(:func:`~hkstore._cli._verify.run_checks`), and the report carries that verdict, so the two
verbs never disagree about an archive; ``--headers-only`` skips reading the tensor data (and
says so). The function pickle, when there is one, is decompressed (bounded) and its opcodes
walked to list the globals it would import; it is never unpickled. Its SHA-256 is shown: the
digest a receiver who reviewed the blob approves it by (``--approve``, ``Trust(approved=)``).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from hkstore._cli._common import human_bytes
from hkstore._cli._status import check_name
from hkstore.errors import HkstoreError

if TYPE_CHECKING:
    from hkstore._cli._verify import VerifyOutcome
    from hkstore.store import Archive, FunctionSpec, Trust

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "element_bytes",
    "inspect_report",
    "render_inspect",
]

REPORT_FORMAT = "hkstore-inspect"
REPORT_VERSION = 1


def inspect_report(
    archive: Archive, path: str, trust: Trust | None = None, outcome: VerifyOutcome | None = None
) -> dict[str, Any]:
    """Build the ``hkstore-inspect`` v1 document (``schemas/cli-inspect.v1.json``).

    Never raises for a damaged archive: what cannot be read is reported as such, and
    ``verdict`` carries the outcome of the checks.

    Args:
        archive: the open archive (container and manifest checked).
        path: the archive's path as given on the command line.
        trust: keys to verify the signature with; ``None`` reports it unverified.
        outcome: the checks' outcome (:func:`~hkstore._cli._verify.run_checks`).

    Returns:
        The report (JSON-safe).
    """
    m = archive.manifest
    trainable = set(m.trainable)
    tensors = []
    for t in m.tensors:
        count = math.prod(t.shape)
        tensors.append({
            "name": t.name, "dtype": t.dtype, "shape": list(t.shape), "elements": count,
            "bytes": count * element_bytes(t.dtype), "trainable": t.name in trainable,
        })
    picked = [t for t in tensors if t["trainable"]]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "path": path,
        "file_size": archive.size,
        "format_version": m.format_version,
        "writer": dict(m.writer.to_dict()),
        "members": [{"name": n, "size": i.size} for n, i in archive.members.items()],
        "data_info": dict(m.data_info),
        "seed": m.seed,
        "weights": {
            "member": m.weights.member,
            "compression": m.weights.compression,
            "size": m.weights.size,
        },
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "elements": sum(t["elements"] for t in tensors),
            "bytes": sum(t["bytes"] for t in tensors),
            "trainable_tensors": len(picked),
            "trainable_elements": sum(t["elements"] for t in picked),
            "trainable_bytes": sum(t["bytes"] for t in picked),
        },
        "functions": {role: _function(spec) for role, spec in m.functions.items()},
        "pickle": _pickle(archive),
        "metadata": dict(m.metadata),
        "signature": signature_state(archive, trust),
        "verdict": _verdict(outcome),
    }


def _verdict(outcome: VerifyOutcome | None) -> dict[str, Any]:
    if outcome is None:
        return {"ok": None, "checks": [], "failed": None}
    return {"ok": outcome.failed is None, "checks": outcome.checks, "failed": outcome.failed}


def element_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code, read from the code itself.

    Every code names its bit width (``F32``, ``BF16``, ``F8_E4M3``; ``BOOL`` is one byte), so
    ``inspect`` needs no numpy (~90 ms of start-up). ``tests/test_cli.py`` checks this against
    the dtype table (the store's dtype table) for every code.
    """
    if code == "BOOL":
        return 1
    width = code.split("_", 1)[0].lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return int(width) // 8


def _function(spec: FunctionSpec) -> dict[str, Any]:
    if spec.kind == "reference":
        return {"kind": "reference", "ref": spec.ref, "kwargs": dict(spec.kwargs)}
    return {"kind": spec.kind}


def _pickle(archive: Archive) -> dict[str, Any] | None:
    record = archive.manifest.pickle
    if record is None:
        return None
    try:
        found: list[str] | None = archive.check_pickle()
        error = None
    except HkstoreError as exc:
        found, error = None, str(exc)
    out: dict[str, Any] = {
        "member": record.member,
        "size": record.size,
        "raw_size": record.raw_size,
        "sha256": record.sha256,
        "checked": error is None,
        "python": record.python,
        "python_implementation": record.python_implementation,
        "cloudpickle": record.cloudpickle,
        "globals": found,
    }
    if error is not None:
        out["error"] = error
    return out


def signature_state(archive: Archive, trust: Trust | None) -> dict[str, Any]:
    """Say whether the archive is signed, by which key id, and whether that was verified.

    ``state`` is ``"unsigned"``, ``"unverified"`` (signed; no key given), ``"verified"``
    or ``"failed"`` (keys given and the signature does not verify with any of them; ``error``
    says why).
    """
    key_id = archive.signature_key_id
    if key_id is None:
        return {"state": "unsigned", "key_id": None}
    if trust is None or not trust.verifiers:
        return {"state": "unverified", "key_id": key_id}
    try:
        archive.check_signature(trust)
    except HkstoreError as exc:
        return {"state": "failed", "key_id": key_id, "error": str(exc), "check": check_name(exc)}
    return {"state": "verified", "key_id": key_id}


# --- text -------------------------------------------------------------------------------------


def render_inspect(report: dict[str, Any]) -> str:
    """Render the report for a terminal: a summary block, the tensor table, functions, signature."""
    w = report["writer"]
    versions = ", ".join(
        [f"hkstore {w['hkstore']}", f"python {w['python']} ({w['python_implementation']})"]
        + [f"{k} {w[k]}" for k in ("numpy", "jax", "haiku", "cloudpickle") if k in w]
    )
    weights = report["weights"]
    totals = report["totals"]
    lines = [
        f"archive    {report['path']} ({human_bytes(report['file_size'])}, "
        f"hkstore format {report['format_version']})",
        f"writer     {versions}",
        f"data info  {_compact(report['data_info'])}",
        f"seed       {'none' if report['seed'] is None else report['seed']}",
        f"weights    {weights['member']}, "
        + ("zstd-compressed" if weights["compression"] else "uncompressed")
        + f", {human_bytes(weights['size'])}",
        f"tensors    {totals['tensors']} ({totals['trainable_tensors']} trainable), "
        f"{totals['elements']:,} parameters ({totals['trainable_elements']:,} trainable), "
        f"{human_bytes(totals['bytes'])}",
        "",
        *_table(report["tensors"], totals),
        "",
    ]
    for role, spec in report["functions"].items():
        head = "functions " if role == "model" else "          "
        lines.append(f"{head} {role + ':':6} {_describe_function(spec)}")
    lines.extend(_describe_pickle(report["pickle"]))
    lines.append(f"metadata   {_compact(report['metadata'])}")
    lines.append(f"signature  {_describe_signature(report['signature'])}")
    lines.append(f"verdict    {_describe_verdict(report['verdict'])}")
    return "\n".join(lines)


def _describe_verdict(verdict: dict[str, Any]) -> str:
    if verdict["ok"] is None:
        return "not checked"
    skipped = [c["name"] for c in verdict["checks"] if c["status"] == "not run"]
    if verdict["ok"]:
        text = "OK: every check passed"
        return text + (f" (not run: {', '.join(skipped)})" if skipped else "")
    failed = verdict["failed"]
    return f"FAILED ({failed['check']}): {failed['message']}"


def _table(tensors: list[dict[str, Any]], totals: dict[str, Any]) -> list[str]:
    rows = [("name", "dtype", "shape", "bytes", "trainable")]
    for t in tensors:
        shape = "(" + ", ".join(map(str, t["shape"])) + ("," if len(t["shape"]) == 1 else "") + ")"
        rows.append((t["name"], t["dtype"], shape, f"{t['bytes']:,}",
                     "yes" if t["trainable"] else "no"))
    rows.append(("total", "", "", f"{totals['bytes']:,}", f"{totals['trainable_tensors']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = []
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            out.append("  " + "  ".join("-" * w for w in widths))
        out.append("  " + "  ".join([
            row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
            row[3].rjust(widths[3]), row[4],
        ]).rstrip())
    return out


def _describe_function(spec: dict[str, Any]) -> str:
    if spec["kind"] == "reference":
        kwargs = f" {_compact(spec['kwargs'])}" if spec["kwargs"] else ""
        return f"reference {spec['ref']}{kwargs}"
    if spec["kind"] == "pickle":
        return "pickled (in functions.pkl.zst)"
    return "none (the loader supplies it)"


def _describe_pickle(pickle: dict[str, Any] | None) -> list[str]:
    if pickle is None:
        return ["pickle     none"]
    lines = [
        f"pickle     {pickle['member']}, {human_bytes(pickle['size'])} "
        f"({human_bytes(pickle['raw_size'])} raw), written by python {pickle['python']} "
        f"({pickle['python_implementation']}), cloudpickle {pickle['cloudpickle']}",
        f"           sha256 {pickle['sha256']}"
        + (" (approve a reviewed blob with --approve / Trust(approved=[...]))"
           if pickle["checked"] else " (NOT checked: see the verdict)"),
    ]
    if pickle["globals"] is None:
        lines.append(f"           cannot list its globals: {pickle['error']}")
        return lines
    lines.append(f"           would import {len(pickle['globals'])} global(s) "
                 "(read from the opcodes, not executed):")
    lines.extend(f"             {name}" for name in pickle["globals"])
    return lines


def _describe_signature(sig: dict[str, Any]) -> str:
    state = sig["state"]
    if state == "unsigned":
        return "unsigned"
    if state == "unverified":
        return f"signed by {sig['key_id']} (not verified: pass --key to check it)"
    if state == "verified":
        return f"signed by {sig['key_id']}, verified"
    return f"signed by {sig['key_id']}, FAILED: {sig['error']}"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
