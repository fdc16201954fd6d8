"""Tests for hkstore.cli: every verb through a real subprocess; --json checked against schemas.

Each verb's outputs and exit codes 0/1/2 are checked through ``python -m hkstore`` in a fresh
process (``run_cli``); finer cases call ``main()`` in this process (``cli``), which is faster.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from helpers_archives import (
    default_tensors,
    flip_tensor_byte,
    make_content,
    malicious_pickle,
    write_test_archive,
)
from helpers_cli import REPO, cli, run_cli, run_python

from hkstore._cli._common import PROGRESS_MIN_BYTES, Progress
from hkstore._cli._diff import tensor_stats
from hkstore._cli._inspect import element_bytes
from hkstore._cli._status import ExitCode, UsageError, exit_code_for
from hkstore.errors import (
    ContainerError,
    DigestMismatchError,
    InvalidKeyError,
    SignatureError,
    UnsupportedVersionError,
)
from hkstore.store._archive import open_archive
from hkstore.store._canonical import canonical_json
from hkstore.store._container import ContainerWriter, read_container
from hkstore.store._zstd import compress

SCHEMAS = REPO / "schemas"


def validated(result: subprocess.CompletedProcess[str], schema: str) -> dict[str, Any]:
    """Parse stdout as JSON and validate it against ``schemas/<schema>``."""
    document = json.loads(result.stdout)
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / schema).read_text()))
    validator.validate(document)
    return document


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    return write_test_archive(
        tmp_path / "round-3.hkz",
        trainable=["mlp/~/linear_1:b", "mlp/~/linear_1:w"],
        metadata={"round": 3, "accuracy": 0.91},
    )


@pytest.fixture()
def keypair(tmp_path: Path) -> tuple[Path, Path, str]:
    result = cli("keygen", tmp_path / "alice")
    assert result.returncode == 0, result.stderr
    return tmp_path / "alice.key", tmp_path / "alice.pub", result.stdout.strip()


# --- scaffolding ------------------------------------------------------------------------------


def test_help_lists_verbs_and_exit_codes() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in ("inspect", "verify", "keygen", "sign", "diff", "convert-declearn"):
        assert verb in result.stdout
    assert "1  a check failed" in result.stdout and "2  usage error" in result.stdout


def test_usage_errors_exit_2_on_stderr() -> None:
    assert run_cli().returncode == 2
    result = run_cli("verify")
    assert result.returncode == 2
    assert "the following arguments are required: ARCHIVE" in result.stderr
    assert result.stdout == ""
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr


def test_version() -> None:
    from hkstore import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"hkstore {__version__}"


@pytest.mark.parametrize("exc,code", [
    (UsageError("x"), ExitCode.USAGE),
    (UnsupportedVersionError("x"), ExitCode.USAGE),
    (InvalidKeyError("x"), ExitCode.USAGE),
    (FileNotFoundError(2, "missing"), ExitCode.USAGE),
    (ContainerError("x"), ExitCode.CHECK_FAILED),
    (DigestMismatchError("x"), ExitCode.CHECK_FAILED),
    (SignatureError("x"), ExitCode.CHECK_FAILED),
    (RuntimeError("bug"), ExitCode.INTERNAL),
    (KeyError("bug"), ExitCode.INTERNAL),
])
def test_exit_code_mapping(exc: BaseException, code: ExitCode) -> None:
    assert exit_code_for(exc) is code


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_text(archive: Path) -> None:
    result = run_cli("inspect", archive)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hkstore format 1" in out
    assert 'data info  {"data_type": "float32", "features_shape": [4]}' in out
    assert "tensors    4 (2 trainable), 67 parameters (27 trainable), 268 B" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()
             if line.startswith("  mlp/")}
    assert lines["mlp/~/linear_0:w"] == ["mlp/~/linear_0:w", "F32", "(4,", "8)", "128", "no"]
    assert lines["mlp/~/linear_1:b"] == ["mlp/~/linear_1:b", "F32", "(3,)", "12", "yes"]
    assert "model: reference fnrefs:forward" in out
    assert 'loss:  reference fnrefs:scaled_loss {"scale": 0.5}' in out
    assert 'metadata   {"accuracy": 0.91, "round": 3}' in out
    assert "signature  unsigned" in out
    assert result.stderr == ""


def test_inspect_json_matches_schema(archive: Path) -> None:
    report = validated(cli("inspect", archive, "--json"), "cli-inspect.v1.json")
    assert (report["format"], report["version"]) == ("hkstore-inspect", 1)
    assert [t["name"] for t in report["tensors"]] == list(default_tensors())
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["mlp/~/linear_1:w"] == {"name": "mlp/~/linear_1:w", "dtype": "F32",
                                           "shape": [8, 3], "elements": 24, "bytes": 96,
                                           "trainable": True}
    assert report["totals"]["bytes"] == 268 and report["totals"]["trainable_bytes"] == 108
    assert report["metadata"] == {"accuracy": 0.91, "round": 3}
    assert report["pickle"] is None
    assert report["signature"] == {"state": "unsigned", "key_id": None}
    assert report["writer"]["hkstore"]
    assert report["file_size"] == archive.stat().st_size


def test_element_bytes_agrees_with_the_dtype_table() -> None:
    from hkstore.store._dtypes import DTYPES
    from hkstore.store._manifest import manifest_schema

    enum = manifest_schema()["properties"]["tensors"]["items"]["properties"]["dtype"]["enum"]
    assert set(enum) == set(DTYPES)
    for code, row in DTYPES.items():
        assert element_bytes(code) == row.itemsize, code


def test_inspect_gives_verifys_verdict_unless_told_to_read_headers_only(archive: Path) -> None:
    flip_tensor_byte(archive, default_tensors()["mlp/~/linear_0:w"])
    inspected = cli("inspect", archive, "--json")
    assert inspected.returncode == cli("verify", archive).returncode == 1
    verdict = validated(inspected, "cli-inspect.v1.json")["verdict"]
    assert (verdict["ok"], verdict["failed"]["check"]) == (False, "digests")
    assert "FAILED (digests)" in cli("inspect", archive).stdout
    # --headers-only reads no tensor data, and says the digests were not checked
    fast = cli("inspect", archive, "--headers-only", "--json")
    assert fast.returncode == 0
    checks = {c["name"]: c["status"] for c in validated(fast, "cli-inspect.v1.json")["verdict"]
              ["checks"]}  # fmt: skip
    assert (checks["weights"], checks["digests"]) == ("not run", "not run")


def test_inspect_lists_pickle_globals_without_running_them(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    raw = malicious_pickle(canary)
    path = write_test_archive(tmp_path / "evil.hkz", pickle_blob=compress(raw),
                              pickle_raw_size=len(raw))
    for args in (("inspect", path), ("inspect", path, "--json"), ("verify", path)):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    text = run_cli("inspect", path).stdout
    assert "posix.system" in text and "not executed" in text
    report = validated(run_cli("inspect", path, "--json"), "cli-inspect.v1.json")
    assert "posix.system" in report["pickle"]["globals"]
    assert report["functions"]["model"] == {"kind": "pickle"}
    assert not canary.exists()


def test_inspect_signature_states(archive: Path, keypair: tuple[Path, Path, str],
                                  tmp_path: Path) -> None:
    private, public, key_id = keypair
    assert cli("sign", archive, "--key", private).returncode == 0
    report = validated(cli("inspect", archive, "--json"), "cli-inspect.v1.json")
    assert report["signature"] == {"state": "unverified", "key_id": key_id}
    result = cli("inspect", archive, "--key", public, "--json")
    assert validated(result, "cli-inspect.v1.json")["signature"]["state"] == "verified"
    assert cli("keygen", tmp_path / "mallory").returncode == 0
    result = cli("inspect", archive, "--key", tmp_path / "mallory.pub")
    assert result.returncode == 1
    assert f"signed by {key_id}, FAILED" in result.stdout


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_unreadable_inputs_exit_2(verb: str, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.hkz")
    cases = {
        tmp_path / "missing.hkz": "no such file",
        tmp_path: "is a folder",
        tmp_path / "fifo.hkz": "is a named pipe (FIFO)",  # refused at once, never opened
        Path("/dev/zero"): "is a character device",
    }
    run = run_cli if verb == "verify" else cli
    for path, message in cases.items():
        result = run(verb, path, "--json")
        assert result.returncode == 2, (path, result.stderr)
        assert message in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_files_that_are_not_archives_fail_the_container_check(verb: str, tmp_path: Path) -> None:
    (tmp_path / "empty.hkz").write_bytes(b"")
    (tmp_path / "text.hkz").write_text("not an archive\n")
    for path in (tmp_path / "empty.hkz", tmp_path / "text.hkz"):
        result = cli(verb, path, "--json")
        assert result.returncode == 1, (path, result.stderr)
        report = json.loads(result.stdout)
        failed = report["failed"] if "failed" in report else report["verdict"]["failed"]
        assert (failed["check"], failed["error"]) == ("container", "ContainerError")


def test_malformed_container_is_a_failed_check(archive: Path) -> None:
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) - 40])  # truncated: the ZIP directory is cut
    for verb in ("inspect", "verify"):
        result = cli(verb, archive)
        assert result.returncode == 1, result.stderr
        assert "container check failed" in result.stderr or "container" in result.stdout


def _with_manifest(source: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Rewrite ``source`` with an edited (still canonical) manifest, members copied as-is."""
    data = source.read_bytes()
    members = read_container(data)
    with open(dest, "wb") as handle:
        writer = ContainerWriter(handle)
        for name, info in members.items():
            body = data[info.data_offset : info.data_offset + info.size]
            if name == "manifest.json":
                document = json.loads(body)
                edit(document)
                body = canonical_json(document)
            writer.add_member(name, body)
        writer.close()
    return dest


