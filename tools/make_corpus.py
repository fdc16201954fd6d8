"""Generate the hostile-input corpus ``tests/corpus/hostile/``: small files, each with its verdict.

Usage::

    python tools/make_corpus.py                 # (re)write tests/corpus/hostile/
    python tools/make_corpus.py --check         # regenerate in a temp folder, compare bytes
    python tools/make_corpus.py --out DIR       # write elsewhere

Every case is one input (an archive, a config document or a declearn checkpoint folder) that
is valid except for the fault it is named after, and ``verdicts.json`` records what every
entry point must say about it: the exact error class, or ``"loads"``. ``tests/test_corpus.py``
runs each case through every entry point and requires that one verdict everywhere.

Reproducible byte for byte: keys come from fixed seeds, writer versions are fixed, weights are
fixed numbers, pickles are assembled opcode by opcode and zstd frames are raw and RLE blocks
with their XXH64 checksum computed here (no compressor whose output could change between
library versions); the container is written by hkstore's writer, whose layout the format fixes.
Regenerate after any change to the format or to what a case exercises, and commit the result;
``--check`` (run by the tests) fails when the committed files differ from what this writes.

The model every case describes: ``helpers_models.mlp_model`` (a two-layer MLP on 4 features,
``mlp/~/linear_0`` 4 -> 8 and ``linear_1`` 8 -> 3, float32) with ``helpers_models.mse_loss``.
"""

from __future__ import annotations

import argparse
import base64
import filecmp
import hashlib
import importlib.util
import io
import json
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hkstore") is None:  # run from a checkout without an install
    sys.path.append(str(REPO))

from hkstore.store._container import ContainerWriter, read_container  # noqa: E402
from hkstore.store._signing import Ed25519Signer, HmacKey, sign_manifest  # noqa: E402

OUT = REPO / "tests" / "corpus" / "hostile"
TABLE_VERSION = 1

# --- fixed inputs -------------------------------------------------------------------------------

WRITER = {"haiku": "0.0.17", "hkstore": "0.1.0", "jax": "0.10.2", "numpy": "2.4.0",
          "python": "3.11", "python_implementation": "cpython"}  # fmt: skip
DATA_INFO = {"data_type": "float32", "features_shape": [4]}
MODEL_REF = {"kind": "reference", "ref": "helpers_models:mlp_model", "kwargs": {}}
LOSS_REF = {"kind": "reference", "ref": "helpers_models:mse_loss", "kwargs": {}}
NONE = {"kind": "none"}
PICKLED = {"kind": "pickle"}
PICKLE_RUNTIME = {"cloudpickle": "3.1.2", "python": "3.11", "python_implementation": "cpython"}
#: The file a canary pickle would create (relative: the tests run from a temp folder).
CANARY = "hkstore-corpus-canary"


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"hkstore test corpus: {label}".encode()).digest()


TRUSTED = Ed25519Signer.from_private_bytes(_seed("trusted ed25519 key"))
OTHER = Ed25519Signer.from_private_bytes(_seed("other ed25519 key"))
HMAC = HmacKey(_seed("hmac secret"))

# --- zstd frames, by hand (XXH64 from its specification) ----------------------------------------

