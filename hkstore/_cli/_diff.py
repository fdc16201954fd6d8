"""``hkstore diff``: what changed between two archives, tensor by tensor (e.g. two rounds).

Tensors whose dtype, shape and SHA-256 digest are equal are reported equal without reading
their data. Others are read (digest-checked) and compared in float64 (complex128 for complex
tensors), chunk by chunk: L2 norm of the difference, that norm relative to A's norm, and the
largest absolute difference. Values that are not finite (NaN, infinities) are reported as JSON
``null`` with ``non_finite: true``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from hkstore.store import Archive, TensorRecord

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "diff_report", "render_diff", "tensor_stats"]

REPORT_FORMAT = "hkstore-diff"
REPORT_VERSION = 1
_CHUNK = 1 << 20  # elements per float64 chunk (8 MiB)


def diff_report(a: Archive, b: Archive, path_a: str, path_b: str) -> dict[str, Any]:
    """Build the ``hkstore-diff`` v1 document (``schemas/cli-diff.v1.json``).

    Raises:
        DigestMismatchError: a tensor that had to be read does not match its digest.
        ArchiveFormatError: either weights member is malformed.
    """
    ta = {t.name: t for t in a.manifest.tensors}
    tb = {t.name: t for t in b.manifest.tensors}
    names = list(ta) + [n for n in tb if n not in ta]
    tensors = [_compare(name, ta.get(name), tb.get(name), a, b) for name in names]
    common = [n for n in ta if n in tb]
    mask_a, mask_b = set(a.manifest.trainable), set(b.manifest.trainable)
    summary = {s: 0 for s in ("equal", "changed", "shape_changed", "dtype_changed",
                              "only_in_a", "only_in_b")}
    for t in tensors:
        summary[t["status"]] += 1
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "a": {"path": path_a, "tensors": len(ta)},
        "b": {"path": path_b, "tensors": len(tb)},
        "tensors": tensors,
        "trainable": {
            "added": [n for n in common if n in mask_b and n not in mask_a],
            "removed": [n for n in common if n in mask_a and n not in mask_b],
        },
        "data_info": _mapping_changes(a.manifest.data_info, b.manifest.data_info),
        "functions": _mapping_changes(a.manifest.functions.to_dict(),
                                      b.manifest.functions.to_dict()),
        "metadata": _mapping_changes(a.manifest.metadata, b.manifest.metadata),
        "summary": summary,
    }


def _side(t: TensorRecord | None) -> dict[str, Any] | None:
    return None if t is None else {"dtype": t.dtype, "shape": list(t.shape)}


def _compare(name: str, ra: TensorRecord | None, rb: TensorRecord | None,
             a: Archive, b: Archive) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "status": "", "a": _side(ra), "b": _side(rb),
                           "read": False, "l2": None, "relative": None, "max_abs": None,
                           "non_finite": False}
    if ra is None or rb is None:
        out["status"] = "only_in_b" if ra is None else "only_in_a"
        return out
    if ra.shape != rb.shape:
        out["status"] = "shape_changed"
        return out
    same_hash = ra.algorithm == rb.algorithm
    if ra.dtype == rb.dtype and same_hash and ra.digest == rb.digest:
        out.update(status="equal", l2=0.0, relative=0.0, max_abs=0.0)
        return out
    xa, xb = a.tensor(name), b.tensor(name)
    out["read"] = True
    if ra.dtype == rb.dtype and not same_hash and xa.tobytes() == xb.tobytes():
        # digests of two algorithms cannot be compared: the bytes were
        out.update(status="equal", l2=0.0, relative=0.0, max_abs=0.0)
        return out
    stats = tensor_stats(xa, xb)
    out["status"] = "changed" if ra.dtype == rb.dtype else "dtype_changed"
    out["non_finite"] = not all(math.isfinite(v) for v in stats.values())
    out.update({k: (v if math.isfinite(v) else None) for k, v in stats.items()})
    return out


def tensor_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Compare two same-shape tensors in float64 (complex128), chunk by chunk.

    Returns:
        ``{"l2": ||y - x||, "relative": ||y - x|| / ||x||, "max_abs": max |y - x|}``;
        ``relative`` is ``inf`` when ``x`` is all zeros and ``y`` is not (0 when both are).
    """
    import numpy as np

    wide = np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(y) else np.float64
    xf, yf = x.reshape(-1), y.reshape(-1)
    sq_diff = sq_ref = 0.0
    peaks = [0.0]
    for start in range(0, xf.size, _CHUNK):
        xa = xf[start : start + _CHUNK].astype(wide)
        d = yf[start : start + _CHUNK].astype(wide) - xa
        mag = np.abs(d)
        sq_diff += float(np.dot(mag, mag))
        sq_ref += float(np.vdot(xa, xa).real)
        peaks.append(float(mag.max()))
    l2 = math.sqrt(sq_diff)
    ref = math.sqrt(sq_ref)
    if ref > 0 or math.isnan(ref):
        relative = l2 / ref
    else:
        relative = 0.0 if l2 == 0 else math.inf
    peak = math.nan if any(math.isnan(p) for p in peaks) else max(peaks)
    return {"l2": l2, "relative": relative, "max_abs": peak}


