"""The documents of a checkpoint directory: the round record and the history entry.

``round.json`` (schema ``schemas/checkpoint-round.v1.json``) is written last in a round's
folder: round number, time, metrics, the retention rules in force, the model archive's size
and manifest digest, the state's tensors (name, dtype, shape, SHA-256) and structure, and an
optional signature covering the record. ``history/NNNNNNNN.json`` (schema
``checkpoint-history.v1.json``) keeps a round's number, time and metrics after retention has
removed the round. Both are canonical JSON; readers refuse anything else, every error naming
the file and the JSON path at fault (:class:`~hkstore.errors.CheckpointFormatError`).

The state's structure is a tree of nodes tagged by ``type`` (``tensor``, ``json``,
``float``, ``dict``, ``list``, ``tuple``, ``namedtuple``, ``custom``; FORMAT.md 13.4). This
module checks it without jax: every tensor node names a listed tensor and every tensor is
named exactly once.

Example:
    >>> data = build_history(3, "2026-11-29T13:45:00.000000Z", {"loss": 0.5})
    >>> parse_history(data, where="history/00000003.json").metrics
    {'loss': 0.5}
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hkstore.errors import (
    CheckpointFormatError,
    LimitExceededError,
    UnsupportedVersionError,
)
from hkstore.store._canonical import (
    canonical_json,
    encode_parsed,
    json_path,
    parse_json_strict,
)
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._manifest import tensor_list_problems
from hkstore.store._records import Document, TensorRecord
from hkstore.store._retention import Retention
from hkstore.store._round_dir import MODEL_MEMBER, STATE_MEMBER
from hkstore.store._schema import raise_problems, schema_problems, validate
from hkstore.store._signing import ALGORITHMS, DocumentSignature, Signer, verify_with
from hkstore.store._trust import Trust

__all__ = [
    "HISTORY_FORMAT",
    "HISTORY_SCHEMA",
    "NODE_TYPES",
    "ROUND_FORMAT",
    "ROUND_SCHEMA",
    "ROUND_SIGNATURE_CONTEXT",
    "ROUND_VERSION",
    "HistoryEntry",
    "ModelRecord",
    "RoundRecord",
    "StateRecord",
    "build_history",
    "build_record",
    "now_iso",
    "parse_history",
    "parse_record",
]

ROUND_FORMAT = "hkstore-checkpoint-round"
HISTORY_FORMAT = "hkstore-checkpoint-history"
ROUND_VERSION = 1
ROUND_SCHEMA = "checkpoint-round.v1.json"
HISTORY_SCHEMA = "checkpoint-history.v1.json"
#: Prefix of a record's signed payload (domain separation from manifests and configs).
ROUND_SIGNATURE_CONTEXT = b"hkstore-checkpoint-round-signature-v1\n"
NODE_TYPES = ("tensor", "json", "float", "dict", "list", "tuple", "namedtuple", "custom")
_PLACEHOLDER = {"type": "json", "value": None}
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


def now_iso() -> str:
    """The current UTC time as the records write it: ``2026-11-29T13:45:00.123456Z``."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ModelRecord:
    """``$.model``: the archive's size and the SHA-256 of its ``manifest.json`` bytes."""

    member: str
    size: int
    manifest_sha256: str


@dataclass(frozen=True)
class StateRecord:
    """``$.state``: the state file's size, header digest, tensors and the tree's structure."""

    member: str
    size: int
    header_sha256: str
    tensors: tuple[TensorRecord, ...]
    structure: dict[str, Any]

    @property
    def digests(self) -> dict[str, str]:
        """``{tensor name: sha256}``."""
        return {t.name: t.digest for t in self.tensors}