def test_newer_format_version_exits_2(archive: Path, tmp_path: Path) -> None:
    newer = _with_manifest(archive, tmp_path / "v2.hkz",
                           lambda m: m.__setitem__("format_version", 2))
    result = cli("verify", newer, "--json")
    assert result.returncode == 2
    assert validated(result, "cli-verify.v1.json")["failed"]["check"] == "format version"
    result = cli("inspect", newer)
    assert result.returncode == 2 and "format version 2 is not supported" in result.stderr


def test_manifest_that_breaks_the_schema_is_a_failed_check(archive: Path,
                                                         tmp_path: Path) -> None:
    bad = _with_manifest(archive, tmp_path / "bad.hkz",
                         lambda m: m["tensors"][0].__setitem__("dtype", "F128"))
    result = cli("verify", bad, "--json")
    assert result.returncode == 1
    failed = validated(result, "cli-verify.v1.json")["failed"]
    assert failed["check"] == "manifest" and "$.tensors[0].dtype" in failed["message"]


# --- verify -----------------------------------------------------------------------------------


def test_verify_good_archive(archive: Path) -> None:
    result = run_cli("verify", archive)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"{archive}: OK"
    report = validated(cli("verify", archive, "--json"), "cli-verify.v1.json")
    assert report["ok"] is True and report["failed"] is None
    assert [c["name"] for c in report["checks"]] == [
        "container", "manifest", "signature", "weights", "digests", "functions"]
    assert report["tensors_checked"] == 4 and report["bytes_checked"] == 268


