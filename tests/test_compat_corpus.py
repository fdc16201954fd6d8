"""Archives written by earlier hkstore releases keep verifying and loading, bit for bit.

Each ``tests/corpus/compat/<version>/`` folder holds archives one release wrote (see its
README); they are committed once and never regenerated. Every archive must pass ``verify``
(with the test key when signed), load into a model whose weights equal the ones recorded in
``expected.json`` (raw-byte SHA-256 taken from the writer's model, not from the archive), and
read lazily one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_models import device_policy

import hkstore
from hkstore.cli import main as cli_main

CORPUS = Path(__file__).parent / "corpus" / "compat"
RELEASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def compat_model(x: jax.Array) -> jax.Array:
    """The structure of the generator's model (tools/make_compat_corpus.py)."""
    h = jax.nn.relu(hk.Linear(8, name="hidden")(x))
    y = hk.Linear(3, name="head")(h)
    scale = hk.get_parameter("scale", (), jnp.bfloat16, init=hk.initializers.Constant(1.5))
    steps = hk.get_parameter("steps", (2,), jnp.int32, init=hk.initializers.Constant(7))
    empty = hk.get_parameter("empty", (0, 3), jnp.float32, init=jnp.zeros)
    bias = (steps.sum() + empty.sum()).astype(jnp.float32)
    return y * scale.astype(jnp.float32) + bias * 0.0


def compat_loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(y_pred - y_true), axis=-1)


def _expected(release: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CORPUS / release / "expected.json").read_text("utf-8"))
    return data


def _cases() -> list[tuple[str, str]]:
    return [(r, name) for r in RELEASES for name in sorted(_expected(r)["archives"])]


def _check_weights(weights: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(weights) == sorted(expected["tensors"])
    for name, want in expected["tensors"].items():
        array = np.asarray(weights[name])
        assert str(array.dtype) == want["dtype"], name
        assert list(array.shape) == want["shape"], name
        raw = np.ascontiguousarray(array).tobytes()
        assert hashlib.sha256(raw).hexdigest() == want["sha256"], name


def test_the_corpus_is_there() -> None:
    assert "0.1.0" in RELEASES
    assert len(_cases()) >= 4


@pytest.mark.parametrize(("release", "name"), _cases())
def test_old_archive_verifies_and_loads(release: str, name: str) -> None:
    folder = CORPUS / release
    expected = _expected(release)
    info = expected["archives"][name]
    path = folder / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], (
        f"{path} changed: corpus archives are never rewritten"
    )
    trust = hkstore.Trust(keys=[folder / "compat-test.pub"], allow_pickle=True)
    with hkstore.open_archive(path) as archive:
        report = archive.verify(trust)
        assert report.signed_by == (expected["key_id"] if info["signed"] else None)
        assert report.tensors == len(expected["tensors"])
        lazy = {n: archive.tensor(n) for n in archive.names()}
        assert archive.manifest.metadata == expected["metadata"]
    _check_weights(lazy, expected)
    with device_policy(gpu=False):
        if info["functions"] == "pickle":
            model = hkstore.load(path, trust=trust)
        else:
            model = hkstore.load(path, model=compat_model, loss=compat_loss, trust=trust)
    _check_weights(dict(model.get_weights().coefs), expected)
    assert model.get_weight_names(trainable=True) == expected["trainable"]
    x = np.ones((2, 4), np.float32)
    _, y_pred, _ = model.compute_batch_predictions((x, np.zeros((2, 3), np.float32), None))
    assert y_pred.shape == (2, 3)


@pytest.mark.parametrize(("release", "name"), _cases())
def test_old_archive_passes_the_cli_verify(
    release: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = CORPUS / release
    args = ["verify", str(folder / name), "--key", str(folder / "compat-test.pub"), "--json"]
    if _expected(release)["archives"][name]["signed"]:
        args.append("--require-signature")
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