@dataclass(frozen=True)
class RoundRecord:
    """A parsed, checked ``round.json`` (nothing verified against the other files yet).

    Attributes:
        round: the round number.
        time: when it was written (UTC, ISO 8601).
        metrics: the caller's metrics.
        model: the archive's record.
        state: the state's record, or ``None``.
        retention: the rules the writer applied.
        signature: the signature, or ``None``.
        where: names the record in messages (its path).
        payload: the exact bytes a signature covers (context prefix included).
    """

    round: int
    time: str
    metrics: dict[str, Any]
    model: ModelRecord
    state: StateRecord | None
    retention: Retention
    signature: DocumentSignature | None
    where: str
    payload: bytes

    def check_signature(self, trust: Trust) -> str | None:
        """Verify the signature with ``trust``'s keys; return the verifying key id or ``None``.

        ``None``: unsigned, or signed while ``trust`` lists no keys and requires no signature.

        Raises:
            SignatureError: a signature is required but absent, or it does not verify.
            UntrustedKeyError: ``trust`` has keys and none of them made the signature.
        """
        if not trust.wants_signature_checked(self.signature is not None,
                                             what=f"{self.where}: the round"):
            return None
        assert self.signature is not None
        return verify_with(
            trust.verifiers,
            key_id=self.signature.key_id,
            algorithm=self.signature.algorithm,
            payload=self.payload,
            signature=self.signature.signature,
            where=self.where,
            signed="the round record",
            content="record",
        )


@dataclass(frozen=True)
class HistoryEntry:
    """One history document: a round that was saved, when, with which metrics."""

    round: int
    time: str
    metrics: dict[str, Any]


# --- writing ----------------------------------------------------------------------------------


def build_record(
    *,
    round_: int,
    time: str,
    metrics: Mapping[str, Any],
    model_size: int,
    manifest_sha256: str,
    state: Mapping[str, Any] | None,
    retention: Retention,
    signer: Signer | None = None,
    where: str = "round.json",
) -> tuple[bytes, RoundRecord]:
    """Return the canonical bytes of a round record (signed when ``signer`` is given), and
    the record as a reader parses it.

    Args:
        round_: the round number.
        time: :func:`now_iso`.
        metrics: JSON-safe metrics.
        model_size: the archive's size in bytes.
        manifest_sha256: SHA-256 of the archive's ``manifest.json`` bytes.
        state: ``{"size", "header_sha256", "tensors": [TensorJSON...], "structure"}`` or
            ``None``.
        retention: the rules in force.
        signer: an Ed25519 or HMAC key.
        where: names the record in the parsed record's messages (its final path).

    Raises:
        CheckpointFormatError: the parts do not make a valid record (it is parsed back).
        ManifestError: a value is not JSON (NaN in the metrics...), naming its path.
    """
    record: dict[str, Any] = {
        "format": ROUND_FORMAT,
        "version": ROUND_VERSION,
        "round": round_,
        "time": time,
        "metrics": dict(metrics),
        "model": {"member": MODEL_MEMBER, "size": model_size, "manifest_sha256": manifest_sha256},
        "state": None if state is None else {"member": STATE_MEMBER, **state},
        "retention": retention.to_dict(),
        "signature": None,
    }
    unsigned = canonical_json(record, what="round.json")
    if signer is not None:
        record["signature"] = {
            "algorithm": signer.algorithm,
            "key_id": signer.key_id,
            "signature": base64.b64encode(
                signer.sign(ROUND_SIGNATURE_CONTEXT + unsigned)
            ).decode("ascii"),
        }
    data = canonical_json(record, what="round.json")
    return data, parse_record(data, where=where, expected_round=round_)  # we can read it


def build_history(round_: int, time: str, metrics: Mapping[str, Any]) -> bytes:
    """Return the canonical bytes of a history entry."""
    document = {"format": HISTORY_FORMAT, "version": ROUND_VERSION, "round": round_,
                "time": time, "metrics": dict(metrics)}
    return canonical_json(document, what="history entry")


# --- reading ----------------------------------------------------------------------------------


