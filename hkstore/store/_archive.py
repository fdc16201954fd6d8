"""The archive: write an hkstore v1 file in one streaming pass; read it lazily behind one gate.

Writing follows the format's layout: weights member (streamed tensor by tensor), the optional
function blob, the canonical manifest that digests both, the optional signature over it.
Reading parses the container once (the one strict parser), decodes the manifest, cross-checks
the safetensors header against it, and only then hands out tensors, digests, signature state
or — through :meth:`Archive.functions` and the caller's :class:`Trust` — code.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from hkstore.errors import (
    ArchiveFormatError,
    ContainerError,
    DigestMismatchError,
    WeightsFormatError,
)
from hkstore.store import _zstd
from hkstore.store._container import ContainerWriter, MemberInfo, parse_container
from hkstore.store._digests import DEFAULT as DEFAULT_DIGEST
from hkstore.store._fileio import BufferSource, ByteSource, FileSource, open_regular
from hkstore.store._functions import pickle_runtime
from hkstore.store._gate import ROLES, resolve_functions
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._manifest import Manifest, decode_manifest, encode_manifest
from hkstore.store._members import FUNCTIONS, MANIFEST, SIGNATURE, WEIGHTS, WEIGHTS_ZSTD
from hkstore.store._remote import RemoteSource, is_url, local_path, remote_filesystem
from hkstore.store._signing import (
    SignatureDocument,
    Signer,
    read_signature_document,
    sign_manifest,
    verify_manifest_signature,
)
from hkstore.store._trust import Trust
from hkstore.store._workers import resolve_workers

if TYPE_CHECKING:
    import numpy as np

    from hkstore.store._weights import TensorEntry, TensorSpec, WeightsReader

# numpy and the weights codec are imported where tensors are written or read, so that
# opening an archive for its manifest (`hkstore inspect`) does not pay for them (~90 ms).

__all__ = ["Archive", "ArchiveContent", "VerifyReport", "open_archive", "write_archive"]

#: members are copied through a buffer of at most this size by :meth:`copy_with_signature`
_COPY_CHUNK = 8 << 20



@dataclass
class ArchiveContent:
    """Everything an archive stores, as plain data (no jax): what :func:`write_archive` takes.

    Attributes:
        specs: the tensors in model order (name, safetensors dtype code, shape).
        fetch: returns one tensor's host array by name; called once per tensor, in order.
        trainable: trainable tensor names, in model order.
        data_info: the model's data info (JSON-safe).
        seed: the model's seed, or ``None``.
        functions: ``{"model": spec, "loss": spec}`` (see the manifest's ``functions``).
        pickle_blob: the zstd-compressed cloudpickle blob, when a function is pickled.
        pickle_raw_size: the blob's decompressed size.
        metadata: free user metadata (JSON-safe).
        writer: extra writer versions (jax, haiku, cloudpickle).
        rng: the model's random state (``{"impl": ..., "key_data": [...]}``), or ``None``.
    """

    specs: Sequence[TensorSpec]
    fetch: Callable[[str], np.ndarray]
    trainable: Sequence[str]
    data_info: Mapping[str, Any]
    seed: int | None
    functions: Mapping[str, Mapping[str, Any]]
    pickle_blob: bytes | None = None
    pickle_raw_size: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    writer: Mapping[str, str] = field(default_factory=dict)
    rng: Mapping[str, Any] | None = None


def write_archive(
    fileobj: BinaryIO,
    content: ArchiveContent,
    *,
    signer: Signer | None = None,
    compression: str | None = None,
    workers: int | None = None,
    digest: str = DEFAULT_DIGEST,
) -> Manifest:
    """Write a complete archive to the seekable binary ``fileobj`` (at position 0).

    Args:
        fileobj: destination (a temp file from ``atomic_write`` or an ``io.BytesIO``).
        content: what to store.
        signer: signs the canonical manifest when given (``signature.json``).
        compression: ``None`` (weights stored raw, memory-mappable) or ``"zstd"``.
        workers: hashing threads; ``None`` for every core the process may use.
        digest: the tensor-digest algorithm, ``"blake3"`` (default) or ``"sha256"`` (what
            hkstore 0.1 wrote, and reads).

    Returns:
        The manifest written.

    Raises:
        UnsupportedDtypeError, WeightsMismatchError: a fetched tensor disagrees with its spec.
        ValueError: ``compression`` is not ``None`` or ``"zstd"``, ``digest`` is not in the
            digest table, or ``workers`` is below 1.
    """
    from hkstore.store._weights import write_weights

    if compression not in (None, "zstd"):
        raise ValueError(f"compression: expected None or 'zstd', got {compression!r}")
    writer = ContainerWriter(fileobj)
    if compression is None:
        stream = writer.begin_member(WEIGHTS, compute_crc=False)
        written = write_weights(
            stream, content.specs, content.fetch, workers=workers, digest=digest
        )
        info = stream.finish(crc32=written.crc32)
        weights_record: dict[str, Any] = {
            "member": WEIGHTS,
            "size": info.size,
            "header_sha256": written.header_sha256,
            "compression": None,
        }
    else:
        weights_record, written = _write_compressed_weights(writer, content, workers, digest)
    pickle_record = None
    if content.pickle_blob is not None:
        writer.add_member(FUNCTIONS, content.pickle_blob)
        pickle_record = {
            "member": FUNCTIONS,
            "size": len(content.pickle_blob),
            "sha256": hashlib.sha256(content.pickle_blob).hexdigest(),
            "raw_size": content.pickle_raw_size,
            **pickle_runtime(),
        }
    manifest = Manifest.build(
        writer=dict(content.writer),
        data_info=dict(content.data_info),
        seed=content.seed,
        tensors=[
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape),
             written.digest: written.tensor_digests[s.name]}
            for s in content.specs
        ],
        trainable=list(content.trainable),
        functions={k: dict(v) for k, v in content.functions.items()},
        weights=weights_record,
        pickle=pickle_record,
        metadata=dict(content.metadata),
        rng=None if content.rng is None else dict(content.rng),
    )
    manifest_bytes = encode_manifest(manifest)
    writer.add_member(MANIFEST, manifest_bytes)
    if signer is not None:
        writer.add_member(SIGNATURE, sign_manifest(manifest_bytes, signer))
    writer.close()
    return manifest


def _write_compressed_weights(
    writer: ContainerWriter, content: ArchiveContent, workers: int | None, digest: str
) -> tuple[dict[str, Any], Any]:
    import numpy as np

    from hkstore.store._weights import encode_header, write_weights

    header = encode_header(content.specs)
    raw_size = len(header) + sum(
        int(np.prod(s.shape, dtype=np.int64)) * _itemsize(s.dtype) for s in content.specs
    )
    stream = writer.begin_member(WEIGHTS_ZSTD)
    compressor = _zstd.stream_writer(stream, raw_size=raw_size)
    written = write_weights(
        compressor, content.specs, content.fetch, workers=workers, digest=digest
    )
    frame = compressor.finish()
    stream.finish()
    record = {
        "member": WEIGHTS_ZSTD,
        "size": frame.size,
        "sha256": frame.sha256,
        "raw_size": raw_size,
        "header_sha256": written.header_sha256,
        "compression": "zstd",
    }
    return record, written


def _itemsize(code: str) -> int:
    from hkstore.store._dtypes import dtype_for_code

    return dtype_for_code(code).itemsize


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`Archive.verify` checked.

    Attributes:
        tensors: number of tensor digests checked.
        members: member names whose digest or structure was checked.
        signed_by: key id of the verified signature, or ``None`` when unsigned or no key given.
        signature_key_id: the key id the archive claims (verified or not), or ``None``.
    """

    tensors: int
    members: tuple[str, ...]
    signed_by: str | None
    signature_key_id: str | None


class Archive:
    """An open hkstore archive: manifest and structure checked, tensors read on demand.

    Use :func:`open_archive` to make one; close it (or use ``with``) to release the file.

    Attributes:
        workers: threads for reads and digest checks (``None``: every core the process may
            use, decided per call); each read method can override it.
    """

    def __init__(self, source: str | os.PathLike[str] | bytes | bytearray | memoryview,
                 *, limits: Limits = DEFAULT_LIMITS, workers: int | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.limits = limits
        self.workers = None if workers is None else resolve_workers(workers)
        self._fd: int | None = None
        self._src: ByteSource
        #: the URL of an archive in object storage, else ``None``
        self.url: str | None = None
        if is_url(source):
            assert isinstance(source, str)
            local = local_path(source)
            if local is not None:
                source = local
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._src = BufferSource(source)
            self.path: Path | None = None
        elif is_url(source):
            assert isinstance(source, str)
            self.path = None
            self.url = source
            fs, key = remote_filesystem(source, storage_options)
            self._src = RemoteSource(fs, key, name=source)
            if self._src.size == 0:
                raise ContainerError(f"{source}: empty object, not an hkstore archive")
        else:
            self.path = Path(source)
            try:
                self._fd = open_regular(self.path)
            except OSError as exc:
                raise ContainerError(f"{self.path}: cannot open archive: {exc.strerror}") from exc
            self._src = FileSource(self._fd, name=str(self.path))
            if self._src.size == 0:
                self.close()
                raise ContainerError(f"{self.path}: empty file, not an hkstore archive")
        try:
            container = parse_container(self._src, limits)
            self.members: dict[str, MemberInfo] = container.members
            self.manifest_bytes = container.payloads[MANIFEST]
            self._signature_bytes = container.payloads.get(SIGNATURE)
            self.manifest: Manifest = decode_manifest(self.manifest_bytes, limits)
            self._check_members_against_manifest()
            self._signature: SignatureDocument | None = None
            if self._signature_bytes is not None:  # malformed: fails at open, keys or not
                self._signature = read_signature_document(self._signature_bytes, limits)
            self._weights: WeightsReader | None = None
            self._digests: dict[str, str] | None = None
            self._verified: tuple[Trust, str] | None = None
            self._pickle: tuple[bytes, list[str]] | None = None
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """The archive's size in bytes (of the file, object or buffer, when opened)."""
        return self._src.size

    # -- structure ----------------------------------------------------------------------

    def _member_bytes(self, name: str) -> bytes:
        """Read a whole member into memory this archive owns (bounded by the member's size)."""
        info = self.members[name]
        return self._src.read(info.data_offset, info.size)

    def _check_members_against_manifest(self) -> None:
        m = self.manifest
        expected = {MANIFEST, m.weights.member}
        if m.pickle is not None:
            expected.add(FUNCTIONS)
        present = set(self.members) - {SIGNATURE}
        problems = []
        for name in sorted(expected - present):
            problems.append(f"member {name!r} is listed in the manifest but missing")
        for name in sorted(present - expected):
            problems.append(f"member {name!r} is present but not listed in the manifest")
        weights = self.members.get(m.weights.member)
        if weights is not None and weights.size != m.weights.size:
            problems.append(
                f"member {m.weights.member!r}: size {weights.size} in the container, "
                f"{m.weights.size} in the manifest"
            )
        if m.pickle is not None and FUNCTIONS in self.members:
            if self.members[FUNCTIONS].size != m.pickle.size:
                problems.append(
                    f"member {FUNCTIONS!r}: size {self.members[FUNCTIONS].size} in the "
                    f"container, {m.pickle.size} in the manifest"
                )
        if problems:
            raise ContainerError("; ".join(problems))

    def _weights_reader(self) -> WeightsReader:
        from hkstore.store._weights import WeightsReader, aligned_empty

        if self._weights is None:
            record = self.manifest.weights
            info = self.members[record.member]
            if record.compression == "zstd":
                # Random access needs the whole file: allocated only now that the header has
                # been checked against the manifest, so its size is what the tensors need.
                stream, header, _ = self._zstd_stream()
                raw = aligned_empty(stream.remaining + len(header))
                raw[: len(header)] = memoryview(header)
                stream.readinto(raw[len(header) :].data)
                stream.close()
                reader = WeightsReader(raw.data, 0, raw.size, self.limits, member=record.member)
            elif self._fd is not None:
                reader = WeightsReader(self._fd, info.data_offset, info.size, self.limits)
            elif isinstance(self._src, RemoteSource):
                reader = WeightsReader(self._src, info.data_offset, info.size, self.limits)
            else:
                assert isinstance(self._src, BufferSource)
                reader = WeightsReader(self._src.view(), info.data_offset, info.size, self.limits)
            self._check_header(reader.header_sha256, reader.entries)
            self._weights = reader
        return self._weights

    def _zstd_stream(self) -> tuple[_zstd.BoundedReader, bytes, list[TensorEntry]]:
        """Open the zstd weights frame as a stream positioned after the checked header.

        Before a byte is decompressed: the frame's SHA-256, the frame itself (5.2), and the
        declared decompressed size against what the manifest's tensors need (their data plus
        a header of at most ``max_header_bytes``). Then only the header is decompressed,
        parsed and checked against the manifest; the tensor data is left in the stream.

        Returns:
            ``(stream, header bytes, entries sorted by offset)``.
        """
        from hkstore.store._dtypes import dtype_for_code
        from hkstore.store._weights import parse_header

        record = self.manifest.weights
        what = f"member {record.member!r}"
        frame = self._member_bytes(record.member)
        actual = hashlib.sha256(frame).hexdigest()
        if actual != record.sha256:
            raise DigestMismatchError(f"{what}: sha256 {actual}, manifest says {record.sha256}")
        raw_size = record.raw_size or 0
        _zstd.check_declared_size(raw_size, cap=self.limits.max_member_bytes, what=what)
        data_len = 0
        for t in self.manifest.tensors:
            count = dtype_for_code(t.dtype, where=f"tensor {t.name!r}").itemsize
            for dim in t.shape:
                count *= dim
            data_len += count
            if data_len > raw_size:
                break
        header_len = raw_size - data_len
        if not 8 <= header_len <= 8 + self.limits.max_header_bytes:
            raise WeightsFormatError(
                f"{what}: $.weights.raw_size is {raw_size} bytes, but the manifest's tensors "
                f"need {data_len if data_len <= raw_size else f'more than {raw_size}'} bytes of "
                f"data plus a header of 8 to {8 + self.limits.max_header_bytes} bytes "
                "(Limits.max_header_bytes)"
            )
        stream = _zstd.BoundedReader(
            frame,
            declared_size=raw_size,
            cap=self.limits.max_member_bytes,
            what=what,
            max_window=self.limits.max_zstd_window_bytes,
        )
        try:
            prefix = stream.read(8)
            n = int.from_bytes(prefix, "little")
            if 8 + n != header_len:
                raise WeightsFormatError(
                    f"{what}: the safetensors header is {n} bytes, but $.weights.raw_size minus "
                    f"the manifest's {data_len} bytes of tensor data leaves {header_len - 8}"
                )
            header = prefix + stream.read(n)
            entries, _, _ = parse_header(
                header, self.limits, member_size=raw_size, member=record.member
            )
            self._check_header(
                hashlib.sha256(header).hexdigest(), {e.name: e for e in entries}
            )
        except BaseException:
            stream.abandon()
            raise
        return stream, header, entries

    def _check_header(self, header_sha256: str, entries: Mapping[str, TensorEntry]) -> None:
        record = self.manifest.weights
        if header_sha256 != record.header_sha256:
            raise DigestMismatchError(
                f"member {record.member!r}: safetensors header sha256 "
                f"{header_sha256}, manifest says {record.header_sha256}"
            )
        problems = []
        declared = {t.name: t for t in self.manifest.tensors}
        for name in sorted(set(declared) - set(entries)):
            problems.append(f"tensor {name!r} is in the manifest but not in the weights member")
        for name in sorted(set(entries) - set(declared)):
            problems.append(f"tensor {name!r} is in the weights member but not in the manifest")
        for name, entry in entries.items():
            want = declared.get(name)
            if want is None:
                continue
            if entry.dtype != want.dtype or tuple(entry.shape) != tuple(want.shape):
                problems.append(
                    f"tensor {name!r}: weights member has {entry.dtype}{list(entry.shape)}, "
                    f"manifest has {want.dtype}{list(want.shape)}"
                )
        if problems:
            raise WeightsFormatError(
                f"weights member disagrees with the manifest ({len(problems)} problem(s)): "
                + "; ".join(problems)
            )

    # -- lazy access --------------------------------------------------------------------

    def names(self) -> list[str]:
        """Return the tensor names, in model order."""
        return [t.name for t in self.manifest.tensors]

    def trainable_names(self) -> list[str]:
        """Return the trainable tensor names, in model order."""
        return list(self.manifest.trainable)

    def tensor_entries(self) -> dict[str, TensorEntry]:
        """Return the safetensors header entries (checked against the manifest).

        For zstd weights only the header is decompressed.
        """
        if self._weights is None and self.manifest.weights.compression == "zstd":
            stream, _, entries = self._zstd_stream()
            stream.abandon()
            return {e.name: e for e in entries}
        return dict(self._weights_reader().entries)

    def tensor(self, name: str, *, verify: bool = True) -> np.ndarray:
        """Read one tensor (only its bytes), checking its digest unless ``verify=False``.

        A big tensor is copied (and, with BLAKE3, hashed) on :attr:`workers` threads.

        Raises:
            KeyError: ``name`` is not in the archive.
            DigestMismatchError: the tensor's bytes do not match the manifest.
        """
        digests = self._tensor_digests()
        if name not in digests:
            raise KeyError(f"tensor {name!r} is not in the archive")
        reader = self._weights_reader()
        return reader.tensor(
            name,
            expected=digests[name] if verify else None,
            algorithm=self.manifest.digest_algorithm,
            workers=self.workers,
        )

    def read_weights(
        self,
        *,
        verify: bool = True,
        workers: int | None = None,
        ready: Callable[[str, np.ndarray], object] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read every tensor into fresh 64-byte-aligned buffers, digests checked by default.

        zstd weights are decompressed straight into the tensors' buffers (the decompressed
        file is never held whole), on the calling thread.

        Args:
            verify: check every tensor's digest (with the manifest's algorithm).
            workers: threads; default :attr:`workers` (``None``: every available core).
            ready: called with each tensor as soon as its digest matched (see
                :meth:`WeightsReader.read_all`).
        """
        if self._weights is None and self.manifest.weights.compression == "zstd":
            from hkstore.store._weights import stream_tensors

            stream, _, entries = self._zstd_stream()
            try:
                arrays = stream_tensors(
                    stream.readinto, entries, self._tensor_digests() if verify else None,
                    keep=True, algorithm=self.manifest.digest_algorithm,
                    member=self.manifest.weights.member,
                )  # fmt: skip
            except BaseException:
                stream.abandon()
                raise
            stream.close()
            assert arrays is not None
            if ready is not None:
                for name, array in arrays.items():
                    ready(name, array)
            return arrays
        if isinstance(self._src, RemoteSource):
            arrays = self._stream_remote(verify=verify, keep=True)
            assert arrays is not None
            if ready is not None:
                for name, array in arrays.items():
                    ready(name, array)
            return arrays
        reader = self._weights_reader()
        return reader.read_all(
            self._tensor_digests() if verify else None,
            algorithm=self.manifest.digest_algorithm,
            workers=self.workers if workers is None else workers,
            ready=ready,
        )

    def _tensor_digests(self) -> dict[str, str]:
        # built once: tensor() is called per tensor, and rebuilding this per call made
        # reading every tensor quadratic in the tensor count (minutes at 20k tensors)
        if self._digests is None:
            self._digests = dict(self.manifest.digests)
        return self._digests

    # -- signature and trust -------------------------------------------------------------

    @property
    def signature_key_id(self) -> str | None:
        """The key id the signature claims (unverified), or ``None`` when unsigned."""
        return None if self._signature is None else self._signature.key_id

    def check_signature(self, trust: Trust) -> str | None:
        """Verify the signature with the caller's keys; return the verifying key id or ``None``.

        ``None`` means: unsigned, or signed but the caller gave no keys and does not require a
        signature (the signature is then not checked at all).

        Raises:
            SignatureError: a signature is required but absent, or it does not verify.
            UntrustedKeyError: the caller gave keys and none of them made the signature.
        """
        if not trust.wants_signature_checked(SIGNATURE in self.members, what="archive"):
            return None
        if self._verified is not None and self._verified[0] is trust:
            return self._verified[1]  # load() checks first, the gate asks again: verify once
        assert self._signature_bytes is not None
        key_id = verify_manifest_signature(
            self._signature_bytes, self.manifest_bytes, trust.verifiers, limits=self.limits
        )
        self._verified = (trust, key_id)
        return key_id

    def verify(self, trust: Trust | None = None, *, functions: bool = False) -> VerifyReport:
        """Check everything a load checks: signature, every member's digest and structure.

        In the order every entry point follows (and :func:`hkstore.load` too): the signature
        (:meth:`check_signature`), the weights (header against the manifest, then every
        tensor digest, :meth:`check_digests`), then the function pickle when there is one
        (:meth:`check_pickle`: digest, bounded decompression, a well-formed opcode stream;
        never unpickled). With ``functions=True`` it also runs every check the trust gate
        runs before importing or unpickling the archive's functions (:meth:`check_functions`),
        so the verdict is the one a load that takes its functions from the archive would give.

        Args:
            trust: keys to check the signature with, and with ``functions=True`` the code
                policy; ``None`` is ``Trust()`` (digests only).
            functions: also check that ``trust`` would accept the archive's functions.

        Returns:
            A :class:`VerifyReport`.

        Raises:
            DigestMismatchError, SignatureError, UntrustedKeyError, ArchiveFormatError,
            LimitExceededError; RefusedCodeError, RuntimeMismatchError with ``functions=True``.
        """
        trust = trust or Trust()
        signed_by = self.check_signature(trust)
        self.check_digests()  # header cross-check + every tensor digest, bounded memory
        checked = [MANIFEST, self.manifest.weights.member]
        if self.manifest.pickle is not None:
            self.check_pickle()
            checked.append(FUNCTIONS)
        if SIGNATURE in self.members:
            checked.append(SIGNATURE)
        if functions:
            self.check_functions(trust)
        return VerifyReport(
            tensors=len(self.manifest.tensors),
            members=tuple(checked),
            signed_by=signed_by,
            signature_key_id=self.signature_key_id,
        )

    def check_digests(
        self, *, progress: Callable[[int], None] | None = None, workers: int | None = None
    ) -> int:
        """Check every tensor's digest without holding the model in memory; return bytes read.

        Tensors are read through a small buffer per thread on ``workers`` threads and dropped
        once hashed (see :meth:`WeightsReader.check_digests`). Every mismatch is collected
        before raising.

        Args:
            progress: called with the byte count of each tensor or batch once it is checked.
            workers: threads; default :attr:`workers` (``None``: every available core).

        Raises:
            DigestMismatchError: naming every tensor whose bytes differ from the manifest.
            WeightsFormatError: the safetensors header disagrees with the manifest, or a BOOL
                byte is neither 0 nor 1.
        """
        if self._weights is None and self.manifest.weights.compression == "zstd":
            return self._check_zstd_digests(progress)
        if isinstance(self._src, RemoteSource):
            self._stream_remote(verify=True, keep=False, progress=progress)
            return sum(e.nbytes for e in self._weights_reader().entries.values())
        return self._weights_reader().check_digests(
            self._tensor_digests(),
            algorithm=self.manifest.digest_algorithm,
            workers=self.workers if workers is None else workers,
            progress=progress,
        )

    def _stream_remote(
        self, *, verify: bool, keep: bool, progress: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray] | None:
        """Read a remote archive's tensors in one streamed request, hashing as they arrive.

        The header was checked against the manifest first (:meth:`_weights_reader`); the
        tensor data (which tiles the member) then comes front to back, each tensor into a
        fresh buffer (``keep``) or through one scratch buffer: transfer and hashing overlap,
        and memory stays bounded by the tensors kept.
        """
        from hkstore.store._weights import stream_tensors

        assert isinstance(self._src, RemoteSource)
        reader = self._weights_reader()
        if self.manifest.weights.compression == "zstd":  # decompressed in memory already
            if keep:
                return reader.read_all(self._tensor_digests() if verify else None,
                                       algorithm=self.manifest.digest_algorithm)
            reader.check_digests(self._tensor_digests(),
                                 algorithm=self.manifest.digest_algorithm, progress=progress)
            return None
        entries = sorted(reader.entries.values(), key=lambda e: e.begin)
        info = self.members[self.manifest.weights.member]
        stream = self._src.stream(info.data_offset + reader.header_size,
                                  sum(e.nbytes for e in entries))
        try:
            return stream_tensors(
                stream.readinto, entries, self._tensor_digests() if verify else None,
                keep=keep, algorithm=self.manifest.digest_algorithm,
                member=self.manifest.weights.member, progress=progress,
            )  # fmt: skip
        finally:
            stream.close()

    def _check_zstd_digests(self, progress: Callable[[int], None] | None) -> int:
        """Hash zstd weights tensor by tensor as they are decompressed, in bounded memory."""
        from hkstore.store._weights import stream_tensors

        stream, _, entries = self._zstd_stream()
        try:
            stream_tensors(
                stream.readinto, entries, self._tensor_digests(), keep=False,
                algorithm=self.manifest.digest_algorithm,
                member=self.manifest.weights.member, progress=progress,
            )  # fmt: skip
        except BaseException:
            stream.abandon()
            raise
        stream.close()
        return sum(e.nbytes for e in entries)

    def check_pickle(self) -> list[str]:
        """Check the function pickle member without running it; return the globals it names.

        The member's SHA-256 against the manifest, its zstd frame (5.2) and a decompression
        bounded by ``$.pickle.raw_size`` and ``limits.max_functions_bytes``, then a static,
        memo-aware walk of its opcodes (:func:`~hkstore.store._pickle_scan.pickle_globals`):
        bytes that are not one well-formed pickle are refused here, by every entry point,
        whether or not anything will be unpickled. Checked once per archive; the checked
        bytes are the ones the trust gate may later unpickle.

        Returns:
            The ``"module.qualname"`` globals the pickle would import, in order (empty
            without a pickle member).

        Raises:
            DigestMismatchError: the member does not match the manifest.
            ArchiveFormatError, LimitExceededError: bad zstd frame or malformed pickle.
        """
        from hkstore.store._pickle_scan import pickle_globals

        record = self.manifest.pickle
        if record is None:
            return []
        if self._pickle is None:
            frame = self._member_bytes(FUNCTIONS)
            actual = hashlib.sha256(frame).hexdigest()
            if actual != record.sha256:
                raise DigestMismatchError(
                    f"member {FUNCTIONS!r}: sha256 {actual}, manifest says {record.sha256}"
                )
            raw = _zstd.decompress_bounded(
                frame,
                declared_size=record.raw_size,
                cap=self.limits.max_functions_bytes,
                what=FUNCTIONS,
                max_window=self.limits.max_zstd_window_bytes,
            )
            try:
                found = pickle_globals(raw, max_ops=self.limits.max_pickle_ops)
            except ArchiveFormatError as exc:
                raise type(exc)(f"{FUNCTIONS}: {exc}") from None
            self._pickle = (frame, found)
        return list(self._pickle[1])

    def pickle_globals(self) -> list[str]:
        """List the globals the function pickle would import, statically; never unpickles.

        Same checks as :meth:`check_pickle` (whose result this is). This is what ``hkstore
        inspect`` shows an operator; it is not a safety check.
        """
        return self.check_pickle()

    def _pickle_frame(self) -> bytes:
        self.check_pickle()
        assert self._pickle is not None
        return self._pickle[0]

    def functions(
        self, trust: Trust, *, roles: Sequence[str] = ROLES
    ) -> dict[str, Callable[..., Any] | None]:
        """Return ``{role: callable}`` for the functions the manifest describes, if allowed.

        This goes through the one trust gate (:func:`~hkstore.store._gate.resolve_functions`):
        references are imported only from ``trust.modules``; the pickle is unpickled only when
        its digest is one of ``trust.approved``, or with ``trust.allow_pickle`` and a signature
        verified by one of ``trust.keys`` (or ``allow_unsigned``), after the member passed
        :meth:`check_pickle` and the writer's Python version was checked.

        Raises:
            RefusedCodeError: the policy refuses (the message says which option would allow it).
            RuntimeMismatchError: the pickle comes from another Python version/implementation.
            SignatureError, UntrustedKeyError, DigestMismatchError.
        """
        return self._gate(trust, roles, load=True)

    def check_functions(self, trust: Trust, *, roles: Sequence[str] = ROLES) -> None:
        """Run every check :meth:`functions` runs, but import and unpickle nothing.

        Raises:
            As :meth:`functions`, except errors of the import itself (a missing module or
            attribute) and of unpickling, which only a real load can find.
        """
        self._gate(trust, roles, load=False)

    def _gate(
        self, trust: Trust, roles: Sequence[str], *, load: bool
    ) -> dict[str, Callable[..., Any] | None]:
        return resolve_functions(
            {role: dict(spec.to_dict()) for role, spec in self.manifest.functions.items()},
            trust,
            roles=roles,
            verified_key_id=lambda: self.check_signature(trust),
            pickle_record=None if self.manifest.pickle is None else self.manifest.pickle.to_dict(),
            read_pickle=self._pickle_frame,
            max_pickle_bytes=self.limits.max_functions_bytes,
            max_window=self.limits.max_zstd_window_bytes,
            where="archive",
            load=load,
        )

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Release the file (idempotent)."""
        self._weights = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def copy_with_signature(self, dest: BinaryIO, signer: Signer) -> None:
        """Write this archive to ``dest`` with a new signature (members copied byte-exact).

        Member data is copied through a bounded buffer; each copied member's CRC-32 must
        equal its headers' (a member changed on disk since it was checked is not re-signed).

        Raises:
            ContainerError: a member's bytes no longer match its CRC-32, or the file shrank.
        """
        writer = ContainerWriter(dest)
        largest = max((info.size for info in self.members.values()), default=1)
        chunk = bytearray(max(1, min(_COPY_CHUNK, largest)))
        for name, info in self.members.items():
            if name in (SIGNATURE, MANIFEST):
                continue
            stream = writer.begin_member(name, size=info.size)
            view = memoryview(chunk)
            for start in range(0, info.size, len(chunk)):
                piece = view[: min(len(chunk), info.size - start)]
                self._src.readinto(info.data_offset + start, piece)
                stream.write(piece)
            copied = stream.finish()
            if copied.crc32 != info.crc32:
                raise ContainerError(
                    f"member {name!r}: CRC-32 {copied.crc32:08x} of its data, "
                    f"{info.crc32:08x} in its headers (corrupted archive; not re-signed)"
                )
        writer.add_member(MANIFEST, self.manifest_bytes)
        writer.add_member(SIGNATURE, sign_manifest(self.manifest_bytes, signer))
        writer.close()


def open_archive(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    limits: Limits = DEFAULT_LIMITS,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Archive:
    """Open an archive lazily: container, manifest and member sizes checked; no tensor read.

    Args:
        source: a path, a URL (``s3://bucket/key.hkz``, ``memory://...``; read by range
            through fsspec, the ``cloud`` extra), or the archive's bytes.
        limits: size and count limits for untrusted input.
        workers: threads for reading and hashing tensors; ``None`` for every core the
            process may use (``os.sched_getaffinity``).
        storage_options: for a URL, the filesystem's options (``endpoint_url``...).

    Returns:
        An :class:`Archive` (a context manager).

    Raises:
        ContainerError, ManifestError, UnsupportedVersionError, LimitExceededError.
        MissingDependencyError: a URL without the ``cloud`` extra installed.

    Example:
        >>> with open_archive("round-3.hkz") as ar:
        ...     ar.names()[:2], ar.manifest.data_info
        (['mlp/~/linear_0:b', 'mlp/~/linear_0:w'], {'data_type': 'float32', 'features_shape': [3]})
    """
    return Archive(source, limits=limits, workers=workers, storage_options=storage_options)


def archive_bytes_writer() -> io.BytesIO:
    """Return an in-memory destination for :func:`write_archive` (used by ``dumps``)."""
    return io.BytesIO()
