"""docs/FORMAT.md against the code: dtype table, member names, limits, magic and worked example.

The schema's dtype enum is compared with the dtype table in ``test_manifest.py``
(``test_schema_dtype_enum_equals_the_dtype_table``); together with the dtype-table test here,
the table, the schema and FORMAT.md agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path

from hkstore.store._config import CONFIG_SIGNATURE_CONTEXT
from hkstore.store._container import ARCHIVE_COMMENT, MEMBER_NAMES, ContainerWriter
from hkstore.store._dtypes import DTYPES
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._manifest import decode_manifest
from hkstore.store._signing import (
    SIGNATURE_CONTEXT,
    Ed25519Signer,
    HmacKey,
    sign_manifest,
    verify_manifest_signature,
)
from hkstore.store._weights import WeightsReader, parse_header

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def _text() -> str:
    return FORMAT_MD.read_text(encoding="utf-8")


def _block(name: str) -> str:
    """The text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``."""
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", _text(), re.S)
    assert match, f"FORMAT.md has no <!-- {name}:begin/end --> block"
    return match.group(1)


def _rows(block: str) -> list[list[str]]:
    """Cells of a Markdown table's body rows (header and separator rows dropped)."""
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"expected a `code` cell, got {cell!r}"
    return match.group(1)


def _example(name: str) -> bytes:
    """The fenced code block right after ``<!-- example:NAME -->``."""
    match = re.search(rf"<!-- example:{name} -->\n```[a-z]*\n(.*?)\n```", _text(), re.S)
    assert match, f"FORMAT.md has no example {name!r}"
    return match.group(1).encode("utf-8")


# --- the tables -------------------------------------------------------------------------------


def test_dtype_table_lists_exactly_the_dtype_table() -> None:
    documented = [(_code(r[0]), _code(r[1]), int(r[2])) for r in _rows(_block("dtype-table"))]
    expected = [(code, str(row.dtype), row.itemsize) for code, row in DTYPES.items()]
    table = "\n".join(f"| `{c}` | `{d}` | {n} | ... |" for c, d, n in expected)
    assert documented == expected, f"FORMAT.md's dtype table must list, in order:\n{table}"


def test_every_member_name_is_in_format_md() -> None:
    text = _text()
    assert sorted(n for n in MEMBER_NAMES if f"`{n}`" not in text) == []


def test_limits_table_lists_every_limit_with_its_default() -> None:
    documented = {_code(r[0]): int(r[1]) for r in _rows(_block("limits-table"))}
    expected = {f.name: getattr(DEFAULT_LIMITS, f.name) for f in dataclasses.fields(Limits)}
    assert documented == expected


def test_magic_and_signing_contexts_are_spelled_out() -> None:
    text = _text()
    assert f"`{ARCHIVE_COMMENT.decode('ascii')}`" in text
    assert " ".join(f"{b:02X}" for b in ARCHIVE_COMMENT) in text
    for context in (SIGNATURE_CONTEXT, CONFIG_SIGNATURE_CONTEXT):
        assert context.endswith(b"\n")
        assert f'b"{context[:-1].decode("ascii")}\\n"' in text
    assert SIGNATURE_CONTEXT.hex() in text
    assert f"{len(SIGNATURE_CONTEXT)}-byte context string" in text


# --- the worked example -------------------------------------------------------------------------


