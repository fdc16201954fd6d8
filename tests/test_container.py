"""Tests of hkstore.store._container: the ZIP writer and the one strict container reader."""

from __future__ import annotations

import hashlib
import io
import mmap
import re
import shutil
import stat
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hkstore.errors import (
    ContainerError,
    LimitExceededError,
    UnsupportedContainerVersionError,
)
from hkstore.store._container import (
    ARCHIVE_COMMENT,
    MEMBER_NAMES,
    ContainerWriter,
    MemberInfo,
    crc32,
    crc32_combine,
    read_container,
)
from hkstore.store._limits import Limits

# --- helpers ------------------------------------------------------------------------------

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_LOCAL_FIELDS = ("sig", "needed", "flags", "method", "time", "date", "crc", "csize", "usize",
                 "name_len", "extra_len")  # fmt: skip
_CENTRAL_FIELDS = ("sig", "made_by", "needed", "flags", "method", "time", "date", "crc",
                   "csize", "usize", "name_len", "extra_len", "comment_len", "disk",
                   "internal", "external", "offset")  # fmt: skip
_EOCD_FIELDS = ("sig", "disk", "cd_disk", "disk_count", "count", "cd_size", "cd_offset",
                "comment_len")  # fmt: skip
_LOCAL_AT = {"flags": 6, "method": 8, "time": 10, "crc": 14, "csize": 18, "usize": 22}
_CENTRAL_AT = {"made_by": 4, "needed": 6, "flags": 8, "method": 10, "crc": 16,
               "csize": 20, "usize": 24, "comment_len": 32, "disk": 34, "external": 38,
               "offset": 42}  # fmt: skip

WEIGHTS = b"W" * 300
FUNCTIONS = bytes(range(256)) * 2
MANIFEST = b'{"format":"hkstore"}'
SIGNATURE = b'{"sig":1}'
ALLOWED = (ContainerError, LimitExceededError)


@dataclass
class Raw:
    """One member of a hand-built ZIP; every header field can be overridden."""

    name: bytes
    data: bytes = b""
    local: dict[str, int] = field(default_factory=dict)
    central: dict[str, int] = field(default_factory=dict)
    local_name: bytes | None = None
    local_extra: bytes = b""
    central_extra: bytes = b""
    comment: bytes = b""
    gap_before: bytes = b""
    write_local: bool = True


def build(
    members: list[Raw],
    *,
    prefix: bytes = b"",
    before_cd: bytes = b"",
    cd_trailer: bytes = b"",
    eocd: dict[str, int] | None = None,
    comment: bytes = ARCHIVE_COMMENT,
    suffix: bytes = b"",
) -> bytes:
    """A ZIP written field by field, so each test can break exactly one thing."""
    out = bytearray(prefix)
    central = []
    for m in members:
        out += m.gap_before
        offset = len(out)
        crc = zlib.crc32(m.data)
        local_name = m.name if m.local_name is None else m.local_name
        lf = {"sig": 0x04034B50, "needed": 20, "flags": 0x800, "method": 0, "time": 0,
              "date": 0x21, "crc": crc, "csize": len(m.data), "usize": len(m.data),
              "name_len": len(local_name), "extra_len": len(m.local_extra)}  # fmt: skip
        lf.update(m.local)
        if m.write_local:
            out += _LOCAL.pack(*(lf[k] for k in _LOCAL_FIELDS)) + local_name + m.local_extra
            out += m.data
        cf = {"sig": 0x02014B50, "made_by": 0x32D, "needed": 20, "flags": 0x800, "method": 0,
              "time": 0, "date": 0x21, "crc": crc, "csize": len(m.data), "usize": len(m.data),
              "name_len": len(m.name), "extra_len": len(m.central_extra),
              "comment_len": len(m.comment), "disk": 0, "internal": 0,
              "external": (stat.S_IFREG | 0o644) << 16, "offset": offset}  # fmt: skip
        cf.update(m.central)
        central.append(
            _CENTRAL.pack(*(cf[k] for k in _CENTRAL_FIELDS)) + m.name + m.central_extra + m.comment
        )
    out += before_cd
    cd_offset = len(out)
    out += b"".join(central) + cd_trailer
    ef = {"sig": 0x06054B50, "disk": 0, "cd_disk": 0, "disk_count": len(members),
          "count": len(members), "cd_size": len(out) - cd_offset, "cd_offset": cd_offset,
          "comment_len": len(comment)}  # fmt: skip
    ef.update(eocd or {})
    out += _EOCD.pack(*(ef[k] for k in _EOCD_FIELDS)) + comment + suffix
    return bytes(out)