def test_compressed_archive(tmp_path: Path) -> None:
    path = write_test_archive(tmp_path / "z.hkz", compression="zstd")
    report = validated(cli("inspect", path, "--json"), "cli-inspect.v1.json")
    assert report["weights"]["member"] == "weights.safetensors.zst"
    assert report["weights"]["compression"] == "zstd"
    result = cli("verify", path, "--json")
    assert result.returncode == 0, result.stderr
    assert validated(result, "cli-verify.v1.json")["tensors_checked"] == 4


def test_verify_tampered_tensor_names_it(archive: Path) -> None:
    flip_tensor_byte(archive, default_tensors()["mlp/~/linear_1:w"], index=5)
    result = run_cli("verify", archive, "--json")
    assert result.returncode == 1
    report = validated(result, "cli-verify.v1.json")
    assert report["ok"] is False
    assert report["failed"]["check"] == "digests"
    assert report["failed"]["error"] == "DigestMismatchError"
    assert "'mlp/~/linear_1:w'" in report["failed"]["message"]
    assert "the digests check failed" in result.stderr
    text = cli("verify", archive).stdout
    assert "digests    FAILED" in text and text.splitlines()[-1].endswith("FAILED (digests)")


def test_verify_names_every_tampered_tensor(archive: Path) -> None:
    tensors = default_tensors()
    flip_tensor_byte(archive, tensors["mlp/~/linear_0:w"])
    flip_tensor_byte(archive, tensors["mlp/~/linear_1:b"])
    failed = validated(cli("verify", archive, "--json"), "cli-verify.v1.json")["failed"]
    assert failed["message"].startswith(
        "weights.safetensors: 2 tensor(s) do not match their BLAKE3 digest"
    )
    assert "'mlp/~/linear_0:w'" in failed["message"]
    assert "'mlp/~/linear_1:b'" in failed["message"]


