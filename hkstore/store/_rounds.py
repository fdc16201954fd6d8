"""Checkpoint rounds without jax: write one, open one, verify one, read its state tensors.

A round is three files in ``DIR/round-NNNNNNNN/`` (``docs/FORMAT.md`` section 13):
``model.hkz`` (a complete archive), ``state.safetensors`` (the state's arrays, only when the
round has a state) and ``round.json`` (the record, written last; see ``_round_record``).
:func:`write_round` writes them through a :class:`~hkstore.store._round_dir.RoundDirectory`
(temp folder, fsync, rename). :class:`Round` reads one back: the record, then the archive
(whose manifest digest the record holds), then the state file (whose header and tensor digests
it holds); :meth:`Round.verify` checks every byte the digests cover. The checkpoint manager
(``hkstore.checkpoint``) and the CLI (``hkstore inspect/verify DIR``) share this module.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from hkstore.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ContainerError,
    DigestMismatchError,
    HkstoreError,
    WeightsFormatError,
)
from hkstore.store._archive import Archive, ArchiveContent, write_archive
from hkstore.store._canonical import canonical_json
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._remote import RemoteSource
from hkstore.store._retention import Retention
from hkstore.store._round_dir import (
    MODEL_MEMBER,
    RECORD_MEMBER,
    STATE_MEMBER,
    RoundDirectory,
    Staging,
    round_folder_name,
)
from hkstore.store._round_objects import ObjectRoundDirectory, ObjectStaging
from hkstore.store._round_record import (
    HistoryEntry,
    RoundRecord,
    build_history,
    build_record,
    now_iso,
    parse_history,
    parse_record,
)
from hkstore.store._signing import Signer
from hkstore.store._trust import Trust
from hkstore.store._workers import resolve_workers

#: a checkpoint directory: a local folder or an object-store prefix (the same operations)
Directory = RoundDirectory | ObjectRoundDirectory

if TYPE_CHECKING:
    import numpy as np

    from hkstore.store._weights import TensorSpec, WeightsReader

__all__ = [
    "Round",
    "StateContent",
    "open_round",
    "reconcile_history",
    "round_history",
    "rounds_metrics",
    "write_round",
]

#: the state's tensors are hashed in batches of about this many bytes by :meth:`Round.verify`
_VERIFY_BATCH_BYTES = 8 << 20


@dataclass
class StateContent:
    """A state as the store writes it: tensors streamed like weights, plus the JSON structure.

    Attributes:
        specs: the tensors in layout order (name, safetensors dtype code, shape).
        fetch: returns one tensor's host array by name; called once per tensor, in order.
        structure: the tree (FORMAT.md 13.4) whose tensor nodes name ``specs``.
    """

    specs: Sequence[TensorSpec]
    fetch: Callable[[str], np.ndarray]
    structure: Mapping[str, Any]


def write_round(
    directory: Directory,
    round_: int,
    model: ArchiveContent,
    *,
    state: StateContent | None,
    metrics: Mapping[str, Any],
    retention: Retention,
    signer: Signer | None = None,
    compression: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> RoundRecord:
    """Write a complete round and make it appear atomically; then its history entry.

    Order: temp folder; ``model.hkz`` (streamed, fsynced); ``state.safetensors`` (streamed,
    fsynced); ``round.json`` last (fsynced); the folder fsynced, renamed to ``round-N``, the
    directory fsynced; ``history/N.json``. The caller holds the writer lock.

    Args:
        directory: the checkpoint directory (it must exist).
        round_: the round number (>= 0).
        model: the archive's content (``hkstore.model.archive_content``); its ``metadata`` is
            replaced by ``{"round": N, "metrics": {...}}``.
        state: the state, or ``None``.
        metrics: JSON-safe metrics.
        retention: the rules in force (recorded).
        signer: signs the archive and the record.
        compression: the archive's weights compression (``None`` or ``"zstd"``).
        overwrite: replace an existing round.
        workers: threads hashing each file's tensors; ``None`` for every core the process may
            use.

    Returns:
        The record written.

    Raises:
        CheckpointExistsError: the round exists and ``overwrite`` is false.
        CheckpointWriteError: a file could not be written (names it); nothing appeared.
        As :func:`write_archive` for the content.
    """
    model.metadata = {"metrics": dict(metrics), "round": round_}
    with directory.stage(round_, overwrite=overwrite) as staging, ThreadPoolExecutor(
            1, thread_name_prefix="hkstore-state") as pool:
        # The state file is written on its own thread while this one writes the archive:
        # each hashes one tensor per core at a time (a tensor's SHA-256 cannot be split), so
        # two files in flight keep both cores busy where one would leave gaps.
        state_job = None if state is None else pool.submit(_write_state, staging, state, workers)
        try:
            with staging.open(MODEL_MEMBER) as handle:
                manifest = write_archive(handle, model, signer=signer, compression=compression,
                                         workers=workers)
                model_size = handle.tell()
        finally:
            state_json = None if state_job is None else state_job.result()
        time = now_iso()
        data, record = build_record(
            round_=round_,
            time=time,
            metrics=metrics,
            model_size=model_size,
            manifest_sha256=hashlib.sha256(
                canonical_json(manifest.to_dict(), what="manifest.json")).hexdigest(),
            state=state_json,
            retention=retention,
            signer=signer,
            where=_where(directory, round_),
        )
        staging.write(RECORD_MEMBER, data)
        staging.publish(overwrite=overwrite)
    directory.write_history(round_, build_history(round_, time, metrics))
    return record


def _write_state(
    staging: Staging | ObjectStaging, state: StateContent, workers: int | None
) -> dict[str, Any]:
    """Write ``state.safetensors``; return the record's ``$.state`` (without ``member``)."""
    from hkstore.store._weights import write_weights

    with staging.open(STATE_MEMBER) as handle:
        # the round record's state tensors carry SHA-256 digests (FORMAT.md section 13)
        written = write_weights(
            handle, state.specs, state.fetch, crc32=None, digest="sha256", workers=workers
        )
    return {
        "header_sha256": written.header_sha256,
        "size": written.size,
        "structure": dict(state.structure),
        "tensors": [
            {"dtype": s.dtype, "name": s.name, "sha256": written.tensor_digests[s.name],
             "shape": list(s.shape)}
            for s in state.specs
        ],
    }


