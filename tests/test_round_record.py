"""The checkpoint directory's format without jax: round records, history, retention, folders.

Records are built with the store's writer and then broken one field at a time; each break
must be refused with a :class:`CheckpointFormatError` (or the limit/version error) naming
the field. The hand-written check of the state tree is held equal to the schema's
``$defs/node`` on a corpus of valid and invalid nodes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hkstore.errors import (
    CheckpointFormatError,
    CheckpointLockedError,
    LimitExceededError,
    SignatureError,
    UnsupportedVersionError,
    UntrustedKeyError,
)
from hkstore.store import HmacKey, Limits, Trust
from hkstore.store._canonical import canonical_json
from hkstore.store._retention import KeepBest, Retention
from hkstore.store._round_dir import RoundDirectory, WriterLock, parse_round_folder
from hkstore.store._round_record import _check_node, build_record, parse_record
from hkstore.store._schema import load_schema

SHA = "ab" * 32
TENSORS = [{"dtype": "F32", "name": "$.a", "sha256": SHA, "shape": [2]},
           {"dtype": "I32", "name": "$.b[0]", "sha256": SHA, "shape": []}]
STRUCTURE = {"type": "dict", "keys": ["a", "b"], "values": [
    {"type": "tensor", "name": "$.a", "array": "numpy"},
    {"type": "list", "items": [{"type": "tensor", "name": "$.b[0]", "array": "jax"},
                               {"type": "float", "value": "nan"}]}]}


def record(**changes: Any) -> dict[str, Any]:
    """A valid record as a dict (unsigned), with ``changes`` applied at the top level."""
    data, _ = build_record(
        round_=3, time="2026-11-29T12:00:00.000000Z", metrics={"loss": 0.5},
        model_size=100, manifest_sha256=SHA,
        state={"size": 80, "header_sha256": SHA, "tensors": TENSORS, "structure": STRUCTURE},
        retention=Retention(keep_last=2))
    doc = json.loads(data)
    doc.update(changes)
    return doc


def parse(doc: dict[str, Any], **kwargs: Any) -> Any:
    return parse_record(canonical_json(doc), where="round.json", **kwargs)


def test_a_valid_record_parses() -> None:
    got = parse(record(), expected_round=3)
    assert got.round == 3 and got.state is not None and got.state.digests["$.a"] == SHA
    assert got.retention == Retention(keep_last=2) and got.signature is None


@pytest.mark.parametrize(("change", "message"), [
    ({"round": 4}, "$.round is 4, but the folder is round 3"),
    ({"time": "2026-11-29 12:00:00"}, "$.time"),
    ({"metrics": []}, "$.metrics"),
    ({"extra": 1}, "Additional properties"),
    ({"model": {"member": "model.hkz", "size": -1, "manifest_sha256": SHA}}, "$.model.size"),
    ({"retention": {"keep_last": 0, "keep_every": None, "keep_best": None}}, "keep_last"),
    ({"signature": {"algorithm": "hmac-sha256", "key_id": "hmac-sha256:" + "0" * 32,
                    "signature": "AAAA"}}, "an hmac-sha256 signature is 32 bytes, got 3"),
    ({"signature": {"algorithm": "ed25519", "key_id": "hmac-sha256:" + "0" * 32,
                    "signature": "A" * 86 + "=="}}, "is not an ed25519 key id"),
])
def test_bad_fields_are_refused_naming_them(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointFormatError, match=r"^round\.json: ") as info:
        parse(record(**change), expected_round=3)
    assert message in str(info.value)


def _state(**changes: Any) -> dict[str, Any]:
    state = record()["state"]
    state.update(changes)
    return state


@pytest.mark.parametrize(("state", "message"), [
    (_state(tensors=[*TENSORS, TENSORS[0]]), "tensor '$.a' is listed twice"),
    (_state(tensors=[*TENSORS, {**TENSORS[0], "name": "$.c"}]), "1 tensor(s) not referenced"),
    (_state(structure={"type": "list", "items": [STRUCTURE, STRUCTURE]}),
     "tensor '$.a' is referenced twice"),
    (_state(structure={"type": "tensor", "name": "$.zzz", "array": "numpy"}),
     "tensor '$.zzz' is not in $.state.tensors"),
    (_state(structure={"type": "dict", "keys": ["a", "a"], "values": [
        {"type": "tensor", "name": "$.a", "array": "numpy"},
        {"type": "tensor", "name": "$.b[0]", "array": "numpy"}]}), "key 'a' is listed twice"),
    (_state(structure={"type": "namedtuple", "class": "m:T", "keys": ["x"], "items": [
        {"type": "tensor", "name": "$.a", "array": "numpy"},
        {"type": "tensor", "name": "$.b[0]", "array": "numpy"}]}), "1 keys but 2 items"),
    (_state(structure={"type": "list", "items": [
        {"type": "tensor", "name": "$.a", "array": "jax-key"},
        {"type": "tensor", "name": "$.b[0]", "array": "numpy", "impl": "rbg"}]}),
     "'impl' is required for jax-key arrays"),
    (_state(tensors=[{**TENSORS[0], "dtype": "F33"}, TENSORS[1]]),
     "$.state.tensors[0].dtype: 'F33' is not one of"),
])
def test_bad_states_are_refused_naming_the_path(state: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointFormatError) as info:
        parse(record(state=state))
    assert message in str(info.value)


def test_strict_json_canonical_bytes_version_and_limits() -> None:
    data = canonical_json(record())
    with pytest.raises(CheckpointFormatError, match="not canonical JSON"):
        parse_record(data + b"\n", where="round.json")
    with pytest.raises(CheckpointFormatError, match="duplicate key"):
        parse_record(b'{"format":1,"format":2}', where="round.json")
    with pytest.raises(UnsupportedVersionError, match="version 2 is not supported"):
        parse(record(version=2))
    with pytest.raises(CheckpointFormatError, match="expected 'hkstore-checkpoint-round'"):
        parse(record(format="hkstore"))
    with pytest.raises(LimitExceededError):
        parse_record(data, where="round.json", limits=Limits(max_manifest_bytes=100))
    with pytest.raises(LimitExceededError, match="2 tensors"):
        parse_record(data, where="round.json", limits=Limits(max_tensors=1))


def test_signature_is_checked_with_the_callers_keys() -> None:
    key, other = HmacKey.generate(), HmacKey.generate()
    data, _ = build_record(
        round_=1, time="2026-11-29T12:00:00.000000Z", metrics={}, model_size=1,
        manifest_sha256=SHA, state=None, retention=Retention(), signer=key)
    signed = parse_record(data, where="r")
    assert signed.check_signature(Trust(keys=[key])) == key.key_id
    assert signed.check_signature(Trust()) is None  # no keys: not checked
    with pytest.raises(UntrustedKeyError):
        signed.check_signature(Trust(keys=[other]))
    changed = json.loads(data)
    changed["metrics"] = {"loss": 1}
    with pytest.raises(SignatureError, match="does not verify over the round record"):
        parse_record(canonical_json(changed), where="r").check_signature(Trust(keys=[key]))
    unsigned = parse(record())
    with pytest.raises(SignatureError, match="unsigned"):
        unsigned.check_signature(Trust(keys=[key], require_signature=True))


# --- the state tree: hand check == schema ---------------------------------------------------

NODES_OK = [
    {"type": "tensor", "name": "$.a", "array": "numpy"},
    {"type": "tensor", "name": "$.a", "array": "jax-key", "impl": "threefry2x32"},
    {"type": "json", "value": None}, {"type": "json", "value": "x"},
    {"type": "json", "value": 1.5}, {"type": "float", "value": "-inf"},
    {"type": "dict", "keys": ["a", 1], "values": [{"type": "json", "value": 1},
                                                  {"type": "json", "value": 2}]},
    {"type": "list", "items": []}, {"type": "tuple", "items": [{"type": "json", "value": 1}]},
    {"type": "namedtuple", "class": "m:T", "keys": ["x"], "items": [{"type": "json", "value": 1}]},
    {"type": "custom", "class": "m:C", "keys": [".x"], "items": [{"type": "json", "value": 1}]},
]
NODES_BAD = [
    {}, {"type": "array"}, {"type": "tensor", "name": "$.a"},
    {"type": "tensor", "name": "", "array": "numpy"},
    {"type": "tensor", "name": "$.a", "array": "torch"},
    {"type": "tensor", "name": "$.a", "array": "jax-key", "impl": "md5"},
    {"type": "json", "value": [1]}, {"type": "json", "value": {}}, {"type": "json"},
    {"type": "float", "value": "NaN"}, {"type": "float", "value": 1.0},
    {"type": "dict", "keys": [True], "values": [{"type": "json", "value": 1}]},
    {"type": "dict", "keys": [[1]], "values": [{"type": "json", "value": 1}]},
    {"type": "dict", "items": []}, {"type": "list", "items": {}},
    {"type": "list", "items": [], "extra": 1}, {"type": "tuple", "items": [3]},
    {"type": "namedtuple", "keys": [], "items": []},
    {"type": "namedtuple", "class": "", "keys": [], "items": []},
    {"type": "namedtuple", "class": "m:T", "keys": [1], "items": [{"type": "json", "value": 1}]},
    {"type": "custom", "class": "m:C", "keys": [], "items": [], "values": []},
]


@pytest.mark.parametrize("node", NODES_OK + NODES_BAD)
def test_hand_written_node_check_agrees_with_the_schema(node: dict[str, Any]) -> None:
    schema = load_schema("checkpoint-round.v1.json")
    wrapper = {**schema["$defs"]["node"], "$defs": schema["$defs"]}
    schema_ok = jsonschema.Draft202012Validator(wrapper).is_valid(node)
    problems: list[str] = []
    _check_node(copy.deepcopy(node), ["state", "structure"], {"$.a": 0}, problems)
    assert schema_ok == (not problems), (node, problems)
    assert schema_ok == (node in NODES_OK)


# --- retention ------------------------------------------------------------------------------


def test_retention_reasons() -> None:
    rules = Retention(keep_last=2, keep_every=4, keep_best=KeepBest("acc", "max", 2))
    metrics = {1: {"acc": 0.9}, 2: {"acc": True}, 3: {"acc": float("inf")}, 4: {},
               5: {"acc": 0.5}, 6: {"acc": 0.9}, 7: {"acc": 0.1}, 8: {"acc": 0.2}}
    reasons = rules.reasons(metrics)
    assert reasons == {1: ["keep_best"], 2: [], 3: [], 4: ["keep_every"], 5: [],
                       6: ["keep_best"], 7: ["keep_last"],
                       8: ["newest", "keep_last", "keep_every"]}
    assert rules.to_remove(metrics) == [2, 3, 5]
    assert rules.best(metrics) == [6, 1, 5, 8, 7]  # tie 1/6: the newer first
    assert Retention().reasons({1: {}, 2: {}}) == {1: ["all"], 2: ["newest", "all"]}
    assert Retention(keep_last=1).to_remove({}) == []
    assert Retention.from_dict(rules.to_dict()) == rules


# --- the directory --------------------------------------------------------------------------


def test_round_folder_names_are_canonical() -> None:
    assert parse_round_folder("round-00000003") == 3
    assert parse_round_folder("round-123456789") == 123456789
    for name in ("round-3", "round-000000003", "round-0000000x", "Round-00000003",
                 "round-00000003.bak", ".tmp-round-00000003-ab"):
        assert parse_round_folder(name) is None, name


def test_remove_renames_away_then_deletes(tmp_path: Path) -> None:
    folder = RoundDirectory(tmp_path)
    (tmp_path / "round-00000001").mkdir()
    (tmp_path / "round-00000001" / "round.json").write_bytes(b"{}")
    (tmp_path / "round-00000001" / "model.hkz").write_bytes(b"x")
    assert folder.rounds() == [1]
    folder.remove(1)
    assert folder.rounds() == [] and list(tmp_path.iterdir()) == []
    folder.remove(1)  # already gone: nothing to do


def test_clean_keeps_a_replaced_round_whose_replacement_appeared(tmp_path: Path) -> None:
    folder = RoundDirectory(tmp_path)
    for name in ("round-00000002", ".old-round-00000002-abcd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "round.json").write_bytes(name.encode())
    assert folder.clean() == [".old-round-00000002-abcd"]
    assert (tmp_path / "round-00000002" / "round.json").read_bytes() == b"round-00000002"
    assert folder.rounds() == [2] and folder.incomplete() == []


def test_the_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    assert WriterLock.holder(tmp_path) is None
    lock = WriterLock.acquire(tmp_path)
    info = WriterLock.holder(tmp_path)
    assert info is not None and info["pid"] == os.getpid()
    with pytest.raises(CheckpointLockedError, match=f"pid {os.getpid()} on host"):
        WriterLock.acquire(tmp_path)
    lock.release()
    lock.release()
    assert WriterLock.holder(tmp_path) is None
    WriterLock.acquire(tmp_path).release()
