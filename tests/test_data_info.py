"""Tests of hkstore.model._data_info: validating and aggregating ``data_info``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hkstore.errors import DataInfoError, HkstoreError
from hkstore.model import aggregate_data_info, validate_data_info


def test_validate_normalizes_known_fields_and_keeps_others() -> None:
    info = validate_data_info(
        {
            "data_type": np.dtype("float32"),
            "features_shape": [np.int64(28), 28],
            "n_samples": np.int32(10),
            "classes": np.array([2, 0, 2, 1]),
            "custom": {"x": 1},
        }
    )
    assert info == {
        "data_type": "float32",
        "features_shape": (28, 28),
        "n_samples": 10,
        "classes": [0, 1, 2],
        "custom": {"x": 1},
    }
    assert type(info["features_shape"][0]) is int


def test_validate_accepts_ml_dtypes_names() -> None:
    info = validate_data_info({"data_type": "bfloat16", "features_shape": ()})
    assert info == {"data_type": "bfloat16", "features_shape": ()}


def test_validate_names_every_missing_field() -> None:
    with pytest.raises(DataInfoError) as info:
        validate_data_info({"n_samples": 3})
    assert "'data_type', 'features_shape'" in str(info.value)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("int", np.dtype(int).name),  # numpy's default integer on this machine
        ("float", "float64"),
        ("double", "float64"),
        ("i8", "int64"),
        ("<f4", "float32"),
        (">f4", "float32"),  # byte order is not part of a data type
        ("f2", "float16"),
        ("bfloat16", "bfloat16"),
        (np.float32, "float32"),
        (np.dtype("uint8"), "uint8"),
    ],
)
def test_validate_normalises_any_numeric_dtype_name_numpy_parses(
    given: Any, canonical: str
) -> None:
    """declearn passes ``data_type="int"`` (any name numpy parses); hkstore keeps its meaning."""
    info = validate_data_info({"data_type": given, "features_shape": (3,)})
    assert info["data_type"] == canonical


def test_validate_refuses_none_dimensions_with_a_clear_message() -> None:
    with pytest.raises(DataInfoError, match=r"\(None, 3\) has None \(unknown\) dimensions"):
        validate_data_info({"data_type": "float32", "features_shape": (None, 3)})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("data_type", "object", "not a numeric dtype"),
        ("data_type", "U10", "not a numeric dtype"),
        ("data_type", "V2", "not a numeric dtype"),
        ("data_type", "f4,i4", "not a numeric dtype"),
        ("data_type", "datetime64", "not a numeric dtype"),
        ("data_type", "complex128", "cannot be stored exactly"),
        ("data_type", "longdouble", "cannot be stored exactly"),
        ("data_type", "nonsense", "not a dtype numpy knows"),
        ("data_type", 3, "a dtype or dtype name"),
        ("features_shape", (0, 3), "bad: 0"),
        ("features_shape", (-2,), "bad: -2"),
        ("features_shape", (True, 2), "bad: True"),
        ("features_shape", (2.0,), "bad: 2.0"),
        ("features_shape", "28,28", "tuple of positive ints"),
        ("features_shape", 28, "tuple of positive ints"),
        ("n_samples", -1, "int >= 0"),
        ("classes", "abc", "collection of labels"),
    ],
)
def test_validate_refuses_bad_values(field: str, value: Any, message: str) -> None:
    info: dict[str, Any] = {"data_type": "float32", "features_shape": (3,)}
    info[field] = value
    with pytest.raises(DataInfoError, match=message):
        validate_data_info(info)


def test_validate_refuses_non_mapping() -> None:
    with pytest.raises(DataInfoError):
        validate_data_info([("data_type", "float32")])  # type: ignore[arg-type]


def test_data_info_error_is_a_valueerror_of_the_family() -> None:
    with pytest.raises(ValueError):
        validate_data_info({})
    with pytest.raises(HkstoreError):
        validate_data_info({})


def test_aggregate_unites_classes_sums_samples_and_checks_the_rest() -> None:
    merged = aggregate_data_info(
        [
            {"data_type": "float32", "features_shape": (3,), "classes": [0, 1], "n_samples": 5},
            {"data_type": "float32", "features_shape": [3], "classes": [2, 1], "n_samples": 7},
        ]
    )
    assert merged == {
        "data_type": "float32",
        "features_shape": (3,),
        "classes": [0, 1, 2],
        "n_samples": 12,
    }


def test_aggregate_names_conflicting_fields() -> None:
    with pytest.raises(DataInfoError, match=r"'features_shape': \[\(3,\), \(4,\)\]"):
        aggregate_data_info(
            [
                {"data_type": "float32", "features_shape": (3,)},
                {"data_type": "float32", "features_shape": (4,)},
            ]
        )
    with pytest.raises(DataInfoError, match="at least one"):
        aggregate_data_info([])
