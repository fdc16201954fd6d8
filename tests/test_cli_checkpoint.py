"""``hkstore inspect DIR`` / ``hkstore verify DIR``: checkpoint directories from the command line.

Directories are written by a real ``Checkpointer`` (signed with an HMAC secret file), damaged
byte by byte, and checked through ``main()`` (fast) and ``python -m hkstore`` in a fresh
process where jax and haiku cannot be imported. ``--json`` output is validated against the
shipped schemas.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_archives import flip_tensor_byte
from helpers_cli import cli, run_cli
from helpers_models import CASES, device_policy

from hkstore import Checkpointer
from hkstore.errors import ManifestError
from hkstore.store import HmacKey
from hkstore.store._schema import validate

MLP = CASES[0]


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


def validated(result: subprocess.CompletedProcess[str], schema: str) -> dict[str, Any]:
    document = json.loads(result.stdout)
    validate(document, schema=schema, what=schema)
    return document


@pytest.fixture()
def run(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A directory with rounds 1-5 saved (keep_last=2, keep_best loss min 1), HMAC-signed."""
    secret = tmp_path / "federation.secret"
    secret.write_bytes(os.urandom(32))
    key = HmacKey(secret.read_bytes())
    folder = tmp_path / "ck"
    model = MLP.build()
    state = {"m": np.arange(8, dtype=np.float32), "step": 0}
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.3}
    with Checkpointer(folder, keep_last=2, keep_best=("loss", "min", 1), signer=key,
                      functions="none") as ckpt:
        for n, value in losses.items():
            ckpt.save(model, n, state={**state, "step": n}, metrics={"loss": value})
    weights = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    return folder, secret, weights


def test_inspect_lists_rounds_metrics_and_the_rules_that_keep_them(run: Any) -> None:
    folder, _, _ = run
    result = cli("inspect", folder)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"checkpoint {folder} (3 round(s) listed)"
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"2", "4", "5"}
    assert "keep_best" in rows["2"] and '{"loss": 0.1}' in rows["2"]
    assert "keep_last" in rows["4"] and "newest, keep_last" in rows["5"]
    assert "history    5 round(s) ever saved" in result.stdout
    assert "state 2 tensors" not in result.stdout and "state 1 tensors" in result.stdout
    report = validated(cli("inspect", folder, "--json"), "cli-inspect-checkpoint.v1.json")
    assert [r["round"] for r in report["rounds"]] == [2, 4, 5]
    assert [r["kept_by"] for r in report["rounds"]] == [["keep_best"], ["keep_last"],
                                                        ["newest", "keep_last"]]
    assert [h["round"] for h in report["history"]] == [1, 2, 3, 4, 5]
    assert report["retention"] == {"keep_best": {"count": 1, "metric": "loss", "mode": "min"},
                                   "keep_every": None, "keep_last": 2}
    assert report["rounds"][0]["signature"]["state"] == "unverified"
    assert report["writer"] is None and report["incomplete"] == []


def test_inspect_one_round_and_with_keys(run: Any) -> None:
    folder, secret, _ = run
    by_option = validated(cli("inspect", folder, "--round", 4, "--json"),
                          "cli-inspect-checkpoint.v1.json")
    by_folder = validated(cli("inspect", folder / "round-00000004", "--json"),
                          "cli-inspect-checkpoint.v1.json")
    assert [r["round"] for r in by_option["rounds"]] == [4] and by_option["history"] is None
    assert by_folder["rounds"] == by_option["rounds"]
    signed = validated(cli("inspect", folder, "--hmac-secret-file", secret, "--json"),
                       "cli-inspect-checkpoint.v1.json")
    assert {r["signature"]["state"] for r in signed["rounds"]} == {"verified"}
    other = secret.with_name("other.secret")
    other.write_bytes(os.urandom(32))
    failed = cli("inspect", folder, "--hmac-secret-file", other)
    assert failed.returncode == 1 and "(failed)" in failed.stdout


def test_verify_every_round_and_one(run: Any) -> None:
    folder, secret, _ = run
    result = cli("verify", folder, "--hmac-secret-file", secret, "--require-signature")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"{folder}: 3 round(s), OK"
    report = validated(cli("verify", folder, "--json"), "cli-verify-checkpoint.v1.json")
    assert report["ok"] and [r["round"] for r in report["rounds"]] == [2, 4, 5]
    assert [c["name"] for c in report["rounds"][0]["checks"]] == ["record", "signature",
                                                                  "model", "state"]
    one = validated(cli("verify", folder / "round-00000002", "--json"),
                    "cli-verify-checkpoint.v1.json")
    assert [r["round"] for r in one["rounds"]] == [2] and one["ok"]