def test_verify_signatures(archive: Path, keypair: tuple[Path, Path, str],
                           tmp_path: Path) -> None:
    private, public, key_id = keypair
    unsigned = cli("verify", archive, "--key", public, "--require-signature", "--json")
    assert unsigned.returncode == 1
    assert validated(unsigned, "cli-verify.v1.json")["failed"]["check"] == "signature"
    assert cli("sign", archive, "--key", private).returncode == 0
    good = cli("verify", archive, "--key", public, "--require-signature", "--json")
    assert good.returncode == 0, good.stderr
    assert validated(good, "cli-verify.v1.json")["signature"] == {"state": "verified",
                                                                  "key_id": key_id}
    no_key = validated(cli("verify", archive, "--json"), "cli-verify.v1.json")
    assert no_key["signature"]["state"] == "unverified"
    cli("keygen", tmp_path / "mallory")
    other = cli("verify", archive, "--key", tmp_path / "mallory.pub", "--json")
    assert other.returncode == 1
    failed = validated(other, "cli-verify.v1.json")["failed"]
    assert failed["error"] == "UntrustedKeyError" and key_id in failed["message"]


class ForgedSigner:
    """Claims someone else's key id and signs with zeros (a well-formed, wrong signature)."""

    algorithm = "ed25519"

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id

    def sign(self, payload: bytes) -> bytes:
        return bytes(64)


def test_verify_forged_signature(archive: Path, keypair: tuple[Path, Path, str],
                                 tmp_path: Path) -> None:
    _, public, key_id = keypair
    forged = tmp_path / "forged.hkz"
    with open_archive(archive) as source, open(forged, "wb") as handle:
        source.copy_with_signature(handle, ForgedSigner(key_id))
    result = cli("verify", forged, "--key", public, "--json")
    assert result.returncode == 1
    failed = validated(result, "cli-verify.v1.json")["failed"]
    assert failed["check"] == "signature" and "does not verify" in failed["message"]


def test_verify_tampered_member_is_a_container_failure(archive: Path,
                                                       keypair: tuple[Path, Path, str]) -> None:
    private, public, _ = keypair
    assert cli("sign", archive, "--key", private).returncode == 0
    data = bytearray(archive.read_bytes())
    at = data.find(b'"signature":"') + len(b'"signature":"')
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    archive.write_bytes(bytes(data))
    result = cli("verify", archive, "--key", public, "--json")
    assert result.returncode == 1
    failed = validated(result, "cli-verify.v1.json")["failed"]
    assert failed["check"] == "container" and "signature.json" in failed["message"]


