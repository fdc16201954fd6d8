"""Tests for hkstore.saving (save/load/dumps/loads) and the config document, for real.

Real HaikuModels (the toy models of ``helpers_models``) go through the public entry points;
every attack of issue 3's "Bad input" list goes through ``hkstore.load`` (a path) and
``hkstore.loads`` (bytes), and must end in the specific ``HkstoreError`` subclass with a
message naming the fault, with the input file unchanged and nothing written beside it. The
store-level versions of the same attacks (``open_archive(...).verify()``) are in
``test_archive.py``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import numpy as np
import pytest
import safetensors.numpy
from helpers_archives import (
    FUNCTIONS,
    WEIGHTS,
    WEIGHTS_ZST,
    archive_bytes,
    archive_members,
    hand_weights,
    make_content,
    malicious_pickle,
    manifest_document,
    pickle_archive,
    repack,
    with_manifest,
    with_weights_member,
    with_zstd_weights,
    zstd_frame,
)
from helpers_models import (
    CASE_IDS,
    CASES,
    ToyCase,
    cnn_model,
    device_policy,
    mlp_model,
    mse_loss,
    noisy_model,
    xent_loss,
)

import hkstore
from hkstore import HaikuModel, JaxNumpyVector, Trust
from hkstore.errors import (
    ArchiveFormatError,
    ConfigError,
    ContainerError,
    DigestMismatchError,
    HkstoreError,
    LimitExceededError,
    ManifestError,
    ModelFunctionError,
    RefusedCodeError,
    RuntimeMismatchError,
    SignatureError,
    UnsafeTrustWarning,
    UnsupportedVersionError,
    UntrustedKeyError,
    WeightsFormatError,
    WeightsMismatchError,
)
from hkstore.store import Ed25519Signer, HmacKey
from hkstore.store._container import read_container

#: The callers' own functions: load takes weights, mask and data info from the archive only.
GIVEN: dict[str, Any] = {"model": mlp_model, "loss": xent_loss}
TOYS = Trust(modules=["helpers_models"])


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


# --- helpers ----------------------------------------------------------------------------------


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def host(model: HaikuModel) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in model.get_weights().coefs.items()}


def assert_same_model(loaded: HaikuModel, original: HaikuModel) -> None:
    """Names, order, trainable mask, data info and every weight's bytes."""
    assert loaded.get_weight_names() == original.get_weight_names()
    assert loaded.get_weight_names(trainable=True) == original.get_weight_names(trainable=True)
    assert loaded.data_info == original.data_info
    want, got = host(original), host(loaded)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert np.array_equal(got[name].view(np.uint8), array.view(np.uint8)), name


def devices(model: HaikuModel) -> set[Any]:
    """The devices holding the model's weights."""
    out = set()
    for value in model.get_weights().coefs.values():
        assert isinstance(value, jax.Array)
        out |= value.devices()
    return out


def perturbed(case: ToyCase, seed: int = 0) -> HaikuModel:
    """A toy model whose weights are random (not the init's), so equality means restored."""
    model = case.build(seed=seed)
    rng = np.random.default_rng(seed + 1)
    model.set_weights(JaxNumpyVector({
        name: rng.standard_normal(value.shape).astype(value.dtype)
        for name, value in host(model).items()
    }))
    return model


class Entry:
    """``hkstore.load`` on a file holding the bytes, or ``hkstore.loads`` on the bytes.

    For ``load`` it also checks that the file is unchanged and nothing was written beside it,
    whether the load succeeds or fails.
    """

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind = kind
        self.folder = folder
        self._counter = itertools.count()

    def __call__(self, data: bytes, **kwargs: Any) -> HaikuModel:
        if self.kind == "loads":
            return hkstore.loads(data, **kwargs)
        path = self.folder / f"input-{next(self._counter)}.hkz"
        path.write_bytes(data)
        before = sorted(os.listdir(self.folder))
        try:
            return hkstore.load(path, **kwargs)
        finally:
            assert path.read_bytes() == data
            assert sorted(os.listdir(self.folder)) == before


@pytest.fixture(params=["load", "loads"])
def entry(request: pytest.FixtureRequest, tmp_path: Path) -> Entry:
    folder = tmp_path / "archives"
    folder.mkdir()
    return Entry(request.param, folder)


@pytest.fixture()
def key() -> HmacKey:
    return HmacKey.generate()


@pytest.fixture()
def canary(tmp_path: Path) -> Path:
    """A path that a hostile payload would create (each test asserts it stays absent)."""
    return tmp_path / "canary"


def refused(cls: type[HkstoreError], match: str) -> Any:
    return pytest.raises(cls, match=match)


