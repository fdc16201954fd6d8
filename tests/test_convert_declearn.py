"""Tests for hkstore.integrations.declearn and ``hkstore convert-declearn``: no unpickling, ever.

Inputs are built here from declearn 2.x's documented wire format (no declearn dependency):
``model_config.json`` is ``{"typekey": "haiku", "model": HEX, "loss": HEX, "data_info": {...}}``
where HEX is the hex of a joblib pickle of the function (for an importable function: one
global reference); ``model_state_<YY-MM-DD_HH-MM-SS>.mpk`` is the MessagePack of
``{"__type__": "JaxNumpyVector", "dump": {name: {"__type__": "np.ndarray",
"dump": [raw bytes, dtype char, shape]}}}``.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import fnrefs
import ml_dtypes
import msgpack
import numpy as np
import pytest
from helpers_archives import default_tensors, malicious_pickle
from helpers_cli import cli, run_cli

from hkstore.cli import main
from hkstore.errors import (
    DeclearnFormatError,
    RefusedCodeError,
    UnsupportedDtypeError,
)
from hkstore.integrations.declearn import (
    decode_array,
    function_reference,
    locate_inputs,
    read_declearn,
)
from hkstore.store._archive import open_archive

# --- declearn's wire format, written by hand --------------------------------------------------


def joblib_reference(module: str, qualname: str) -> bytes:
    """The bytes joblib (protocol 4) writes for a function stored by reference."""
    body = b""
    for text in (module, qualname):
        raw = text.encode()
        body += b"\x8c" + bytes([len(raw)]) + raw + b"\x94"  # SHORT_BINUNICODE, MEMOIZE
    body += b"\x93\x94"  # STACK_GLOBAL, MEMOIZE
    return b"\x80\x04\x95" + struct.pack("<Q", len(body) + 1) + body + b"."


def pack_array(array: np.ndarray) -> dict[str, Any]:
    return {"__type__": "np.ndarray",
            "dump": [array.tobytes(), array.dtype.char, list(array.shape)]}


def pack_state(weights: dict[str, np.ndarray], vector_type: str = "JaxNumpyVector") -> bytes:
    document = {"__type__": vector_type,
                "dump": {name: pack_array(a) for name, a in weights.items()}}
    return msgpack.packb(document, use_bin_type=True)


def declearn_config(model: bytes, loss: bytes, data_info: dict[str, Any] | None = None) -> dict:
    return {"typekey": "haiku", "model": model.hex(), "loss": loss.hex(),
            "data_info": data_info if data_info is not None else
            {"data_type": "float32", "features_shape": [4]}}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The declearn checkpoint's weights: the shared small MLP of the archive helpers."""
    return default_tensors(seed)


