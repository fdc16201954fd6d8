"""The fast clipping path against the per-sample path: same numbers, the switch, the report.

Tolerance: per tensor, max |fast - per-sample| <= 1e-5 * max |per-sample| (float32), with
``max_norm`` binding (1e-6: every sample clipped, so every norm counts) and not (1e6: none
clipped), sample weights on. Measured on the models below: at most 3.5e-7 for dense and
convolution kernels and biases (rank-1, Gram and direct norms alike), 1.3e-6 for embedding
tables (an 80-id lookup into 5 rows sums about 16 gradients into each: longer float32 sums),
2.2e-7 for weights that fall back. The per-sample path is itself checked against a hand
computation and optax in ``test_model.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_models import device_policy, mse_loss

from hkstore.errors import ClippingError, HkstoreError
from hkstore.model import HaikuModel
from hkstore.model._batch import place_batch
from hkstore.model._ghost_layers import LayerCall, _chunk
from hkstore.model._ghost_norms import embedding_sq_norms, outer_sq_norms

REL = 1e-5


@pytest.fixture(autouse=True)
def _second_cpu() -> Iterator[None]:
    with device_policy(gpu=False, idx=1):
        yield


# --- models: one per layer kind and method, mixed, shared, random, mixing samples ------------


def dense_rows(x: jax.Array) -> jax.Array:
    """hk.Linear on (batch, 6, 8) inputs: 'a' direct (T*(d+p) > d*p), 'wide' Gram, 'out' rank 1."""
    h = jax.nn.tanh(hk.Linear(16, name="a")(x))
    h = hk.Linear(64, name="wide")(h)
    return hk.Linear(2, name="out")(h.mean(axis=1))


def conv_nhwc(x: jax.Array) -> jax.Array:
    """Conv2D, channels last: 'c1' direct (SAME, stride 1), 'c2' Gram (T=4 rows, stride 3)."""
    h = jax.nn.relu(hk.Conv2D(8, 3, name="c1")(x))
    h = hk.Conv2D(16, 3, stride=3, padding="VALID", name="c2")(h)
    return hk.Linear(2, name="out")(h.reshape(h.shape[0], -1))


def conv_nchw(x: jax.Array) -> jax.Array:
    """Conv2D, channels first, explicit asymmetric padding, kernel dilation; and Conv1D."""
    h = hk.Conv2D(4, 3, stride=2, padding="VALID", data_format="NCHW", name="c1")(x)
    h = hk.Conv2D(3, (2, 3), rate=2, padding=((1, 0), (2, 1)), data_format="NCHW", name="c2")(
        jax.nn.relu(h)
    )
    h = hk.Conv1D(2, 2, name="c1d")(h.reshape(h.shape[0], h.shape[1], -1).transpose(0, 2, 1))
    return hk.Linear(2, name="out")(h.reshape(h.shape[0], -1))


def embeds(ids: jax.Array) -> jax.Array:
    """hk.Embed, both lookup styles, short rows (Gram of ids) and 80 rows (sort)."""
    ids = ids.astype(jnp.int32)
    e = hk.Embed(11, 4, name="emb")(ids)
    e1h = hk.Embed(11, 4, lookup_style="ONE_HOT", name="emb1h")(ids)
    long = hk.Embed(5, 3, name="emb_long")(jnp.tile(ids, (1, 10)))
    h = jnp.concatenate([(e + e1h).reshape(e.shape[0], -1), long.mean(axis=1)], axis=1)
    return hk.Linear(2, name="out")(h)


def mixed(x: jax.Array) -> jax.Array:
    """hk.LayerNorm (scale, offset) and hk.RMSNorm (per-sample vector weights), one hk.Linear
    called twice (its gradient is the sum of two calls'), and a batch mean (on a batch of one,
    on both paths, that is the sample itself)."""
    lin = hk.Linear(8, name="shared")
    h = lin(x) * jax.nn.sigmoid(lin(2.0 * x))
    h = hk.LayerNorm(-1, create_scale=True, create_offset=True, name="ln")(h)
    h = hk.RMSNorm(-1, name="rms")(jax.nn.gelu(h))
    h = hk.Linear(8, name="l")(h)
    h = h - h.mean(axis=0, keepdims=True) + x[:, :8]
    return hk.Linear(2, name="out")(h)


def lstm_static(x: jax.Array) -> jax.Array:
    """hk.LSTM unrolled with hk.static_unroll: its Linear is called once per time step."""
    core = hk.LSTM(6, name="lstm")
    out, _ = hk.static_unroll(core, x, core.initial_state(x.shape[0]), time_major=False)
    return hk.Linear(2, name="out")(out[:, -1])


def rnn_dynamic(x: jax.Array) -> jax.Array:
    """hk.VanillaRNN under hk.dynamic_unroll (a scan): its Linears fall back to per-sample."""
    core = hk.VanillaRNN(6, name="rnn")
    out, _ = hk.dynamic_unroll(core, x, core.initial_state(x.shape[0]), time_major=False)
    return hk.Linear(2, name="out")(out[:, -1])


def tied(ids: jax.Array) -> jax.Array:
    """Tied embeddings: the table also serves as the output projection (a fallback)."""
    emb = hk.Embed(11, 4, name="emb")
    h = emb(ids.astype(jnp.int32)).mean(axis=1)
    return (h @ emb.embeddings.T)[:, :2]


def dropout(x: jax.Array) -> jax.Array:
    """Draws random numbers: each sample's key decides its dropout mask."""
    h = jax.nn.relu(hk.Linear(16, name="l")(x))
    h = hk.dropout(hk.next_rng_key(), 0.5, h)
    return hk.Linear(2, name="out")(h)