def test_verify_key_problems_exit_2(archive: Path, tmp_path: Path) -> None:
    result = cli("verify", archive, "--require-signature")
    assert result.returncode == 2 and "--require-signature needs" in result.stderr
    result = cli("verify", archive, "--key", tmp_path / "nope.pub")
    assert result.returncode == 2 and "no such file" in result.stderr
    (tmp_path / "junk.pub").write_text("junk\n")
    result = cli("verify", archive, "--key", tmp_path / "junk.pub")
    assert result.returncode == 2 and "junk.pub" in result.stderr


def test_verify_hmac(archive: Path, tmp_path: Path) -> None:
    secret = tmp_path / "federation.secret"
    secret.write_bytes(os.urandom(32))
    assert cli("sign", archive, "--hmac-secret-file", secret).returncode == 0
    result = cli("verify", archive, "--hmac-secret-file", secret, "--require-signature")
    assert result.returncode == 0, result.stderr
    assert "verified with hmac-sha256:" in result.stdout


def test_progress_only_on_a_terminal_for_big_inputs() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    small, quiet, shown = Tty(), io.StringIO(), Tty()
    for stream, total in ((small, 1000), (quiet, PROGRESS_MIN_BYTES), (shown, PROGRESS_MIN_BYTES)):
        progress = Progress("verifying", total, stream=stream)
        progress.advance(total)
        progress.close()
    assert small.getvalue() == "" and quiet.getvalue() == ""
    assert "verifying: 100% (1.0 GiB of 1.0 GiB)" in shown.getvalue()


# --- keygen and sign --------------------------------------------------------------------------


def test_keygen(tmp_path: Path, keypair: tuple[Path, Path, str]) -> None:
    private, public, key_id = keypair
    assert key_id.startswith("ed25519:")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = run_cli("keygen", tmp_path / "alice")
    assert again.returncode == 2 and "alice" in again.stderr


def test_sign_to_out_leaves_source_unchanged(archive: Path, keypair: tuple[Path, Path, str],
                                            tmp_path: Path) -> None:
    private, public, key_id = keypair
    before = archive.read_bytes()
    out = tmp_path / "signed.hkz"
    result = run_cli("sign", archive, "--key", private, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{out}: signed by {key_id}"
    assert archive.read_bytes() == before
    assert run_cli("verify", out, "--key", public, "--require-signature").returncode == 0


def test_sign_refuses_a_failing_archive(archive: Path, keypair: tuple[Path, Path, str],
                                        tmp_path: Path) -> None:
    private, _, _ = keypair
    flip_tensor_byte(archive, default_tensors()["mlp/~/linear_0:b"])
    before = archive.read_bytes()
    result = run_cli("sign", archive, "--key", private)
    assert result.returncode == 1
    assert "refusing to sign" in result.stderr and "digests check failed" in result.stderr
    assert archive.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.key", "alice.pub",
                                                          "round-3.hkz"]


def test_sign_with_a_public_key_exits_2(archive: Path, keypair: tuple[Path, Path, str]) -> None:
    _, public, _ = keypair
    result = run_cli("sign", archive, "--key", public)
    assert result.returncode == 2 and "private key" in result.stderr


# --- diff -------------------------------------------------------------------------------------