def _parse_document(
    data: bytes,
    *,
    what: str,
    fmt: str,
    schema: str,
    max_bytes: int,
    max_values: int = DEFAULT_LIMITS.max_json_values,
) -> tuple[dict[str, Any], tuple[TensorRecord, ...] | None]:
    """Strict JSON, then format and version (before anything else), canonical bytes, schema.

    Returns:
        The document, and the records of ``$.state.tensors`` (``None`` when it has none).
    """
    document = parse_json_strict(data, what=what, max_bytes=max_bytes,
                                 error=CheckpointFormatError, max_values=max_values)
    if document.get("format") != fmt:
        raise CheckpointFormatError(
            f"{what}: $.format is {str(document.get('format'))[:60]!r}; expected {fmt!r}"
        )
    version = document.get("version")
    if version != ROUND_VERSION:
        if type(version) is int:
            raise UnsupportedVersionError(
                f"{what}: version {version} is not supported (this reader implements "
                f"{ROUND_VERSION})"
            )
        raise CheckpointFormatError(f"{what}: $.version is {str(version)[:40]!r}; expected 1")
    if encode_parsed(document, what=what, error=CheckpointFormatError) != bytes(data):
        raise CheckpointFormatError(
            f"{what}: not canonical JSON (sorted keys, no whitespace, shortest number forms)"
        )
    state = document.get("state")
    if not isinstance(state, dict):
        validate(document, schema=schema, what=what, error=CheckpointFormatError)
        return document, None
    # The state's tree is checked node by node by _check_node (same rules as the schema's
    # $defs/node): through jsonschema's if/then it cost ~0.3 ms per node, seconds for the
    # optimizer state of a model with a few thousand tensors. Its tensor list is checked in
    # one pass by tensor_list_problems (jsonschema: ~100 us an entry, 11 s for 100,000).
    skeleton_state = dict(state)
    if "structure" in state:
        skeleton_state["structure"] = _PLACEHOLDER
    if isinstance(state.get("tensors"), list):
        skeleton_state["tensors"] = []
    problems = schema_problems({**document, "state": skeleton_state}, schema=schema)
    records, tensor_problems = tensor_list_problems(
        state.get("tensors"), ["state", "tensors"], algorithms=("sha256",)
    )
    raise_problems(problems + tensor_problems, what=what, error=CheckpointFormatError)
    return document, records


def parse_record(
    data: bytes,
    *,
    where: str,
    expected_round: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> RoundRecord:
    """Check every field of an untrusted ``round.json``.

    Order: size, strict JSON, format and version, canonical bytes, schema, then the rules
    JSON Schema cannot express: the round matches its folder, time, tensor names unique, the
    structure references every tensor exactly once, dict keys unique, keys as many as items,
    the signature's length. A malformed signature is refused here, keys or not.

    Args:
        data: the file's bytes.
        where: names the record in messages (e.g. its path).
        expected_round: the round its folder name says (``None``: not checked).
        limits: ``max_manifest_bytes`` bounds the record, ``max_tensors`` its tensors.

    Returns:
        The :class:`RoundRecord`.

    Raises:
        CheckpointFormatError: naming the field at fault.
        UnsupportedVersionError: another record version.
        LimitExceededError: the record or its tensor list is larger than ``limits`` allow.
    """
    d, tensors = _parse_document(data, what=where, fmt=ROUND_FORMAT, schema=ROUND_SCHEMA,
                                 max_bytes=limits.max_manifest_bytes,
                                 max_values=limits.max_json_values)
    problems: list[str] = []
    if expected_round is not None and d["round"] != expected_round:
        problems.append(f"$.round is {d['round']}, but the folder is round {expected_round}")
    if not _TIME_RE.fullmatch(d["time"]):
        problems.append(f"$.time {d['time'][:40]!r} is not UTC ISO 8601 with microseconds")
    state = None
    if d["state"] is not None:
        state = _parse_state(d["state"], tensors, where, limits, problems)
    signature = None
    if d["signature"] is not None:
        signature = _parse_signature(d["signature"], problems)
    if problems:
        raise CheckpointFormatError(
            f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:20])
            + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    model = d["model"]
    unsigned = {**d, "signature": None}
    return RoundRecord(
        round=d["round"],
        time=d["time"],
        metrics=d["metrics"],
        model=ModelRecord(model["member"], model["size"], model["manifest_sha256"]),
        state=state,
        retention=Retention.from_dict(d["retention"]),
        signature=signature,
        where=where,
        payload=ROUND_SIGNATURE_CONTEXT
        + encode_parsed(unsigned, what=where, error=CheckpointFormatError),
    )