def test_worked_example_weights_and_manifest_agree() -> None:
    weights = bytes.fromhex("".join(_example("weights-hex").decode("ascii").split()))
    manifest_bytes = _example("manifest")
    manifest = decode_manifest(manifest_bytes)  # canonical, schema-valid, rules hold
    entries, header_len, header = parse_header(weights)
    assert header_len % 64 == 0
    assert len(weights) == manifest.weights.size
    assert hashlib.sha256(header).hexdigest() == manifest.weights.header_sha256
    assert {e.name: (e.dtype, e.shape) for e in entries} == {
        t.name: (t.dtype, t.shape) for t in manifest.tensors
    }
    arrays = WeightsReader(weights).read_all(
        manifest.digests, algorithm=manifest.digest_algorithm
    )
    assert arrays["lin:w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert arrays["lin:b"].shape == (0,)
    assert arrays["s"].shape == () and bool(arrays["s"])
    assert hashlib.sha256(manifest_bytes).hexdigest() in _text()

    # The offsets the example states for the container.
    out = io.BytesIO()
    writer = ContainerWriter(out)
    stream = writer.begin_member("weights.safetensors")
    stream.write(weights)
    weights_info = stream.finish()
    manifest_info = writer.add_member("manifest.json", manifest_bytes)
    writer.close()
    assert (weights_info.header_offset, weights_info.data_offset) == (0, 128)
    assert (manifest_info.header_offset, manifest_info.data_offset) == (345, 388)
    assert out.getvalue()[30 + len("weights.safetensors") :][:6] == bytes.fromhex("35d94b004000")


def test_worked_example_signatures_are_exact() -> None:
    manifest_bytes = _example("manifest")
    hmac_key = HmacKey(bytes(32))
    ed_key = Ed25519Signer.from_private_bytes(bytes(32))
    text = _text()
    assert ed_key.verifier().public_bytes.hex() in text
    for name, signer, verifier in (
        ("signature-hmac", hmac_key, hmac_key),
        ("signature-ed25519", ed_key, ed_key.verifier()),
    ):
        document = _example(name)
        assert signer.key_id in text
        assert sign_manifest(manifest_bytes, signer) == document  # both are deterministic
        assert verify_manifest_signature(document, manifest_bytes, [verifier]) == signer.key_id


# --- section 13: checkpoint directories -----------------------------------------------------


def test_checkpoint_worked_example_is_exact() -> None:
    from hkstore.store._retention import Retention
    from hkstore.store._round_record import (
        ROUND_SIGNATURE_CONTEXT,
        build_history,
        build_record,
        parse_record,
    )
    from hkstore.store._trust import Trust

    text = _text()
    record_bytes = _example("round-record")
    record = parse_record(record_bytes, where="round.json", expected_round=3)
    key = HmacKey(bytes(32))
    assert record.check_signature(Trust(keys=[key], require_signature=True)) == key.key_id
    assert f'b"{ROUND_SIGNATURE_CONTEXT[:-1].decode("ascii")}\\n"' in text
    assert f"({len(record_bytes)} bytes, one line)" in text
    # model.hkz is the archive of section 12
    manifest_bytes = _example("manifest")
    weights = bytes.fromhex("".join(_example("weights-hex").decode("ascii").split()))
    out = io.BytesIO()
    writer = ContainerWriter(out)
    stream = writer.begin_member("weights.safetensors")
    stream.write(weights)
    stream.finish()
    writer.add_member("manifest.json", manifest_bytes)
    writer.close()
    assert record.model.size == len(out.getvalue())
    assert record.model.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    # state.safetensors: size, header digest and every tensor digest
    state = bytes.fromhex("".join(_example("round-state-hex").decode("ascii").split()))
    assert record.state is not None and len(state) == record.state.size
    assert f"`state.safetensors` ({len(state)} bytes)" in text
    reader = WeightsReader(state)
    assert reader.header_sha256 == record.state.header_sha256
    arrays = reader.read_all(record.state.digests, algorithm="sha256")
    assert int(arrays["$.count"]) == 3 and arrays['$.mu["lin:w"]'].tolist() == [[0.5] * 3] * 2
    # a writer given the same inputs writes the same bytes
    state_json = {k: v for k, v in json.loads(record_bytes)["state"].items() if k != "member"}
    again, _ = build_record(
        round_=3, time=record.time, metrics=record.metrics, model_size=record.model.size,
        manifest_sha256=record.model.manifest_sha256, state=state_json,
        retention=Retention(keep_last=2), signer=key)
    assert again == record_bytes
    assert build_history(3, record.time, record.metrics) == _example("round-history")


def test_checkpoint_node_table_lists_every_node_type() -> None:
    from hkstore.store._round_record import NODE_TYPES

    block = _text().split("### 13.4", 1)[1].split("### 13.5", 1)[0]
    documented = []
    for row in _rows("\n".join(line for line in block.splitlines() if line.startswith("|"))):
        documented += re.findall(r"`([a-z]+)`", row[0])
    assert documented == list(NODE_TYPES)


# --- tensor digests -----------------------------------------------------------------------------


def _indented_rows(block: str) -> list[list[str]]:
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_digest_table_is_the_algorithm_table() -> None:
    from hkstore.store._digests import ALGORITHMS, digest_hex

    rows = _indented_rows(_block("digest-table"))
    assert [_code(r[0]) for r in rows] == list(ALGORITHMS)
    for row in rows:
        assert _code(row[2]) == digest_hex(_code(row[0]), b""), row[0]


def test_worked_example_tensor_digests_check_with_standard_libraries() -> None:
    import blake3

    weights = bytes.fromhex("".join(_example("weights-hex").decode("ascii").split()))
    reader = WeightsReader(weights)
    rows = _rows(_block("tensor-digests"))
    assert [_code(r[0]) for r in rows] == ["lin:w", "lin:b", "s"]
    for row in rows:
        entry = reader.entries[_code(row[0])]
        data = weights[reader.header_size + entry.begin : reader.header_size + entry.end]
        assert data == (b"" if row[1] == "(empty)" else bytes.fromhex(_code(row[1])))
        assert _code(row[2]) == hashlib.sha256(data).hexdigest()
        assert _code(row[3]) == blake3.blake3(data).hexdigest()
    manifest = decode_manifest(_example("manifest"))
    assert {t.name: t.digest for t in manifest.tensors} == {_code(r[0]): _code(r[2]) for r in rows}