def check_type(info: pytest.ExceptionInfo[Any], cls: type[HkstoreError]) -> None:
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_load_restores_weights_mask_and_data_info(case: ToyCase, tmp_path: Path) -> None:
    model = perturbed(case)
    path = tmp_path / f"{case.name}.hkz"
    manifest = hkstore.save(model, path, metadata={"round": 3})
    assert manifest.metadata == {"round": 3}
    assert manifest.trainable == tuple(model.get_weight_names(trainable=True))
    # functions from the archive's references (allowed module) ...
    loaded = hkstore.load(path, trust=TOYS)
    assert_same_model(loaded, model)
    state = loaded.export_state()
    assert state.model is case.model and state.loss is case.loss
    # ... or given by the caller, with nothing imported from the archive
    assert_same_model(hkstore.load(path, model=case.model, loss=case.loss), model)
    if case.freeze:
        assert loaded.get_weight_names(trainable=True) != loaded.get_weight_names()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_get_config_from_config_restores_mask_data_info_and_weights(case: ToyCase) -> None:
    model = case.build(seed=7)
    config = model.get_config()
    assert config["trainable"] == model.get_weight_names(trainable=True)
    rebuilt = HaikuModel.from_config(config, trust=TOYS)
    assert_same_model(rebuilt, model)  # same seed: the same initial weights, bit for bit
    with pytest.raises(RefusedCodeError, match="'helpers_models' is not in the allowed modules"):
        HaikuModel.from_config(config)  # references need an allowed module
    assert_same_model(HaikuModel.from_config(config, model=case.model, loss=case.loss), model)


def test_zstd_save_load_round_trip(tmp_path: Path) -> None:
    model = perturbed(CASES[3])
    hkstore.save(model, tmp_path / "cnn.hkz", compression="zstd")
    with hkstore.open_archive(tmp_path / "cnn.hkz") as archive:
        assert archive.manifest.weights.member == WEIGHTS_ZST
        assert archive.verify().tensors == len(model.get_weight_names())
    assert_same_model(hkstore.load(tmp_path / "cnn.hkz", **GIVEN | {"model": cnn_model}), model)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_dumps_loads_round_trip(compression: str | None) -> None:
    model = perturbed(CASES[1])
    data = hkstore.dumps(model, compression=compression)  # type: ignore[arg-type]
    assert isinstance(data, bytes)
    assert_same_model(hkstore.loads(data, trust=TOYS), model)
    with pytest.raises(TypeError, match="loads\\(\\) takes bytes, got str"):
        hkstore.loads("model.hkz")  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", [1, 2, None])
def test_workers_pass_through_save_load_dumps_loads(tmp_path: Path, workers: int | None) -> None:
    model = perturbed(CASES[1])
    path = tmp_path / "w.hkz"
    hkstore.save(model, path, workers=workers)
    assert_same_model(hkstore.load(path, trust=TOYS, workers=workers), model)
    data = hkstore.dumps(model, workers=workers)
    assert data == path.read_bytes()  # the same bytes whatever the thread count
    assert_same_model(hkstore.loads(data, trust=TOYS, workers=workers), model)
    with hkstore.open_archive(path) as archive:
        assert archive.manifest.digest_algorithm == "blake3"


def test_bad_workers_fail_before_anything_is_written(tmp_path: Path) -> None:
    model = perturbed(CASES[1])
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        hkstore.save(model, tmp_path / "w.hkz", workers=0)
    assert not (tmp_path / "w.hkz").exists()
    with pytest.raises(TypeError, match="workers must be an int"):
        hkstore.load(tmp_path / "missing.hkz", workers="2")  # type: ignore[arg-type]


def test_load_places_weights_on_the_loaders_device(tmp_path: Path) -> None:
    cpu0, cpu1 = jax.devices("cpu")[:2]
    with device_policy(gpu=False, idx=0):
        model = perturbed(CASES[0])
        assert devices(model) == {cpu0}
        hkstore.save(model, tmp_path / "m.hkz")
    with device_policy(gpu=False, idx=1):
        loaded = hkstore.load(tmp_path / "m.hkz", **GIVEN)
    assert devices(loaded) == {cpu1}
    assert_same_model(loaded, model)
    x, y, _ = CASES[0].batch()
    assert np.array_equal(np.asarray(loaded.compute_batch_predictions((x, y, None))[1]),
                          np.asarray(model.compute_batch_predictions((x, y, None))[1]))


def test_weights_member_loads_with_plain_safetensors(tmp_path: Path) -> None:
    model = perturbed(CASES[2])
    hkstore.save(model, tmp_path / "rnn.hkz")
    with zipfile.ZipFile(tmp_path / "rnn.hkz") as archive:
        assert archive.testzip() is None
        archive.extract(WEIGHTS, tmp_path)
    loaded = safetensors.numpy.load_file(tmp_path / WEIGHTS)
    want = host(model)
    assert set(loaded) == set(want)
    for name, array in want.items():
        assert np.array_equal(loaded[name].view(np.uint8), array.view(np.uint8)), name