def _parse_state(
    value: dict[str, Any],
    tensors: tuple[TensorRecord, ...] | None,
    where: str,
    limits: Limits,
    problems: list[str],
) -> StateRecord:
    """``$.state`` of a record whose schema checks passed (``tensors``: its parsed entries,
    ``None`` when one is one the schema accepts but a record does not, e.g. a shape of 2.0)."""
    if tensors is None:  # the slow path, field by field: raises naming the entry at fault
        document = Document(where, CheckpointFormatError)
        tensors = tuple(TensorRecord.from_dict(t, [document, "state", "tensors", i])
                        for i, t in enumerate(value["tensors"]))
    if len(tensors) > limits.max_tensors:
        raise LimitExceededError(
            f"{where}: $.state.tensors lists {len(tensors)} tensors, more than the limit of "
            f"{limits.max_tensors}"
        )
    names: dict[str, int] = {}
    for t in tensors:
        if t.name in names:
            problems.append(f"$.state.tensors: tensor {t.name!r} is listed twice")
        names[t.name] = 0
    _check_node(value["structure"], ["state", "structure"], names, problems)
    unused = [n for n, uses in names.items() if uses == 0]
    if unused:
        problems.append(
            f"$.state.structure: {len(unused)} tensor(s) not referenced: "
            + ", ".join(map(repr, unused[:10]))
        )
    return StateRecord(value["member"], value["size"], value["header_sha256"], tensors,
                       value["structure"])


_NODE_KEYS = {
    "tensor": ({"type", "name", "array"}, {"impl"}),
    "json": ({"type", "value"}, set()),
    "float": ({"type", "value"}, set()),
    "dict": ({"type", "keys", "values"}, set()),
    "list": ({"type", "items"}, set()),
    "tuple": ({"type", "items"}, set()),
    "namedtuple": ({"type", "class", "keys", "items"}, set()),
    "custom": ({"type", "class", "keys", "items"}, set()),
}
_ARRAYS = ("numpy", "numpy-scalar", "jax", "jax-key")
_FLOATS = ("nan", "inf", "-inf")


def _check_node(
    node: Any, path: list[str | int], names: dict[str, int], problems: list[str]
) -> None:
    """Check one node of the state's tree and its children: ``schemas/checkpoint-round.v1.json``
    ``$defs/node`` (written out here for speed; a test holds the two equal), plus the rules
    it cannot express (tensors named once each, keys unique, as many keys as items)."""
    at = json_path(path)
    if not isinstance(node, dict):
        problems.append(f"{at}: expected a node object, got {type(node).__name__}")
        return
    kind = node.get("type")
    if kind not in _NODE_KEYS:
        problems.append(f"{at}.type: {str(kind)[:40]!r} is not one of {', '.join(NODE_TYPES)}")
        return
    required, optional = _NODE_KEYS[kind]
    missing = sorted(required - set(node))
    extra = sorted(set(node) - required - optional)
    if missing or extra:
        problems.append(f"{at}: a {kind} node has exactly {', '.join(sorted(required))}"
                        + (f" (and optionally {', '.join(sorted(optional))})" if optional else "")
                        + f"; missing {missing}, unexpected {extra}")
        return
    if kind == "tensor":
        _check_tensor_node(node, at, names, problems)
        return
    if kind == "json":
        value = node["value"]
        if not (value is None or isinstance(value, bool | int | float | str)):
            problems.append(f"{at}.value: expected a JSON scalar, got {type(value).__name__}")
        return
    if kind == "float":
        if node["value"] not in _FLOATS:
            problems.append(f"{at}.value: expected one of {', '.join(_FLOATS)}")
        return
    children_key = "values" if kind == "dict" else "items"
    children = node[children_key]
    if not isinstance(children, list):
        problems.append(f"{at}.{children_key}: expected an array")
        return
    if "class" in node and not (isinstance(node["class"], str) and 0 < len(node["class"]) <= 1000):
        problems.append(f"{at}.class: expected a non-empty string of at most 1000 characters")
    if "keys" in node:
        _check_keys(node["keys"], kind, len(children), at, problems)
    for i, child in enumerate(children):
        _check_node(child, [*path, children_key, i], names, problems)