def _two_rounds(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    a = default_tensors(0)
    b = dict(a)
    b["mlp/~/linear_0:w"] = a["mlp/~/linear_0:w"] + np.float32(0.5)
    b["mlp/~/linear_1:b"] = np.zeros(4, np.float32)  # reshaped
    b["mlp/~/linear_1:w"] = a["mlp/~/linear_1:w"].astype(np.float16)  # retyped
    del b["mlp/~/linear_0:b"]
    b["mlp/~/linear_2:w"] = np.ones((3, 2), np.float32)
    path_a = write_test_archive(tmp_path / "a.hkz", make_content(
        a, trainable=["mlp/~/linear_0:b", "mlp/~/linear_0:w", "mlp/~/linear_1:w"],
        metadata={"round": 2}))
    path_b = write_test_archive(tmp_path / "b.hkz", make_content(
        b, trainable=["mlp/~/linear_1:b", "mlp/~/linear_2:w"], metadata={"round": 3},
        data_info={"data_type": "float32", "features_shape": [4], "classes": 3}))
    return path_a, path_b, a, b


def test_diff_json(tmp_path: Path) -> None:
    path_a, path_b, a, _ = _two_rounds(tmp_path)
    report = validated(run_cli("diff", path_a, path_b, "--json"), "cli-diff.v1.json")
    by_name = {t["name"]: t for t in report["tensors"]}
    assert [t["name"] for t in report["tensors"]] == [*a, "mlp/~/linear_2:w"]
    assert by_name["mlp/~/linear_0:b"]["status"] == "only_in_a"
    assert by_name["mlp/~/linear_2:w"]["status"] == "only_in_b"
    assert by_name["mlp/~/linear_1:b"]["status"] == "shape_changed"
    changed = by_name["mlp/~/linear_0:w"]
    assert changed["status"] == "changed" and changed["read"] is True
    expected_l2 = float(np.sqrt(32 * 0.25))
    assert changed["l2"] == pytest.approx(expected_l2, rel=1e-6)
    assert changed["max_abs"] == pytest.approx(0.5, rel=1e-6)
    norm_a = float(np.linalg.norm(a["mlp/~/linear_0:w"].astype(np.float64)))
    assert changed["relative"] == pytest.approx(expected_l2 / norm_a, rel=1e-6)
    retyped = by_name["mlp/~/linear_1:w"]
    assert retyped["status"] == "dtype_changed"
    assert retyped["a"]["dtype"] == "F32" and retyped["b"]["dtype"] == "F16"
    assert 0 < retyped["max_abs"] < 1e-2
    assert report["trainable"] == {"added": ["mlp/~/linear_1:b"],
                                   "removed": ["mlp/~/linear_0:w", "mlp/~/linear_1:w"]}
    assert report["data_info"] == [{"key": "classes", "change": "added", "a": None, "b": 3}]
    assert report["metadata"] == [{"key": "round", "change": "changed", "a": 2, "b": 3}]
    assert report["summary"] == {"equal": 0, "changed": 1, "shape_changed": 1,
                                 "dtype_changed": 1, "only_in_a": 1, "only_in_b": 1}


def test_diff_text(tmp_path: Path) -> None:
    path_a, path_b, _, _ = _two_rounds(tmp_path)
    result = cli("diff", path_a, path_b)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("  mlp/")}
    assert rows["mlp/~/linear_1:b"] == ["mlp/~/linear_1:b", "reshaped", "F32", "(3,)", "F32",
                                        "(4,)"]
    assert rows["mlp/~/linear_1:w"][:6] == ["mlp/~/linear_1:w", "retyped", "F32", "(8,", "3)",
                                            "F16"]
    assert rows["mlp/~/linear_0:w"][-3:] == ["2.828", "0.6106", "0.5"]
    assert rows["mlp/~/linear_0:b"][1:] == ["only", "in", "a", "F32", "(8,)", "-"]
    assert "trainable  +mlp/~/linear_1:b, -mlp/~/linear_0:w, -mlp/~/linear_1:w" in out
    assert "metadata   round: 2 -> 3" in out
    assert "summary    0 equal, 1 changed, 1 reshaped, 1 retyped, 1 only in a, 1 only in b" in out