def test_signed_save_and_load_with_hmac_and_ed25519(tmp_path: Path) -> None:
    model = perturbed(CASES[0])
    for signer, public in ((HmacKey.generate(), None), (Ed25519Signer.generate(), "pub")):
        verifier: Any = signer if public is None else signer.verifier()  # type: ignore[union-attr]
        hkstore.save(model, tmp_path / "s.hkz", signer=signer)
        strict = Trust(keys=[verifier], modules=["helpers_models"], require_signature=True)
        assert_same_model(hkstore.load(tmp_path / "s.hkz", trust=strict), model)
        with pytest.raises(UntrustedKeyError, match=f"signed by {signer.key_id}"):
            hkstore.load(tmp_path / "s.hkz", trust=Trust(keys=[HmacKey.generate()]), **GIVEN)
    with pytest.raises(SignatureError, match="unsigned, but the trust policy requires"):
        hkstore.loads(hkstore.dumps(model), trust=Trust(keys=[verifier], require_signature=True),
                      **GIVEN)


def test_pickled_functions_round_trip_only_with_a_trusted_signature(tmp_path: Path) -> None:
    offset = 0.25

    def shifted_loss(y_pred: Any, y_true: Any) -> Any:  # a closure: travels by value only
        return xent_loss(y_pred, y_true) + offset

    signer = Ed25519Signer.generate()
    model = HaikuModel(lambda x: hk.Linear(3, name="lin")(x), shifted_loss, seed=1)
    model.initialize({"data_type": "float32", "features_shape": [5]})
    hkstore.save(model, tmp_path / "p.hkz", functions="pickle", signer=signer)
    with pytest.raises(RefusedCodeError, match="does not allow unpickling"):
        hkstore.load(tmp_path / "p.hkz")
    loaded = hkstore.load(tmp_path / "p.hkz",
                          trust=Trust(allow_pickle=True, keys=[signer.verifier()]))
    assert_same_model(loaded, model)
    x, y, _ = CASES[0].batch()
    assert np.allclose(loaded.loss_function(y, np.asarray(x[:, :3])),
                       model.loss_function(y, np.asarray(x[:, :3])))


def test_from_config_with_pickled_functions_needs_signature_and_allow_pickle() -> None:
    signer = HmacKey.generate()
    model = HaikuModel(lambda x: hk.Linear(2, name="lin")(x), xent_loss, seed=3)
    model.initialize({"data_type": "float32", "features_shape": [4]})
    signed = model.get_config(functions="pickle", signer=signer)
    unsigned = model.get_config(functions="pickle")
    with pytest.raises(RefusedCodeError, match="config: the functions are pickled"):
        HaikuModel.from_config(signed)
    with pytest.raises(RefusedCodeError, match="the trust policy lists no keys to verify"):
        HaikuModel.from_config(signed, trust=Trust(allow_pickle=True))
    with pytest.raises(RefusedCodeError, match="not signed by any of the trusted keys"):
        HaikuModel.from_config(unsigned, trust=Trust(allow_pickle=True, keys=[signer]))
    with pytest.raises(UntrustedKeyError, match=f"config: signed by {signer.key_id}"):
        HaikuModel.from_config(signed, trust=Trust(allow_pickle=True, keys=[HmacKey.generate()]))
    tampered = {**signed, "seed": 4}
    with pytest.raises(SignatureError, match=f"signature by {signer.key_id} does not verify"):
        HaikuModel.from_config(tampered, trust=Trust(allow_pickle=True, keys=[signer]))
    rebuilt = HaikuModel.from_config(signed, trust=Trust(allow_pickle=True, keys=[signer]))
    assert_same_model(rebuilt, model)
    with pytest.warns(UnsafeTrustWarning):
        again = HaikuModel.from_config(
            unsigned, trust=Trust(allow_pickle=True, allow_unsigned=True)
        )
    assert_same_model(again, model)


def test_from_config_checks_the_signature_even_when_the_caller_passes_the_functions() -> None:
    signer = HmacKey.generate()
    model = HaikuModel(mlp_model, xent_loss, seed=3)
    model.initialize({"data_type": "float32", "features_shape": [4]})
    unsigned = model.get_config()
    signed = model.get_config(signer=signer)
    strict = Trust(keys=[signer], require_signature=True)
    with pytest.raises(SignatureError, match="config is unsigned"):
        HaikuModel.from_config(unsigned, trust=strict, model=mlp_model, loss=xent_loss)
    with pytest.raises(SignatureError, match="does not verify"):
        HaikuModel.from_config({**signed, "seed": 9}, trust=strict, model=mlp_model,
                               loss=xent_loss)
    rebuilt = HaikuModel.from_config(signed, trust=strict, model=mlp_model, loss=xent_loss)
    assert_same_model(rebuilt, model)