def write_archive(*, force_zip64: bool = False, streamed: bool = True) -> bytes:
    """The member order hkstore writes: weights (aligned), functions, manifest, signature."""
    out = io.BytesIO()
    writer = ContainerWriter(out, force_zip64=force_zip64)
    if streamed:
        stream = writer.begin_member("weights.safetensors")
        for start in range(0, len(WEIGHTS), 128):
            stream.write(memoryview(WEIGHTS)[start : start + 128])
        stream.finish()
    else:
        writer.add_member("weights.safetensors", WEIGHTS)
    writer.add_member("functions.pkl.zst", FUNCTIONS)
    writer.add_member("manifest.json", MANIFEST)
    writer.add_member("signature.json", SIGNATURE)
    writer.close()
    return out.getvalue()


def central_entries(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, name) of each central entry of a valid non-ZIP64 archive."""
    _, _, _, _, count, _, pos, _ = _EOCD.unpack_from(data, len(data) - 22 - len(ARCHIVE_COMMENT))
    for _ in range(count):
        fields = dict(zip(_CENTRAL_FIELDS, _CENTRAL.unpack_from(data, pos), strict=True))
        yield pos, data[pos + 46 : pos + 46 + fields["name_len"]]
        pos += 46 + fields["name_len"] + fields["extra_len"] + fields["comment_len"]


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def patch_member(data: bytes, name: str, *, where: str, field_name: str, value: int) -> bytes:
    """Set one header field of member ``name`` in its local header or central entry."""
    members = read_container(data)
    fmt = "<I" if field_name in {"crc", "csize", "usize", "external", "offset"} else "<H"
    if where == "local":
        return patch(data, members[name].header_offset + _LOCAL_AT[field_name], fmt, value)
    (pos,) = [pos for pos, raw in central_entries(data) if raw == name.encode()]
    return patch(data, pos + _CENTRAL_AT[field_name], fmt, value)


def refused(data: bytes, pattern: str, *, limits: Limits | None = None) -> ContainerError:
    with pytest.raises(ContainerError, match=pattern) as info:
        read_container(data) if limits is None else read_container(data, limits)
    return info.value


# --- writing and reading back --------------------------------------------------------------


@pytest.mark.parametrize("force_zip64", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_roundtrip_gives_members_in_file_order(force_zip64: bool, streamed: bool) -> None:
    data = write_archive(force_zip64=force_zip64, streamed=streamed)
    members = read_container(data, force_zip64=force_zip64)
    assert list(members) == [
        "weights.safetensors",
        "functions.pkl.zst",
        "manifest.json",
        "signature.json",
    ]
    expected = {"weights.safetensors": WEIGHTS, "functions.pkl.zst": FUNCTIONS,
                "manifest.json": MANIFEST, "signature.json": SIGNATURE}  # fmt: skip
    for name, info in members.items():
        assert data[info.data_offset : info.data_offset + info.size] == expected[name]
        assert info.crc32 == zlib.crc32(expected[name])
    assert members["weights.safetensors"].header_offset == 0
    assert members["weights.safetensors"].data_offset % 64 == 0


def test_writer_returns_the_infos_the_reader_finds() -> None:
    out = io.BytesIO()
    writer = ContainerWriter(out)
    stream = writer.begin_member("weights.safetensors")
    stream.write(WEIGHTS)
    infos = [stream.finish(), writer.add_member("manifest.json", MANIFEST)]
    writer.close()
    assert list(read_container(out.getvalue()).values()) == infos


def test_output_is_deterministic_and_byte_stable() -> None:
    data = write_archive()
    assert write_archive() == data
    assert data[:4] == b"PK\x03\x04"
    assert data.endswith(ARCHIVE_COMMENT)
    # Pins the v1 byte layout (fixed dates, versions, attributes, padding): change these only
    # together with docs/FORMAT.md.
    assert hashlib.sha256(data).hexdigest() == (
        "854e437d8bcbc69caf89608ef04cfa0195577a77a6957b340d64ef9161bf47cb"
    )
    assert hashlib.sha256(write_archive(force_zip64=True)).hexdigest() == (
        "594facc7a22103285b0d8a33448e9e50167ca8e9489b794f544d0443d2d4e778"
    )


def test_data_start_follows_the_one_layout_after_any_prefix() -> None:
    for prefix_size in range(0, 70, 7):
        out = io.BytesIO()
        writer = ContainerWriter(out)
        stream = writer.begin_member("weights.safetensors")
        stream.write(b"w" * prefix_size)
        streamed = stream.finish()
        added = writer.add_member("functions.pkl.zst", b"x" * prefix_size)
        manifest = writer.add_member("manifest.json", b"{}")
        writer.close()
        members = read_container(out.getvalue())
        assert list(members.values()) == [streamed, added, manifest]
        assert streamed.data_offset % 64 == 0
        # unaligned members carry no padding: data right after the name
        assert added.data_offset == added.header_offset + 30 + len("functions.pkl.zst")
        assert manifest.data_offset == manifest.header_offset + 30 + len("manifest.json")


def test_stream_accepts_numpy_arrays_and_memoryviews_of_any_format() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = io.BytesIO()
    writer = ContainerWriter(out)
    stream = writer.begin_member("weights.safetensors")
    assert stream.write(array) == 48
    assert stream.write(memoryview(array.data)) == 48
    assert stream.write(np.array(1.5)) == 8
    info = stream.finish()
    writer.add_member("manifest.json", memoryview(b"{}"))
    writer.close()
    data = out.getvalue()
    assert data[info.data_offset : info.data_offset + info.size] == (
        array.tobytes() * 2 + np.array(1.5).tobytes()
    )


def test_finish_with_a_crc_combined_from_pieces() -> None:
    pieces = [b"a" * 100, b"", b"b" * 7, bytes(range(256))]
    crc = 0
    out = io.BytesIO()
    writer = ContainerWriter(out)
    stream = writer.begin_member("weights.safetensors", compute_crc=False)
    for piece in pieces:
        stream.write(piece)
        crc = crc32_combine(crc, crc32(piece), len(piece))
    info = stream.finish(crc32=crc)
    writer.add_member("manifest.json", b"{}")
    writer.close()
    assert info.crc32 == zlib.crc32(b"".join(pieces))
    assert read_container(out.getvalue())["weights.safetensors"].crc32 == info.crc32


def test_writer_refuses_misuse() -> None:
    out = io.BytesIO()
    writer = ContainerWriter(out)
    with pytest.raises(ValueError, match="not one of"):
        writer.add_member("evil.py", b"")
    with pytest.raises(ValueError, match="needs size="):
        writer.begin_member("manifest.json")
    stream = writer.begin_member("weights.safetensors", compute_crc=False)
    with pytest.raises(ValueError, match=r"'weights.safetensors' is not finished"):
        writer.add_member("manifest.json", b"{}")
    with pytest.raises(ValueError, match="needs finish"):
        stream.finish()
    stream.finish(crc32=0)
    with pytest.raises(ValueError, match="finished"):
        stream.write(b"late")
    with pytest.raises(ValueError, match="written twice"):
        writer.add_member("weights.safetensors", b"")
    with pytest.raises(ValueError, match=r"no manifest.json"):
        writer.close()
    writer.add_member("manifest.json", b"{}")
    with pytest.raises(ValueError, match="members are written in the order"):
        writer.add_member("functions.pkl.zst", b"")
    checked = writer.begin_member("signature.json", size=2)
    checked.write(b"{}")
    with pytest.raises(ValueError, match="the data written has"):
        checked.finish(crc32=1)
    checked.finish()
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.add_member("functions.pkl.zst", b"")
    positioned = io.BytesIO(b"xx")
    positioned.seek(2)
    with pytest.raises(ValueError, match="offset 0"):
        ContainerWriter(positioned)


def test_reads_from_mmap_and_leaves_it_closable(tmp_path: Path) -> None:
    path = tmp_path / "a.hkz"
    path.write_bytes(write_archive())
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert read_container(mapped) == read_container(path.read_bytes())
    bad = tmp_path / "bad.hkz"
    bad.write_bytes(patch_member(write_archive(), "manifest.json", where="local",
                                 field_name="crc", value=0))  # fmt: skip
    with bad.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with pytest.raises(ContainerError):
            read_container(mapped)
    # leaving the with-block closed the mmap: no view of it outlived the failed read


def test_refuses_a_valid_zip_that_is_not_the_one_encoding() -> None:
    # zipfile writes its own "version made by", attributes and flags: a valid ZIP with the
    # right comment, but not byte for byte what the format allows, so it is refused.
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(zipfile.ZipInfo("manifest.json", (1980, 1, 1, 0, 0, 0)), MANIFEST)
        zf.comment = ARCHIVE_COMMENT
    error = refused(out.getvalue(), "the only allowed value is")
    assert "flags is 0x0; the only allowed value is 0x800" in str(error)


# --- interoperability ----------------------------------------------------------------------


@pytest.mark.parametrize("force_zip64", [False, True])
def test_zipfile_and_unzip_read_our_archives_byte_exactly(
    force_zip64: bool, tmp_path: Path
) -> None:
    data = write_archive(force_zip64=force_zip64)
    members = read_container(data, force_zip64=force_zip64)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        assert zf.comment == ARCHIVE_COMMENT
        assert [i.filename for i in zf.infolist()] == list(members)
        for info in zf.infolist():
            ours = members[info.filename]
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset, info.file_size, info.CRC) == (
                ours.header_offset,
                ours.size,
                ours.crc32,
            )
            assert zf.read(info) == data[ours.data_offset : ours.data_offset + ours.size]
    unzip = shutil.which("unzip")
    if unzip:  # also check Info-ZIP where installed; the zipfile checks above always run
        path = tmp_path / "a.zip"
        path.write_bytes(data)
        tested = subprocess.run([unzip, "-t", str(path)], capture_output=True, text=True)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "No errors detected" in tested.stdout
        listed = subprocess.run([unzip, "-l", str(path)], capture_output=True, text=True)
        assert listed.returncode == 0
        for name in members:
            assert name in listed.stdout


def test_forced_zip64_writes_the_zip64_records() -> None:
    data = write_archive(force_zip64=True)
    assert struct.pack("<I", 0x06064B50) in data
    assert data[-22 - len(ARCHIVE_COMMENT) - 20 :][:4] == struct.pack("<I", 0x07064B50)
    plain = read_container(write_archive())
    zip64 = read_container(data, force_zip64=True)
    refused(data, "the only allowed value")  # ZIP64 where nothing needs it: not the encoding
    for name in plain:
        assert (zip64[name].size, zip64[name].crc32) == (plain[name].size, plain[name].crc32)


# --- refusals: end records -----------------------------------------------------------------


def test_refuses_empty_and_random_files() -> None:
    refused(b"", "no end-of-central-directory record")
    refused(b"PK\x05\x06" + bytes(18), "no end-of-central-directory record")
    refused(b"hello world" * 10, "no end-of-central-directory record")


def test_refuses_wrong_comment_and_plain_zips() -> None:
    data = write_archive()
    refused(data[: -len(ARCHIVE_COMMENT)] + b"hkstore/X", "comment b'hkstore/1'")
    refused(data[: -len(ARCHIVE_COMMENT)] + b"hkstore/2", "container magic 'hkstore/2'")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", MANIFEST)
    refused(out.getvalue(), "not an hkstore archive")


def test_refuses_trailing_bytes_after_end_record() -> None:
    data = write_archive()
    refused(data + b"\x00", "trailing bytes")
    refused(data + b"PK\x05\x06", "trailing bytes")
    # a second archive appended: its end record is intact, but nothing before it adds up
    refused(data + data, "must end exactly where the end records start")


def test_refuses_prepended_data() -> None:
    # Offsets fixed up (like a self-extractor): zipfile accepts it, we do not.
    data = build([Raw(b"manifest.json", MANIFEST)], prefix=b"#!/bin/sh\nexit 0\n")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("manifest.json") == MANIFEST
    refused(data, r"17 bytes of prepended data at offset 0")
    # Offsets not fixed up: zipfile still copes (it shifts them); we refuse.
    naive = b"JUNK" + write_archive()
    with zipfile.ZipFile(io.BytesIO(naive)) as zf:
        assert zf.read("manifest.json") == MANIFEST
    refused(naive, "central directory")


def test_refuses_multi_disk_archives() -> None:
    member = Raw(b"manifest.json", MANIFEST)
    refused(build([member], eocd={"disk": 1}), "multi-disk")
    refused(build([member], eocd={"disk_count": 0}), "multi-disk")
    refused(build([Raw(b"manifest.json", MANIFEST, central={"disk": 1})]), "starts on disk 1")


def test_refuses_central_directory_not_ending_at_end_record() -> None:
    member = Raw(b"manifest.json", MANIFEST)
    refused(build([member], eocd={"cd_size": 10}), "must end exactly where the end records")
    # a directory size that also covers junk after the entries
    refused(build([member], cd_trailer=b"\x00" * 8), "central directory has 8 unaccounted bytes")


def test_refuses_wrong_entry_counts() -> None:
    member = Raw(b"manifest.json", MANIFEST)
    refused(build([], eocd={}), "no members; manifest.json is required")
    refused(build([member], eocd={"count": 6, "disk_count": 6}), "at most 5 allowed")
    refused(build([member], eocd={"count": 2, "disk_count": 2}), "runs past")


def test_refuses_zip64_placeholders_without_locator() -> None:
    member = Raw(b"manifest.json", MANIFEST)
    refused(build([member], eocd={"cd_offset": 0xFFFFFFFF}), "no ZIP64 locator")
    refused(build([member], eocd={"count": 0xFFFF, "disk_count": 0xFFFF}), "no ZIP64 locator")


def test_refuses_bad_zip64_end_records() -> None:
    data = write_archive(force_zip64=True)
    eocd = len(data) - 22 - len(ARCHIVE_COMMENT)
    locator = eocd - 20
    record = locator - 56
    refused(patch(data, locator + 8, "<Q", record - 1), "ZIP64 locator .* points to offset")
    refused(patch(data, locator + 16, "<I", 2), "describes 2 disks")
    refused(patch(data, record, "<I", 0), "ZIP64 end record at offset .*: expected signature")
    refused(patch(data, record + 4, "<Q", 45), "expected signature .* and size 44")
    refused(patch(data, record + 40, "<Q", 3), "disagrees with the ZIP64 end record")
    refused(patch(data, record + 32, "<Q", 3), "multi-disk")
    refused(patch(data, record + 48, "<Q", 1), "disagrees with the ZIP64 end record")
    refused(patch(data, record + 16, "<I", 1), "multi-disk")


# --- refusals: members ---------------------------------------------------------------------


def test_refuses_duplicate_members() -> None:
    data = build([Raw(b"manifest.json", MANIFEST), Raw(b"manifest.json", b"{}")])
    refused(data, r"member 'manifest.json' \(central directory entry at offset \d+\): duplicate")


def test_refuses_unknown_and_missing_members() -> None:
    refused(
        build([Raw(b"manifest.json", MANIFEST), Raw(b"payload.py", b"import os")]),
        r"member 'payload.py' .*unknown member name",
    )
    refused(build([Raw(b"signature.json", SIGNATURE)]), "no manifest.json member; it is required")


@pytest.mark.parametrize(
    "name",
    [b"../manifest.json", b"/manifest.json", b"a/../../manifest.json", b"C:manifest.json",
     b"..\\manifest.json", b"manifest.json\x00", b"", b"weights/..", b"\\\\host\\share"],
)  # fmt: skip
def test_refuses_traversal_absolute_backslash_and_drive_names(name: bytes) -> None:
    data = build([Raw(b"manifest.json", MANIFEST), Raw(name, b"x")])
    error = refused(data, "unsafe name")
    assert repr(name)[1:] in str(error)


def test_refuses_names_that_are_not_utf8() -> None:
    refused(build([Raw(b"manifest.json", MANIFEST), Raw(b"\xff\xfe", b"")]), "not valid UTF-8")


def test_refuses_compressed_members() -> None:
    member = Raw(b"manifest.json", MANIFEST, local={"method": 8}, central={"method": 8})
    refused(build([member]), r"compression method 8; expected 0 \(stored\)")


def test_refuses_encrypted_members() -> None:
    for flag in (0x1, 0x40, 0x2000):
        member = Raw(b"manifest.json", MANIFEST, local={"flags": flag}, central={"flags": flag})
        refused(build([member]), "is encrypted")


def test_refuses_data_descriptors() -> None:
    member = Raw(b"manifest.json", MANIFEST, local={"flags": 0x808}, central={"flags": 0x808})
    refused(build([member]), "uses a data descriptor")


def test_refuses_unsupported_flags_and_versions() -> None:
    member = Raw(b"manifest.json", MANIFEST, local={"flags": 0x802}, central={"flags": 0x802})
    refused(build([member]), "unsupported flag bits 0x0002")
    refused(build([Raw(b"manifest.json", MANIFEST, central={"needed": 51})]), "ZIP version 5.1")
    refused(build([Raw(b"manifest.json", MANIFEST, local={"needed": 63})]), "ZIP version 6.3")


@pytest.mark.parametrize(
    ("made_by", "external", "pattern"),
    [
        (0x31E, (stat.S_IFLNK | 0o777) << 16, "symlink"),
        (0x31E, (stat.S_IFDIR | 0o755) << 16, "symlink, directory"),
        (0x31E, (stat.S_IFIFO | 0o644) << 16, "device"),
        (0x014, 0x10, "directory or volume label"),
        (0x31E, ((stat.S_IFREG | 0o644) << 16) | 0x10, "directory or volume label"),
    ],
)
def test_refuses_symlink_and_directory_attributes(
    made_by: int, external: int, pattern: str
) -> None:
    member = Raw(b"manifest.json", MANIFEST, central={"made_by": made_by, "external": external})
    refused(build([member]), pattern)


def test_refuses_file_comments() -> None:
    refused(build([Raw(b"manifest.json", MANIFEST, comment=b"hi")]), "2-byte file comment")


def test_refuses_unequal_sizes_for_a_stored_member() -> None:
    member = Raw(b"manifest.json", MANIFEST, local={"csize": 5}, central={"csize": 5})
    refused(build([member]), "compressed size 5 != uncompressed size 20")


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("flags", 0), ("method", 0x63), ("time", 1), ("crc", 0), ("csize", 1), ("usize", 1)],
)
def test_refuses_local_header_disagreeing_with_central_entry(field_name: str, value: int) -> None:
    data = patch_member(write_archive(), "signature.json", where="local",
                        field_name=field_name, value=value)  # fmt: skip
    refused(data, r"member 'signature.json' \(local header at offset \d+\): .* in the local header")


def test_refuses_local_name_disagreeing_with_central_name() -> None:
    member = Raw(b"manifest.json", MANIFEST, local_name=b"evil.json.py1")
    refused(
        build([member]),
        re.escape("name is b'evil.json.py1' in the local header but b'manifest.json'"),
    )


def test_refuses_corrupted_manifest_and_signature_bytes() -> None:
    data = write_archive()
    members = read_container(data)
    for name in ("manifest.json", "signature.json"):
        broken = bytearray(data)
        broken[members[name].data_offset] ^= 0x20
        refused(bytes(broken), rf"member '{re.escape(name)}' \(data at offset \d+\): CRC-32")


def test_refuses_unknown_and_malformed_extra_fields() -> None:
    unknown = struct.pack("<HH", 0x5455, 5) + b"\x01" + bytes(4)
    refused(build([Raw(b"manifest.json", MANIFEST, local_extra=unknown)]), "unexpected extra")
    refused(build([Raw(b"manifest.json", MANIFEST, central_extra=unknown)]), "unexpected extra")
    stray = build([Raw(b"manifest.json", MANIFEST, central_extra=b"\x01")])
    refused(stray, "extra field has 1 stray bytes")
    long = struct.pack("<HH", 0xD935, 30) + bytes(4)
    refused(build([Raw(b"manifest.json", MANIFEST, local_extra=long)]), "runs past the extra")
    pad = struct.pack("<HHH", 0xD935, 4, 8) + b"\x00\x01"
    refused(build([Raw(b"manifest.json", MANIFEST, local_extra=pad)]), "u16 then zero bytes")
    twice = struct.pack("<HHH", 0xD935, 2, 8) * 2
    refused(build([Raw(b"manifest.json", MANIFEST, local_extra=twice)]), "appears twice")


def test_refuses_malformed_zip64_extra_fields() -> None:
    sizes = struct.pack("<HHQQ", 1, 16, 20, 20)
    # ZIP64 field present though the 32-bit sizes are real
    refused(build([Raw(b"manifest.json", MANIFEST, local_extra=sizes)]), "local ZIP64 extra")
    # placeholders without a ZIP64 field
    member = Raw(b"manifest.json", MANIFEST, local={"csize": 0xFFFFFFFF, "usize": 0xFFFFFFFF})
    refused(build([member]), "local ZIP64 extra")
    member = Raw(b"manifest.json", MANIFEST, central={"offset": 0xFFFFFFFF})
    refused(build([member]), "ZIP64 placeholders but no ZIP64 extra field")
    member = Raw(b"manifest.json", MANIFEST, central={"offset": 0xFFFFFFFF},
                 central_extra=struct.pack("<HHQQ", 1, 16, 0, 0))  # fmt: skip
    refused(build([member]), "ZIP64 extra field is 16 bytes; expected 8")


def test_refuses_gaps_between_members() -> None:
    data = build([Raw(b"functions.pkl.zst", b"f"), Raw(b"manifest.json", MANIFEST,
                                                      gap_before=b"hidden")])  # fmt: skip
    refused(data, r"member 'manifest.json' \(local header at offset \d+\): 6 bytes of a gap")


def test_refuses_gap_before_central_directory() -> None:
    refused(
        build([Raw(b"manifest.json", MANIFEST)], before_cd=b"sneaky"),
        "6 unaccounted bytes at offset 63 between the last member's data and the central",
    )


def test_refuses_overlapping_members() -> None:
    # A complete local header + data for manifest.json hidden inside the weights' data, and the
    # central directory pointing into it: the classic overlapping-entries trick.
    inner = build([Raw(b"manifest.json", MANIFEST)])
    inner_local = inner[: 30 + 13 + len(MANIFEST)]
    weights = Raw(b"weights.safetensors", b"w" * 8 + inner_local)
    manifest = Raw(b"manifest.json", MANIFEST, central={"offset": 30 + 19 + 8},
                   write_local=False)  # fmt: skip
    data = build([weights, manifest])
    refused(data, r"member 'manifest.json' \(local header at offset 57\): overlaps the previous")


def test_refuses_member_data_running_into_central_directory() -> None:
    member = Raw(b"manifest.json", MANIFEST, local={"csize": 999, "usize": 999},
                 central={"csize": 999, "usize": 999})  # fmt: skip
    refused(build([member]), "data of 999 bytes at offset 43 runs into the central directory")


def test_refuses_local_header_offsets_out_of_range() -> None:
    data = write_archive()
    for offset in (1 << 31, len(data) - 40, 3):
        broken = patch_member(data, "manifest.json", where="central",
                              field_name="offset", value=offset)  # fmt: skip
        with pytest.raises(ContainerError, match=r"member 'manifest.json'"):
            read_container(broken)


# --- limits --------------------------------------------------------------------------------


def test_limits_refuse_large_files_and_members() -> None:
    data = write_archive()
    with pytest.raises(LimitExceededError, match=f"file is {len(data)} bytes.*max_total_bytes"):
        read_container(data, Limits(max_total_bytes=len(data) - 1))
    with pytest.raises(LimitExceededError, match=r"'weights.safetensors' is 300 bytes.*member"):
        read_container(data, Limits(max_member_bytes=299))
    with pytest.raises(LimitExceededError, match=r"'manifest.json' is 20 bytes.*max_manifest"):
        read_container(data, Limits(max_manifest_bytes=19))
    with pytest.raises(LimitExceededError, match=r"'signature.json' is 9 bytes.*max_signature"):
        read_container(data, Limits(max_signature_bytes=8))
    assert read_container(data, Limits(max_total_bytes=len(data), max_member_bytes=512))


def test_limits_apply_to_declared_sizes_before_anything_else() -> None:
    huge = 1 << 40
    member = Raw(b"weights.safetensors", b"", local={"csize": 0xFFFFFFFF, "usize": 0xFFFFFFFF},
                 central={"csize": 0xFFFFFFFF, "usize": 0xFFFFFFFF},
                 central_extra=struct.pack("<HHQQ", 1, 16, huge, huge))  # fmt: skip
    data = build([Raw(b"manifest.json", MANIFEST), member])
    with pytest.raises(LimitExceededError, match=f"is {huge} bytes"):
        read_container(data, Limits(max_member_bytes=1 << 30))


# --- truncation, bit flips, fuzzing ----------------------------------------------------------


@pytest.mark.parametrize("force_zip64", [False, True])
def test_truncation_at_every_byte_is_a_container_error(force_zip64: bool) -> None:
    data = write_archive(force_zip64=force_zip64)
    for end in range(len(data)):
        with pytest.raises(ContainerError):
            read_container(data[:end], force_zip64=force_zip64)
    for start in range(1, len(data)):
        with pytest.raises(ContainerError):
            read_container(data[start:], force_zip64=force_zip64)


@pytest.mark.parametrize("force_zip64", [False, True])
def test_byte_flips_are_refused_or_change_nothing(force_zip64: bool) -> None:
    data = write_archive(force_zip64=force_zip64)
    original = read_container(data, force_zip64=force_zip64)
    weights = original["weights.safetensors"]
    functions = original["functions.pkl.zst"]
    data_bytes = {
        offset
        for info in (weights, functions)
        for offset in range(info.data_offset, info.data_offset + info.size)
    }
    for offset in range(len(data)):
        if offset in data_bytes:
            continue  # covered by the manifest's digests, not by the container
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(data)
            flipped[offset] ^= mask
            # one encoding: every header byte has one allowed value, so any flip is refused
            with pytest.raises(ALLOWED):
                read_container(bytes(flipped), force_zip64=force_zip64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_raise_container_errors(blob: bytes) -> None:
    for candidate in (blob, blob + ARCHIVE_COMMENT, b"PK\x03\x04" + blob):
        with pytest.raises(ALLOWED):
            read_container(candidate)


_VALID = {False: write_archive(), True: write_archive(force_zip64=True)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.binary(max_size=8),
)
def test_fuzz_mutations_of_a_valid_container_only_raise_container_errors(
    force_zip64: bool, writes: list[tuple[int, int]], cut: int | None, inserted: bytes
) -> None:
    data = bytearray(_VALID[force_zip64])
    for offset, value in writes:
        data[offset % len(data)] = value
    if cut is not None:
        at = cut % len(data)
        data[at:at] = inserted
    try:
        members = read_container(bytes(data), force_zip64=force_zip64)
    except ALLOWED:
        return
    assert set(members) <= MEMBER_NAMES and "manifest.json" in members
    for info in members.values():
        assert isinstance(info, MemberInfo)
        assert 0 <= info.header_offset < info.data_offset <= info.data_offset + info.size
        assert info.data_offset + info.size <= len(data)


def test_read_container_rejects_a_future_container_version_as_unsupported() -> None:
    buffer = io.BytesIO()
    writer = ContainerWriter(buffer)
    writer.add_member("manifest.json", b"{}")
    writer.close()
    data = buffer.getvalue()
    assert data.endswith(b"hkstore/1")
    with pytest.raises(UnsupportedContainerVersionError, match=r"container magic 'hkstore/2'"):
        read_container(data[:-1] + b"2")
