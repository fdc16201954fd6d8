"""Build small hkstore archives without jax (numpy arrays through ``write_archive``) for tests.

Example:
    >>> tmp_path = getfixture("tmp_path")
    >>> path = write_test_archive(tmp_path / "a.hkz", make_content())
    >>> path.name
    'a.hkz'
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hkstore.store._archive import ArchiveContent, write_archive
from hkstore.store._canonical import canonical_json
from hkstore.store._container import ContainerWriter, read_container
from hkstore.store._dtypes import code_for_dtype
from hkstore.store._signing import Signer, sign_manifest
from hkstore.store._weights import TensorSpec

__all__ = [
    "DEFAULT_DATA_INFO",
    "FUNCTIONS",
    "NO_FUNCTIONS",
    "WEIGHTS",
    "WEIGHTS_ZST",
    "archive_bytes",
    "archive_members",
    "default_tensors",
    "flip_tensor_byte",
    "hand_weights",
    "make_content",
    "malicious_pickle",
    "manifest_document",
    "pickle_archive",
    "repack",
    "with_manifest",
    "with_weights_member",
    "with_zstd_weights",
    "write_test_archive",
    "zstd_frame",
]

DEFAULT_DATA_INFO: dict[str, Any] = {"data_type": "float32", "features_shape": [4]}


def default_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A small two-layer MLP's weights, in model order (random, so their bytes are unique)."""
    rng = np.random.default_rng(seed)
    return {
        "mlp/~/linear_0:b": rng.standard_normal(8).astype(np.float32),
        "mlp/~/linear_0:w": rng.standard_normal((4, 8)).astype(np.float32),
        "mlp/~/linear_1:b": rng.standard_normal(3).astype(np.float32),
        "mlp/~/linear_1:w": rng.standard_normal((8, 3)).astype(np.float32),
    }


def make_content(
    tensors: Mapping[str, np.ndarray] | None = None,
    *,
    trainable: list[str] | None = None,
    data_info: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    functions: Mapping[str, Mapping[str, Any]] | None = None,
    pickle_blob: bytes | None = None,
    pickle_raw_size: int = 0,
    seed: int | None = 0,
) -> ArchiveContent:
    """An :class:`ArchiveContent` over numpy arrays (default: :func:`default_tensors`).

    ``trainable`` defaults to every tensor; ``functions`` to references into ``tests.fnrefs``
    (or kind ``pickle`` for both when ``pickle_blob`` is given).
    """
    arrays = dict(default_tensors() if tensors is None else tensors)
    if functions is None:
        functions = (
            {"model": {"kind": "pickle"}, "loss": {"kind": "pickle"}}
            if pickle_blob is not None
            else {
                "model": {"kind": "reference", "ref": "fnrefs:forward", "kwargs": {}},
                "loss": {"kind": "reference", "ref": "fnrefs:scaled_loss",
                         "kwargs": {"scale": 0.5}},
            }
        )
    writer = {"cloudpickle": "3.1.2"} if pickle_blob is not None else {}
    return ArchiveContent(
        specs=[TensorSpec(n, code_for_dtype(a.dtype), tuple(a.shape)) for n, a in arrays.items()],
        fetch=lambda name: arrays[name],
        trainable=list(arrays) if trainable is None else trainable,
        data_info=dict(DEFAULT_DATA_INFO if data_info is None else data_info),
        seed=seed,
        functions=functions,
        pickle_blob=pickle_blob,
        pickle_raw_size=pickle_raw_size,
        metadata=dict(metadata or {}),
        writer=writer,
    )


def write_test_archive(
    path: str | os.PathLike[str],
    content: ArchiveContent | None = None,
    *,
    signer: Any = None,
    compression: str | None = None,
    digest: str = "blake3",
    **content_options: Any,
) -> Path:
    """Write an archive file at ``path`` (content from :func:`make_content` unless given)."""
    if content is None:
        content = make_content(**content_options)
    with open(path, "wb") as handle:
        write_archive(handle, content, signer=signer, compression=compression, digest=digest)
    return Path(path)


def flip_tensor_byte(path: str | os.PathLike[str], array: np.ndarray, index: int = 0) -> None:
    """Flip one bit of ``array``'s bytes where they are stored in the (uncompressed) archive."""
    data = bytearray(Path(path).read_bytes())
    raw = np.ascontiguousarray(array).tobytes()
    at = data.find(raw)
    if at < 0 or data.find(raw, at + 1) >= 0:
        raise ValueError("the tensor's bytes are not found exactly once in the archive")
    data[at + index] ^= 0x01
    Path(path).write_bytes(bytes(data))


