"""A model's weights as Flower ArrayRecords and back: names, dtypes (bfloat16 and float8 kept
through Flower's wire form), FedAdam's float64 cast with one warning, and every mismatch
refused with the tensor named."""

from __future__ import annotations

import io
import warnings

import flower_app
import ml_dtypes
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from grid_double import as_server, over_the_wire

import hkstore
from hkstore.errors import ArrayRecordCastWarning, ArrayRecordMismatchError, WeightsMismatchError
from hkstore.integrations.flower import array_to_numpy, from_arrayrecord, to_arrayrecord

NAMES = ["mlp/~/linear_0:b", "mlp/~/linear_0:w", "mlp/~/linear_1:b", "mlp/~/linear_1:w"]

#: Every dtype of hkstore's format (docs/FORMAT.md 4.3).
FORMAT_DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                 np.uint64, np.int64, np.float16, ml_dtypes.bfloat16, np.float32, np.float64,
                 np.complex64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
                 ml_dtypes.float8_e8m0fnu, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz]


def wire(record: ArrayRecord) -> ArrayRecord:
    """The record as a client receives it: through Flower's protobuf wire form and back."""
    as_server()
    message = Message(RecordDict({"arrays": record}), 1, "train")
    received: ArrayRecord = over_the_wire(message).content["arrays"]
    return received


def host(model: hkstore.HaikuModel) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}


def test_to_arrayrecord_names_order_dtypes_and_values() -> None:
    model = flower_app.make_model()
    record = to_arrayrecord(model)
    assert list(record) == model.get_weight_names() == NAMES
    for name, value in host(model).items():
        assert record[name].dtype == "float32"
        assert record[name].shape == value.shape
        np.testing.assert_array_equal(record[name].numpy(), value)


def test_round_trip_through_the_wire_sets_the_same_weights() -> None:
    source = flower_app.make_model(seed=1)
    target = flower_app.make_model(seed=2)
    assert any(not np.array_equal(a, host(target)[k]) for k, a in host(source).items())
    vector = from_arrayrecord(wire(to_arrayrecord(source)), like=target)
    assert isinstance(vector, hkstore.JaxNumpyVector)
    assert list(vector.coefs) == NAMES
    target.set_weights(vector)
    for name, value in host(source).items():
        assert host(target)[name].tobytes() == value.tobytes()


def bf16_model() -> hkstore.HaikuModel:
    model = hkstore.HaikuModel(flower_app.forward, flower_app.loss, seed=0)
    model.initialize({"data_type": "bfloat16", "features_shape": (4,)})
    return model


def test_bfloat16_comes_back_as_bfloat16_not_raw_void() -> None:
    model = bf16_model()
    received = wire(to_arrayrecord(model))
    name = NAMES[1]
    assert received[name].dtype == "bfloat16"
    assert received[name].numpy().dtype == np.dtype("V2")  # the pitfall: Flower's own reader
    vector = from_arrayrecord(received, like=model)
    for key, value in host(model).items():
        got = np.asarray(vector.coefs[key])
        assert got.dtype == ml_dtypes.bfloat16
        assert got.tobytes() == value.tobytes()


@pytest.mark.parametrize("dtype", FORMAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_array_to_numpy_keeps_every_format_dtype(dtype: type) -> None:
    value = np.arange(6).reshape(2, 3).astype(dtype)
    array = wire(ArrayRecord({"t": Array(value)}))["t"]
    got = array_to_numpy(array, where="t")
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 3)
    assert got.tobytes() == value.tobytes()


def test_fortran_order_arrays_are_read_as_they_are() -> None:
    value = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(array_to_numpy(Array(value), where="t"), value)