def _double_w(next_getter: Callable[[Any], Any], value: Any, context: Any) -> Any:
    return next_getter(value * 2.0 if context.module_name == "scaled" and context.name == "w"
                       else value)


def fallbacks(x: jax.Array) -> jax.Array:
    """A custom getter that doubles 'scaled:w' before its layer sees it, and a masked Conv1D:
    both weights fall back to per-sample gradients; 'out:w' stays normed."""
    with hk.custom_getter(_double_w):
        h = jax.nn.relu(hk.Linear(3, name="scaled")(x))
    mask = np.ones((3, 3, 4), np.float32)
    mask[0] = 0.0
    h = hk.Conv1D(4, 3, mask=mask, name="masked")(h)
    return hk.Linear(2, name="out")(h.reshape(h.shape[0], -1))


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[..., Any]
    shape: tuple[int, ...]
    ids: bool = False
    methods: tuple[tuple[str, str], ...] = ()  # (weight, method) the report must give
    fallbacks: tuple[str, ...] = ()  # weights that must fall back

    def build(self, seed: int = 0) -> HaikuModel:
        model = HaikuModel(self.model, mse_loss, seed=seed)
        dtype = "int32" if self.ids else "float32"
        model.initialize({"data_type": dtype, "features_shape": self.shape})
        return model

    def batch(self, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        if self.ids:  # negative and out-of-range ids, and repeats
            x = rng.integers(-13, 15, size=(n, *self.shape)).astype(np.int32)
            x[:, :3] = 2
        else:
            x = rng.normal(size=(n, *self.shape)).astype(np.float32)
        y = rng.normal(size=(n, 2)).astype(np.float32)
        w = rng.uniform(0.2, 2.0, size=(n,)).astype(np.float32)
        return x, y, w


CASES = [
    Case("dense_rows", dense_rows, (6, 8),
         methods=(("a:w", "linear: direct"), ("wide:w", "linear: gram"),
                  ("out:w", "linear: rank1"), ("a:b", "linear: bias"))),
    Case("conv_nhwc", conv_nhwc, (9, 9, 2),
         methods=(("c1:w", "conv: direct"), ("c2:w", "conv: gram"), ("c1:b", "conv: bias"))),
    Case("conv_nchw", conv_nchw, (2, 11, 11),
         methods=(("c1:w", "conv: "), ("c2:w", "conv: "), ("c1d:w", "conv: "),
                  ("c1:b", "conv: bias"))),
    Case("embeds", embeds, (8,), ids=True,
         methods=(("emb:embeddings", "embed: ids"), ("emb1h:embeddings", "embed: ids"),
                  ("emb_long:embeddings", "embed: ids"))),
    Case("mixed", mixed, (9,),
         methods=(("ln:scale", "per-sample (layer-norm)"), ("ln:offset", "per-sample (layer-norm)"),
                  ("rms:scale", "per-sample (rms-norm)"), ("shared:w", "linear: gram, 2 calls"),
                  ("shared:b", "linear: bias, 2 calls"),
                  ("l:w", "linear: rank1"))),
    Case("lstm_static", lstm_static, (4, 3), methods=(("lstm/linear:w", "linear: gram, 4 calls"),)),
    Case("rnn_dynamic", rnn_dynamic, (4, 3), fallbacks=("rnn/linear:w", "rnn/linear_1:w"),
         methods=(("out:w", "linear: rank1"),)),
    Case("tied", tied, (7,), ids=True, fallbacks=("emb:embeddings",)),
    Case("dropout", dropout, (5,), methods=(("l:w", "linear: rank1"),)),
    Case("fallbacks", fallbacks, (6, 3), fallbacks=("scaled:w", "masked:w"),
         methods=(("out:w", "linear: rank1"),)),
]
IDS = [c.name for c in CASES]


def host(vector: Any) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, np.float64) for name, value in vector.coefs.items()}


