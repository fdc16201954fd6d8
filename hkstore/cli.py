"""The ``hkstore`` command: inspect, verify, keygen, sign, diff and convert-declearn archives.

It never imports jax or haiku, so it runs on a gateway or CI machine that has only numpy.
Each verb is one short function below; the building blocks live in :mod:`hkstore._cli`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hkstore._cli._common import (
    emit,
    emit_report,
    load_signer,
    load_trust,
    note,
    open_input,
    parse_storage_options,
)
from hkstore._cli._escape import printable
from hkstore._cli._status import ExitCode, UsageError, run_verb
from hkstore._version import __version__

__all__ = ["main"]

_DESCRIPTION = """\
Inspect, verify, sign, compare and convert hkstore model archives.
Runs without jax or haiku: only numpy, jsonschema and (to sign) cryptography."""

_VERIFY = """\
Check an archive the way a loader would, without loading it: the ZIP container
(strict structure, limits), the manifest (canonical JSON, schema), the signature
(with the keys given; required with --require-signature), the safetensors header
against the manifest, every tensor's digest (BLAKE3, or SHA-256 in older archives),
and the pickle member's digest and opcodes (never unpickled); with --functions or a
code-policy option, also whether a loader with that policy would accept the archive's
functions (nothing is imported or unpickled). Stops at the first failed check and names
it. Reads and hashes on every core this process may use (--workers N).

Given a checkpoint directory, check every round (or one: DIR/round-N, --round N)
the way Checkpointer.restore() does: the round record (canonical JSON, schema,
signature), the model archive (the manifest digest the record holds, then every
check above) and the state (header and every tensor digest)."""

_INSPECT = """\
Show what an archive holds: members, tensors, trainable mask, data info, functions (and
the globals a pickle would import, read from its opcodes, with the digest to approve it by),
metadata and signature. The archive is checked exactly as `verify` checks it, and the exit
status is the same verdict; with --headers-only the tensor data is not read.

Given a checkpoint directory, list its rounds from their records (or one: DIR/round-N,
--round N)."""

_EXIT_CODES = """\
exit status:
  0  ok
  1  a check failed: the input was read and fails the container, manifest, limits,
     digest or signature checks (a file that is not an archive at all included), or, for
     convert-declearn, holds code that is refused
  2  usage error, or input that cannot be judged: missing or unreadable file, a folder
     that is not a checkpoint directory, a FIFO or device, a key file that does not load,
     a newer format version
  3  internal error (a bug in hkstore; never a verdict on the input)
"""


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show what an archive holds, with the same checks and verdict as ``verify`` (or list a
    checkpoint directory's rounds)."""
    from hkstore._cli._inspect import inspect_report, render_inspect
    from hkstore._cli._verify import render_verify, run_checks

    if _is_folder(args):
        from hkstore._cli._checkpoint import (
            inspect_checkpoint,
            inspect_exit_code,
            render_inspect_checkpoint,
            resolve_target,
        )

        keys_given = bool(args.key or args.hmac_secret_file)
        listing = inspect_checkpoint(resolve_target(args.archive, args.round, _storage(args)),
                                     _trust(args) if keys_given else None)
        emit_report(listing, render_inspect_checkpoint, as_json=args.json)
        return inspect_exit_code(listing)
    trust = _trust(args)
    reports: list[dict[str, Any]] = []
    outcome = run_checks(
        lambda: open_input(args.archive, workers=args.workers, storage_options=_storage(args)),
        args.archive, trust,
        functions=_code_check(args),
        digests=not args.headers_only,
        report=lambda archive, done: reports.append(
            inspect_report(archive, args.archive, trust, done)
        ),
    )  # fmt: skip
    if reports:
        emit_report(reports[0], render_inspect, as_json=args.json)
    else:  # not even a container and manifest to show: the verify report says why
        emit_report(outcome.report(), render_verify, as_json=args.json)
    if outcome.failed is not None:
        note(f"inspect: {args.archive}: the {outcome.failed['check']} check failed: "
             f"{outcome.failed['message']}")
    return outcome.exit_code


def cmd_verify(args: argparse.Namespace) -> int:
    """Run every check; exit 0 when all pass, 1 naming the check that failed."""
    from hkstore._cli._verify import render_verify, run_checks

    trust = _trust(args)
    if _is_folder(args):
        from hkstore._cli._checkpoint import (
            render_verify_checkpoint,
            resolve_target,
            verify_checkpoint,
        )

        target = resolve_target(args.archive, args.round, _storage(args))
        checked, code = verify_checkpoint(target, trust, workers=args.workers)
        emit_report(checked, render_verify_checkpoint, as_json=args.json)
        for r in checked["rounds"]:
            if r["failed"] is not None:
                note(f"verify: {args.archive}: round {r['round']}: the {r['failed']['check']} "
                     "check failed")
        return code
    outcome = run_checks(
        lambda: open_input(args.archive, workers=args.workers, storage_options=_storage(args)),
        args.archive, trust, functions=_code_check(args),
    )  # fmt: skip
    report = outcome.report()
    emit_report(report, render_verify, as_json=args.json)
    if outcome.failed is not None:
        note(f"verify: {args.archive}: the {outcome.failed['check']} check failed")
    return outcome.exit_code


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    return parse_storage_options(args.storage_option)