def test_diff_equal_digests_are_not_read(tmp_path: Path) -> None:
    tensors = default_tensors()
    path_a = write_test_archive(tmp_path / "a.hkz", make_content(tensors))
    path_b = write_test_archive(tmp_path / "b.hkz", make_content(tensors))
    flip_tensor_byte(path_b, tensors["mlp/~/linear_0:w"])  # same digest in B's manifest
    report = validated(cli("diff", path_a, path_b, "--json"), "cli-diff.v1.json")
    assert {t["status"] for t in report["tensors"]} == {"equal"}
    assert not any(t["read"] for t in report["tensors"])


def test_diff_reads_are_digest_checked(tmp_path: Path) -> None:
    path_a, path_b, _, b = _two_rounds(tmp_path)
    flip_tensor_byte(path_b, b["mlp/~/linear_0:w"])
    result = run_cli("diff", path_a, path_b)
    assert result.returncode == 1 and "digests check failed" in result.stderr
    assert run_cli("diff", path_a, tmp_path / "missing.hkz").returncode == 2


def test_tensor_stats_non_finite_and_zero_reference() -> None:
    stats = tensor_stats(np.zeros(3, np.float32), np.array([0, 3, 4], np.float32))
    assert stats == {"l2": 5.0, "relative": float("inf"), "max_abs": 4.0}
    stats = tensor_stats(np.ones(2, np.float32), np.array([1, np.nan], np.float32))
    assert np.isnan(stats["l2"]) and np.isnan(stats["max_abs"])


# --- no jax -----------------------------------------------------------------------------------


def test_verbs_run_where_jax_and_haiku_cannot_be_imported(
    tmp_path: Path, archive: Path
) -> None:
    blocker = tmp_path / "blocker"
    canary = tmp_path / "imported"
    for name in ("jax", "haiku", "jaxlib"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            f"open({str(canary)!r}, 'a').write({name!r})\n"
            f"raise ImportError('{name} is blocked in this test')\n"
        )
    other = write_test_archive(tmp_path / "other.hkz", make_content(default_tensors(1)))
    steps = [
        ("keygen", tmp_path / "k"),
        ("inspect", archive),
        ("inspect", archive, "--json"),
        ("verify", archive),
        ("sign", archive, "--key", tmp_path / "k.key"),
        ("verify", archive, "--key", tmp_path / "k.pub", "--require-signature"),
        ("diff", archive, other),
    ]
    for step in steps:
        result = run_cli(*step, pythonpath=[blocker])
        assert result.returncode == 0, (step, result.stderr)
    assert not canary.exists()


def test_verbs_import_neither_jax_nor_the_model_layer(archive: Path, tmp_path: Path) -> None:
    other = write_test_archive(tmp_path / "other.hkz", make_content(default_tensors(1)))
    script = (
        "import sys\n"
        "from hkstore.cli import main\n"
        "codes = [main(a) for a in sys.argv[1:]]\n"
        "heavy = ('jax', 'haiku', 'hkstore.model', 'hkstore.saving', 'cloudpickle')\n"
        "print(codes, sorted(m for m in heavy if m in sys.modules))\n"
    )
    argv = [str(["inspect", str(archive)]), str(["verify", str(archive)]),
            str(["diff", str(archive), str(other)])]
    program = script.replace("sys.argv[1:]", f"[{', '.join(argv)}]")
    result = run_python(program)
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 0] []"


def test_inspect_headers_only_starts_without_numpy(archive: Path) -> None:
    """``inspect --headers-only`` reads no tensor data, so it must not pay numpy's import."""
    program = (
        "import sys\n"
        "from hkstore.cli import main\n"
        f"code = main(['inspect', {str(archive)!r}, '--json', '--headers-only'])\n"
        "print(code, sorted(m for m in ('numpy', 'jax', 'cloudpickle') if m in sys.modules))\n"
    )
    result = run_python(program)
    assert result.stdout.strip().splitlines()[-1] == "0 []"