def make_checkpoint(folder: Path, *, config: dict | None = None,
                    states: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """A declearn Checkpointer folder: model_config.json + model_state_<ts>.mpk files."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = declearn_config(joblib_reference("fnrefs", "forward"),
                                 joblib_reference("fnrefs", "scaled_loss"))
    (folder / "model_config.json").write_text(json.dumps(config), encoding="utf-8")
    if states is None:
        states = {"26-11-27_10-00-00": weights(0), "26-11-27_10-05-00": weights(1)}
    for stamp, values in states.items():
        (folder / f"model_state_{stamp}.mpk").write_bytes(pack_state(values))
    return folder


# --- the wire form is what we think it is ----------------------------------------------------


def test_hand_written_reference_equals_pickles_own_bytes() -> None:
    assert joblib_reference("fnrefs", "forward") == pickle.dumps(fnrefs.forward, protocol=4)


# --- function references ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_function_reference_reads_any_protocol(protocol: int) -> None:
    blob = pickle.dumps(fnrefs.scaled_loss, protocol=protocol)
    assert function_reference(blob.hex(), role="loss", where="cfg") == "fnrefs:scaled_loss"


def test_function_reference_refuses_code_and_lists_globals(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    with pytest.raises(RefusedCodeError) as info:
        function_reference(malicious_pickle(canary).hex(), role="model", where="cfg")
    message = str(info.value)
    assert "cfg: the 'model' pickle is not a plain reference" in message
    assert "posix.system" in message or "os.system" in message
    assert not canary.exists()


def test_function_reference_refuses_a_partial() -> None:
    import functools

    blob = pickle.dumps(functools.partial(fnrefs.scaled_loss, power=1), protocol=4)
    with pytest.raises(RefusedCodeError, match=r"functools\.partial.*fnrefs\.scaled_loss"):
        function_reference(blob.hex(), role="loss", where="cfg")


@pytest.mark.parametrize("text,match", [("zz", "not a hex string"),
                                        ("8004", "malformed pickle")])
def test_function_reference_refuses_non_pickles(text: str, match: str) -> None:
    with pytest.raises(DeclearnFormatError, match=match):
        function_reference(text, role="model", where="cfg")


# --- arrays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,code", [
    (np.float32, "F32"), (np.float64, "F64"), (np.float16, "F16"), (ml_dtypes.bfloat16, "BF16"),
    (np.int8, "I8"), (np.uint8, "U8"), (np.int16, "I16"), (np.int32, "I32"),
    (np.int64, "I64"), (np.uint64, "U64"), (np.longlong, "I64"), (np.bool_, "BOOL"),
    (np.complex64, "C64"),
])
def test_decode_array_maps_dtype_chars(dtype: Any, code: str) -> None:
    array = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    got_code, got = decode_array(pack_array(array)["dump"], where="w")
    assert got_code == code
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 3)
    assert got.tobytes() == array.tobytes()


def test_decode_array_c_long_width_follows_the_byte_count() -> None:
    four = np.arange(3, dtype=np.int32).tobytes()
    assert decode_array([four, "l", [3]], where="w")[0] == "I32"
    assert decode_array([np.arange(3, dtype=np.int64).tobytes(), "l", [3]], where="w")[0] == "I64"


def test_decode_array_refuses_what_cannot_be_stored_exactly() -> None:
    with pytest.raises(UnsupportedDtypeError, match="'D'"):
        decode_array([np.zeros(2, np.complex128).tobytes(), "D", [2]], where="w")
    with pytest.raises(UnsupportedDtypeError, match="'O'"):
        decode_array([b"", "O", [0]], where="w")


@pytest.mark.parametrize("wire,match", [
    ([b"\x00" * 7, "f", [2]], "7 bytes of data, but shape \\[2\\] of 'f' needs 8"),
    (["00", "f", [1]], "data is str, expected bytes"),
    ([b"", "f", [-1]], "is not a list of sizes"),
    ([b"", "f"], "expected \\[data, dtype, shape\\]"),
])
def test_decode_array_refuses_malformed_wire(wire: Any, match: str) -> None:
    with pytest.raises(DeclearnFormatError, match=match):
        decode_array(wire, where="w")


# --- locating and reading ---------------------------------------------------------------------


def test_read_checkpoint_folder_takes_the_newest_state(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    config, state = locate_inputs(folder, None)
    assert state.name == "model_state_26-11-27_10-05-00.mpk"
    model = read_declearn(config, state)
    assert model.references == {"model": "fnrefs:forward", "loss": "fnrefs:scaled_loss"}
    assert model.data_info == {"data_type": "float32", "features_shape": [4]}
    expected = weights(1)
    assert list(model.weights) == list(expected)
    for name, (code, array) in model.weights.items():
        assert code == "F32"
        np.testing.assert_array_equal(array, expected[name])


def test_plain_config_without_state_is_refused_with_a_hint(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt", states={})
    with pytest.raises(DeclearnFormatError, match=r"holds no weights.*model_state_.*--state FILE"):
        locate_inputs(folder / "model_config.json", None)
    with pytest.raises(DeclearnFormatError, match="holds no weights"):
        locate_inputs(folder, None)


def test_non_haiku_config_is_refused(tmp_path: Path) -> None:
    config = declearn_config(b"", b"")
    config["typekey"] = "torch"
    folder = make_checkpoint(tmp_path / "ckpt", config=config)
    with pytest.raises(DeclearnFormatError, match="only declearn HaikuModel configs"):
        read_declearn(*locate_inputs(folder, None))


def test_duplicate_keys_in_config_are_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    text = (folder / "model_config.json").read_text()
    (folder / "model_config.json").write_text(text[:-1] + ', "typekey": "haiku"}')
    with pytest.raises(DeclearnFormatError, match="duplicate key 'typekey'"):
        read_declearn(*locate_inputs(folder, None))


@pytest.mark.parametrize("payload,match", [
    (b"\xc1", "not a MessagePack document"),
    (msgpack.packb({"__type__": "TorchVector", "dump": {}}), "type 'TorchVector'"),
    (msgpack.packb([1, 2]), "expected a declearn typed object"),
    (msgpack.packb({"__type__": "JaxNumpyVector", "dump": {}}), "holds no weights"),
    (msgpack.packb({"__type__": "JaxNumpyVector",
                    "dump": {"a:w": {"__type__": "int", "dump": b"\x01"}}}), "'a:w'"),
    (msgpack.packb(msgpack.ExtType(1, b"x")), "expected a declearn typed object"),
])
def test_malformed_states_are_refused(tmp_path: Path, payload: bytes, match: str) -> None:
    folder = make_checkpoint(tmp_path / "ckpt", states={})
    state = folder / "model_state_26-11-27_10-00-00.mpk"
    state.write_bytes(payload)
    with pytest.raises(DeclearnFormatError, match=match):
        read_declearn(folder / "model_config.json", state)


# --- the command ------------------------------------------------------------------------------


def test_convert_checkpoint_folder(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "model.hkz"
    result = run_cli("convert-declearn", folder, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "4 tensors from model_state_26-11-27_10-05-00.mpk" in result.stdout
    assert "model fnrefs:forward, loss fnrefs:scaled_loss" in result.stdout
    with open_archive(out) as archive:
        archive.verify()
        m = archive.manifest
        assert m.functions.model.ref == "fnrefs:forward"
        assert m.functions.loss.ref == "fnrefs:scaled_loss"
        assert dict(m.data_info) == {"data_type": "float32", "features_shape": [4]}
        assert list(m.trainable) == list(weights(1))
        assert m.metadata["converted_from"]["state"] == "model_state_26-11-27_10-05-00.mpk"
        for name, expected in weights(1).items():
            np.testing.assert_array_equal(archive.tensor(name), expected)
    assert run_cli("verify", out).returncode == 0


def test_convert_config_with_explicit_state(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "model.hkz"
    result = cli("convert-declearn", folder / "model_config.json", "--state",
                     folder / "model_state_26-11-27_10-00-00.mpk", "--out", out)
    assert result.returncode == 0, result.stderr
    with open_archive(out) as archive:
        np.testing.assert_array_equal(archive.tensor("mlp/~/linear_0:w"),
                                      weights(0)["mlp/~/linear_0:w"])


def test_convert_plain_config_exits_2_with_a_hint(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt", states={})
    out = tmp_path / "model.hkz"
    result = cli("convert-declearn", folder / "model_config.json", "--out", out)
    assert result.returncode == 2
    assert "holds no weights" in result.stderr and "--state FILE" in result.stderr
    assert not out.exists()


def test_convert_refuses_legacy_config_whose_pickle_runs_code(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    config = declearn_config(malicious_pickle(canary), joblib_reference("fnrefs", "scaled_loss"))
    folder = make_checkpoint(tmp_path / "ckpt", config=config)
    out = tmp_path / "model.hkz"
    result = run_cli("convert-declearn", folder, "--out", out)
    assert result.returncode == 1
    assert "the 'model' pickle is not a plain reference" in result.stderr
    assert "posix.system" in result.stderr or "os.system" in result.stderr
    assert not canary.exists()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp file left behind


def test_convert_overrides_and_private_reference_warning(tmp_path: Path) -> None:
    config = declearn_config(joblib_reference("fnrefs", "forward"),
                             joblib_reference("optax.losses._regression", "l2_loss"))
    folder = make_checkpoint(tmp_path / "ckpt", config=config)
    out = tmp_path / "model.hkz"
    result = cli("convert-declearn", folder, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "warning: the loss reference 'optax.losses._regression:l2_loss'" in result.stderr
    assert "--loss-ref" in result.stderr
    result = cli("convert-declearn", folder, "--out", out, "--loss-ref", "optax:l2_loss")
    assert result.returncode == 0 and "warning" not in result.stderr
    with open_archive(out) as archive:
        assert archive.manifest.functions.loss.ref == "optax:l2_loss"
    bad = cli("convert-declearn", folder, "--out", out, "--model-ref", "not a ref")
    assert bad.returncode == 2 and "model reference 'not a ref'" in bad.stderr


def test_convert_missing_input_exits_2(tmp_path: Path) -> None:
    result = cli("convert-declearn", tmp_path / "nope", "--out", tmp_path / "o.hkz")
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr


def test_convert_without_msgpack_says_what_to_install(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "msgpack"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('msgpack is blocked in this test')\n")
    folder = make_checkpoint(tmp_path / "ckpt")
    result = run_cli("convert-declearn", folder, "--out", tmp_path / "o.hkz",
                     pythonpath=[tmp_path / "blocker"])
    assert result.returncode == 2
    assert "needs the 'msgpack' package: pip install msgpack" in result.stderr


def test_conversion_errors_are_hkstore_errors_and_exit_2(tmp_path: Path) -> None:
    """A library caller's ``except HkstoreError`` catches them; the command exits 2."""
    from hkstore.errors import HkstoreError

    with pytest.raises(HkstoreError) as info:
        locate_inputs(tmp_path / "missing", None)
    assert isinstance(info.value, DeclearnFormatError)
    assert main(["convert-declearn", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "x.hkz")]) == 2
    assert not (tmp_path / "x.hkz").exists()