class _RunsCommand:
    """Pickles as a call to ``os.system(command)``: unpickling it would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def malicious_pickle(canary: str | os.PathLike[str]) -> bytes:
    """A pickle that, if ever unpickled, would create the file ``canary`` via ``os.system``."""
    return pickle.dumps({"model": _RunsCommand(f"touch '{os.fspath(canary)}'")}, protocol=4)


# --- taking archives apart (for the bad-input tests) -------------------------------------------


def archive_bytes(
    content: ArchiveContent | None = None,
    *,
    signer: Any = None,
    compression: str | None = None,
    digest: str = "blake3",
    **content_options: Any,
) -> bytes:
    """The bytes of an archive (content from :func:`make_content` unless given)."""
    buffer = io.BytesIO()
    if content is None:
        content = make_content(**content_options)
    write_archive(buffer, content, signer=signer, compression=compression, digest=digest)
    return buffer.getvalue()


def archive_members(data: bytes) -> dict[str, bytes]:
    """Member name -> member bytes, in file order (read with the strict container parser)."""
    view = memoryview(data)
    return {
        name: bytes(view[info.data_offset : info.data_offset + info.size])
        for name, info in read_container(data).items()
    }


def repack(members: Mapping[str, bytes]) -> bytes:
    """Write ``members`` (in order) as a fresh, valid container: CRCs and sizes recomputed.

    A test changes one member and repacks, so that the container itself stays valid and only
    the change is at fault. The weights member is 64-byte aligned, as hkstore writes it.
    """
    buffer = io.BytesIO()
    writer = ContainerWriter(buffer)
    for name, data in members.items():
        writer.add_member(name, data)
    writer.close()
    return buffer.getvalue()


def manifest_document(data: bytes) -> dict[str, Any]:
    """The parsed ``manifest.json`` of archive bytes (a fresh dict, free to edit)."""
    document: dict[str, Any] = json.loads(archive_members(data)["manifest.json"])
    return document


def with_manifest(
    data: bytes,
    document: Mapping[str, Any] | bytes,
    *,
    signer: Signer | None = None,
    members: Mapping[str, bytes] | None = None,
) -> bytes:
    """Archive bytes with ``manifest.json`` replaced (canonical JSON of ``document``, or bytes).

    The old signature is dropped; ``signer`` signs the new manifest. ``members`` replaces
    other members' bytes as well (e.g. a hand-made weights member).
    """
    parts = archive_members(data)
    parts.pop("signature.json", None)
    parts.update(members or {})
    manifest = document if isinstance(document, bytes) else canonical_json(dict(document))
    parts["manifest.json"] = manifest
    if signer is not None:
        parts["signature.json"] = sign_manifest(manifest, signer)
    return repack(parts)


# --- hostile archives: each valid but for one fault ----------------------------------------------

WEIGHTS = "weights.safetensors"
WEIGHTS_ZST = "weights.safetensors.zst"
FUNCTIONS = "functions.pkl.zst"
#: Functions described as kind "none": an archive that names no code at all.
NO_FUNCTIONS: dict[str, dict[str, Any]] = {"model": {"kind": "none"}, "loss": {"kind": "none"}}


def hand_weights(header: Mapping[str, Any], data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors member written by hand: u64 LE length (or ``length``), JSON, data."""
    body = json.dumps(dict(header), separators=(",", ":")).encode()
    return (len(body) if length is None else length).to_bytes(8, "little") + body + data


def with_weights_member(data: bytes, member: bytes) -> bytes:
    """``data`` with its ``weights.safetensors`` replaced by ``member`` (unsigned).

    The manifest's member size and header digest are updated to match, so that only the
    member's own content is at fault.
    """
    document = manifest_document(data)
    n = int.from_bytes(member[:8], "little")
    header = member[: 8 + n] if 8 + n <= len(member) else member
    document["weights"].update(size=len(member), header_sha256=_sha256(header))
    return with_manifest(data, document, members={WEIGHTS: member})


def with_zstd_weights(data: bytes, frame: bytes, *, raw_size: int) -> bytes:
    """A zstd archive with its weights frame replaced; manifest size/digest/raw_size updated."""
    document = manifest_document(data)
    document["weights"].update(size=len(frame), sha256=_sha256(frame), raw_size=raw_size)
    return with_manifest(data, document, members={WEIGHTS_ZST: frame})


def zstd_frame(raw: bytes, *, content_size: int | Literal["real", "unknown"] = "real") -> bytes:
    """One zstd frame of ``raw`` whose header records ``content_size``.

    ``"real"``: the real size; ``"unknown"``: no content size at all (the header omits it);
    an int: that (lying) size, patched into the frame header (the data and checksum are
    untouched, so only the declared size lies).
    """
    import zstandard

    if content_size == "unknown":
        return zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(
            raw
        )
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
    if content_size == "real":
        return bytes(frame)
    assert isinstance(content_size, int)
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    width = {0: 1 if single_segment else 0, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    at = 5 + (0 if single_segment else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[descriptor & 3]
    stored = content_size - 256 if width == 2 else content_size
    frame[at : at + width] = stored.to_bytes(width, "little")
    if zstandard.frame_content_size(bytes(frame)) != content_size:
        raise ValueError(f"cannot record a content size of {content_size} in this frame")
    return bytes(frame)


def pickle_archive(
    raw_pickle: bytes,
    *,
    signer: Signer | None = None,
    frame: bytes | None = None,
    raw_size: int | None = None,
) -> bytes:
    """An archive whose two functions are pickled in ``raw_pickle`` (a real zstd frame of it
    unless ``frame`` is given; ``raw_size`` is the decompressed size the manifest declares)."""
    blob = zstd_frame(raw_pickle) if frame is None else frame
    return archive_bytes(
        make_content(
            pickle_blob=blob, pickle_raw_size=len(raw_pickle) if raw_size is None else raw_size
        ),
        signer=signer,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