def test_from_config_refuses_a_malformed_pickle_record_and_a_future_version() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=3)
    model.initialize({"data_type": "float32", "features_shape": [4]})
    config = model.get_config()
    with pytest.raises(ConfigError, match=r"^config: \$\.pickle: expected an object, got str$"):
        HaikuModel.from_config({**config, "pickle": "x"})
    with pytest.raises(UnsupportedVersionError, match="config: version 2 is not supported"):
        HaikuModel.from_config({**config, "version": 2})
    with pytest.raises(ConfigError, match=r"^config: \$\.version is 'True'; expected an integer$"):
        HaikuModel.from_config({**config, "version": True})


def test_from_config_takes_explicit_keywords_only() -> None:
    """A typo in ``trust=`` fails at once instead of being swallowed by **kwargs."""
    config = HaikuModel(mlp_model, xent_loss, seed=3).get_config()
    with pytest.raises(TypeError, match="unexpected keyword argument 'trsut'"):
        HaikuModel.from_config(config, trsut=TOYS)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="allow_bin must be a bool, got Trust"):
        HaikuModel.from_config(config, TOYS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positional"):
        HaikuModel.from_config(config, False, TOYS)  # type: ignore[misc]


def test_allow_bin_carries_the_pickle_blob_as_bytes_and_changes_nothing_else() -> None:
    """declearn's ``allow_bin``: binary content as bytes (msgpack); trust is unchanged."""
    signer = HmacKey.generate()
    model = HaikuModel(lambda x: hk.Linear(2, name="lin")(x), xent_loss, seed=3)
    model.initialize({"data_type": "float32", "features_shape": [4]})
    text = model.get_config(functions="pickle", signer=signer)
    binary = model.get_config(True, functions="pickle", signer=signer)
    assert isinstance(text["pickle"]["blob"], str)
    assert binary["pickle"]["blob"] == base64.b64decode(text["pickle"]["blob"])
    assert {k: v for k, v in binary.items() if k != "pickle"} == {
        k: v for k, v in text.items() if k != "pickle"
    }
    # the binary form still needs the same trust, and its signature still verifies
    with pytest.raises(RefusedCodeError, match="config: the functions are pickled"):
        HaikuModel.from_config(binary, allow_bin=True)
    trusted = Trust(allow_pickle=True, keys=[signer])
    assert_same_model(HaikuModel.from_config(binary, allow_bin=True, trust=trusted), model)
    assert_same_model(HaikuModel.from_config(text, allow_bin=True, trust=trusted), model)
    with pytest.raises(ConfigError, match=r"\$\.pickle\.blob"):  # bytes need allow_bin=True
        HaikuModel.from_config(binary, trust=trusted)
    # a reference config has no binary content: both forms are the same document
    plain = HaikuModel(mlp_model, xent_loss, seed=3)
    assert plain.get_config(allow_bin=True) == plain.get_config(allow_bin=False)
    with pytest.raises(TypeError, match="allow_bin must be a bool"):
        plain.get_config("yes")  # type: ignore[arg-type]


def test_config_errors_name_the_config_and_the_field() -> None:
    config = HaikuModel(mlp_model, xent_loss, seed=3).get_config()
    cases = {
        "seed": (2**32, r"^config: \$\.seed: 4294967296 is not below 2\*\*32"),
        "trainable": (["a", "a"], r"^config: \$\.trainable: a name is listed twice$"),
        "functions": ({"model": {"kind": "eval"}, "loss": {"kind": "none"}},
                      r"^config: \$\.functions\.model\.kind: 'eval' is not one of"),
        "signature": ({"algorithm": "ed25519", "key_id": "x", "signature": ""},
                      r"^config: \$\.signature\.key_id: 'x' is not a key id"),
        "rng": ({"impl": "threefry2x32", "key_data": [1]},
                r"^config: \$\.rng\.key_data: expected an array of 2 integers"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            HaikuModel.from_config({**config, key: value}, model=mlp_model, loss=xent_loss)


def test_config_documents_match_their_schema() -> None:
    """What get_config writes validates against schemas/config.v1.json; bad ones do not."""
    from hkstore.store._schema import validate

    signer = HmacKey.generate()
    model = HaikuModel(mlp_model, xent_loss, seed=3)
    validate(model.get_config(), schema="config.v1.json", what="config")
    model.initialize({"data_type": "float32", "features_shape": [4]})
    for config in (model.get_config(signer=signer), model.get_config(functions="pickle")):
        validate(config, schema="config.v1.json", what="config")
    with pytest.raises(ManifestError, match=r"\$\.seed"):
        validate({**model.get_config(), "seed": -1}, schema="config.v1.json", what="config")


def test_archives_and_configs_carry_the_random_state() -> None:
    """A reloaded model continues the random stream where the saved one was, not at the seed."""
    model = HaikuModel(noisy_model, mse_loss, seed=5)
    model.initialize({"data_type": "float32", "features_shape": [3]})
    batch = (np.ones((2, 3), np.float32), np.zeros((2, 1), np.float32), None)
    model.compute_batch_gradients(batch)  # the key moves on from the seed's
    data = hkstore.dumps(model)
    config = model.get_config()
    loaded = hkstore.loads(data, model=noisy_model, loss=mse_loss)
    rebuilt = HaikuModel.from_config(config, model=noisy_model, loss=mse_loss)
    assert loaded.rng_state == model.rng_state == rebuilt.rng_state
    with hkstore.open_archive(data) as archive:
        assert archive.manifest.rng is not None
        assert archive.manifest.rng.key_data == model.rng_state.key_data
    expected = model.compute_batch_gradients(batch)
    assert loaded.compute_batch_gradients(batch) == expected
    assert rebuilt.compute_batch_gradients(batch) == expected


def test_archives_and_configs_without_a_random_state_still_load() -> None:
    """Archives and configs written before the rng field restart from the seed's stream."""
    model = HaikuModel(noisy_model, mse_loss, seed=5)
    model.initialize({"data_type": "float32", "features_shape": [3]})
    fresh_rng = model.rng_state
    batch = (np.ones((2, 3), np.float32), np.zeros((2, 1), np.float32), None)
    model.compute_batch_gradients(batch)
    data = hkstore.dumps(model)
    document = manifest_document(data)
    del document["rng"]
    old = with_manifest(data, document)
    loaded = hkstore.loads(old, model=noisy_model, loss=mse_loss)
    assert loaded.rng_state == fresh_rng  # what initialize leaves for seed 5
    config = model.get_config()
    del config["rng"]
    assert HaikuModel.from_config(config, model=noisy_model, loss=mse_loss).rng_state == fresh_rng


class FailingSigner:
    """A real Signer whose key refuses to sign (an HSM that went away)."""

    algorithm = "ed25519"

    def __init__(self) -> None:
        self.key_id = Ed25519Signer.generate().key_id

    def sign(self, payload: bytes) -> bytes:
        raise OSError("signing device unavailable")


def test_failed_save_leaves_no_file_and_no_temp_files(tmp_path: Path) -> None:
    model = perturbed(CASES[0])
    with pytest.raises(OSError, match="signing device unavailable"):
        hkstore.save(model, tmp_path / "new.hkz", signer=FailingSigner())
    assert os.listdir(tmp_path) == []
    # over an existing archive: the old one stays, byte for byte
    hkstore.save(model, tmp_path / "old.hkz")
    before = (tmp_path / "old.hkz").read_bytes()
    with pytest.raises(OSError, match="signing device unavailable"):
        hkstore.save(perturbed(CASES[0], seed=5), tmp_path / "old.hkz", signer=FailingSigner())
    assert os.listdir(tmp_path) == ["old.hkz"]
    assert (tmp_path / "old.hkz").read_bytes() == before


def test_failed_save_of_non_json_metadata_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"metadata\.bad: object is not JSON-safe"):
        hkstore.save(perturbed(CASES[0]), tmp_path / "m.hkz", metadata={"bad": object()})
    assert os.listdir(tmp_path) == []


# --- bad input: truncation, bit flips -----------------------------------------------------------


def small_archive(key: HmacKey | None = None) -> bytes:
    """The helper's MLP weights (they fit ``mlp_model`` on features [4]), signed if asked."""
    return archive_bytes(signer=key)


def test_load_accepts_the_unmodified_archives(entry: Entry, key: HmacKey) -> None:
    """The control for every attack below: the same archives, untouched, load."""
    loaded = entry(small_archive(key), trust=Trust(keys=[key], require_signature=True), **GIVEN)
    assert loaded.get_weight_names() == list(manifest_document(small_archive())["trainable"])


def test_load_rejects_truncation_at_every_byte(entry: Entry, key: HmacKey) -> None:
    data = small_archive(key)
    for length in range(len(data)):
        with refused(ContainerError, "truncated|empty") as info:
            entry(data[:length], trust=Trust(keys=[key]), **GIVEN)
        check_type(info, ContainerError)


def test_load_rejects_a_bit_flip_in_every_member(entry: Entry, key: HmacKey) -> None:
    data = small_archive(key)
    for name, member in read_container(data).items():
        for at in range(member.data_offset, member.data_offset + member.size, 3):
            corrupt = bytearray(data)
            corrupt[at] ^= 1 << (at % 8)
            with pytest.raises(HkstoreError) as info:
                entry(bytes(corrupt), trust=Trust(keys=[key]), **GIVEN)
            assert name in str(info.value), (name, at, str(info.value))


def test_load_rejects_a_tensor_bit_flip(entry: Entry) -> None:
    data = bytearray(small_archive())
    target = manifest_document(bytes(data))["tensors"][1]["name"]
    data[bytes(data).find(_tensor_bytes(target))] ^= 0x04
    with refused(DigestMismatchError, f"{WEIGHTS}: 1 tensor\\(s\\) do not match") as info:
        entry(bytes(data), **GIVEN)
    assert f"{target!r}: expected" in str(info.value)
    check_type(info, DigestMismatchError)


def test_load_with_verify_false_misses_a_tensor_flip_that_verify_catches(entry: Entry) -> None:
    """``verify=False`` skips exactly the tensor digests (for archives one wrote oneself): the
    flipped weight is loaded as is. ``Archive.verify`` still names it."""
    data = bytearray(small_archive())
    name = "mlp/~/linear_0:w"
    data[bytes(data).find(_tensor_bytes(name))] ^= 0x04
    loaded = entry(bytes(data), verify=False, **GIVEN)
    original = _tensor(name)
    got = np.asarray(loaded.get_weights().coefs[name])
    assert not np.array_equal(got, original)
    assert np.sum(got != original) == 1
    with hkstore.open_archive(bytes(data)) as archive, pytest.raises(
        DigestMismatchError, match=f"{re.escape(repr(name))}: expected"
    ):
        archive.verify()


def _tensor(name: str) -> np.ndarray:
    from helpers_archives import default_tensors

    return default_tensors()[name]


def _tensor_bytes(name: str) -> bytes:
    return _tensor(name).tobytes()


# --- bad input: the weights member against the manifest ---------------------------------------


def test_load_rejects_manifest_header_mismatch(entry: Entry) -> None:
    data = small_archive()
    document = manifest_document(data)
    document["tensors"][1]["shape"] = [8, 4]  # 'mlp/~/linear_0:w' is [4, 8] in the header
    with refused(WeightsFormatError, exactly(
        "weights member disagrees with the manifest (1 problem(s)): tensor 'mlp/~/linear_0:w': "
        "weights member has F32[4, 8], manifest has F32[8, 4]"
    )):
        entry(with_manifest(data, document), **GIVEN)


@pytest.mark.parametrize(
    ("offsets", "message"),
    [([[0, 32], [16, 48]], "tensor 'b' at data_offsets [16, 48] overlaps tensor 'a' at [0, 32]"),
     ([[0, 32], [40, 72]], "bytes [32, 40) of the data belong to no tensor (gap before tensor "
                           "'b')")],
    ids=["overlap", "gap"],
)
def test_load_rejects_overlapping_or_gapped_tensor_ranges(
    entry: Entry, offsets: list[list[int]], message: str
) -> None:
    tensors = {"a": np.zeros(8, np.float32), "b": np.ones(8, np.float32)}
    data = archive_bytes(make_content(tensors))
    header = {name: {"dtype": "F32", "shape": [8], "data_offsets": span}
              for name, span in zip(tensors, offsets, strict=True)}
    member = hand_weights(header, bytes(offsets[1][1]))
    with refused(WeightsFormatError, exactly(f"{WEIGHTS}: {message}")):
        entry(with_weights_member(data, member), **GIVEN)


def test_load_rejects_duplicate_keys_in_manifest(entry: Entry) -> None:
    data = small_archive()
    manifest = archive_members(data)["manifest.json"]
    with refused(ManifestError, exactly("manifest.json: duplicate key 'seed' in the object at $")):
        entry(with_manifest(data, b'{"seed":1,' + manifest[1:]), **GIVEN)


def test_load_rejects_huge_header_length_prefix(entry: Entry) -> None:
    data = archive_bytes(make_content({"a": np.zeros(2, np.float32)}))
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with refused(LimitExceededError, exactly(
        f"{WEIGHTS}: header length {2**62} bytes exceeds the limit of {32 << 20} "
        "(Limits.max_header_bytes)"
    )):
        entry(with_weights_member(data, hand_weights(header, bytes(8), length=2**62)), **GIVEN)


def test_load_rejects_huge_raw_size_of_zstd_weights(entry: Entry) -> None:
    data = archive_bytes(compression="zstd")
    document = manifest_document(data)
    document["weights"]["raw_size"] = 2**62
    with refused(LimitExceededError, f"member {WEIGHTS_ZST!r}: declared size {2**62} bytes"):
        entry(with_manifest(data, document), **GIVEN)


@pytest.mark.parametrize(
    ("recorded", "declared", "error", "message"),
    [("unknown", 0, ArchiveFormatError, "zstd frame does not record its content size"),
     (-8, -8, ArchiveFormatError, "corrupt zstd frame"),
     (64, 0, LimitExceededError, "bytes of content, more than the"),
     (0, 64, ArchiveFormatError, "bytes are declared for it")],
    ids=["unknown", "lying", "over-declared", "under-declared"],
)
def test_load_rejects_zstd_weights_frame_with_unknown_or_lying_size(
    entry: Entry, recorded: int | str, declared: int, error: type[HkstoreError], message: str
) -> None:
    import zstandard

    data = archive_bytes(compression="zstd")
    raw = zstandard.ZstdDecompressor().decompress(archive_members(data)[WEIGHTS_ZST])
    size = recorded if isinstance(recorded, str) else len(raw) + recorded
    frame = zstd_frame(raw, content_size=size)  # type: ignore[arg-type]
    with refused(error, f"^member {WEIGHTS_ZST!r}: .*{message}") as info:
        entry(with_zstd_weights(data, frame, raw_size=len(raw) + declared), **GIVEN)
    check_type(info, error)


# --- bad input: pickled functions (canaries) ---------------------------------------------------


def test_load_runs_the_canary_pickle_when_the_policy_allows_it(entry: Entry, canary: Path) -> None:
    """The control: this payload does create the canary when unpickled."""
    with pytest.warns(UnsafeTrustWarning), pytest.raises(ArchiveFormatError, match=FUNCTIONS):
        entry(pickle_archive(malicious_pickle(canary)),
              trust=Trust(allow_pickle=True, allow_unsigned=True))
    assert canary.exists()


@pytest.mark.parametrize(
    ("policy", "message"),
    [("none", "archive: the functions are pickled and the trust policy does not allow "
              "unpickling"),
     ("allow_pickle", "refusing to unpickle the pickled functions: the trust policy lists "
                      "no keys to verify a signature with"),
     ("allow_pickle+keys", "refusing to unpickle the pickled functions: it is not signed by "
                           "any of the trusted keys")],
)
def test_load_rejects_unsigned_pickle(
    entry: Entry, key: HmacKey, canary: Path, policy: str, message: str
) -> None:
    trust = {"none": Trust(), "allow_pickle": Trust(allow_pickle=True),
             "allow_pickle+keys": Trust(allow_pickle=True, keys=[key])}[policy]
    with refused(RefusedCodeError, "^" + re.escape(message)) as info:
        entry(pickle_archive(malicious_pickle(canary)), trust=trust)
    check_type(info, RefusedCodeError)
    assert not canary.exists()


def test_load_accepts_unsigned_pickle_with_allow_pickle_and_allow_unsigned(entry: Entry) -> None:
    model = HaikuModel(lambda x: hk.Linear(2, name="lin")(x), xent_loss, seed=2)
    model.initialize({"data_type": "float32", "features_shape": [3]})
    data = hkstore.dumps(model, functions="pickle")
    with pytest.raises(RefusedCodeError):
        entry(data, trust=Trust(allow_pickle=True))
    with pytest.warns(UnsafeTrustWarning, match="allow_unsigned=True"):
        loaded = entry(data, trust=Trust(allow_pickle=True, allow_unsigned=True))
    assert_same_model(loaded, model)


def test_load_rejects_pickle_signed_by_untrusted_key(
    entry: Entry, key: HmacKey, canary: Path
) -> None:
    stranger = Ed25519Signer.generate()
    data = pickle_archive(malicious_pickle(canary), signer=stranger)
    with refused(UntrustedKeyError, exactly(
        f"signature.json: signed by {stranger.key_id} (ed25519), which is not a trusted key "
        f"(trusted: {key.key_id})"
    )):
        entry(data, trust=Trust(allow_pickle=True, keys=[key]))
    with refused(RefusedCodeError, "refusing to unpickle"):
        entry(data, trust=Trust(allow_pickle=True))
    assert not canary.exists()


def test_load_rejects_replayed_signature(entry: Entry, key: HmacKey, canary: Path) -> None:
    benign = pickle_archive(pickle.dumps({"model": None, "loss": None}), signer=key)
    members = archive_members(pickle_archive(malicious_pickle(canary)))
    members["signature.json"] = archive_members(benign)["signature.json"]
    sha = hashlib.sha256(members["manifest.json"]).hexdigest()
    with refused(SignatureError, f"but manifest.json has sha256 {sha} \\(signature replayed") as i:
        entry(repack(members), trust=Trust(allow_pickle=True, keys=[key]))
    check_type(i, SignatureError)
    with refused(SignatureError, "signature replayed"):  # weights-only loads check it too
        entry(repack(members), trust=Trust(keys=[key]), **GIVEN)
    assert not canary.exists()


@pytest.mark.parametrize(
    ("python", "implementation"),
    [(f"3.{sys.version_info.minor - 1}", "cpython"), (f"3.{sys.version_info.minor}", "pypy")],
    ids=["older-minor", "pypy"],
)
def test_load_rejects_pickle_from_another_python(
    entry: Entry, key: HmacKey, canary: Path, python: str, implementation: str
) -> None:
    data = pickle_archive(malicious_pickle(canary), signer=key)
    document = manifest_document(data)
    document["pickle"].update(python=python, python_implementation=implementation)
    with refused(RuntimeMismatchError, "^" + re.escape(
        f"{FUNCTIONS}: pickled under {implementation} {python}, but this is cpython "
        f"3.{sys.version_info.minor}; "
    )):
        entry(with_manifest(data, document, signer=key),
              trust=Trust(allow_pickle=True, keys=[key]))
    assert not canary.exists()


def test_load_rejects_huge_raw_size_of_pickle(entry: Entry, key: HmacKey, canary: Path) -> None:
    data = pickle_archive(malicious_pickle(canary), signer=key, raw_size=2**40)
    with refused(LimitExceededError, exactly(
        f"{FUNCTIONS}: declared size {2**40} bytes is more than the limit of {256 << 20} bytes"
    )):
        entry(data, trust=Trust(allow_pickle=True, keys=[key]))
    assert not canary.exists()


@pytest.mark.parametrize("recorded", ["unknown", -3], ids=["unknown", "lying"])
def test_load_rejects_pickle_frame_with_unknown_or_lying_size(
    entry: Entry, key: HmacKey, canary: Path, recorded: int | str
) -> None:
    payload = malicious_pickle(canary)
    size = recorded if isinstance(recorded, str) else len(payload) + recorded
    frame = zstd_frame(payload, content_size=size)  # type: ignore[arg-type]
    data = pickle_archive(payload, signer=key, frame=frame,
                          raw_size=len(payload) if isinstance(size, str) else size)
    with refused(ArchiveFormatError, f"^{FUNCTIONS}: ") as info:
        entry(data, trust=Trust(allow_pickle=True, keys=[key]))
    check_type(info, ArchiveFormatError)
    assert not canary.exists()


CANARY_MODULE = "hkstore_load_canary_module"


def test_load_rejects_reference_outside_the_allowlist(
    entry: Entry, tmp_path: Path, canary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{CANARY_MODULE}.py").write_text(
        f"import pathlib\n\npathlib.Path({str(canary)!r}).write_text('imported')\n\n\n"
        "from helpers_models import mlp_model as forward\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, CANARY_MODULE, raising=False)
    specs = {"model": {"kind": "reference", "ref": f"{CANARY_MODULE}:forward", "kwargs": {}},
             "loss": {"kind": "reference", "ref": "helpers_models:xent_loss", "kwargs": {}}}
    data = archive_bytes(make_content(functions=specs))
    with refused(RefusedCodeError, exactly(
        f"reference '{CANARY_MODULE}:forward': module '{CANARY_MODULE}' is not in the allowed "
        "modules ('helpers_models'); add it to Trust(modules=[...]) if you trust its code"
    )):
        entry(data, trust=TOYS)
    assert CANARY_MODULE not in sys.modules
    assert not canary.exists()
    entry(data, trust=TOYS, model=mlp_model)  # the caller's model: the archive's is not needed
    assert CANARY_MODULE not in sys.modules
    assert not canary.exists()


# --- weights that don't fit the model ---------------------------------------------------------


def _wider_mlp(x: Any) -> Any:
    return hk.nets.MLP([9, 3], name="mlp")(x)


def test_load_rejects_weights_of_another_architecture(entry: Entry) -> None:
    mlp = ToyCase("mlp-on-images", mlp_model, xent_loss, (6, 6, 1)).build()
    with refused(WeightsMismatchError, exactly(
        "from_state: 2 mismatch(es) between the stored weights and the model:\n"
        "  - missing 4 name(s): 'conv:b', 'conv:w', 'head:b', 'head:w'\n"
        "  - unexpected 4 name(s): 'mlp/~/linear_0:b', 'mlp/~/linear_0:w', 'mlp/~/linear_1:b', "
        "'mlp/~/linear_1:w'"
    )):
        entry(hkstore.dumps(mlp), model=cnn_model, loss=xent_loss)


def test_load_rejects_weights_of_another_size(entry: Entry) -> None:
    with refused(WeightsMismatchError, exactly(
        "from_state: 3 mismatch(es) between the stored weights and the model:\n"
        "  - 'mlp/~/linear_0:b': shape (8,) given, model has (9,)\n"
        "  - 'mlp/~/linear_0:w': shape (5, 8) given, model has (5, 9)\n"
        "  - 'mlp/~/linear_1:w': shape (8, 3) given, model has (9, 3)"
    )):
        entry(hkstore.dumps(CASES[0].build()), model=_wider_mlp, loss=xent_loss)


def test_load_rejects_model_that_cannot_take_the_stored_data(entry: Entry) -> None:
    """An MLP archive for features [5] given to a conv net: it cannot even be initialized."""
    with refused(ModelFunctionError, "^" + re.escape(
        "from_state: the model function fails on the stored data info (data_type 'float32', "
        "features_shape [5]): ValueError: "
    )):
        entry(hkstore.dumps(CASES[0].build()), model=cnn_model, loss=xent_loss)