def rel_error(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    assert list(got) == list(ref)
    worst = 0.0
    for name in ref:
        scale = max(float(np.max(np.abs(ref[name]), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(got[name] - ref[name]), initial=0.0)) / scale)
    return worst


def both_paths(model: HaikuModel, batch: Any, max_norm: float) -> tuple[dict, dict, Any]:
    """Clipped gradients on each path from the same random state (the fast one last)."""
    state = model._rng
    slow = host(model.compute_batch_gradients(batch, max_norm=max_norm, clipping="per-sample"))
    model._rng = state
    fast = host(model.compute_batch_gradients(batch, max_norm=max_norm, clipping="fast"))
    return fast, slow, model.last_clipping


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_path_equals_per_sample_path(case: Case) -> None:
    model = case.build()
    batch = case.batch()
    for max_norm in (1e-6, 1e6):  # every sample clipped (norms matter), none clipped
        fast, slow, report = both_paths(model, batch, max_norm)
        assert rel_error(fast, slow) <= REL, (case.name, max_norm)
        assert report.path == "fast" and report.requested == "fast"
    assert list(report.methods) == model.get_weight_names(trainable=True)
    for weight, method in case.methods:
        assert report.methods[weight].startswith(method), (weight, report.methods[weight])
    assert sorted(report.fallbacks) == sorted(case.fallbacks)
    for weight in case.fallbacks:
        assert report.methods[weight].startswith("per-sample: ")


def bf16_conv(x: jax.Array) -> jax.Array:
    """A Conv1D and a Linear whose weights are bfloat16 (the data type at initialize)."""
    h = jax.nn.relu(hk.Conv1D(4, 3, name="c")(x))
    return hk.Linear(2, name="out")(h.reshape(h.shape[0], -1))


def test_bfloat16_weights_agree_within_bfloat16_round_off() -> None:
    model = HaikuModel(bf16_conv, mse_loss, seed=0)
    model.initialize({"data_type": "bfloat16", "features_shape": (6, 3)})
    x = np.random.default_rng(0).normal(size=(8, 6, 3)).astype(jnp.bfloat16)
    batch = (x, np.zeros((8, 2), jnp.bfloat16), None)
    for max_norm in (1e-3, 1e3):
        fast, slow, report = both_paths(model, batch, max_norm)
        assert rel_error(fast, slow) <= 2e-2  # bfloat16 keeps 8 bits: a few ulps
    assert report.methods["c:w"] == "conv: direct" and report.path == "fast"
    grads = model.compute_batch_gradients(batch, max_norm=1.0, clipping="fast")
    assert {v.dtype for v in grads.coefs.values()} == {jnp.dtype(jnp.bfloat16)}


def test_binding_clip_changes_the_gradient_on_the_fast_path() -> None:
    # guards the test above: a bound that binds gives another answer than one that does not
    case = CASES[0]
    model = case.build()
    batch = case.batch()
    tight, _, _ = both_paths(model, batch, 1e-4)
    loose, _, _ = both_paths(model, batch, 1e4)
    assert rel_error(tight, loose) > 0.5
    norm = np.sqrt(sum(float(np.sum(v**2)) for v in tight.values()))
    assert norm <= 1e-4 * (1 + 1e-5)


def test_frozen_layers_cost_nothing_and_keep_the_numbers() -> None:
    case = CASES[0]
    model = case.build()
    model.set_trainable_weights(lambda layer, name, value: layer != "wide" and name != "w")
    batch = case.batch()
    fast, slow, report = both_paths(model, batch, 1e-3)
    assert rel_error(fast, slow) <= REL
    assert list(report.methods) == ["a:b", "out:b"]  # biases of frozen kernels: still normed
    assert set(report.methods.values()) == {"linear: bias"}
    # no tap, no kept input for the frozen layer: the plan calls only trainable layers
    trainable, frozen = model._split()
    inputs, y, w = place_batch(batch, model._device, where="test")
    plan = model._functions().plan(trainable, frozen, inputs, y, w)
    assert [c.module for c in plan.calls] == ["a", "out"]


def test_random_models_get_each_sample_its_own_key_on_both_paths() -> None:
    # identical samples: dropout masks differ only through the per-sample keys
    case = next(c for c in CASES if c.name == "dropout")
    model = case.build(seed=3)
    x = np.repeat(case.batch(n=1)[0], 6, axis=0)
    batch = (x, np.zeros((6, 2), np.float32), None)
    fast, slow, report = both_paths(model, batch, 1e-4)
    assert report.path == "fast" and rel_error(fast, slow) <= REL
    norm = np.sqrt(sum(float(np.sum(v**2)) for v in fast.values()))
    assert norm < 0.99e-4  # one shared key would give identical gradients: norm == max_norm


def test_both_paths_leave_the_same_random_state() -> None:
    case = next(c for c in CASES if c.name == "dropout")
    batch = case.batch()
    a, b = case.build(seed=5), case.build(seed=5)
    a.compute_batch_gradients(batch, max_norm=1.0, clipping="fast")
    b.compute_batch_gradients(batch, max_norm=1.0, clipping="per-sample")
    after_a = host(a.compute_batch_gradients(batch))
    after_b = host(b.compute_batch_gradients(batch))
    assert all(np.array_equal(after_a[k], after_b[k]) for k in after_a)


# --- the switch and the report -----------------------------------------------------------------


def test_auto_takes_the_fast_path_and_says_so() -> None:
    model = CASES[0].build()
    assert model.clipping == "auto" and model.last_clipping is None
    model.compute_batch_gradients(CASES[0].batch())
    assert model.last_clipping is None  # no clipping, no report
    model.compute_batch_gradients(CASES[0].batch(), max_norm=1.0)
    assert model.last_clipping is not None
    assert (model.last_clipping.path, model.last_clipping.requested) == ("fast", "auto")
    assert model.last_clipping.fallbacks == {}


def test_the_attribute_and_the_keyword_force_a_path() -> None:
    model = CASES[0].build()
    model.clipping = "per-sample"
    model.compute_batch_gradients(CASES[0].batch(), max_norm=1.0)
    assert model.last_clipping.path == "per-sample"
    assert set(model.last_clipping.methods.values()) == {"per-sample"}
    model.compute_batch_gradients(CASES[0].batch(), max_norm=1.0, clipping="fast")
    assert model.last_clipping.path == "fast"
    model.compute_batch_gradients(CASES[0].batch(), 1.0)  # declearn's positional call
    assert model.last_clipping.path == "per-sample"


def test_auto_uses_the_per_sample_path_when_nothing_is_normed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def only_own_weights(x: jax.Array) -> jax.Array:  # a closure: a plan of its own
        w = hk.get_parameter("w", (x.shape[-1], 2), init=hk.initializers.Constant(0.1))
        return x @ w

    model = HaikuModel(only_own_weights, mse_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    batch = (np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32), None)
    with caplog.at_level(logging.WARNING, logger="hkstore.model"):
        model.compute_batch_gradients(batch, max_norm=1.0)
    assert model.last_clipping.path == "per-sample"
    assert model.last_clipping.fallbacks == {"~:w": "created outside any module"}
    [record] = [r for r in caplog.records if r.name == "hkstore.model"]
    assert "~:w" in record.getMessage() and "per-sample path runs" in record.getMessage()


def test_a_fallback_is_logged_once_per_plan_naming_the_weights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    case = next(c for c in CASES if c.name == "rnn_dynamic")
    model = case.build()
    with caplog.at_level(logging.WARNING, logger="hkstore.model"):
        model.compute_batch_gradients(case.batch(seed=1), max_norm=1.0)
        model.compute_batch_gradients(case.batch(seed=2), max_norm=1.0)
    records = [r.getMessage() for r in caplog.records if r.name == "hkstore.model"]
    assert len(records) <= 1  # once per plan (none if an earlier test made this plan)
    report = model.last_clipping
    assert report.path == "fast"
    for weight in ("rnn/linear:w", "rnn/linear_1:w"):
        assert "jax transformation" in report.fallbacks[weight]
        assert "static_unroll" in report.fallbacks[weight]
        assert all(weight in message for message in records)


def test_debug_log_names_the_path(caplog: pytest.LogCaptureFixture) -> None:
    model = CASES[0].build()
    with caplog.at_level(logging.DEBUG, logger="hkstore.model"):
        model.compute_batch_gradients(CASES[0].batch(), max_norm=1.0)
    assert any("fast path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", ["ghost", "", None, 1, "Per-Sample"])
def test_an_unknown_switch_is_refused_and_changes_nothing(bad: object) -> None:
    model = CASES[0].build()
    state = model._rng
    if bad is not None:  # (as a keyword, None means "the attribute's value")
        with pytest.raises(ClippingError, match="clipping must be one of 'auto', 'fast'"):
            model.compute_batch_gradients(CASES[0].batch(), max_norm=1.0, clipping=bad)  # type: ignore[arg-type]
    model.clipping = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match=f"'per-sample', got {bad!r}"):
        model.compute_batch_gradients(CASES[0].batch(), max_norm=1.0)
    assert model._rng is state and model.collect_training_losses() == []
    assert model.last_clipping is None
    with pytest.raises(ClippingError):  # checked on every call, clipped or not
        model.compute_batch_gradients(CASES[0].batch())
    assert issubclass(ClippingError, HkstoreError)