def test_float64_for_a_float32_model_is_cast_with_one_warning() -> None:
    model = flower_app.make_model()
    wide = {k: v.astype(np.float64) + 1e-9 for k, v in host(model).items()}
    record = ArrayRecord({k: Array(v) for k, v in wide.items()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vector = from_arrayrecord(record, like=model)
    assert [type(w.message) for w in caught] == [ArrayRecordCastWarning]
    assert str(caught[0].message) == (
        "from_arrayrecord: cast 4 float64 tensor(s) to the model's float32: "
        + ", ".join(repr(n) for n in NAMES))
    for name, value in wide.items():
        got = np.asarray(vector.coefs[name])
        assert got.dtype == np.float32
        assert got.tobytes() == value.astype(np.float32).tobytes()


def test_no_warning_when_dtypes_match() -> None:
    model = flower_app.make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_arrayrecord(to_arrayrecord(model), like=model)


def mismatch(record: ArrayRecord, like: hkstore.HaikuModel) -> str:
    with pytest.raises(ArrayRecordMismatchError) as info:
        from_arrayrecord(record, like=like)
    assert isinstance(info.value, WeightsMismatchError | KeyError | ValueError)
    return str(info.value)


def test_every_mismatch_is_named_at_once() -> None:
    model = flower_app.make_model()
    weights = host(model)
    record = ArrayRecord({
        # NAMES[0] missing
        NAMES[1]: Array(weights[NAMES[1]].astype(np.float16)),            # other dtype
        NAMES[2]: Array(np.zeros((3,), np.float32)),                       # other shape
        NAMES[3]: Array(weights[NAMES[3]]),
        "head:w": Array(np.zeros((2,), np.float32)),                       # extra
    })
    assert mismatch(record, model) == (
        "from_arrayrecord: the ArrayRecord does not fit the model (4 problem(s)):\n"
        "  - missing 1 tensor(s): 'mlp/~/linear_0:b'\n"
        "  - unexpected 1 tensor(s): 'head:w'\n"
        "  - 'mlp/~/linear_0:w': dtype float16 in the record, the model has float32\n"
        "  - 'mlp/~/linear_1:b': shape (3,) in the record, the model has (2,)")


@pytest.mark.parametrize("wrong", [np.int32, np.float16, ml_dtypes.bfloat16, np.complex64])
def test_other_dtypes_are_refused_not_cast(wrong: type) -> None:
    model = flower_app.make_model()
    record = to_arrayrecord(model)
    record[NAMES[3]] = Array(host(model)[NAMES[3]].astype(wrong))
    assert (f"'{NAMES[3]}': dtype {np.dtype(wrong).name} in the record, the model has float32"
            in mismatch(record, model))


def test_a_float32_record_for_a_bfloat16_model_is_refused() -> None:
    model = bf16_model()
    record = to_arrayrecord(flower_app.make_model())
    text = mismatch(record, model)
    assert "(4 problem(s))" in text
    assert f"'{NAMES[0]}': dtype float32 in the record, the model has bfloat16" in text


def raw(dtype: str, shape: tuple[int, ...], data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def npy(value: np.ndarray) -> bytes:
    data: bytes = Array(value).data
    return data


@pytest.mark.parametrize(("array", "expected"), [
    (raw("float32", (2,), npy(np.zeros(2, np.float32)), stype="torch.Tensor"),
     "stype 'torch.Tensor' is not 'numpy.ndarray' (the only serialization read)"),
    (raw("float32", (2,), b"not npy data"), "the data is not a .npy array"),
    (raw("float32", (2,), npy(np.zeros(2, np.float32))[:-3]),
     "the data has 5 bytes after its header, 8 expected for float32[2]"),
    (raw("float32", (2,), npy(np.zeros(2, np.float32))[:20]),
     "the data is not a .npy array (header of 118 bytes)"),
    (raw("float32", (3,), npy(np.zeros(2, np.float32))),
     "the data holds shape (2,), the shape field says (3,)"),
    (raw("float32", (2,), npy(np.zeros(2, np.int32))),
     "the data holds '<i4' items, the dtype field says float32"),
    (raw("bfloat16", (2,), npy(np.zeros(2, np.int16))),
     "the data holds '<i2' items, the dtype field says bfloat16"),
    (raw("bfloat16", (2,), npy(np.zeros(2, ml_dtypes.float8_e4m3fn))),
     "the data holds '<V1' items, the dtype field says bfloat16"),
    (raw("float32", (4,), npy(np.zeros(2, np.float32)).replace(b"(2,)", b"(4,)")),
     "the data has 8 bytes after its header, 16 expected for float32[4]"),
    (raw("float32", (2,), npy(np.zeros(2, np.float32)).replace(b"'descr'", b"'other'")),
     "the data is not a .npy array (the header is not {descr, fortran_order, shape})"),
    (raw("float32", (2,), npy(np.zeros(2, np.float32)).replace(b"{", b"[")),
     "the data is not a .npy array (the header is not a dict literal)"),
    (raw("float7", (2,), npy(np.zeros(2, np.float32))),
     "dtype 'float7' is not a dtype numpy or ml_dtypes knows"),
    (raw("f4", (2,), npy(np.zeros(2, np.float32))),
     "dtype 'f4' is not a canonical dtype name (expected 'float32')"),
    (raw(">f4", (2,), npy(np.zeros(2, ">f4"))), "big-endian dtype '>f4'"),
    (raw("complex128", (2,), npy(np.zeros(2, np.float32))), "cannot be stored exactly"),
    (raw("int4", (2,), npy(np.zeros(2, np.int8))), "dtype int4 cannot be stored exactly"),
    (raw("object", (2,), npy(np.zeros(2, np.float32))), "dtype 'object'"),
])
def test_malformed_arrays_are_refused_by_name(array: Array, expected: str) -> None:
    model = flower_app.make_model()
    record = to_arrayrecord(model)
    record[NAMES[2]] = array
    text = mismatch(record, model)
    assert "(1 problem(s))" in text
    assert f"  - '{NAMES[2]}': " in text and expected in text, text


def test_pickled_npy_data_is_refused_unread() -> None:
    """An object array's .npy form is a pickle: it is refused by its descriptor, unread."""
    model = flower_app.make_model()
    record = to_arrayrecord(model)
    buffer = io.BytesIO()
    np.save(buffer, np.array([print], dtype=object), allow_pickle=True)
    record[NAMES[2]] = raw("float32", (1,), buffer.getvalue())
    assert "the data holds '|O' items, the dtype field says float32" in mismatch(record, model)


def test_wrong_argument_types() -> None:
    model = flower_app.make_model()
    with pytest.raises(TypeError, match=r"expected a flwr\.app\.ArrayRecord, got dict"):
        from_arrayrecord({}, like=model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"like= expects an hkstore\.HaikuModel"):
        from_arrayrecord(to_arrayrecord(model), like=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected an hkstore\.HaikuModel, got int"):
        to_arrayrecord(3)  # type: ignore[arg-type]


def test_an_uninitialized_model_is_refused() -> None:
    model = hkstore.HaikuModel(flower_app.forward, flower_app.loss, seed=0)
    with pytest.raises(hkstore.errors.NotInitializedError):
        to_arrayrecord(model)
    with pytest.raises(hkstore.errors.NotInitializedError):
        from_arrayrecord(ArrayRecord(), like=model)