def _mapping_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-level key changes between two JSON objects, in A's key order then B's."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        if key not in b:
            out.append({"key": key, "change": "removed", "a": a[key], "b": None})
        elif key not in a:
            out.append({"key": key, "change": "added", "a": None, "b": b[key]})
        elif a[key] != b[key] or type(a[key]) is not type(b[key]):
            out.append({"key": key, "change": "changed", "a": a[key], "b": b[key]})
    return out


# --- text -------------------------------------------------------------------------------------


def render_diff(report: dict[str, Any]) -> str:
    """Render the report for a terminal."""
    lines = [
        f"a  {report['a']['path']} ({report['a']['tensors']} tensors)",
        f"b  {report['b']['path']} ({report['b']['tensors']} tensors)",
        "",
    ]
    rows = [("name", "change", "a", "b", "l2", "relative", "max abs")]
    for t in report["tensors"]:
        rows.append((t["name"], *_describe_tensor(t)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     .rstrip())
    mask = report["trainable"]
    changes = [f"+{n}" for n in mask["added"]] + [f"-{n}" for n in mask["removed"]]
    lines += ["", f"trainable  {', '.join(changes) if changes else 'unchanged'}"]
    for key, label in (("data_info", "data info"), ("functions", "functions"),
                       ("metadata", "metadata")):
        lines.append(f"{label:<10} {_describe_changes(report[key])}")
    s = report["summary"]
    lines.append(
        f"summary    {s['equal']} equal, {s['changed']} changed, {s['shape_changed']} reshaped, "
        f"{s['dtype_changed']} retyped, {s['only_in_a']} only in a, {s['only_in_b']} only in b"
    )
    return "\n".join(lines)


def _describe_tensor(t: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    labels = {"equal": "equal", "changed": "changed", "shape_changed": "reshaped",
              "dtype_changed": "retyped", "only_in_a": "only in a", "only_in_b": "only in b"}
    a, b = ("-" if s is None else f"{s['dtype']} {_shape(s['shape'])}" for s in (t["a"], t["b"]))
    if t["status"] in ("shape_changed", "only_in_a", "only_in_b"):
        return (labels[t["status"]], a, b, "", "", "")
    flag = t["non_finite"]
    return (labels[t["status"]], a, b, _number(t["l2"], flag), _number(t["relative"], flag),
            _number(t["max_abs"], flag))


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _number(value: float | None, non_finite: bool) -> str:
    if value is None:
        return "nan/inf" if non_finite else "-"
    return f"{value:.4g}"


def _describe_changes(changes: list[dict[str, Any]]) -> str:
    if not changes:
        return "unchanged"
    parts = []
    for c in changes:
        if c["change"] == "added":
            parts.append(f"{c['key']}: (none) -> {_compact(c['b'])}")
        elif c["change"] == "removed":
            parts.append(f"{c['key']}: {_compact(c['a'])} -> (none)")
        else:
            parts.append(f"{c['key']}: {_compact(c['a'])} -> {_compact(c['b'])}")
    return "; ".join(parts)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