def _where(directory: Directory, round_: int) -> str:
    return str(directory.member_path(round_, RECORD_MEMBER))


def open_round(
    directory: Directory, round_: int, *, limits: Limits = DEFAULT_LIMITS
) -> Round:
    """Read and check a round's record (nothing else is read yet).

    Raises:
        CheckpointNotFoundError: no complete round ``round_``.
        CheckpointFormatError, UnsupportedVersionError, LimitExceededError: a bad record.
    """
    if not directory.has_member(round_, RECORD_MEMBER):
        present = directory.rounds()
        listed = ", ".join(map(str, present[-10:])) or "none"
        raise CheckpointNotFoundError(
            f"round {round_} is not a complete round of {directory.path} "
            f"(complete rounds: {listed})"
        )
    data = directory.read_member(round_, RECORD_MEMBER, max_bytes=limits.max_manifest_bytes)
    record = parse_record(data, where=_where(directory, round_), expected_round=round_,
                          limits=limits)
    return Round(directory, record, limits)


class Round:
    """One complete round, its record checked: open its archive, read or verify its state."""

    def __init__(self, directory: Directory, record: RoundRecord, limits: Limits) -> None:
        self.directory = directory
        self.record = record
        self.limits = limits

    @property
    def number(self) -> int:
        """The round number."""
        return self.record.round

    @property
    def name(self) -> str:
        """The round's folder name (``round-00000003``)."""
        return round_folder_name(self.record.round)

    def _path(self, member: str) -> str:
        return str(self.directory.member_path(self.record.round, member))

    def size(self) -> int:
        """Bytes on disk of the round's files."""
        members = [MODEL_MEMBER, RECORD_MEMBER] + ([STATE_MEMBER] if self.record.state else [])
        return sum(self.directory.member_size(self.record.round, m) for m in members
                   if self.directory.has_member(self.record.round, m))

    def open_model(self, *, workers: int | None = None) -> Archive:
        """Open ``model.hkz`` and check it is the archive the record names.

        ``workers``: threads reading and hashing its tensors (``None``: every usable core).

        Raises:
            CheckpointFormatError: the file is missing.
            DigestMismatchError: its size or its manifest's SHA-256 differs from the record.
            ContainerError, ManifestError, ...: as :func:`open_archive`.
        """
        path = self._path(MODEL_MEMBER)
        want = self.record.model
        try:
            size = self.directory.member_size(self.record.round, MODEL_MEMBER)
        except CheckpointNotFoundError:
            raise CheckpointFormatError(f"{path}: missing (the record lists it)") from None
        if size != want.size:
            raise DigestMismatchError(f"{path}: {size} bytes, the round record says {want.size}")
        archive = self.directory.open_archive(
            self.record.round, MODEL_MEMBER, limits=self.limits, workers=workers
        )
        actual = hashlib.sha256(archive.manifest_bytes).hexdigest()
        if actual != want.manifest_sha256:
            archive.close()
            raise DigestMismatchError(
                f"{path}: manifest.json has sha256 {actual}, the round record says "
                f"{want.manifest_sha256}"
            )
        return archive

    @contextlib.contextmanager
    def open_state(self) -> Iterator[WeightsReader]:
        """Open ``state.safetensors``, checking its size, header digest and tensor list.

        Yields:
            A reader of the file (closed when the block ends).

        Raises:
            CheckpointFormatError: the round has no state, or the file is missing.
            DigestMismatchError: size or header digest differs from the record.
            WeightsFormatError: the header disagrees with the record's tensors.
        """
        from hkstore.store._weights import WeightsReader

        state = self.record.state
        path = self._path(STATE_MEMBER)
        if state is None:
            raise CheckpointFormatError(f"{self.record.where}: the round has no state")
        with contextlib.ExitStack() as stack:
            try:
                opened = self.directory.open_source(self.record.round, STATE_MEMBER)
                source, size = cast(
                    "tuple[int | RemoteSource, int]", stack.enter_context(opened)
                )
            except FileNotFoundError:
                raise CheckpointFormatError(f"{path}: missing (the record lists it)") from None
            except ContainerError as exc:  # a FIFO, device or folder; a missing object
                raise CheckpointFormatError(str(exc)) from None
            if size != state.size:
                raise DigestMismatchError(
                    f"{path}: {size} bytes, the round record says {state.size}"
                )
            with WeightsReader(source, 0, size, self.limits, member=path) as reader:
                if reader.header_sha256 != state.header_sha256:
                    raise DigestMismatchError(
                        f"{path}: header sha256 {reader.header_sha256}, the round record says "
                        f"{state.header_sha256}"
                    )
                _check_state_header(reader, self.record, path)
                yield reader

    def read_state_tensors(
        self, *, verify: bool = True, workers: int | None = None
    ) -> dict[str, Any]:
        """Read every state tensor into fresh aligned buffers, digests checked unless not asked.

        ``workers``: threads reading and hashing (``None``: every core the process may use).

        Returns:
            ``{name: numpy array}`` (empty when the round has no state).

        Raises:
            DigestMismatchError: naming every tensor whose bytes differ.
            As :meth:`open_state`.
        """
        state = self.record.state
        if state is None:
            return {}
        with self.open_state() as reader:
            return reader.read_all(
                state.digests if verify else None, algorithm="sha256",
                workers=resolve_workers(workers)
            )

    def check_state(
        self, *, progress: Callable[[int], None] | None = None, workers: int | None = None
    ) -> int:
        """Check every state tensor's digest in bounded memory; return the bytes checked.

        ``workers``: hashing threads (``None``: every core the process may use).

        Raises:
            DigestMismatchError: naming every tensor whose bytes differ.
            As :meth:`open_state`.
        """
        state = self.record.state
        if state is None:
            return 0
        digests = state.digests
        workers = resolve_workers(workers)
        with self.open_state() as reader:
            batches: list[list[str]] = [[]]
            size = 0
            for t in state.tensors:
                if size >= _VERIFY_BATCH_BYTES:
                    batches.append([])
                    size = 0
                batches[-1].append(t.name)
                size += reader.entries[t.name].nbytes

            def check(names: list[str]) -> tuple[int, list[str]]:
                bad, done = [], 0
                for name in names:
                    try:
                        reader.tensor(name, expected=digests[name], algorithm="sha256")
                    except DigestMismatchError as exc:
                        bad.append(str(exc).split("\n", 1)[-1].strip())
                    done += reader.entries[name].nbytes
                return done, bad

            total, mismatched = 0, []
            with ThreadPoolExecutor(workers, thread_name_prefix="hkstore-verify") as pool:
                pending: list[Future[tuple[int, list[str]]]] = []
                for batch in (b for b in batches if b):
                    pending.append(pool.submit(check, batch))
                    while len(pending) >= 2 * workers:
                        done, bad = pending.pop(0).result()
                        total += done
                        mismatched += bad
                        if progress is not None:
                            progress(done)
                for future in pending:
                    done, bad = future.result()
                    total += done
                    mismatched += bad
                    if progress is not None:
                        progress(done)
        if mismatched:
            raise DigestMismatchError(
                f"{self._path(STATE_MEMBER)}: {len(mismatched)} tensor(s) do not match their "
                "SHA-256 digest:\n  " + "\n  ".join(mismatched)
            )
        return total

    def verify(self, trust: Trust | None = None) -> None:
        """Check the whole round: record signature, archive (every digest), state (every digest).

        Raises:
            SignatureError, UntrustedKeyError, DigestMismatchError, ArchiveFormatError, ...:
                the first check that fails.
        """
        trust = trust or Trust()
        self.record.check_signature(trust)
        with self.open_model() as archive:
            archive.verify(trust)
        self.check_state()