def _is_folder(args: argparse.Namespace) -> bool:
    """Whether the input is a checkpoint directory or round (``--round`` needs one)."""
    from hkstore._cli._checkpoint import is_checkpoint_path

    if is_checkpoint_path(args.archive, _storage(args)):
        if _code_check(args) or args.allow_stdlib or args.allow_python_mismatch:
            raise UsageError(f"{args.archive}: --functions, --approve, --allow-module, "
                             "--allow-stdlib, --allow-pickle and --allow-python-mismatch "
                             "apply to an archive, not a checkpoint directory")
        return True
    if args.round is not None:
        raise UsageError(f"--round: {args.archive} is not a checkpoint directory")
    return False


def _trust(args: argparse.Namespace) -> Any:
    return load_trust(
        args.key, args.hmac_secret_file, require_signature=args.require_signature,
        approved=args.approve, modules=args.allow_module, allow_stdlib=args.allow_stdlib,
        allow_pickle=args.allow_pickle, allow_python_mismatch=args.allow_python_mismatch,
    )  # fmt: skip


def _code_check(args: argparse.Namespace) -> bool:
    return bool(args.functions or args.approve or args.allow_module or args.allow_pickle)


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create NAME.key (private, 0600) and NAME.pub; print the key id."""
    from hkstore.store import generate_ed25519_keypair

    key_id = generate_ed25519_keypair(args.name)
    note(f"wrote {args.name}.key (private, mode 0600) and {args.name}.pub")
    emit(key_id)
    return ExitCode.OK


def cmd_sign(args: argparse.Namespace) -> int:
    """Verify the archive's digests, then re-sign it atomically (in place unless --out)."""
    from hkstore._cli._sign import sign_archive

    signer = load_signer(key=args.key, hmac_secret_file=args.hmac_secret_file)
    outcome = sign_archive(args.archive, args.out or args.archive, signer, workers=args.workers,
                           storage_options=_storage(args))
    if outcome.failed is not None:
        note(f"refusing to sign {args.archive}: the {outcome.failed['check']} check failed: "
             f"{outcome.failed['message']}")
        return outcome.exit_code
    emit(f"{args.out or args.archive}: signed by {signer.key_id}")
    return ExitCode.OK


def cmd_diff(args: argparse.Namespace) -> int:
    """Compare two archives tensor by tensor (equal digests are not read)."""
    from hkstore._cli._diff import diff_report, render_diff

    options = _storage(args)
    with open_input(args.a, storage_options=options) as a, \
            open_input(args.b, storage_options=options) as b:
        report = diff_report(a, b, args.a, args.b)
    emit_report(report, render_diff, as_json=args.json)
    return ExitCode.OK


def cmd_convert_declearn(args: argparse.Namespace) -> int:
    """Write an hkstore archive from a declearn HaikuModel checkpoint, unpickling nothing."""
    from hkstore.integrations.declearn import convert, locate_inputs

    config, state = locate_inputs(Path(args.path), Path(args.state) if args.state else None)
    overrides = {role: ref for role, ref in (("model", args.model_ref),
                                              ("loss", args.loss_ref)) if ref}
    summary = convert(config, state, args.out, overrides=overrides)
    for warning in summary.warnings:
        note(f"warning: {warning}")
    emit(summary.text)
    return ExitCode.OK


# --- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise (so :func:`main` returns 2 instead of exiting)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def _add_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", action="append", default=[], metavar="FILE",
                   help="trusted Ed25519 public key (NAME.pub); repeat for several")
    p.add_argument("--hmac-secret-file", action="append", default=[], metavar="FILE",
                   help="trusted HMAC-SHA256 shared secret file; repeat for several")


def _round_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a round number (an integer >= 0), got "
                                         f"{text!r}")
    return int(text)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_workers, default=None, metavar="N",
                   help="threads that read and hash (default: every core this process may use)")


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the filesystem for s3://... and other URLs (fsspec; "
                        "e.g. endpoint_url=http://host:9000); repeatable. The usual AWS_* "
                        "variables (AWS_ENDPOINT_URL...) apply too")