def test_verify_names_the_damaged_round_and_check(run: Any) -> None:
    folder, secret, weights = run
    flip_tensor_byte(folder / "round-00000004" / "model.hkz", weights["mlp/~/linear_1:w"])
    state = folder / "round-00000005" / "state.safetensors"
    flip_tensor_byte(state, np.arange(8, dtype=np.float32), 2)
    result = cli("verify", folder)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == (
        f"{folder}: 3 round(s), FAILED (round 4: model, round 5: state)")
    assert f"verify: {folder}: round 4: the model check failed" in result.stderr
    report = validated(cli("verify", folder, "--json"), "cli-verify-checkpoint.v1.json")
    failed = {r["round"]: r["failed"] for r in report["rounds"] if r["failed"]}
    assert failed[4]["check"] == "model" and failed[4]["error"] == "DigestMismatchError"
    assert failed[5]["check"] == "state" and "'$.m'" in failed[5]["message"]
    assert cli("verify", folder, "--round", 2).returncode == 0
    other = secret.with_name("other.secret")
    other.write_bytes(os.urandom(32))
    wrong = cli("verify", folder, "--round", 2, "--hmac-secret-file", other, "--json")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["rounds"][0]["failed"]["check"] == "signature"


def test_a_damaged_record_fails_the_record_check_and_inspect_lists_it(run: Any) -> None:
    folder, _, _ = run
    record = folder / "round-00000005" / "round.json"
    record.write_bytes(record.read_bytes() + b" ")
    result = cli("verify", folder, "--round", 5, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["rounds"][0]["failed"]["check"] == "record"
    listing = cli("inspect", folder, "--json")
    assert listing.returncode == 1
    row = validated(listing, "cli-inspect-checkpoint.v1.json")["rounds"][-1]
    assert row["round"] == 5 and "not canonical JSON" in row["error"]


def test_incomplete_folders_are_listed(run: Any) -> None:
    folder, _, _ = run
    (folder / ".tmp-round-00000006-00c0ffee").mkdir()
    assert "incomplete .tmp-round-00000006-00c0ffee" in cli("inspect", folder).stdout
    report = validated(cli("verify", folder, "--json"), "cli-verify-checkpoint.v1.json")
    assert report["incomplete"] == [".tmp-round-00000006-00c0ffee"] and report["ok"]


def test_usage_errors(run: Any, tmp_path: Path) -> None:
    folder, _, _ = run
    (tmp_path / "empty").mkdir()
    cases = [
        (("verify", tmp_path / "empty"), "neither a checkpoint directory"),
        (("verify", folder, "--round", 3), "no complete round 3 (complete: 2, 4, 5)"),
        (("inspect", folder / "round-00000004", "--round", 5), "is round 4"),
        (("verify", folder / "round-00000004" / "model.hkz", "--round", 4),
         "not a checkpoint directory"),
        (("inspect", folder, "--round", "x"), "expected a round number"),
        (("verify", tmp_path / "missing"), "no such file"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    # the round's archive is an archive like any other
    assert cli("verify", folder / "round-00000004" / "model.hkz").returncode == 0


def test_only_incomplete_rounds_fail_verification(tmp_path: Path) -> None:
    (tmp_path / "round-00000001").mkdir()  # a round without its record
    result = cli("verify", tmp_path, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["rounds"] == []


def test_verbs_on_directories_run_where_jax_and_haiku_cannot_be_imported(
    run: Any, tmp_path: Path
) -> None:
    folder, secret, _ = run
    blocker, canary = tmp_path / "blocker", tmp_path / "imported"
    for name in ("jax", "haiku", "jaxlib"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            f"open({str(canary)!r}, 'a').write({name!r})\n"
            f"raise ImportError('{name} is blocked in this test')\n")
    for args in (["inspect", folder, "--json"], ["verify", folder, "--hmac-secret-file",
                                                  secret, "--require-signature"],
                 ["verify", folder / "round-00000002"]):
        result = run_cli(*args, pythonpath=[blocker])
        assert result.returncode == 0, (args, result.stderr)
    assert not canary.exists()


def test_round_record_schema_is_what_the_writer_writes(run: Any) -> None:
    folder, _, _ = run
    record = json.loads((folder / "round-00000005" / "round.json").read_bytes())
    validate(record, schema="checkpoint-round.v1.json", what="round.json")
    entry = json.loads((folder / "history" / "00000001.json").read_bytes())
    validate(entry, schema="checkpoint-history.v1.json", what="history")
    with pytest.raises(ManifestError):
        validate({**record, "round": -1}, schema="checkpoint-round.v1.json", what="round.json")


def test_a_round_of_a_newer_version_exits_2_unless_another_round_failed(run: Any) -> None:
    folder, _, weights = run
    record = folder / "round-00000005" / "round.json"
    record.write_bytes(record.read_bytes().replace(b'"version":1}', b'"version":2}'))
    assert cli("verify", folder, "--round", 5).returncode == 2
    result = cli("verify", folder, "--json")
    assert result.returncode == 2
    failed = [r["failed"] for r in json.loads(result.stdout)["rounds"] if r["failed"]]
    assert [f["error"] for f in failed] == ["UnsupportedVersionError"]
    flip_tensor_byte(folder / "round-00000004" / "model.hkz", weights["mlp/~/linear_1:w"])
    assert cli("verify", folder).returncode == 1
