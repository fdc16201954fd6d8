"""``hkstore verify``: every check an archive must pass, in order, each one named in the report.

Checks, cheapest first: ``container`` and ``manifest`` (done when the archive is opened:
strict ZIP structure, limits, canonical JSON, schema, member sizes), ``signature`` (with the
caller's keys; required with ``--require-signature``), ``weights`` (the safetensors header's
digest and its agreement with the manifest), ``digests`` (every tensor's digest with the
manifest's algorithm, read through a small buffer per thread, so memory stays bounded),
``functions`` (the pickle's digest, bounded decompression and a well-formed opcode stream;
never unpickled), and, when asked (``--functions`` or a code option), ``code``: whether the
trust policy the options describe would accept the archive's functions, with every check the
loader runs before it imports or unpickles (nothing is imported or unpickled). The same checks
in the same order as :meth:`hkstore.store.Archive.verify` and :func:`hkstore.load`: one
verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hkstore._cli._common import Progress, human_bytes
from hkstore._cli._status import ExitCode, check_name, exit_code_for
from hkstore.errors import HkstoreError

if TYPE_CHECKING:
    from hkstore.store import Archive, Trust

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "VerifyOutcome", "render_verify", "run_checks"]

REPORT_FORMAT = "hkstore-verify"
REPORT_VERSION = 1
CHECKS = ("container", "manifest", "signature", "weights", "digests", "functions", "code")


@dataclass
class VerifyOutcome:
    """The checks run so far and how the run ended."""

    path: str
    checks: list[dict[str, str]] = field(default_factory=list)
    failed: dict[str, str] | None = None
    signature: dict[str, Any] = field(default_factory=lambda: {"state": "unsigned",
                                                               "key_id": None})
    tensors: int = 0
    bytes: int = 0
    exit_code: ExitCode = ExitCode.OK
    step: str = ""  # the check being run, named when a generic error fails it

    def passed(self, name: str, detail: str) -> None:
        """Record a check that passed."""
        self.checks.append({"name": name, "status": "ok", "detail": detail})

    def fail(self, exc: HkstoreError) -> None:
        """Record the failed check (named after the error), and mark the rest not run."""
        name = check_name(exc)
        if name == "archive" and self.step:  # a generic format error: name its step
            name = self.step
        self.failed = {"check": name, "error": type(exc).__name__, "message": str(exc)}
        self.checks.append({"name": name, "status": "failed", "detail": str(exc)})
        done = {c["name"] for c in self.checks}
        for rest in CHECKS:
            if rest not in done:
                self.checks.append({"name": rest, "status": "not run", "detail": ""})
        self.exit_code = exit_code_for(exc)

    def report(self) -> dict[str, Any]:
        """The ``hkstore-verify`` v1 document (``schemas/cli-verify.v1.json``)."""
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "path": self.path,
            "ok": self.failed is None,
            "checks": self.checks,
            "failed": self.failed,
            "signature": self.signature,
            "tensors_checked": self.tensors,
            "bytes_checked": self.bytes,
        }


def run_checks(
    open_archive: Callable[[], Archive],
    path: str,
    trust: Trust,
    *,
    functions: bool = False,
    digests: bool = True,
    then: Callable[[Archive], None] | None = None,
    report: Callable[[Archive, VerifyOutcome], None] | None = None,
) -> VerifyOutcome:
    """Run every check on the archive, stopping at the first that fails.

    Args:
        open_archive: opens the archive (its errors count as failed container/manifest checks).
        path: the archive's path, for the report.
        trust: the caller's keys, ``require_signature`` and code policy.
        functions: also run the ``code`` check (see the module docstring).
        digests: check the weights header and every tensor digest (``False``: those two
            checks are reported "not run", as ``inspect --headers-only`` asks).
        then: called with the still-open archive when every check passed (``sign`` copies it).
        report: called with the still-open archive and the outcome once the checks ran,
            passed or not (``inspect`` builds its report), when the archive opened.

    Returns:
        The :class:`VerifyOutcome` (``exit_code`` 0, 1 or 2).

    Raises:
        UsageError: the input is not an archive at all (raised by ``open_archive``).
    """
    outcome = VerifyOutcome(path)
    try:
        archive = open_archive()
    except HkstoreError as exc:
        outcome.fail(exc)
        return outcome
    with archive:
        try:
            _steps(archive, trust, outcome, functions=functions, digests=digests)
        except HkstoreError as exc:
            outcome.fail(exc)
        if report is not None:
            report(archive, outcome)
        if then is not None and outcome.failed is None:
            then(archive)
    return outcome


def _steps(
    archive: Archive, trust: Trust, outcome: VerifyOutcome, *, functions: bool, digests: bool
) -> None:
    m = archive.manifest
    outcome.passed("container", f"{len(archive.members)} members: {', '.join(archive.members)}")
    outcome.passed("manifest", f"format {m.format_version}, canonical, schema valid")
    key_id = archive.signature_key_id
    outcome.signature = {"state": "unsigned" if key_id is None else "unverified",
                         "key_id": key_id}
    verified = archive.check_signature(trust)
    if verified is not None:
        outcome.signature["state"] = "verified"
        outcome.passed("signature", f"verified with {verified}")
    else:
        outcome.passed("signature", "unsigned" if key_id is None else
                       f"signed by {key_id}; not verified (no --key given)")
    if digests:
        entries = archive.tensor_entries()  # header digest + cross-check against the manifest
        total = sum(e.nbytes for e in entries.values())
        outcome.passed("weights", f"{m.weights.member}: header matches the manifest")
        outcome.bytes = _check_digests(archive, total)
        outcome.tensors = len(m.tensors)
        outcome.passed("digests", f"{outcome.tensors} tensors, {human_bytes(total)}, "
                       f"{m.digest_algorithm} match")
    else:
        for name in ("weights", "digests"):
            outcome.checks.append({"name": name, "status": "not run",
                                   "detail": "--headers-only: tensor data not read"})
    outcome.step = "functions"
    if m.pickle is None:
        outcome.passed("functions", "no pickle member")
    else:
        count = len(archive.check_pickle())
        outcome.passed("functions", f"{m.pickle.member}: sha256 {m.pickle.sha256} matches, "
                       f"{count} global(s); not unpickled")
    if functions:
        outcome.step = "code"
        archive.check_functions(trust)
        outcome.passed("code", "the trust policy accepts the archive's functions "
                       "(checked without importing or unpickling anything)")


def _check_digests(archive: Archive, total: int) -> int:
    """Check every tensor digest (bounded memory, all mismatches named) with a progress line."""
    progress = Progress("verifying", total)
    try:
        return archive.check_digests(progress=progress.advance)
    finally:
        progress.close()


def render_verify(report: dict[str, Any]) -> str:
    """Render the report for a terminal: one line per check, then the verdict."""
    lines = []
    for check in report["checks"]:
        status = {"ok": "ok", "failed": "FAILED", "not run": "-"}[check["status"]]
        detail = check["detail"].replace("\n", "\n" + " " * 20)
        lines.append(f"  {check['name']:<10} {status:<7} {detail}".rstrip())
    verdict = "OK" if report["ok"] else f"FAILED ({report['failed']['check']})"
    lines.append(f"{report['path']}: {verdict}")
    return "\n".join(lines)