_TRACES: list[int] = []


def changes_between_traces(x: jax.Array) -> jax.Array:
    """Calls its layer once or twice, alternating at every trace (python state)."""
    _TRACES.append(1)
    lin = hk.Linear(x.shape[-1], name="l")
    h = x
    for _ in range(len(_TRACES) % 2 + 1):
        h = lin(h)
    return hk.Linear(2, name="out")(h)


def test_a_model_whose_calls_change_between_traces_is_refused() -> None:
    _TRACES.clear()
    model = HaikuModel(changes_between_traces, mse_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    state = model._rng
    batch = (np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32), None)
    with pytest.raises(ClippingError, match="clipping='per-sample'"):
        model.compute_batch_gradients(batch, max_norm=1.0, clipping="fast")
    assert model._rng is state and model.collect_training_losses() == []


# --- the norms themselves ------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_outer_norms_match_materialised_per_sample_gradients(rows: int) -> None:
    rng = np.random.default_rng(rows)
    for d, p in ((7, 5), (2, 30), (64, 64)):
        x = rng.normal(size=(3, rows, d)).astype(np.float32)
        g = rng.normal(size=(3, rows, p)).astype(np.float32)
        full = np.einsum("ntd,ntp->ndp", x.astype(np.float64), g.astype(np.float64))
        expected = np.sum(full**2, axis=(1, 2))
        np.testing.assert_allclose(np.asarray(outer_sq_norms(x, g)), expected, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 100])