def _check_state_header(reader: WeightsReader, record: RoundRecord, path: str) -> None:
    assert record.state is not None
    problems = []
    declared = {t.name: t for t in record.state.tensors}
    for name in sorted(set(declared) - set(reader.entries)):
        problems.append(f"tensor {name!r} is in the round record but not in the file")
    for name in sorted(set(reader.entries) - set(declared)):
        problems.append(f"tensor {name!r} is in the file but not in the round record")
    for name, entry in reader.entries.items():
        want = declared.get(name)
        if want is not None and (entry.dtype, tuple(entry.shape)) != (want.dtype, want.shape):
            problems.append(
                f"tensor {name!r}: the file has {entry.dtype}{list(entry.shape)}, the record "
                f"{want.dtype}{list(want.shape)}"
            )
    if problems:
        raise WeightsFormatError(f"{path}: disagrees with the round record: " + "; ".join(problems))


def round_history(
    directory: Directory, *, limits: Limits = DEFAULT_LIMITS
) -> list[HistoryEntry]:
    """Every round ever saved in ``directory``, in round order: number, time, metrics.

    The history documents (kept by retention) and the records of the complete rounds (for
    a round whose history entry was not written yet, e.g. after a crash right after its
    rename) are merged. Unreadable entries are left out.
    """
    entries: dict[int, HistoryEntry] = {}
    for number, data in directory.history().items():
        try:
            entries[number] = parse_history(data, where=f"history/{number:08d}.json",
                                            expected_round=number)
        except HkstoreError:
            continue
    for number in directory.rounds():
        if number in entries:
            continue
        try:
            record = open_round(directory, number, limits=limits).record
        except (HkstoreError, OSError):
            continue
        entries[number] = HistoryEntry(number, record.time, record.metrics)
    return [entries[n] for n in sorted(entries)]