def _add_trust(p: argparse.ArgumentParser) -> None:
    """The options of ``verify`` and ``inspect``: keys, and the policy whose verdict to give."""
    _add_keys(p)
    p.add_argument("--require-signature", action="store_true",
                   help="fail unless signed by one of the given keys")
    code = p.add_argument_group(
        "code policy", "report whether a loader with this policy would accept the archive's "
        "functions (the 'code' check); nothing is ever imported or unpickled here")
    code.add_argument("--functions", action="store_true",
                      help="run the code check (implied by the options below)")
    code.add_argument("--approve", action="append", default=[], metavar="SHA256",
                      help="accept the pickle member with this digest, signed or not "
                           "(Trust(approved=...)); `inspect` prints the digest; repeatable")
    code.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                      help="references may import this module (Trust(modules=...)); repeatable")
    code.add_argument("--allow-stdlib", action="store_true",
                      help="let --allow-module name standard-library modules")
    code.add_argument("--allow-pickle", action="store_true",
                      help="accept a pickle signed by one of the given keys")
    code.add_argument("--allow-python-mismatch", action="store_true",
                      help="with --allow-pickle or --approve: accept a pickle written by "
                           "another Python (nothing is unpickled here either way)")


def build_parser() -> argparse.ArgumentParser:
    """The ``hkstore`` argument parser (one sub-command per verb)."""
    parser = _Parser(prog="hkstore", description=_DESCRIPTION, epilog=_EXIT_CODES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hkstore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, func: object, help_: str, description: str = "") -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_, description=description or help_,
                             epilog=_EXIT_CODES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = verb("inspect", cmd_inspect, "show an archive's contents, checked as verify checks it, "
             "or list a checkpoint directory's rounds", _INSPECT)
    p.add_argument("archive", metavar="ARCHIVE|DIR",
                   help="an archive, a checkpoint directory, or one round's folder DIR/round-N")
    p.add_argument("--round", type=_round_number, metavar="N",
                   help="with a checkpoint directory: only round N")
    p.add_argument("--json", action="store_true",
                   help="print hkstore-inspect (or hkstore-inspect-checkpoint) v1 JSON")
    p.add_argument("--headers-only", action="store_true",
                   help="do not read tensor data: the weights and digests checks are not run "
                        "(fast on huge archives; then the verdict does not cover the tensors)")
    _add_trust(p)
    _add_workers(p)
    _add_storage(p)
    p = verb("verify", cmd_verify, "check structure, schema, limits, every digest, signature",
             _VERIFY)
    p.add_argument("archive", metavar="ARCHIVE|DIR",
                   help="an archive, a checkpoint directory (every round), or DIR/round-N")
    p.add_argument("--round", type=_round_number, metavar="N",
                   help="with a checkpoint directory: only round N")
    _add_trust(p)
    p.add_argument("--json", action="store_true",
                   help="print hkstore-verify (or hkstore-verify-checkpoint) v1 JSON")
    _add_workers(p)
    _add_storage(p)
    p = verb("keygen", cmd_keygen, "create an Ed25519 key pair NAME.key (0600) + NAME.pub")
    p.add_argument("name", metavar="NAME")
    p = verb("sign", cmd_sign, "verify an archive's digests, then (re-)sign it atomically")
    p.add_argument("archive", metavar="ARCHIVE")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", metavar="NAME.key", help="Ed25519 private key file")
    who.add_argument("--hmac-secret-file", metavar="FILE", help="HMAC-SHA256 shared secret")
    p.add_argument("--out", metavar="FILE", help="write here instead of replacing ARCHIVE")
    _add_workers(p)
    _add_storage(p)
    p = verb("diff", cmd_diff, "compare two archives tensor by tensor")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print hkstore-diff v1 JSON")
    _add_storage(p)
    p = verb("convert-declearn", cmd_convert_declearn,
             "convert a declearn 2.x HaikuModel checkpoint without unpickling it")
    p.add_argument("path", metavar="PATH",
                   help="declearn checkpoint folder, or its model_config.json with --state")
    p.add_argument("--out", required=True, metavar="ARCHIVE", help="the archive to write")
    p.add_argument("--state", metavar="FILE",
                   help="the model_state_*.mpk to take weights from (default: the newest)")
    p.add_argument("--model-ref", metavar="MODULE:QUALNAME",
                   help="store this reference for the model function instead of the pickle's")
    p.add_argument("--loss-ref", metavar="MODULE:QUALNAME",
                   help="store this reference for the loss function instead of the pickle's")
    return parser


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The parser, built once per process (``main`` may run many times in one process)."""
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hkstore`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Example:
        >>> main(["verify", "round-3.hkz"])  # doctest: +ELLIPSIS
          container  ok      2 members: weights.safetensors, manifest.json
        ...
        round-3.hkz: OK
        0
    """
    parser = _parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(arguments)
    except UsageError as exc:
        sys.stderr.write(printable(f"{exc}") + "\n")
        return ExitCode.USAGE
    except SystemExit as exc:  # --help and --version print and exit 0
        return int(exc.code or 0) if not isinstance(exc.code, str) else ExitCode.USAGE
    if args.verb is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    return run_verb(args.verb, lambda: args.func(args), debug=args.debug)