def test_embedding_norms_match_a_scatter(rows: int) -> None:
    rng = np.random.default_rng(rows)
    ids = rng.integers(-1, 6, size=(4, rows))
    g = rng.normal(size=(4, rows, 3)).astype(np.float32)
    expected = []
    for i in range(4):
        table = np.zeros((6, 3))
        for t in range(rows):
            if ids[i, t] >= 0:
                table[ids[i, t]] += g[i, t]
        expected.append(np.sum(table**2))
    got = np.asarray(embedding_sq_norms(jnp.asarray(ids), g))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def wide_kernel_conv(x: jax.Array) -> jax.Array:
    """A 5x5 kernel on one channel: patch rows 25x wider than the input."""
    h = hk.Conv2D(6, 5, name="c")(x)
    return hk.Linear(2, name="out")(h.reshape(h.shape[0], -1))


def test_conv_norms_run_in_chunks_when_patches_outgrow_the_activations() -> None:
    model = HaikuModel(wide_kernel_conv, mse_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (8, 8, 1)})
    case = Case("wide", wide_kernel_conv, (8, 8, 1))
    batch = case.batch(n=16)
    fast, slow, report = both_paths(model, batch, 1e-3)
    assert rel_error(fast, slow) <= REL
    call = LayerCall("c", "conv", "c:w", _conv_config(), (1, 8, 8, 1), (1, 8, 8, 6),
                     np.dtype(np.float32))
    assert 1 <= _chunk([call], 16) < 16  # this test exercises the chunked loop
    assert report.methods["c:w"] == "conv: direct"


def _conv_config() -> tuple[Any, ...]:
    dims = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return (2, (5, 5), (1, 1), "SAME", (1, 1), (1, 1), dims)

