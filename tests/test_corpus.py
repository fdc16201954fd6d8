"""The hostile-input corpus: every case through every entry point, one verdict everywhere.

``tests/corpus/hostile/`` is written by ``tools/make_corpus.py`` (regenerating it must give the
committed bytes: checked below) and ``verdicts.json`` gives each case's verdict: the exact
error class every entry point must raise or report, or ``"loads"``. Archives go through
``hkstore.load`` (path), ``hkstore.loads`` (bytes), ``open_archive(...).verify()``, ``hkstore
verify --json`` and ``hkstore inspect --json``; configs through ``HaikuModel.from_config``;
declearn checkpoints through ``read_declearn`` and ``hkstore convert-declearn``. Every entry
point runs in an empty folder where a canary pickle, if anything ever unpickled one, would
create a file: it must never appear.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import REPO, cli
from helpers_models import device_policy, mlp_model, mse_loss

import hkstore
from hkstore import HaikuModel, Trust
from hkstore._cli._status import exit_code_for
from hkstore.errors import HkstoreError
from hkstore.store import load_hmac_key, load_verifier, open_archive

CORPUS = Path(__file__).parent / "corpus" / "hostile"
TABLE: dict[str, Any] = json.loads((CORPUS / "verdicts.json").read_text())
CASES: list[dict[str, Any]] = TABLE["cases"]


def _ids(case: dict[str, Any]) -> str:
    return str(case["name"])


def _key(name: str) -> Any:
    path = CORPUS / TABLE["keys"][name]
    return load_hmac_key(path) if name == "hmac" else load_verifier(path)


def trust_of(case: dict[str, Any]) -> Trust:
    spec = dict(case["trust"])
    keys = [_key(name) for name in spec.pop("keys", [])]
    return Trust(keys=keys, **spec)


def cli_options(case: dict[str, Any]) -> list[str]:
    """The command-line options that describe the case's trust policy."""
    spec = case["trust"]
    out: list[str] = []
    for name in spec.get("keys", []):
        option = "--hmac-secret-file" if name == "hmac" else "--key"
        out += [option, str(CORPUS / TABLE["keys"][name])]
    if spec.get("require_signature"):
        out.append("--require-signature")
    for module in spec.get("modules", []):
        out += ["--allow-module", module]
    for digest in spec.get("approved", []):
        out += ["--approve", digest]
    for flag in ("allow_pickle", "allow_stdlib", "allow_python_mismatch"):
        if spec.get(flag):
            out.append("--" + flag.replace("_", "-"))
    if case["functions"] == "archive":
        out.append("--functions")
    return out


def verdict_of(call: Callable[[], object]) -> str:
    """``"loads"``, or the class name of the HkstoreError raised (anything else fails)."""
    try:
        call()
    except HkstoreError as exc:
        return type(exc).__name__
    return "loads"


def cli_verdict(verb: str, path: Path, options: list[str]) -> str:
    result = cli(verb, path, "--json", *options)
    report = json.loads(result.stdout)
    failed = report["verdict"]["failed"] if "verdict" in report else report["failed"]
    verdict = "loads" if failed is None else failed["error"]
    expected_code = 0 if failed is None else _exit_code(verdict)
    assert result.returncode == expected_code, (verb, result.stderr)
    return verdict


def _exit_code(error_class: str) -> int:
    """The exit status the command gives for an error of this class."""
    return int(exit_code_for(getattr(hkstore.errors, error_class)("")))


@pytest.fixture(autouse=True)
def _empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run every entry point in an empty folder and check no canary ever appears."""
    monkeypatch.chdir(tmp_path)
    with device_policy(gpu=False):
        yield
    assert not (tmp_path / TABLE["canary"]).exists(), "a pickle was unpickled"


def test_regenerating_the_corpus_gives_the_committed_bytes() -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_corpus.py"), "--check"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_corpus_covers_every_category_with_enough_cases() -> None:
    categories = Counter(case["name"].split("/")[0] for case in CASES)
    assert len(CASES) >= 60
    for category in ("valid", "container", "manifest", "header", "zstd", "signature", "code",
                     "pickle", "config", "declearn"):
        assert categories[category] >= 2, category
    assert all(case["verdict"] == "loads" or hasattr(hkstore.errors, case["verdict"])
               for case in CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "archive"], ids=_ids)
def test_archive_gives_one_verdict_at_every_entry_point(case: dict[str, Any]) -> None:
    path = CORPUS / case["path"]
    trust = trust_of(case)
    given = {"model": mlp_model, "loss": mse_loss} if case["functions"] == "caller" else {}
    options = cli_options(case)

    def verify() -> None:
        with open_archive(path) as archive:
            archive.verify(trust, functions=case["functions"] == "archive")

    verdicts = {
        "load": verdict_of(lambda: hkstore.load(path, trust=trust, **given)),
        "loads": verdict_of(lambda: hkstore.loads(path.read_bytes(), trust=trust, **given)),
        "Archive.verify": verdict_of(verify),
        "hkstore verify": cli_verdict("verify", path, options),
        "hkstore inspect": cli_verdict("inspect", path, options),
    }
    assert verdicts == dict.fromkeys(verdicts, case["verdict"]), case["what"]


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "config"], ids=_ids)
def test_config_gives_its_verdict(case: dict[str, Any]) -> None:
    config = json.loads((CORPUS / case["path"]).read_text())
    given = {"model": mlp_model, "loss": mse_loss} if case["functions"] == "caller" else {}
    verdict = verdict_of(lambda: HaikuModel.from_config(config, trust=trust_of(case), **given))
    assert verdict == case["verdict"], case["what"]


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "declearn"], ids=_ids)
def test_declearn_checkpoint_gives_one_verdict_at_every_entry_point(
    case: dict[str, Any], tmp_path: Path
) -> None:
    from hkstore.integrations.declearn import locate_inputs, read_declearn

    folder = CORPUS / case["path"]
    config, state = locate_inputs(folder, None)
    library = verdict_of(lambda: read_declearn(config, state))
    result = cli("convert-declearn", folder, "--out", tmp_path / "out.hkz")
    expected = 0 if case["verdict"] == "loads" else _exit_code(case["verdict"])
    assert (library, result.returncode) == (case["verdict"], expected), (case["what"],
                                                                         result.stderr)
    if case["verdict"] == "loads":
        assert hkstore.load(tmp_path / "out.hkz", model=mlp_model, loss=mse_loss)
    else:
        assert not (tmp_path / "out.hkz").exists()