_M = (1 << 64) - 1
_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (the zstd content checksum is its low 32 bits)."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while i + 32 <= n:
            v = [_round(v[k], int.from_bytes(data[i + 8 * k : i + 8 * k + 8], "little"))
                 for k in range(4)]  # fmt: skip
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for lane in v:
            h = ((h ^ _round(0, lane)) * _P1 + _P4) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[i : i + 8], "little")), 27) * _P1 + _P4)
        h &= _M
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i : i + 4], "little") * _P1) & _M
        h = (_rotl(h, 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h = (_rotl(h ^ ((data[i] * _P5) & _M), 11) * _P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    return h ^ (h >> 32)


_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK = 128 << 10


def _block(kind: int, size: int, payload: bytes, last: bool) -> bytes:
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little") + payload


def zstd_frame(
    content: bytes,
    *,
    declared: int | str | None = "real",
    checksum: bool | bytes = True,
    dict_id: int = 0,
    window_log: int | None = None,
    blocks: list[bytes] | None = None,
) -> bytes:
    """A zstd frame of raw blocks (or the given ``blocks``) holding ``content``.

    ``declared``: the content size field ("real", a lying int, or None for no field);
    ``checksum``: True (the real one), False (flag off), or the 4 bytes to write;
    ``window_log``: write a window descriptor (not single-segment) with this log.
    """
    size = len(content) if declared == "real" else declared
    single = window_log is None and size is not None
    fcs_flag = 0 if size is None else 3
    descriptor = fcs_flag << 6 | int(single) << 5 | (0x04 if checksum is not False else 0)
    descriptor |= 1 if dict_id else 0
    out = _MAGIC + bytes([descriptor])
    if not single:
        out += bytes([((window_log or 17) - 10) << 3])
    if dict_id:
        out += bytes([dict_id])
    if size is not None:
        assert isinstance(size, int)
        out += size.to_bytes(8, "little")
    if blocks is None:
        pieces = [content[i : i + _BLOCK] for i in range(0, len(content), _BLOCK)] or [b""]
        blocks = [_block(0, len(p), p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    out += b"".join(blocks)
    if checksum is True:
        out += (xxh64(content) & 0xFFFFFFFF).to_bytes(4, "little")
    elif isinstance(checksum, bytes):
        out += checksum
    return out


# --- pickles, opcode by opcode ------------------------------------------------------------------


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def ref_pickle(**roles: tuple[str, str]) -> bytes:
    """``{role: module.name}``: PROTO 5, EMPTY_DICT, MARK, (key, STACK_GLOBAL)..., SETITEMS."""
    body = b"".join(_text(k) + _text(m) + _text(n) + b"\x93" for k, (m, n) in roles.items())
    return b"\x80\x05}(" + body + b"u."


def canary_pickle() -> bytes:
    """``{"model": os.system("touch CANARY")}``: unpickling it creates the canary file."""
    call = _text("os") + _text("system") + b"\x93" + _text(f"touch {CANARY}") + b"\x85R"
    return b"\x80\x05}" + _text("model") + call + b"s."


BENIGN_PICKLE = ref_pickle(model=("helpers_models", "mlp_model"),
                           loss=("helpers_models", "mse_loss"))  # fmt: skip

# --- archives from parts ------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()  # fmt: skip


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(algorithm: str, data: bytes) -> str:
    if algorithm == "blake3":
        from blake3 import blake3

        return str(blake3(data).hexdigest())
    return _sha(data)


def _to_blake3(index: int) -> Callable[[dict[str, Any]], None]:
    """A manifest edit: tensor ``index``'s digest as BLAKE3 (the others keep SHA-256)."""

    def apply(doc: dict[str, Any]) -> None:
        del doc["tensors"][index]["sha256"]
        doc["tensors"][index]["blake3"] = _tensor_digest("blake3", TENSORS[index][3])

    return apply


def _floats(count: int, start: float) -> bytes:
    return struct.pack(f"<{count}f", *(start + 0.25 * i for i in range(count)))


#: (name, dtype, shape, data) of the model's weights, in model (haiku) order.
TENSORS: list[tuple[str, str, list[int], bytes]] = [
    ("mlp/~/linear_0:b", "F32", [8], _floats(8, 0.0)),
    ("mlp/~/linear_0:w", "F32", [4, 8], _floats(32, -4.0)),
    ("mlp/~/linear_1:b", "F32", [3], _floats(3, 1.0)),
    ("mlp/~/linear_1:w", "F32", [8, 3], _floats(24, -3.0)),
]


def safetensors(
    tensors: list[tuple[str, str, list[int], bytes]] = TENSORS,
    *,
    header: dict[str, Any] | None = None,
    raw_header: bytes | None = None,
    length: int | None = None,
    tail: bytes = b"",
) -> bytes:
    """A safetensors file: the header as hkstore writes it (unless given), then the data."""
    if raw_header is None:
        if header is None:
            header, offset = {}, 0
            for name, dtype, shape, data in tensors:
                header[name] = {"data_offsets": [offset, offset + len(data)], "dtype": dtype,
                                "shape": shape}  # fmt: skip
                offset += len(data)
        raw_header = _canonical(header)
        raw_header += b" " * (-(8 + len(raw_header)) % 64)
    n = len(raw_header) if length is None else length
    return n.to_bytes(8, "little") + raw_header + b"".join(t[3] for t in tensors) + tail


@dataclass
class Parts:
    """An archive being built: its members, and the manifest document that describes them."""

    weights: bytes = field(default_factory=safetensors)
    zstd: bytes | None = None  # the weights as a zstd frame, when compressed
    raw_size: int | None = None
    pickle: bytes | None = None  # the functions.pkl.zst frame
    pickle_raw_size: int = 0
    pickle_runtime: dict[str, str] = field(default_factory=lambda: dict(PICKLE_RUNTIME))
    functions: dict[str, Any] = field(default_factory=lambda: {"model": NONE, "loss": NONE})
    tensors: list[tuple[str, str, list[int], bytes]] = field(default_factory=lambda: TENSORS)
    extra_members: dict[str, bytes] = field(default_factory=dict)
    digest: str = "sha256"  # the tensors' digest algorithm: "sha256" (hkstore 0.1) or "blake3"

    def manifest(self) -> dict[str, Any]:
        n = int.from_bytes(self.weights[:8], "little")
        weights: dict[str, Any] = {
            "compression": None, "header_sha256": _sha(self.weights[: 8 + n]),
            "member": "weights.safetensors", "size": len(self.weights),
        }  # fmt: skip
        if self.zstd is not None:
            weights.update(compression="zstd", member="weights.safetensors.zst",
                           size=len(self.zstd), sha256=_sha(self.zstd),
                           raw_size=len(self.weights) if self.raw_size is None else self.raw_size)
        doc: dict[str, Any] = {
            "data_info": dict(DATA_INFO), "format": "hkstore", "format_version": 1,
            "functions": json.loads(json.dumps(self.functions)), "metadata": {"round": 3},
            "pickle": None, "seed": 7,
            "tensors": [{"dtype": d, "name": name, self.digest: _tensor_digest(self.digest, data),
                         "shape": shape} for name, d, shape, data in self.tensors],
            "trainable": [t[0] for t in self.tensors], "weights": weights,
            "writer": dict(WRITER),
        }  # fmt: skip
        if self.pickle is not None:
            doc["pickle"] = {"member": "functions.pkl.zst", "raw_size": self.pickle_raw_size,
                             "sha256": _sha(self.pickle), "size": len(self.pickle),
                             **self.pickle_runtime}  # fmt: skip
            doc["writer"]["cloudpickle"] = self.pickle_runtime["cloudpickle"]
        return doc

    def members(self) -> dict[str, bytes]:
        out = {"weights.safetensors.zst": self.zstd} if self.zstd is not None else {
            "weights.safetensors": self.weights}
        if self.pickle is not None:
            out["functions.pkl.zst"] = self.pickle
        return out  # type: ignore[return-value]


def with_pickle(raw: bytes, **frame_options: Any) -> Parts:
    """Parts whose two functions are pickled in ``raw`` (a raw-block zstd frame of it)."""
    return Parts(pickle=zstd_frame(raw, **frame_options), pickle_raw_size=len(raw),
                 functions={"model": PICKLED, "loss": PICKLED})  # fmt: skip


def pack(members: dict[str, bytes], *, force_zip64: bool = False) -> bytes:
    out = io.BytesIO()
    writer = ContainerWriter(out, force_zip64=force_zip64)
    for name in ("weights.safetensors", "weights.safetensors.zst", "functions.pkl.zst",
                 "manifest.json", "signature.json"):  # fmt: skip
        if name in members:
            writer.add_member(name, members[name])
    writer.close()
    return out.getvalue()


def pack_as_signed_by_010(members: dict[str, bytes]) -> bytes:
    """The container as hkstore 0.1.0's ``hkstore sign`` wrote it: ``functions.pkl.zst`` with
    the 20-byte padding field of a streamed member (still accepted: FORMAT.md 2.5)."""
    from hkstore.store import _container as c

    out, infos, pos = b"", [], 0
    for name in c.MEMBER_ORDER:
        if name not in members:
            continue
        data = members[name]
        crc = c.crc32(data)
        streamed = name in ("weights.safetensors", "weights.safetensors.zst",
                            "functions.pkl.zst")  # fmt: skip
        extra = c._extra_length(name if name != "functions.pkl.zst" else
                                "weights.safetensors.zst", pos, None if streamed else len(data),
                                c._U32_MAX)  # fmt: skip
        header = c._local_header(name, pos, len(data), crc, extra, c._U32_MAX)
        infos.append(c.MemberInfo(name, pos, pos + len(header), len(data), crc))
        out += header + data
        pos = len(out)
    central = b"".join(c._central_entry(info, c._U32_MAX) for info in infos)
    return out + central + c._end_records(len(infos), pos, len(central), c._U32_MAX)


def archive(
    parts: Parts | None = None,
    *,
    signer: Any = None,
    edit: Callable[[dict[str, Any]], Any] | None = None,
    manifest: bytes | None = None,
    signature: bytes | None = None,
) -> bytes:
    """The archive of ``parts``: manifest (``edit``-ed, or these exact bytes), signature."""
    parts = parts or Parts()
    if manifest is None:
        doc = parts.manifest()
        if edit is not None:
            edit(doc)
        manifest = _canonical(doc)
    members = {**parts.members(), "manifest.json": manifest, **parts.extra_members}
    if signature is not None:
        members["signature.json"] = signature
    elif signer is not None:
        members["signature.json"] = sign_manifest(manifest, signer)
    return pack(members)


def patch_bytes(data: bytes, changes: dict[int, bytes]) -> bytes:
    out = bytearray(data)
    for at, value in changes.items():
        out[at : at + len(value)] = value
    return bytes(out)


def member_offset(data: bytes, name: str, *, header: bool = False) -> int:
    info = read_container(data)[name]
    return info.header_offset if header else info.data_offset


def central_offset(data: bytes, name: str) -> int:
    """Offset of ``name``'s central directory entry."""
    return data.rindex(b"PK\x01\x02", 0, data.rindex(name.encode()))


# --- the cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One corpus input and the verdict every entry point must give."""

    name: str
    kind: str  # "archive" | "config" | "declearn"
    build: Callable[[], Any]
    verdict: str  # the exact error class, or "loads"
    what: str
    trust: dict[str, Any] = field(default_factory=dict)
    functions: str = "caller"  # "caller": loaders pass model/loss; "archive": resolved from it

    def file_name(self) -> str:
        suffix = {"archive": ".hkz", "config": ".json", "declearn": ""}[self.kind]
        return self.name.replace("/", "-") + suffix


REQUIRE = {"keys": ["ed25519"], "require_signature": True}
REF_TRUST = {"modules": ["helpers_models"]}


def _edit(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


_DELETE = object()


def _plain() -> bytes:
    return archive()


def _signed() -> bytes:
    return archive(signer=TRUSTED)


def _flip_header_field(
    name: str, where: str, offset: int, value: bytes | None = None, *, xor: int = 0
) -> Callable[[], bytes]:
    """Set (or XOR) bytes of ``name``'s local header or central entry in a signed archive."""

    def build() -> bytes:
        data = _signed()
        start = member_offset(data, name, header=True) if where == "local" else central_offset(
            data, name)
        if value is None:
            value_ = bytes([data[start + offset] ^ xor])
        else:
            value_ = value
        return patch_bytes(data, {start + offset: value_})

    return build


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _zstd_parts(frame: bytes | None = None, raw_size: int | None = None) -> Parts:
    parts = Parts()
    parts.zstd = zstd_frame(parts.weights) if frame is None else frame
    parts.raw_size = raw_size
    return parts


def _rle_ops_pickle_frame(ops: int) -> tuple[bytes, int]:
    """A pickle of ``ops`` NONE opcodes (then STOP) as a tiny frame of RLE blocks."""
    content = b"\x80\x05" + b"N" * ops + b"."
    blocks = [_block(0, 2, b"\x80\x05", False)]
    left = ops
    while left:
        n = min(left, _BLOCK)
        blocks.append(_block(1, n, b"N", False))
        left -= n
    blocks.append(_block(0, 1, b".", True))
    return zstd_frame(content, blocks=blocks), len(content)


def _signature_doc(**changes: Any) -> Callable[[], bytes]:
    def build() -> bytes:
        manifest = _canonical(Parts().manifest())
        doc = json.loads(sign_manifest(manifest, TRUSTED))
        doc.update(changes)
        return archive(manifest=manifest, signature=_canonical(doc))

    return build


def archive_cases() -> list[Case]:
    c: list[Case] = []

    def add(name: str, build: Callable[[], Any], verdict: str, what: str, **kw: Any) -> None:
        c.append(Case(name, "archive", build, verdict, what, **kw))

    # -- valid inputs: what every entry point accepts --------------------------------------
    add("valid/plain", _plain, "loads", "an unsigned archive; the caller passes the functions")
    add("valid/signed-ed25519", _signed, "loads", "signed by the trusted key, signature required",
        trust=REQUIRE)
    add("valid/signed-hmac", lambda: archive(signer=HMAC), "loads",
        "signed with the trusted HMAC secret, signature required",
        trust={"keys": ["hmac"], "require_signature": True})
    add("valid/zstd", lambda: archive(_zstd_parts()), "loads", "weights as one zstd frame")
    add("valid/blake3", lambda: archive(Parts(digest="blake3"), signer=TRUSTED), "loads",
        "tensor digests with BLAKE3 (what hkstore writes by default), signed", trust=REQUIRE)
    add("valid/references", lambda: archive(Parts(functions={"model": MODEL_REF,
                                                             "loss": LOSS_REF})),
        "loads", "functions by reference, their module allowed", trust=REF_TRUST,
        functions="archive")
    add("valid/pickle-caller-functions", lambda: archive(with_pickle(BENIGN_PICKLE),
                                                         signer=TRUSTED),
        "loads", "a signed pickle member; the caller passes the functions (never unpickled)",
        trust=REQUIRE)
    add("valid/pickle-approved", lambda: archive(with_pickle(BENIGN_PICKLE)), "loads",
        "an unsigned pickle whose digest the receiver approved", functions="archive",
        trust={"approved": ["self"], "allow_python_mismatch": True})
    def resigned_by_010() -> bytes:
        parts = with_pickle(BENIGN_PICKLE)
        manifest = _canonical(parts.manifest())
        return pack_as_signed_by_010({**parts.members(), "manifest.json": manifest,
                                      "signature.json": sign_manifest(manifest, TRUSTED)})

    add("valid/resigned-by-0.1.0", resigned_by_010, "loads",
        "a pickle archive as hkstore 0.1.0's `hkstore sign` wrote it (20 bytes of padding "
        "before the pickle): archives already out in the world keep verifying",
        trust=REQUIRE)
    add("valid/pickle-signed-allowed", lambda: archive(with_pickle(BENIGN_PICKLE),
                                                       signer=TRUSTED),
        "loads", "a pickle signed by a trusted key, allow_pickle", functions="archive",
        trust={"keys": ["ed25519"], "allow_pickle": True, "allow_python_mismatch": True})

    # -- container -------------------------------------------------------------------------
    add("container/empty-file", lambda: b"", "ContainerError", "a zero-byte file")
    add("container/not-zip", lambda: b"PK\x03\x04" + b"\x00" * 60, "ContainerError",
        "ZIP magic, then zeros")
    add("container/prepended-byte", lambda: b"\x00" + _signed(), "ContainerError",
        "a byte before the first local header (polyglot)", trust=REQUIRE)
    add("container/appended-byte", lambda: _signed() + b"\x00", "ContainerError",
        "a byte after the end record's comment", trust=REQUIRE)
    add("container/truncated", lambda: _signed()[:-1], "ContainerError", "the last byte cut",
        trust=REQUIRE)
    add("container/comment-v2", lambda: _signed()[:-1] + b"2",
        "UnsupportedContainerVersionError", "end record comment 'hkstore/2'", trust=REQUIRE)
    add("container/comment-other", lambda: _signed()[:-9] + b"zipfile/1", "ContainerError",
        "end record comment of another format", trust=REQUIRE)
    add("container/version-made-by", _flip_header_field("manifest.json", "central", 4,
                                                        b"\x14\x00"),
        "ContainerError", "'version made by' 0x0014 (MS-DOS): every field has one value",
        trust=REQUIRE)
    add("container/version-needed", _flip_header_field("manifest.json", "local", 4, b"\x2d"),
        "ContainerError", "'version needed' 45 on a member that needs no ZIP64", trust=REQUIRE)
    add("container/internal-attributes", _flip_header_field("weights.safetensors", "central", 36,
                                                            b"\x01"),
        "ContainerError", "internal attributes 1 (text file)", trust=REQUIRE)
    add("container/external-attributes-mode", _flip_header_field("manifest.json", "central",
                                                                 40, b"\xed\x81"),
        "ContainerError", "mode 0755 instead of 0644 in the external attributes",
        trust=REQUIRE)
    add("container/symlink", _flip_header_field("manifest.json", "central", 40, b"\xa4\xa1"),
        "ContainerError", "external attributes of a symlink", trust=REQUIRE)
    add("container/dos-date", _flip_header_field("manifest.json", "local", 12, b"\x22"),
        "ContainerError", "another DOS date (in the local header only)", trust=REQUIRE)
    add("container/dos-time-both", lambda: patch_bytes(
        _flip_header_field("manifest.json", "local", 10, b"\x01")(),
        {central_offset(_signed(), "manifest.json") + 12: b"\x01"}),
        "ContainerError", "another DOS time, in both headers", trust=REQUIRE)
    add("container/flag-encrypted", _flip_header_field("manifest.json", "central", 8, b"\x01"),
        "ContainerError", "the encryption flag", trust=REQUIRE)
    add("container/flag-data-descriptor", _flip_header_field("manifest.json", "central", 8,
                                                             b"\x08"),
        "ContainerError", "the data-descriptor flag", trust=REQUIRE)
    add("container/method-deflate", _flip_header_field("manifest.json", "central", 10,
                                                       b"\x08"),
        "ContainerError", "compression method 8 (deflate)", trust=REQUIRE)
    add("container/padding-alignment", _flip_header_field("weights.safetensors", "local", 53,
                                                          xor=0x60),
        "ContainerError", "the padding field's alignment value 32 instead of 64 (a byte no "
        "digest covers: checked exactly)", trust=REQUIRE)
    add("container/crc-mismatch", _flip_header_field("manifest.json", "local", 14, xor=0x01),
        "ContainerError", "a CRC-32 bit of the local header", trust=REQUIRE)
    add("container/manifest-crc", lambda: patch_bytes(_signed(), {member_offset(
        _signed(), "manifest.json") + 2: b"X"}), "ContainerError",
        "a manifest byte changed (its CRC-32 no longer matches)", trust=REQUIRE)
    add("container/forced-zip64", lambda: pack({**Parts().members(), "manifest.json":
                                                 _canonical(Parts().manifest())},
                                                force_zip64=True),
        "ContainerError", "ZIP64 records where nothing needs them")
    add("container/unknown-member", lambda: named("evil.py"), "ContainerError",
        "a member named evil.py")
    add("container/traversal-name", lambda: named("../../manifest.json"),
        "ContainerError", "a member named ../../manifest.json")
    add("container/duplicate-member", lambda: duplicate_member(), "ContainerError",
        "manifest.json twice")
    add("container/member-order", lambda: reorder_members(), "ContainerError",
        "manifest.json before the weights")
    add("container/entry-count", lambda: patch_bytes(_plain(), {len(_plain()) - 21: b"\x03",
                                                                len(_plain()) - 23: b"\x03"}),
        "ContainerError", "the end record counts 3 entries; there are 2")

    # -- manifest --------------------------------------------------------------------------
    def manifest_case(name: str, verdict: str, what: str, **kw: Any) -> None:
        add(f"manifest/{name}", kw.pop("build"), verdict, what, **kw)

    raw = _canonical(Parts().manifest())
    manifest_case("whitespace", "ManifestError", "a space after the first '{'",
                  build=lambda: archive(manifest=b"{ " + raw[1:]))
    manifest_case("bom", "ManifestError", "a UTF-8 byte-order mark",
                  build=lambda: archive(manifest=b"\xef\xbb\xbf" + raw))
    manifest_case("duplicate-key", "ManifestError", "'seed' twice",
                  build=lambda: archive(manifest=raw.replace(b'"seed":7', b'"seed":7,"seed":8')))
    manifest_case("invalid-utf8", "ManifestError", "a 0xff byte in a string",
                  build=lambda: archive(manifest=raw.replace(b'"round"', b'"r\xffund"')))
    manifest_case("nan", "ManifestError", "NaN in metadata",
                  build=lambda: archive(manifest=raw.replace(b'"round":3', b'"round":NaN')))
    manifest_case("float-overflow", "ManifestError", "1e999 in metadata",
                  build=lambda: archive(manifest=raw.replace(b'"round":3', b'"round":1e999')))
    manifest_case("huge-integer", "ManifestError", "a 5000-digit integer",
                  build=lambda: archive(manifest=raw.replace(b'"round":3',
                                                             b'"round":' + b"9" * 5000)))
    manifest_case("lone-surrogate", "ManifestError", "a string holding \\ud800",
                  build=lambda: archive(manifest=raw.replace(b'"round"', b'"\\ud800"')))
    manifest_case("too-deep", "ManifestError", "metadata nested 70 levels",
                  build=lambda: archive(edit=_edit(["metadata", "deep"], _nested(70))))
    manifest_case("format-version-2", "UnsupportedVersionError", "format_version 2",
                  build=lambda: archive(edit=_edit(["format_version"], 2)))
    manifest_case("format-other", "ManifestError", "format 'safetensors'",
                  build=lambda: archive(edit=_edit(["format"], "safetensors")))
    manifest_case("unknown-field", "ManifestError", "a top-level field 'exec'",
                  build=lambda: archive(edit=_edit(["exec"], "rm -rf /")))
    manifest_case("tensor-extra-field", "ManifestError", "a tensor entry with 'offset'",
                  build=lambda: archive(edit=_edit(["tensors", 0, "offset"], 0)))
    manifest_case("dtype-unknown", "ManifestError", "dtype 'F4'",
                  build=lambda: archive(edit=_edit(["tensors", 0, "dtype"], "F4")))
    manifest_case("shape-negative", "ManifestError", "a -1 dimension",
                  build=lambda: archive(edit=_edit(["tensors", 1, "shape"], [-1, 8])))
    manifest_case("digest-uppercase", "ManifestError", "an upper-case SHA-256",
                  build=lambda: archive(edit=lambda d: d["tensors"][0].update(
                      sha256=d["tensors"][0]["sha256"].upper())))
    manifest_case("digest-two-keys", "ManifestError", "a tensor with both 'sha256' and "
                  "'blake3' (which one would a reader check?)",
                  build=lambda: archive(edit=lambda d: d["tensors"][0].update(
                      blake3=_tensor_digest("blake3", TENSORS[0][3]))))
    manifest_case("digest-mixed-algorithms", "ManifestError", "one tensor with BLAKE3, the "
                  "others with SHA-256",
                  build=lambda: archive(edit=_to_blake3(0)))
    manifest_case("digest-unknown-algorithm", "ManifestError", "a tensor digest under 'md5'",
                  build=lambda: archive(edit=lambda d: d["tensors"][0].update(
                      md5=d["tensors"][0].pop("sha256"))))
    manifest_case("trainable-unknown", "ManifestError", "a trainable name that is no tensor",
                  build=lambda: archive(edit=_edit(["trainable", 0], "mlp/~/linear_9:w")))
    manifest_case("trainable-order", "ManifestError", "trainable names out of model order",
                  build=lambda: archive(edit=lambda d: d["trainable"].reverse()))
    manifest_case("trainable-objects", "ManifestError",
                  "10,000 distinct objects in $.trainable (quadratic for JSON Schema's "
                  "uniqueItems: 85 s before the fix)",
                  build=lambda: archive(edit=_edit(["trainable"],
                                                   [{"": i} for i in range(10_000)])))
    manifest_case("tensor-name-reserved", "ManifestError", "a tensor named __metadata__",
                  build=lambda: archive(edit=_edit(["tensors", 0, "name"], "__metadata__")))
    manifest_case("tensor-name-duplicate", "ManifestError", "two tensors with one name",
                  build=lambda: archive(edit=_edit(["tensors", 1, "name"], "mlp/~/linear_0:b")))
    manifest_case("seed-out-of-range", "ManifestError", "seed 2**64",
                  build=lambda: archive(edit=_edit(["seed"], 2**64)))
    manifest_case("ref-pattern", "ManifestError", "ref 'os.system' (no ':')",
                  build=lambda: archive(Parts(functions={"model": {**MODEL_REF, "ref":
                                                                   "os.system"},
                                                         "loss": LOSS_REF})))
    manifest_case("ref-too-long", "ManifestError", "a 1001-character reference",
                  build=lambda: archive(Parts(functions={"model": {**MODEL_REF, "ref":
                                                                   "a:" + "b" * 999},
                                                         "loss": LOSS_REF})))
    manifest_case("function-kind", "ManifestError", "function kind 'eval'",
                  build=lambda: archive(Parts(functions={"model": {"kind": "eval"},
                                                         "loss": NONE})))
    manifest_case("pickle-missing-record", "ManifestError",
                  "a function of kind pickle, $.pickle null",
                  build=lambda: archive(Parts(functions={"model": PICKLED, "loss": NONE})))
    manifest_case("member-missing", "ContainerError",
                  "$.pickle records functions.pkl.zst; the member is absent",
                  build=lambda: archive(edit=lambda d: d.update(
                      pickle=with_pickle(BENIGN_PICKLE).manifest()["pickle"],
                      functions={"model": PICKLED, "loss": PICKLED})))
    manifest_case("member-size", "ContainerError", "$.weights.size one byte off",
                  build=lambda: archive(edit=lambda d: d["weights"].update(
                      size=d["weights"]["size"] + 1)))
    manifest_case("member-unlisted", "ContainerError",
                  "a functions.pkl.zst member the manifest does not list",
                  build=lambda: archive(Parts(extra_members={
                      "functions.pkl.zst": zstd_frame(BENIGN_PICKLE)})))

    # -- safetensors header ------------------------------------------------------------------
    def weights_case(name: str, weights: bytes, verdict: str, what: str) -> None:
        add(f"header/{name}", lambda: archive(Parts(weights=weights)), verdict, what)

    good = {t[0]: {"data_offsets": [0, 0], "dtype": t[1], "shape": t[2]} for t in TENSORS}
    offset = 0
    for name, _, _, data in TENSORS:
        good[name]["data_offsets"] = [offset, offset + len(data)]
        offset += len(data)

    def header(**changes: Any) -> dict[str, Any]:
        out = json.loads(json.dumps(good))
        for name, value in changes.items():
            out[name.replace("__", "/~/").replace("_b", ":b").replace("_w", ":w")] = value
        return out

    weights_case("length-huge", safetensors(length=2**62), "LimitExceededError",
                 "a header length of 2**62 (checked before anything is allocated)")
    weights_case("length-past-end", safetensors(length=10_000), "WeightsFormatError",
                 "a header length past the member's end")
    first = "mlp/~/linear_0:b"
    weights_case("overlap", safetensors(header={**good, first: {**good[first],
                                                                 "data_offsets": [0, 32]},
                                                "mlp/~/linear_0:w": {**good["mlp/~/linear_0:w"],
                                                                     "data_offsets":
                                                                     [16, 144]}}),
                 "WeightsFormatError", "two tensors' bytes overlap")
    weights_case("gap", safetensors(header={**good, first: {**good[first],
                                                             "data_offsets": [4, 36]}}),
                 "WeightsFormatError", "4 bytes before the first tensor belong to none")
    weights_case("trailing", safetensors(tail=b"\x00" * 4), "WeightsFormatError",
                 "4 bytes after the last tensor")
    weights_case("dtype-code", safetensors(header={**good, first: {**good[first],
                                                                    "dtype": "F4"}}),
                 "UnsupportedDtypeError", "a dtype code outside the table")
    weights_case("shape-bytes", safetensors(header={**good, first: {**good[first],
                                                                     "shape": [9]}}),
                 "WeightsFormatError", "a shape that needs 36 bytes for a 32-byte range")
    weights_case("duplicate-key", safetensors(raw_header=_canonical(good).replace(
        b'{"mlp', b'{"mlp/~/linear_0:b":' + _canonical(good[first]) + b',"mlp', 1)),
        "WeightsFormatError", "a tensor listed twice in the header JSON")
    weights_case("metadata-not-string", safetensors(header={**good, "__metadata__":
                                                            {"a": 1}}),
                 "WeightsFormatError", "__metadata__ with a number value")
    weights_case("header-not-json", safetensors(raw_header=b"{" + b" " * 63),
                 "WeightsFormatError", "a header that is not JSON")
    weights_case("header-too-deep", safetensors(raw_header=_canonical(
        {**good, "__metadata__": {"a": "b"}, "x": _nested(100)})),
        "WeightsFormatError", "a header nested 100 levels")

    def header_vs_manifest(name: str, header_doc: dict[str, Any], verdict: str,
                           what: str) -> None:
        weights = safetensors(header=header_doc)
        add(f"header/{name}", lambda: archive(Parts(weights=weights)), verdict, what)

    header_vs_manifest("shape-mismatch", {**good, "mlp/~/linear_0:w": {
        **good["mlp/~/linear_0:w"], "shape": [8, 4]}}, "WeightsFormatError",
        "the header's shape [8, 4], the manifest's [4, 8]")
    renamed = dict(good)
    renamed["mlp/~/linear_0:bias"] = renamed.pop(first)
    header_vs_manifest("name-mismatch", renamed, "WeightsFormatError",
                       "a tensor renamed in the header")

    def digest_case(name: str, data: Callable[[], bytes], verdict: str, what: str,
                    **kw: Any) -> None:
        add(f"digest/{name}", data, verdict, what, **kw)

    def flipped_tensor() -> bytes:
        data = _signed()
        at = member_offset(data, "weights.safetensors") + len(safetensors()) - 1
        return patch_bytes(data, {at: bytes([data[at] ^ 0x01])})

    digest_case("tensor-bit", flipped_tensor, "DigestMismatchError",
                "one bit of the last tensor flipped in a signed archive", trust=REQUIRE)

    def flipped_blake3_tensor() -> bytes:
        data = archive(Parts(digest="blake3"), signer=TRUSTED)
        at = member_offset(data, "weights.safetensors") + len(safetensors()) - 1
        return patch_bytes(data, {at: bytes([data[at] ^ 0x01])})

    digest_case("blake3-tensor-bit", flipped_blake3_tensor, "DigestMismatchError",
                "one bit of the last tensor flipped in a signed BLAKE3 archive", trust=REQUIRE)
    digest_case("blake3-claimed-for-sha256", lambda: archive(edit=lambda d: [
        t.update(blake3=t.pop("sha256")) for t in d["tensors"]]), "DigestMismatchError",
        "SHA-256 digests stored under the 'blake3' key: checked as BLAKE3, they fail")
    def padding_tab() -> bytes:
        data = _signed()
        n = int.from_bytes(safetensors()[:8], "little")
        at = member_offset(data, "weights.safetensors") + 8 + n - 1
        assert data[at : at + 1] == b" "
        return patch_bytes(data, {at: b"\t"})

    digest_case("header-padding", padding_tab, "DigestMismatchError",
                "the header's last padding space changed to a tab (still valid JSON)",
                trust=REQUIRE)
    bools = [("flag", "BOOL", [2], b"\x01\x02")]
    digest_case("bool-byte", lambda: archive(Parts(weights=safetensors(TENSORS + bools),
                                                   tensors=TENSORS + bools)),
                "WeightsFormatError", "a BOOL tensor holding the byte 2")

    # -- zstd ------------------------------------------------------------------------------
    weights = safetensors()

    def zstd_case(name: str, frame: bytes, verdict: str, what: str,
                  raw_size: int | None = None) -> None:
        add(f"zstd/{name}", lambda: archive(_zstd_parts(frame, raw_size)), verdict, what)

    zstd_case("no-checksum", zstd_frame(weights, checksum=False), "ArchiveFormatError",
              "a frame without content checksum")
    zstd_case("bad-checksum", zstd_frame(weights, checksum=b"\x00\x00\x00\x00"),
              "ArchiveFormatError", "a wrong content checksum")
    zstd_case("no-content-size", zstd_frame(weights, declared=None, window_log=17),
              "ArchiveFormatError", "a frame that does not declare its content size")
    zstd_case("declares-more", zstd_frame(weights, declared=len(weights) + 64),
              "LimitExceededError", "a frame declaring 64 bytes more than the manifest")
    zstd_case("declares-less", zstd_frame(weights, declared=len(weights) - 64),
              "ArchiveFormatError", "a frame declaring 64 bytes less than the manifest")
    zstd_case("dictionary", zstd_frame(weights, dict_id=7), "ArchiveFormatError",
              "a frame that needs dictionary 7")
    zstd_case("window-too-large", zstd_frame(weights, window_log=31), "LimitExceededError",
              "a 2 GiB window (the limit is 128 MiB)")
    zstd_case("trailing-frame", zstd_frame(weights) + zstd_frame(b""), "ArchiveFormatError",
              "a second frame after the first")
    zstd_case("skippable-prefix", b"\x50\x2a\x4d\x18\x00\x00\x00\x00" + zstd_frame(weights),
              "ArchiveFormatError", "a skippable frame before the frame")
    zstd_case("truncated", zstd_frame(weights)[:-6], "ArchiveFormatError",
              "the frame's last block cut")
    zstd_case("reserved-block", zstd_frame(weights, blocks=[_block(3, 4, b"\x00" * 4, True)]),
              "ArchiveFormatError", "a block of the reserved type")
    zstd_case("claims-more-than-blocks", zstd_frame(
        weights, blocks=[_block(0, 64, weights[:64], True)], checksum=b"\x00" * 4),
        "ArchiveFormatError", "a frame declaring the right size whose blocks hold 64 bytes "
        "(found by walking block headers, nothing decompressed)")
    zstd_case("declares-200GiB", zstd_frame(
        b"", declared=200 << 30, blocks=[_block(1, _BLOCK, b"\x00", i == 3) for i in range(4)],
        checksum=b"\x00" * 4), "WeightsFormatError",
        "a 400-byte archive declaring 200 GiB of weights: more than the manifest's tensors "
        "need, refused before anything is allocated (was MemoryError)",
        raw_size=200 << 30)
    zstd_case("raw-size-vs-tensors", zstd_frame(weights + bytes(64)), "WeightsFormatError",
              "$.weights.raw_size 64 bytes more than header + tensors",
              raw_size=len(weights) + 64)
    zstd_case("rle-bomb", zstd_frame(weights + bytes(64 * _BLOCK), blocks=[
        _block(0, len(weights), weights, False),
        *[_block(1, _BLOCK, b"\x00", i == 63) for i in range(64)]]),
        "WeightsFormatError", "8 MiB of zeros in 256 bytes of RLE blocks after the weights: "
        "more than the manifest's tensors need", raw_size=len(weights) + 64 * _BLOCK)

    # -- signature ---------------------------------------------------------------------------
    add("signature/unsigned-required", _plain, "SignatureError",
        "an unsigned archive where a signature is required", trust=REQUIRE)
    add("signature/other-key", lambda: archive(signer=OTHER), "UntrustedKeyError",
        "signed by a key the receiver does not trust", trust=REQUIRE)
    add("signature/hmac-as-ed25519", lambda: archive(signer=HMAC), "UntrustedKeyError",
        "signed with an HMAC secret; only the Ed25519 key is trusted", trust=REQUIRE)

    def flipped_signature() -> bytes:
        data = _signed()
        sig = json.loads(read_member(data, "signature.json"))
        raw = bytearray(base64.b64decode(sig["signature"]))
        raw[0] ^= 0x01
        sig["signature"] = base64.b64encode(bytes(raw)).decode()
        manifest = read_member(data, "manifest.json")
        return archive(manifest=manifest, signature=_canonical(sig))

    add("signature/bit-flip", flipped_signature, "SignatureError",
        "one bit of the Ed25519 signature flipped", trust=REQUIRE)

    def replayed() -> bytes:
        other = _canonical(Parts().manifest() | {"seed": 8})
        return archive(signature=sign_manifest(other, TRUSTED))

    add("signature/replayed", replayed, "SignatureError",
        "a valid signature of another manifest", trust=REQUIRE)
    add("signature/manifest-edited", lambda: archive(
        manifest=_canonical(Parts().manifest() | {"seed": 9}),
        signature=sign_manifest(_canonical(Parts().manifest()), TRUSTED)), "SignatureError",
        "the manifest changed after signing (seed 9)", trust=REQUIRE)
    add("signature/extra-field", _signature_doc(comment="hi"), "SignatureError",
        "an unexpected field in signature.json")
    add("signature/version-2", _signature_doc(version=2), "UnsupportedVersionError",
        "signature.json version 2")
    add("signature/bad-base64", _signature_doc(signature="!!!!"), "SignatureError",
        "a signature that is not base64 (refused without keys too)")
    add("signature/key-id-mismatch", _signature_doc(
        key_id="hmac-sha256:" + "0" * 32), "SignatureError",
        "an hmac-sha256 key id on an ed25519 signature")
    add("signature/non-canonical", lambda: archive(
        manifest=_canonical(Parts().manifest()),
        signature=sign_manifest(_canonical(Parts().manifest()), TRUSTED) + b"\n"),
        "SignatureError", "a newline after signature.json's JSON", trust=REQUIRE)

    # -- code references -----------------------------------------------------------------------
    def ref_case(name: str, model_ref: str, verdict: str, what: str, **trust: Any) -> None:
        add(f"code/{name}", lambda: archive(Parts(functions={
            "model": {**MODEL_REF, "ref": model_ref}, "loss": LOSS_REF})), verdict, what,
            functions="archive", trust=trust or {})

    ref_case("os-system-default-trust", "os:system", "RefusedCodeError",
             "ref os:system under the default trust")
    ref_case("not-allowed-module", "json:loads", "RefusedCodeError",
             "ref json:loads; only helpers_models is allowed", **REF_TRUST)
    ref_case("private-segment", "helpers_models:_private", "RefusedCodeError",
             "a private name in an allowed module", **REF_TRUST)
    ref_case("dunder-walk", "helpers_models:mlp_model.__globals__", "RefusedCodeError",
             "a dunder attribute walk", **REF_TRUST)
    ref_case("prefix-lookalike", "helpers_modelsx:mlp_model", "RefusedCodeError",
             "a module that only starts like the allowed one", **REF_TRUST)
    add("code/kind-none", _plain, "ArchiveFormatError",
        "functions of kind none, and the loader asks the archive for them",
        functions="archive")

    # -- pickles -------------------------------------------------------------------------------
    def pickle_case(name: str, build: Callable[[], bytes], verdict: str, what: str,
                    **kw: Any) -> None:
        add(f"pickle/{name}", build, verdict, what, **kw)

    pickle_case("canary-default-trust", lambda: archive(with_pickle(canary_pickle())),
                "RefusedCodeError", "an unsigned os.system pickle under the default trust",
                functions="archive")
    pickle_case("canary-signed-not-allowed", lambda: archive(with_pickle(canary_pickle()),
                                                             signer=TRUSTED),
                "RefusedCodeError", "a signed pickle without allow_pickle", functions="archive",
                trust=REQUIRE)
    pickle_case("canary-unsigned-allowed", lambda: archive(with_pickle(canary_pickle())),
                "RefusedCodeError", "allow_pickle with keys, an unsigned pickle",
                functions="archive", trust={"keys": ["ed25519"], "allow_pickle": True})
    pickle_case("canary-other-approved", lambda: archive(with_pickle(canary_pickle())),
                "RefusedCodeError", "another blob's digest approved", functions="archive",
                trust={"approved": ["benign"]})
    pickle_case("canary-other-signer", lambda: archive(with_pickle(canary_pickle()),
                                                       signer=OTHER),
                "UntrustedKeyError", "signed by an untrusted key, allow_pickle",
                functions="archive", trust={"keys": ["ed25519"], "allow_pickle": True})
    mismatch = with_pickle(canary_pickle())
    mismatch.pickle_runtime = {**PICKLE_RUNTIME, "python": "2.7"}
    pickle_case("canary-python-2.7", lambda: archive(mismatch, signer=TRUSTED),
                "RuntimeMismatchError", "signed and allowed, written by Python 2.7",
                functions="archive", trust={"keys": ["ed25519"], "allow_pickle": True})
    pickle_case("not-a-pickle", lambda: archive(with_pickle(b"not a pickle at all")),
                "ArchiveFormatError", "a valid zstd frame whose content is not a pickle "
                "(every entry point checks the member, functions passed or not)")
    pickle_case("truncated-opcodes", lambda: archive(with_pickle(BENIGN_PICKLE[:-3])),
                "ArchiveFormatError", "a pickle cut before its STOP")

    def altered_pickle() -> bytes:
        data = archive(with_pickle(BENIGN_PICKLE), signer=TRUSTED)
        at = member_offset(data, "functions.pkl.zst") + 20
        return patch_bytes(data, {at: bytes([data[at] ^ 0x01])})

    pickle_case("altered-signed", altered_pickle, "DigestMismatchError",
                "a pickle byte changed in a signed archive; the caller passes the functions",
                trust=REQUIRE)
    frame, raw_len = _rle_ops_pickle_frame(250_001)
    pickle_case("opcode-bomb", lambda: archive(Parts(
        pickle=frame, pickle_raw_size=raw_len, functions={"model": PICKLED, "loss": PICKLED})),
        "LimitExceededError", "250,001 opcodes in a 40-byte frame (max_pickle_ops)")
    pickle_case("raw-size-over-cap", lambda: archive(with_pickle(BENIGN_PICKLE),
                                                     edit=_edit(["pickle", "raw_size"],
                                                                1 << 40)),
                "LimitExceededError", "$.pickle.raw_size 1 TiB")
    return c


def read_member(data: bytes, name: str) -> bytes:
    info = read_container(data)[name]
    return data[info.data_offset : info.data_offset + info.size]


def zip_with(entries: list[tuple[str, bytes]]) -> bytes:
    """A plain ZIP (Python's zipfile, fixed dates and attributes) with the hkstore comment."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            with warnings_off():
                zf.writestr(info, data)
        zf.comment = b"hkstore/1"
    return out.getvalue()


def warnings_off() -> Any:
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")  # zipfile warns about the duplicate name on purpose
    return stack


def _valid_members() -> list[tuple[str, bytes]]:
    parts = Parts()
    return [*parts.members().items(), ("manifest.json", _canonical(parts.manifest()))]


def named(name: str) -> bytes:
    """The valid members plus one named ``name``."""
    return zip_with([*_valid_members(), (name, b"print('hello')")])


def duplicate_member() -> bytes:
    return zip_with([*_valid_members(), ("manifest.json", _canonical(Parts().manifest()))])


def reorder_members() -> bytes:
    """The manifest first, then the weights."""
    return zip_with(list(reversed(_valid_members())))


# --- configs ------------------------------------------------------------------------------------


def config_cases() -> list[Case]:
    from hkstore.store._config import build_config

    def config(**changes: Any) -> Callable[[], dict[str, Any]]:
        def build() -> dict[str, Any]:
            signer = changes.pop("signer", None)
            edit = changes.pop("edit", None)
            doc = build_config(seed=7, data_info=dict(DATA_INFO),
                               trainable=[t[0] for t in TENSORS],
                               functions=changes.pop("functions",
                                                     {"model": NONE, "loss": NONE}),
                               signer=signer, **changes)  # fmt: skip
            if edit is not None:
                edit(doc)
            return doc

        return build

    c: list[Case] = []

    def add(name: str, build: Callable[[], Any], verdict: str, what: str, **kw: Any) -> None:
        c.append(Case(f"config/{name}", "config", build, verdict, what, **kw))

    pickle_blob = zstd_frame(BENIGN_PICKLE)
    add("valid", config(), "loads", "a config; the caller passes the functions")
    add("valid-signed", config(signer=TRUSTED), "loads", "signed, signature required",
        trust=REQUIRE)
    add("valid-references", config(functions={"model": MODEL_REF, "loss": LOSS_REF}),
        "loads", "functions by reference, their module allowed", functions="archive",
        trust=REF_TRUST)
    add("seed-too-large", config(edit=_edit(["seed"], 2**32)), "ConfigError",
        "seed 2**32 (seeds are 32-bit)")
    add("format-other", config(edit=_edit(["format"], "declearn")), "ConfigError",
        "format 'declearn'")
    add("version-2", config(edit=_edit(["version"], 2)), "UnsupportedVersionError",
        "version 2")
    add("malformed-signature-no-keys", config(edit=_edit(["signature"], {
        "algorithm": "ed25519", "key_id": "x", "signature": "!"})), "ConfigError",
        "a malformed signature, and the receiver gives no keys (refused all the same)")
    add("unsigned-required", config(), "SignatureError",
        "an unsigned config where a signature is required", trust=REQUIRE)
    add("kwargs-deep", config(functions={"model": MODEL_REF, "loss": LOSS_REF},
                              edit=_edit(["functions", "model", "kwargs"], {"x": _nested(70)})),
        "ConfigError", "reference kwargs nested 70 levels", functions="archive",
        trust=REF_TRUST)
    add("os-system", config(functions={"model": {**MODEL_REF, "ref": "os:system"},
                                       "loss": LOSS_REF}),
        "RefusedCodeError", "ref os:system", functions="archive", trust=REF_TRUST)
    def swap_blob(raw: bytes) -> Callable[[dict[str, Any]], None]:
        frame = zstd_frame(raw)

        def apply(doc: dict[str, Any]) -> None:
            doc["pickle"].update(blob=base64.b64encode(frame).decode(), sha256=_sha(frame),
                                 size=len(frame), raw_size=len(raw))  # fmt: skip

        return apply

    add("pickle-not-a-pickle", config(
        functions={"model": PICKLED, "loss": PICKLED}, pickle_blob=pickle_blob,
        pickle_raw_size=len(BENIGN_PICKLE), pickle_runtime=PICKLE_RUNTIME,
        edit=swap_blob(b"not a pickle")), "ConfigError",
        "a pickle blob that is a valid frame but not a pickle; the caller passes the "
        "functions (checked all the same)")
    add("pickle-digest", config(
        functions={"model": PICKLED, "loss": PICKLED}, pickle_blob=pickle_blob,
        pickle_raw_size=len(BENIGN_PICKLE), pickle_runtime=PICKLE_RUNTIME,
        edit=lambda d: d["pickle"].update(sha256="0" * 64)), "DigestMismatchError",
        "a pickle blob whose digest differs from its record")
    add("pickle-unsigned", config(
        functions={"model": PICKLED, "loss": PICKLED}, pickle_blob=pickle_blob,
        pickle_raw_size=len(BENIGN_PICKLE), pickle_runtime=PICKLE_RUNTIME),
        "RefusedCodeError", "an unsigned pickle under the default trust", functions="archive")
    add("pickle-approved", config(
        functions={"model": PICKLED, "loss": PICKLED}, pickle_blob=pickle_blob,
        pickle_raw_size=len(BENIGN_PICKLE), pickle_runtime=PICKLE_RUNTIME),
        "loads", "an unsigned pickle whose digest the receiver approved",
        functions="archive", trust={"approved": ["self"], "allow_python_mismatch": True})
    add("features-huge", config(edit=_edit(["data_info", "features_shape"], [10**6, 10**6])),
        "LimitExceededError", "data info asking for a 10**12-element input batch")
    add("data-type-object", config(edit=_edit(["data_info", "data_type"], "object")),
        "DataInfoError", "data_type 'object'")
    add("trainable-unknown", config(edit=_edit(["trainable"], ["mlp/~/linear_9:w"])),
        "WeightsMismatchError", "a trainable name the model does not have")
    return c


# --- declearn checkpoints ----------------------------------------------------------------------


def _hex_reference(module: str, name: str) -> str:
    """What declearn stores for an importable function: a joblib (pickle) global reference."""
    return (b"\x80\x04" + _text(module) + _text(name) + b"\x93.").hex()


def declearn_cases() -> list[Case]:
    c: list[Case] = []

    def folder(config: dict[str, Any] | bytes, state: Any) -> Callable[[], dict[str, bytes]]:
        def build() -> dict[str, bytes]:
            import msgpack

            raw_config = config if isinstance(config, bytes) else _canonical(config)
            raw_state = state if isinstance(state, bytes) else msgpack.packb(
                state, use_bin_type=True)
            return {"model_config.json": raw_config,
                    "model_state_26-01-01_00-00-00.mpk": raw_state}

        return build

    config = {"typekey": "haiku", "model": _hex_reference("helpers_models", "mlp_model"),
              "loss": _hex_reference("helpers_models", "mse_loss"),
              "data_info": dict(DATA_INFO), "seed": 7}  # fmt: skip

    def vector(**arrays: Any) -> dict[str, Any]:
        return {"__type__": "JaxNumpyVector", "dump": {
            name: {"__type__": "np.ndarray", "dump": wire} for name, wire in arrays.items()}}

    good = vector(**{name: [data, "f", shape] for name, _, shape, data in TENSORS})

    def add(name: str, build: Callable[[], Any], verdict: str, what: str) -> None:
        c.append(Case(f"declearn/{name}", "declearn", build, verdict, what))

    add("valid", folder(config, good), "loads", "a declearn checkpoint with references")
    add("code-pickle", folder({**config, "model": (
        b"\x80\x04" + _text("os") + _text("system") + b"\x93" + _text("id") + b"\x85R.").hex()},
        good), "RefusedCodeError", "a model pickle that calls os.system")
    add("not-msgpack", folder(config, b"\xc1" * 8), "DeclearnFormatError",
        "a state file that is not MessagePack")
    add("array-bytes", folder(config, vector(w=[b"\x00" * 5, "f", [2]])),
        "DeclearnFormatError", "5 bytes for a float32 array of 2")
    add("array-rank-100", folder(config, vector(w=[b"\x00" * 4, "f", [1] * 100])),
        "DeclearnFormatError", "an array of 100 dimensions (numpy allows 64)")
    add("array-zero-huge", folder(config, vector(w=[b"", "f", [0, 2**64 - 1]])),
        "DeclearnFormatError", "a zero-size array with a 2**64 - 1 dimension")
    add("array-dtype-object", folder(config, vector(w=[b"\x00" * 8, "O", [1]])),
        "UnsupportedDtypeError", "dtype 'O' (Python objects)")
    add("typekey", folder({**config, "typekey": "torch"}, good), "DeclearnFormatError",
        "a typekey other than haiku")
    add("config-not-json", folder(b"{'typekey': 'haiku'}", good), "DeclearnFormatError",
        "a config that is not JSON")
    return c


# --- writing ------------------------------------------------------------------------------------


def all_cases() -> list[Case]:
    return archive_cases() + config_cases() + declearn_cases()


def _trust_json(case: Case, digests: dict[str, str]) -> dict[str, Any]:
    trust = dict(case.trust)
    if "approved" in trust:
        trust["approved"] = [digests[name] for name in trust["approved"]]
    return trust


def write_corpus(out: Path) -> dict[str, Any]:
    """Write every case and the keys into ``out``; return the verdict table."""
    if out.exists():
        shutil.rmtree(out)
    (out / "keys").mkdir(parents=True)
    from hkstore.store._keys import public_key_pem

    (out / "keys" / "trusted-ed25519.pub").write_bytes(public_key_pem(TRUSTED.verifier()))
    (out / "keys" / "other-ed25519.pub").write_bytes(public_key_pem(OTHER.verifier()))
    (out / "keys" / "trusted.hmac").write_bytes(HMAC.secret)
    digests = {"benign": _sha(zstd_frame(BENIGN_PICKLE)), "canary": _sha(
        zstd_frame(canary_pickle()))}  # fmt: skip
    rows = []
    names = set()
    for case in all_cases():
        assert case.name not in names, case.name
        names.add(case.name)
        built = case.build()
        folder = {"archive": "archives", "config": "configs", "declearn": "declearn"}[case.kind]
        path = out / folder / case.file_name()
        path.parent.mkdir(parents=True, exist_ok=True)
        if case.kind == "archive":
            path.write_bytes(built)
        elif case.kind == "config":
            path.write_bytes(_canonical(built) + b"\n")
        else:
            path.mkdir()
            for name, data in built.items():
                (path / name).write_bytes(data)
        self_digest = None
        if case.kind == "archive" and isinstance(built, bytes):
            try:
                self_digest = _sha(read_member(built, "functions.pkl.zst"))
            except Exception:
                self_digest = None
        elif case.kind == "config" and built.get("pickle"):
            self_digest = built["pickle"]["sha256"]
        trust = _trust_json(case, {**digests, "self": self_digest or ""})
        rows.append({"name": case.name, "kind": case.kind,
                     "path": path.relative_to(out).as_posix(), "verdict": case.verdict,
                     "functions": case.functions, "trust": trust, "what": case.what})  # fmt: skip
    table = {
        "format": "hkstore-corpus-verdicts", "version": TABLE_VERSION,
        "keys": {"ed25519": "keys/trusted-ed25519.pub", "other": "keys/other-ed25519.pub",
                 "hmac": "keys/trusted.hmac"},
        "canary": CANARY, "cases": rows,
    }  # fmt: skip
    (out / "verdicts.json").write_text(json.dumps(table, indent=1, ensure_ascii=True) + "\n")
    (out / "README.md").write_text(_README)
    return table


_README = """\
# Hostile-input corpus

Written by `python tools/make_corpus.py` (do not edit by hand: regenerate, then commit).
`tests/test_corpus.py` checks that regenerating gives these exact bytes, and runs every case
through every entry point, requiring the verdict `verdicts.json` records (the exact error
class, or `loads`) from each:

- archives: `hkstore.load` (path), `hkstore.loads` (bytes), `open_archive(...).verify()`,
  `hkstore verify --json` and `hkstore inspect --json`;
- configs: `HaikuModel.from_config`;
- declearn checkpoints: `hkstore.integrations.declearn.read_declearn` and
  `hkstore convert-declearn`.

Each row's `trust` is the receiver's policy (`keys` names files of `keys/`; `approved` holds
digests); `functions` says whether the loader passes the model and loss functions itself
(`caller`) or asks the input for them (`archive`: the CLI then runs its code check with the
same policy). The keys are test keys derived from fixed seeds: never trust them.

`canary` names the file a canary pickle would create if it were ever unpickled; the tests run
every entry point in an empty folder and check it never appears.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="where to write (default: the corpus)")
    p.add_argument("--check", action="store_true",
                   help="write to a temp folder and compare with --out, byte for byte")
    args = p.parse_args(argv)
    if not args.check:
        table = write_corpus(args.out)
        print(f"wrote {len(table['cases'])} cases to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "corpus"
        write_corpus(fresh)
        diff = _compare(fresh, args.out)
    for line in diff:
        print(line)
    return 1 if diff else 0


def _compare(a: Path, b: Path) -> list[str]:
    """Files that differ, exist on one side only, in two trees."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()} if b.exists() else set()
    out = [f"only in the regenerated corpus: {p}" for p in sorted(files_a - files_b)]
    out += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    out += [f"differs: {p}" for p in sorted(files_a & files_b)
            if not filecmp.cmp(a / p, b / p, shallow=False)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
