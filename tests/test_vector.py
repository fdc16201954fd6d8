"""Tests of hkstore.model._vector: JaxNumpyVector arithmetic, equality, flatten and pack."""

from __future__ import annotations

import base64
import dataclasses
import json
import operator

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hkstore.errors import HkstoreError, WeightsMismatchError
from hkstore.model import JaxNumpyVector, VectorSpec


def vec(**arrays: object) -> JaxNumpyVector:
    return JaxNumpyVector({k.replace("__", ":"): jnp.asarray(v) for k, v in arrays.items()})


def devices_of(v: JaxNumpyVector) -> set[jax.Device]:
    value = v.coefs["a:w"]
    assert isinstance(value, jax.Array)
    return set(value.devices())


def as_numpy(v: JaxNumpyVector) -> dict[str, np.ndarray]:
    return {k: np.asarray(x) for k, x in v.coefs.items()}


# --- property tests against numpy -----------------------------------------------------

names = st.lists(st.sampled_from(["a:w", "a:b", "b/~/c:w"]), min_size=1, max_size=3, unique=True)
# XLA on CPU flushes subnormals to zero (numpy does not): keep them out of the comparison.
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
nonzero = finite.filter(lambda x: abs(x) > 1e-2)
shapes = hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)


@st.composite
def vector_pairs(draw: st.DrawFn, elements: st.SearchStrategy[float] = finite) -> tuple:
    keys = draw(names)
    left, right = {}, {}
    for key in keys:
        shape = draw(shapes)
        left[key] = draw(hnp.arrays(np.float32, shape, elements=finite))
        right[key] = draw(hnp.arrays(np.float32, shape, elements=elements))
    return left, right


BINARY = [operator.add, operator.sub, operator.mul, operator.truediv]
# results below float32's smallest normal may be flushed to zero by XLA on CPU
TINY = float(np.finfo(np.float32).tiny)


@settings(max_examples=20, deadline=None)
@given(pair=vector_pairs(nonzero), op=st.sampled_from(BINARY))
def test_vector_op_vector_matches_numpy(pair: tuple, op: object) -> None:
    left, right = pair
    result = op(JaxNumpyVector(left), JaxNumpyVector(right))  # type: ignore[operator]
    assert list(result.coefs) == list(left)
    for key, value in as_numpy(result).items():
        expected = op(left[key], right[key])  # type: ignore[operator]
        assert value.dtype == expected.dtype == np.float32
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=TINY)


@settings(max_examples=20, deadline=None)
@given(pair=vector_pairs(), scalar=nonzero, op=st.sampled_from(BINARY), reflected=st.booleans())
def test_vector_op_scalar_matches_numpy(
    pair: tuple, scalar: float, op: object, reflected: bool
) -> None:
    left = pair[0]
    if reflected and op is operator.truediv:
        left = {k: np.where(np.abs(v) < 1e-2, np.float32(1), v) for k, v in left.items()}
    v = JaxNumpyVector(left)
    result = op(scalar, v) if reflected else op(v, scalar)  # type: ignore[operator]
    for key, value in as_numpy(result).items():
        expected = op(scalar, left[key]) if reflected else op(left[key], scalar)  # type: ignore[operator]
        assert value.dtype == np.float32  # python scalars do not promote (weak typing)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=TINY)