def rounds_metrics(directory: Directory, *, limits: Limits = DEFAULT_LIMITS
                   ) -> dict[int, dict[str, Any]]:
    """The metrics of every complete round (for retention and ``best``): from its history
    entry, else from its record; ``{}`` when neither reads. Only complete rounds are read."""
    out: dict[int, dict[str, Any]] = {}
    for number in directory.rounds():
        data = directory.read_history(number)
        try:
            if data is not None:
                out[number] = parse_history(data, where=f"history/{number:08d}.json",
                                            expected_round=number).metrics
                continue
        except HkstoreError:
            pass
        try:
            out[number] = open_round(directory, number, limits=limits).record.metrics
        except (HkstoreError, OSError):
            out[number] = {}
    return out


def reconcile_history(directory: Directory, *, limits: Limits = DEFAULT_LIMITS) -> list[int]:
    """Write the history entry of every complete round whose entry is missing or stale.

    A writer that died between a round's rename and its history entry (or between replacing a
    round and rewriting its entry) left it so. Call under the writer lock.

    Returns:
        The rounds whose entry was (re)written.
    """
    entries = directory.history()
    fixed = []
    for number in directory.rounds():
        try:
            record = open_round(directory, number, limits=limits).record
        except (HkstoreError, OSError):
            continue
        data = build_history(number, record.time, record.metrics)
        if entries.get(number) != data:
            directory.write_history(number, data)
            fixed.append(number)
    return fixed