def _check_tensor_node(node: dict[str, Any], at: str, names: dict[str, int],
                       problems: list[str]) -> None:
    name = node["name"]
    if not isinstance(name, str) or not name:
        problems.append(f"{at}.name: expected a non-empty string")
    elif name not in names:
        problems.append(f"{at}: tensor {name!r} is not in $.state.tensors")
    else:
        names[name] += 1
        if names[name] == 2:
            problems.append(f"{at}: tensor {name!r} is referenced twice")
    if node["array"] not in _ARRAYS:
        problems.append(f"{at}.array: expected one of {', '.join(_ARRAYS)}")
    elif (node["array"] == "jax-key") != ("impl" in node):
        problems.append(f"{at}: 'impl' is required for jax-key arrays, and only for them")
    elif "impl" in node and node["impl"] not in ("threefry2x32", "rbg", "unsafe_rbg"):
        problems.append(f"{at}.impl: {str(node['impl'])[:40]!r} is not a PRNG implementation")


def _check_keys(keys: Any, kind: str, count: int, at: str, problems: list[str]) -> None:
    allowed = (str, int) if kind == "dict" else (str,)
    if not isinstance(keys, list) or not all(
            isinstance(k, allowed) and not isinstance(k, bool) for k in keys):
        what = "strings or integers" if kind == "dict" else "strings"
        problems.append(f"{at}.keys: expected an array of {what}")
        return
    seen = set()
    for key in keys:
        tag = (type(key).__name__, key)
        if tag in seen and kind == "dict":
            problems.append(f"{at}: key {key!r} is listed twice")
        seen.add(tag)
    if len(keys) != count:
        problems.append(f"{at}: {len(keys)} keys but {count} "
                        + ("values" if kind == "dict" else "items"))


def _parse_signature(value: dict[str, Any], problems: list[str]) -> DocumentSignature | None:
    algorithm = value["algorithm"]
    text = value["signature"]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        problems.append("$.signature.signature is not standard padded base64")
        return None
    if len(raw) != ALGORITHMS[algorithm]:
        problems.append(
            f"$.signature.signature: an {algorithm} signature is {ALGORITHMS[algorithm]} bytes, "
            f"got {len(raw)}"
        )
        return None
    if not value["key_id"].startswith(algorithm + ":"):
        problems.append(f"$.signature.key_id {value['key_id']!r} is not an {algorithm} key id")
        return None
    return DocumentSignature(algorithm, value["key_id"], raw)


def parse_history(data: bytes, *, where: str, expected_round: int | None = None) -> HistoryEntry:
    """Check a history document.

    Raises:
        CheckpointFormatError: naming the field at fault (or a round other than its name's).
        UnsupportedVersionError: another version.
    """
    d, _ = _parse_document(data, what=where, fmt=HISTORY_FORMAT, schema=HISTORY_SCHEMA,
                           max_bytes=1 << 20)
    if expected_round is not None and d["round"] != expected_round:
        raise CheckpointFormatError(
            f"{where}: $.round is {d['round']}, but the file is for round {expected_round}"
        )
    return HistoryEntry(d["round"], d["time"], d["metrics"])