@settings(max_examples=15, deadline=None)
@given(
    pair=vector_pairs(st.floats(0.125, 10, allow_subnormal=False, width=32)),
    exponent=st.sampled_from([2, 0.5, -1, 3]),
)
def test_vector_pow_matches_numpy(pair: tuple, exponent: float) -> None:
    base = {k: np.abs(v) + np.float32(0.5) for k, v in pair[0].items()}
    powered = as_numpy(JaxNumpyVector(base) ** exponent)
    reflected = as_numpy(2**JaxNumpyVector(pair[1]))
    vector_pow = as_numpy(JaxNumpyVector(base) ** JaxNumpyVector(pair[1]))
    for key in base:
        np.testing.assert_allclose(powered[key], base[key] ** exponent, rtol=1e-5)
        np.testing.assert_allclose(reflected[key], np.float32(2) ** pair[1][key], rtol=1e-5)
        np.testing.assert_allclose(vector_pow[key], base[key] ** pair[1][key], rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(pair=vector_pairs())
def test_vector_unary_min_max_sum_match_numpy(pair: tuple) -> None:
    left, right = pair
    v, w = JaxNumpyVector(left), JaxNumpyVector(right)
    half = np.float32(0.5)
    checks = {
        "neg": (-v, {k: -x for k, x in left.items()}),
        "abs": (abs(v), {k: np.abs(x) for k, x in left.items()}),
        "sign": (v.sign(), {k: np.sign(x) for k, x in left.items()}),
        "min": (v.minimum(w), {k: np.minimum(x, right[k]) for k, x in left.items()}),
        "max": (v.maximum(w), {k: np.maximum(x, right[k]) for k, x in left.items()}),
        "min_scalar": (v.minimum(0.5), {k: np.minimum(x, half) for k, x in left.items()}),
        "max_scalar": (v.maximum(0.5), {k: np.maximum(x, half) for k, x in left.items()}),
    }
    for what, (got, expected) in checks.items():
        for key, value in as_numpy(got).items():
            np.testing.assert_array_equal(value, expected[key], err_msg=what)
            assert value.dtype == expected[key].dtype, what
    for key, value in as_numpy(v.sum()).items():
        assert value.shape == ()
        np.testing.assert_allclose(value, left[key].sum(dtype=np.float64), rtol=1e-5, atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(pair=vector_pairs())
def test_vector_flatten_unflatten_roundtrip(pair: tuple) -> None:
    v = JaxNumpyVector(pair[0])
    values, spec = v.flatten()
    assert isinstance(spec, VectorSpec)
    assert spec.names == list(pair[0])  # declearn's spec shape: a list, and dicts by name
    assert spec.shapes == {k: a.shape for k, a in pair[0].items()}
    assert spec.dtypes == dict.fromkeys(pair[0], "float32")
    assert all(isinstance(x, float) for x in values)
    assert len(values) == sum(a.size for a in pair[0].values())
    assert JaxNumpyVector.unflatten(values, spec) == v


# --- names, errors --------------------------------------------------------------------


def test_vector_ops_with_other_names_raise_keyerror_naming_both_sides() -> None:
    v = vec(a__w=[1.0], a__b=[2.0])
    w = vec(a__w=[1.0], c__w=[2.0])
    with pytest.raises(KeyError) as info:
        v + w
    assert isinstance(info.value, WeightsMismatchError)
    message = str(info.value)
    assert "missing from the right operand: ['a:b']" in message
    assert "only in the right operand: ['c:w']" in message


def test_vector_ops_with_unsupported_operands_raise_typeerror() -> None:
    v = vec(a__w=[1.0])
    with pytest.raises(TypeError):
        v + "1"  # type: ignore[operator]
    with pytest.raises(TypeError):
        v + None  # type: ignore[operator]
    with pytest.raises(TypeError):
        v.minimum("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        v.maximum([1.0])  # type: ignore[arg-type]


def test_vector_constructor_rejects_non_arrays_naming_them() -> None:
    with pytest.raises(TypeError, match="'a:w' \\(list\\)"):
        JaxNumpyVector({"a:w": [1.0], "a:b": jnp.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        JaxNumpyVector([("a:w", jnp.ones(1))])  # type: ignore[arg-type]


def test_numpy_scalar_on_the_left_gives_a_vector() -> None:
    v = vec(a__w=[1.0, 2.0])
    for result in (np.float32(2) * v, jnp.float32(2) * v, np.float64(2) - v):
        assert isinstance(result, JaxNumpyVector)
    assert (np.float32(2) * v) == vec(a__w=[2.0, 4.0])


# --- declearn bug 12: missing operators, inconsistent min/max, dtype-blind ==, bf16 pack ----


def test_vector_negation_abs_and_reflected_pow_exist() -> None:
    v = vec(a__w=[-1.0, 2.0])
    assert -v == vec(a__w=[1.0, -2.0])
    assert abs(v) == vec(a__w=[1.0, 2.0])
    assert 2**v == vec(a__w=[0.5, 4.0])


def test_vector_minimum_and_maximum_accept_the_same_operand_types() -> None:
    v, w = vec(a__w=[1.0, 5.0]), vec(a__w=[3.0, 2.0])
    assert v.minimum(w) == vec(a__w=[1.0, 2.0])
    assert v.maximum(w) == vec(a__w=[3.0, 5.0])
    assert v.minimum(2.0) == vec(a__w=[1.0, 2.0])
    assert v.maximum(2.0) == vec(a__w=[2.0, 5.0])
    assert v.minimum(np.float32(2)) == v.minimum(2.0)


def test_vector_equality_is_dtype_aware_and_exact() -> None:
    ints = JaxNumpyVector({"a:w": jnp.array([1, 2], dtype=jnp.int32)})
    floats = JaxNumpyVector({"a:w": jnp.array([1, 2], dtype=jnp.float32)})
    assert ints != floats
    assert floats == JaxNumpyVector({"a:w": np.array([1, 2], dtype=np.float32)})
    assert floats != JaxNumpyVector({"a:w": jnp.array([1, 2 + 2**-20], dtype=jnp.float32)})
    assert floats != JaxNumpyVector({"a:w": jnp.array([[1, 2]], dtype=jnp.float32)})  # shape
    assert floats != JaxNumpyVector({"a:b": jnp.array([1, 2], dtype=jnp.float32)})  # names
    assert floats != "not a vector"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8", "uint16", "bool"])
def test_vector_pack_unpack_roundtrip_by_dtype_name(dtype: str) -> None:
    host = np.arange(6).reshape(2, 3).astype(np.dtype(dtype))
    v = JaxNumpyVector({"a:w": jnp.asarray(host), "a:b": jnp.asarray(host[0])})
    packed = v.pack()
    assert packed["a:w"]["dtype"] == dtype
    assert packed["a:w"]["shape"] == [2, 3]
    assert base64.b64decode(packed["a:w"]["data"]) == np.ascontiguousarray(host).tobytes()
    # plain JSON and plain msgpack carry it as it is (declearn's hooks add nothing to it)
    for carried in (json.loads(json.dumps(packed)), msgpack.unpackb(msgpack.packb(packed))):
        back = JaxNumpyVector.unpack(carried)
        assert back == v
        assert back.dtypes() == {"a:w": dtype, "a:b": dtype}


def test_vector_unpack_reads_raw_bytes_too() -> None:
    v = vec(a__w=[1.0, -2.0])
    packed = v.pack()
    raw = {k: {**item, "data": base64.b64decode(item["data"])} for k, item in packed.items()}
    assert v.pack(binary=True) == raw
    assert JaxNumpyVector.unpack(raw) == v


def test_vector_pack_bfloat16_keeps_exact_bits() -> None:
    values = np.array([1.5, -0.0078125, 3.0e38], dtype=ml_dtypes.bfloat16)
    packed = JaxNumpyVector({"x:w": jnp.asarray(values)}).pack()
    assert base64.b64decode(packed["x:w"]["data"]) == values.tobytes()
    assert packed["x:w"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda p: p["a:w"].update(dtype="object"), TypeError),
        (lambda p: p["a:w"].update(dtype="<f4"), TypeError),
        (lambda p: p["a:w"].update(data=b"\0" * 3), ValueError),
        (lambda p: p["a:w"].update(data="AAA"), ValueError),  # not padded base64
        (lambda p: p["a:w"].update(data="AA!A"), ValueError),
        (lambda p: p["a:w"].update(data=3), TypeError),
        (lambda p: p["a:w"].update(shape=[2, -1]), TypeError),
        (lambda p: p["a:w"].pop("shape"), TypeError),
    ],
)
def test_vector_unpack_refuses_malformed_input(mutate: object, error: type) -> None:
    packed = vec(a__w=[1.0, 2.0]).pack()
    mutate(packed)  # type: ignore[operator]
    with pytest.raises(error):
        JaxNumpyVector.unpack(packed)


def test_vector_unflatten_refuses_wrong_count() -> None:
    values, spec = vec(a__w=[1.0, 2.0]).flatten()
    with pytest.raises(ValueError, match="3 values given, spec needs 2"):
        JaxNumpyVector.unflatten([*values, 0.0], spec)


def test_vector_flatten_keeps_bfloat16_and_int_dtypes() -> None:
    v = JaxNumpyVector(
        {
            "a:w": jnp.array([0.5, 1.5], dtype=jnp.bfloat16),
            "a:b": jnp.array([[3, -4]], dtype=jnp.int32),
        }
    )
    values, spec = v.flatten()
    assert values == [0.5, 1.5, 3.0, -4.0]
    assert spec == VectorSpec(
        names=["a:w", "a:b"],
        shapes={"a:w": (2,), "a:b": (1, 2)},
        dtypes={"a:w": "bfloat16", "a:b": "int32"},
    )
    assert JaxNumpyVector.unflatten(values, spec) == v


def test_vector_unflatten_reads_any_spec_of_that_shape_and_names_what_it_lacks() -> None:
    @dataclasses.dataclass
    class OtherSpec:  # declearn's VectorSpec has these attributes (and more)
        names: list[str]
        shapes: dict[str, list[int]]
        dtypes: dict[str, str]
        v_type: tuple[str, str] = ("other", "Vector")

    shapes, dtypes = {"a:w": [2]}, {"a:w": "float32", "a:b": "float32"}
    assert JaxNumpyVector.unflatten([1.0, 2.0], OtherSpec(["a:w"], shapes, dtypes)) == (
        vec(a__w=np.array([1.0, 2.0], np.float32))
    )
    with pytest.raises(WeightsMismatchError, match=r"'a:b' \(no shape\)"):
        JaxNumpyVector.unflatten([1.0, 2.0, 3.0], OtherSpec(["a:w", "a:b"], shapes, dtypes))
    with pytest.raises(TypeError, match="names"):
        JaxNumpyVector.unflatten([1.0], object())


def test_vector_repr_shows_names_dtypes_and_tuple_shapes() -> None:
    v = JaxNumpyVector({"a:w": jnp.zeros((4, 2)), "a:b": jnp.zeros((7,), jnp.bfloat16)})
    assert repr(v) == "JaxNumpyVector({'a:w': float32 (4, 2), 'a:b': bfloat16 (7,)})"


class _Tagged(JaxNumpyVector):
    """A subclass taking plain dicts of arrays as operands (as a framework's vector would)."""

    def _operand(self, other: object) -> object:
        return JaxNumpyVector(other) if isinstance(other, dict) else other


def test_vector_results_keep_the_left_operands_class_and_the_operand_hook_applies() -> None:
    t = _Tagged({"a:w": jnp.array([1.0, 4.0])})
    plain = vec(a__w=[2.0, 2.0])
    for result in (t + plain, t - 1.0, 2.0 * t, -t, abs(t), t.sign(), t.sum(), t.minimum(plain)):
        assert type(result) is _Tagged
    assert type(plain + t) is JaxNumpyVector  # the left operand decides
    assert t - {"a:w": np.array([1.0, 1.0], np.float32)} == _Tagged({"a:w": jnp.array([0.0, 3.0])})
    # a foreign operand on the left: the reflected operation takes it through the hook too
    assert {"a:w": np.array([5.0, 5.0], np.float32)} - t == _Tagged({"a:w": jnp.array([4.0, 1.0])})
    with pytest.raises(WeightsMismatchError, match="names differ"):
        _ = {"b:w": np.array([5.0], np.float32)} - t
    assert _Tagged.unpack(t.pack()) == t and type(_Tagged.unpack(t.pack())) is _Tagged


def test_vector_shapes_and_dtypes() -> None:
    v = JaxNumpyVector({"a:w": jnp.zeros((2, 3)), "a:b": jnp.zeros((), dtype=jnp.int32)})
    assert v.shapes() == {"a:w": (2, 3), "a:b": ()}
    assert v.dtypes() == {"a:w": "float32", "a:b": "int32"}


# --- devices --------------------------------------------------------------------------


def test_vector_ops_move_the_right_operand_to_the_left_device() -> None:
    dev0, dev1 = jax.devices()[:2]
    left = JaxNumpyVector({"a:w": jax.device_put(jnp.ones(3), dev1)})
    right = JaxNumpyVector({"a:w": jax.device_put(jnp.full(3, 2.0), dev0)})
    for result in (left + right, left * right, left.minimum(right), left**right):
        assert devices_of(result) == {dev1}
    assert devices_of(right - left) == {dev0}
    assert (left + right) == vec(a__w=[3.0, 3.0, 3.0])


def test_errors_are_part_of_the_family() -> None:
    with pytest.raises(HkstoreError):
        vec(a__w=[1.0]) - vec(b__w=[1.0])


def test_vector_unpack_places_arrays_on_jaxs_default_device() -> None:
    """declearn puts unpacked arrays on its policy's device; hkstore leaves them on jax's
    default device (a model moves what it is given to its own device)."""
    v = JaxNumpyVector({"a:w": jax.device_put(jnp.ones(2), jax.devices()[1])})
    back = JaxNumpyVector.unpack(v.pack())
    assert devices_of(back) == {jax.devices()[0]}
    assert back == v
