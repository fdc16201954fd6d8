"""hkstore.Checkpointer: rounds, retention, history, state, restore, tampering, background, lock.

Everything runs on real files in ``tmp_path``: rounds are written, listed, damaged byte by
byte and read back through the public API; locks are taken by real second Checkpointers and
real subprocesses; write failures come from ``RLIMIT_FSIZE`` in a real subprocess (a read-only
folder does not stop a process running as root).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers_archives import flip_tensor_byte
from helpers_cli import subprocess_env
from helpers_models import (
    CASES,
    device_policy,
    frozen_mlp_model,
    mlp_model,
    mse_loss,
    noisy_model,
    xent_loss,
)

import hkstore
from hkstore import Checkpointer, HaikuModel
from hkstore.cli import main
from hkstore.errors import (
    ArchiveFormatError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointWarning,
    DigestMismatchError,
    HkstoreError,
    IntegrityError,
    ManifestError,
    NotImportableError,
    SignatureError,
    StateMismatchError,
    UntrustedKeyError,
    WeightsMismatchError,
)
from hkstore.store import HmacKey, Trust, open_archive

REPO = Path(__file__).resolve().parents[1]
MLP = CASES[0]
GIVEN: dict[str, Any] = {"model": mlp_model, "loss": xent_loss}


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


def host(model: HaikuModel) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in model.get_weights().coefs.items()}


def same_bits(a: Any, b: Any) -> bool:
    """Two pytrees with the same structure and bit-identical leaves (dtype included)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


def step(model: HaikuModel, seed: int = 0) -> None:
    """One SGD step (changes the weights and the random state)."""
    grads = model.compute_batch_gradients(MLP.batch(seed=seed))
    model.apply_updates(grads * -0.1)


def adam_state(model: HaikuModel) -> Any:
    return optax.adam(1e-2).init(model.get_weights().coefs)


# --- saving and restoring -------------------------------------------------------------------


def test_save_and_restore_round_trip_model_state_metrics(tmp_path: Path) -> None:
    model = MLP.build(seed=3)
    model.set_trainable_weights(lambda layer, name, value: name == "w")
    step(model)
    state = adam_state(model)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(model, 7, state=state, metrics={"loss": np.float32(0.25), "acc": 0.5})
        assert ckpt.rounds() == [7] and ckpt.latest() == 7
        r = ckpt.restore(**GIVEN, state_like=state)
    assert r.round == 7 and r.metrics == {"acc": 0.5, "loss": 0.25}
    assert same_bits(host(r.model), host(model))
    assert r.model.get_weight_names(trainable=True) == model.get_weight_names(trainable=True)
    assert r.model.rng_state == model.rng_state
    assert r.model.data_info == model.data_info
    assert same_bits(r.state, state)
    assert type(r.state[0]).__name__ == "ScaleByAdamState"
    # the round's model archive is a plain archive: hkstore.load and open_archive work on it
    path = tmp_path / "ck" / "round-00000007" / "model.hkz"
    with open_archive(path) as archive:
        assert archive.manifest.metadata == {"round": 7, "metrics": {"acc": 0.5, "loss": 0.25}}
    assert same_bits(host(hkstore.load(path, **GIVEN)), host(model))


def test_restore_by_reference_through_trust(tmp_path: Path) -> None:
    model = MLP.build()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 0)
        with pytest.raises(hkstore.errors.RefusedCodeError):
            ckpt.restore()  # the stored references need a trust policy allowing them
        r = ckpt.restore(trust=Trust(modules=["helpers_models"]))
    assert same_bits(host(r.model), host(model)) and r.state is None and r.metrics == {}


def test_functions_that_cannot_be_referenced_are_refused_at_save(tmp_path: Path) -> None:
    model = HaikuModel(lambda x: mlp_model(x), xent_loss, seed=0)
    model.initialize(MLP.data_info)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(NotImportableError):
            ckpt.save(model, 0)
        assert ckpt.rounds() == []
    with Checkpointer(tmp_path, functions="none") as ckpt:
        ckpt.save(model, 0)
        assert same_bits(host(ckpt.restore(**GIVEN).model), host(model))


def test_saving_an_existing_round_raises_unless_overwrite(tmp_path: Path) -> None:
    model = MLP.build()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 1, metrics={"v": 1})
        with pytest.raises(CheckpointExistsError, match="round 1 is already saved"):
            ckpt.save(model, 1, metrics={"v": 2})
        assert isinstance(CheckpointExistsError("x"), HkstoreError)
        step(model)
        ckpt.save(model, 1, metrics={"v": 3}, overwrite=True)
        r = ckpt.restore(1, **GIVEN)
    assert r.metrics == {"v": 3} and same_bits(host(r.model), host(model))
    assert [h["metrics"] for h in Checkpointer(tmp_path).history()] == [{"v": 3}]
    # another Checkpointer on the same directory knows the round exists too
    with Checkpointer(tmp_path) as again, pytest.raises(CheckpointExistsError):
        again.save(model, 1)


def test_an_overwrite_never_leaves_the_round_missing_for_a_reader(tmp_path: Path) -> None:
    """Overwriting swaps the new round in atomically: a reader polling the directory while the
    round is replaced again and again always finds it (old or new), and nothing is left aside."""
    import threading

    from hkstore.store import RoundDirectory

    model = MLP.build()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 0)
        ckpt.save(model, 1)
        missing: list[list[int]] = []
        done = threading.Event()

        def poll() -> None:
            folder = RoundDirectory(tmp_path)
            while not done.is_set():
                listed = folder.rounds()
                if 1 not in listed:
                    missing.append(listed)

        reader = threading.Thread(target=poll)
        reader.start()
        try:
            for value in range(15):
                ckpt.save(model, 1, metrics={"v": value}, overwrite=True)
        finally:
            done.set()
            reader.join()
        assert missing == []
        assert ckpt.restore(1, **GIVEN).metrics == {"v": 14}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".old-", ".tmp-"))]


@pytest.mark.parametrize("bad", [-1, 1.0, True, "3", None])
def test_round_must_be_an_integer_at_least_zero(tmp_path: Path, bad: Any) -> None:
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="round"):
        ckpt.save(MLP.build(), bad)
    assert list(tmp_path.iterdir()) == []  # refused before anything was touched


def test_bad_constructor_arguments_are_refused(tmp_path: Path) -> None:
    for kwargs, message in [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_every": 1.5}, "keep_every"),
        ({"keep_best": ("loss", "low", 2)}, "mode"),
        ({"keep_best": ("loss", "min")}, "keep_best"),
        ({"keep_best": ("", "min", 1)}, "metric"),
        ({"functions": "source"}, "functions"),
        ({"compression": "gzip"}, "compression"),
    ]:
        with pytest.raises(ValueError, match=message):
            Checkpointer(tmp_path, **kwargs)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_sets_the_hashing_threads_of_save_restore_and_cli_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # a 4 MiB state tensor: enough work for the scheduler to start its pool (1 MiB and up)
    state = {"big": np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)}
    started: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    model = MLP.build()
    with Checkpointer(tmp_path / "ck", workers=workers) as ckpt:
        ckpt.save(model, 1, state=state)
        saved = [n for n in started if re.fullmatch(r"hkstore_\d+", n)]
        started.clear()
        r = ckpt.restore(**GIVEN)
        restored = [n for n in started if re.fullmatch(r"hkstore_\d+", n)]
    assert same_bits(r.state, state)
    # one worker: the scheduler runs inline; more: a pool of at most that many threads
    # (started as jobs arrive), where the default would use every core
    for names in (saved, restored):
        assert (len(set(names)) == 0) if workers == 1 else (1 <= len(set(names)) <= workers)
    started.clear()
    assert main(["verify", str(tmp_path / "ck"), "--workers", str(workers)]) == 0
    verified = [n for n in started if re.fullmatch(r"hkstore-verify_\d+", n)]
    assert 1 <= len(set(verified)) <= workers
    for bad, error in [(0, ValueError), (True, TypeError), (1.5, TypeError)]:
        with pytest.raises(error, match="workers"):
            Checkpointer(tmp_path / "other", workers=bad)  # type: ignore[arg-type]


def test_bad_metrics_are_refused_naming_the_key(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ManifestError, match=r"metrics\.loss"):
            ckpt.save(MLP.build(), 0, metrics={"loss": float("nan")})
        with pytest.raises(ManifestError, match=r"metrics\.when"):
            ckpt.save(MLP.build(), 0, metrics={"when": object()})
        with pytest.raises(TypeError, match="metrics"):
            ckpt.save(MLP.build(), 0, metrics=[("loss", 1.0)])  # type: ignore[arg-type]
        ckpt.save(MLP.build(), 0, metrics={"loss": jnp.float32(0.5), "per_class": np.ones(2)})
        assert ckpt.history()[0]["metrics"] == {"loss": 0.5, "per_class": [1.0, 1.0]}


def test_zstd_and_signed_rounds(tmp_path: Path) -> None:
    key, other = HmacKey.generate(), HmacKey.generate()
    model = MLP.build()
    with Checkpointer(tmp_path, signer=key, compression="zstd") as ckpt:
        ckpt.save(model, 2, state={"m": np.ones(3, np.float32)})
    ckpt = Checkpointer(tmp_path)
    r = ckpt.restore(**GIVEN, trust=Trust(keys=[key], require_signature=True))
    assert same_bits(host(r.model), host(model))
    record = json.loads((tmp_path / "round-00000002" / "round.json").read_bytes())
    assert record["signature"]["key_id"] == key.key_id
    with open_archive(tmp_path / "round-00000002" / "model.hkz") as archive:
        assert archive.signature_key_id == key.key_id
        assert archive.manifest.weights.compression == "zstd"
    with pytest.raises(UntrustedKeyError):
        ckpt.restore(2, **GIVEN, trust=Trust(keys=[other]))


def test_require_signature_refuses_unsigned_rounds_and_skips_to_a_signed_one(
    tmp_path: Path,
) -> None:
    key = HmacKey.generate()
    model = MLP.build()
    with Checkpointer(tmp_path, signer=key) as ckpt:
        ckpt.save(model, 1)
    step(model)
    with Checkpointer(tmp_path) as ckpt:  # a writer without the key (or an intruder)
        ckpt.save(model, 2)
    trust = Trust(keys=[key], require_signature=True)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(SignatureError, match="unsigned"):
        ckpt.restore(2, **GIVEN, trust=trust)
    with pytest.warns(CheckpointWarning, match=r"skipping round 2 .*unsigned"):
        r = ckpt.restore(**GIVEN, trust=trust)
    assert r.round == 1
    assert ckpt.restore(**GIVEN).round == 2  # no signature required: the newest


def test_signed_record_refuses_a_changed_record(tmp_path: Path) -> None:
    key = HmacKey.generate()
    with Checkpointer(tmp_path, signer=key) as ckpt:
        ckpt.save(MLP.build(), 1, metrics={"acc": 0.5})
    path = tmp_path / "round-00000001" / "round.json"
    path.write_bytes(path.read_bytes().replace(b'"acc":0.5', b'"acc":0.9'))
    with pytest.raises(SignatureError, match="does not verify"):
        Checkpointer(tmp_path).restore(1, **GIVEN, trust=Trust(keys=[key]))


# --- rounds, retention, history -------------------------------------------------------------


def save_rounds(ckpt: Checkpointer, rounds: list[int], losses: dict[int, float] | None = None
                ) -> None:
    model = MLP.build()
    for n in rounds:
        ckpt.save(model, n, metrics={"loss": (losses or {}).get(n, 1.0 / (n + 1))})


def test_keep_last(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        save_rounds(ckpt, [0, 1, 2, 3, 4])
        assert ckpt.rounds() == [3, 4]
        assert [h["round"] for h in ckpt.history()] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", "history", "round-00000003", "round-00000004"]


def test_keep_every_and_keep_last_together(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=1, keep_every=3) as ckpt:
        save_rounds(ckpt, list(range(8)))
        assert ckpt.rounds() == [0, 3, 6, 7]


def test_keep_best_min_and_max(tmp_path: Path) -> None:
    losses = {0: 0.9, 1: 0.2, 2: 0.5, 3: 0.1, 4: 0.8, 5: 0.7}
    with Checkpointer(tmp_path / "min", keep_last=1, keep_best=("loss", "min", 2)) as ckpt:
        save_rounds(ckpt, list(range(6)), losses)
        assert ckpt.rounds() == [1, 3, 5] and ckpt.best() == 3
    with Checkpointer(tmp_path / "max", keep_last=1, keep_best=("loss", "max", 1)) as ckpt:
        save_rounds(ckpt, list(range(6)), losses)
        assert ckpt.rounds() == [0, 5] and ckpt.best() == 0
    assert Checkpointer(tmp_path / "min").best() is None  # no keep_best rule: no best


def test_keep_best_ignores_rounds_without_the_metric_and_ties_go_to_the_newer(
    tmp_path: Path,
) -> None:
    model = MLP.build()
    with Checkpointer(tmp_path, keep_last=1, keep_best=("acc", "max", 1)) as ckpt:
        ckpt.save(model, 0, metrics={"acc": 0.5})
        ckpt.save(model, 1, metrics={"acc": 0.5})
        ckpt.save(model, 2, metrics={"loss": 9.0})
        ckpt.save(model, 3, metrics={"acc": "n/a"})
        assert ckpt.rounds() == [1, 3] and ckpt.best() == 1


def test_retention_never_removes_the_newest_round(tmp_path: Path) -> None:
    model = MLP.build()
    with Checkpointer(tmp_path, keep_every=10) as ckpt:
        ckpt.save(model, 10)
        ckpt.save(model, 13)
        assert ckpt.rounds() == [10, 13]
        ckpt.save(model, 14)
        assert ckpt.rounds() == [10, 14]
        ckpt.save(model, 3)  # an older round number: not the newest, no rule keeps it
        assert ckpt.rounds() == [10, 14]


def test_no_rule_keeps_every_round(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        save_rounds(ckpt, [0, 1, 2, 3])
        assert ckpt.rounds() == [0, 1, 2, 3]


def test_history_survives_retention_and_restarts(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        save_rounds(ckpt, [0, 1, 2])
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        save_rounds(ckpt, [3, 4])
        history = ckpt.history()
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["metrics"]["loss"] for h in history] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", h["time"])
               for h in history)
    assert Checkpointer(tmp_path).rounds() == [4]


def test_history_includes_a_round_whose_entry_was_never_written(tmp_path: Path) -> None:
    """A writer killed between the rename and the history entry: the record fills the gap,
    and the next writer writes the entry."""
    with Checkpointer(tmp_path) as ckpt:
        save_rounds(ckpt, [0, 1])
    (tmp_path / "history" / "00000001.json").unlink()
    assert [h["round"] for h in Checkpointer(tmp_path).history()] == [0, 1]
    assert (tmp_path / "history" / "00000001.json").exists()  # written back on open


def test_an_empty_or_missing_directory(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "nothing")
    assert ckpt.rounds() == [] and ckpt.latest() is None and ckpt.best() is None
    assert ckpt.history() == []
    with pytest.raises(CheckpointNotFoundError, match="no complete round"):
        ckpt.restore(**GIVEN)
    with pytest.raises(CheckpointNotFoundError, match="round 3"):
        ckpt.restore(3, **GIVEN)
    assert not (tmp_path / "nothing").exists()  # reading creates nothing
    ckpt.close()


def test_closed_checkpointer_reads_but_does_not_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(MLP.build(), 0)
    ckpt.close()
    ckpt.close()
    assert ckpt.rounds() == [0]
    with pytest.raises(HkstoreError, match="closed"):
        ckpt.save(MLP.build(), 1)


# --- state ----------------------------------------------------------------------------------


def test_plain_state_round_trips_without_a_template(tmp_path: Path) -> None:
    key = jax.random.key(5)
    state = {
        "step": 12,
        "lr": 0.001,
        "best": float("inf"),
        "worst": float("-inf"),
        "undefined": float("nan"),
        "name": "fedavg",
        "flag": True,
        "nothing": None,
        "m_t": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((0, 4), np.float64)],
        "pair": (np.int8(-3), np.uint64(2**63 + 1), jnp.asarray([1, 2], jnp.int32)),
        "bf16": np.asarray([1.5, -2.25], dtype=ml_dtypes.bfloat16),
        "f8": jnp.asarray([0.5, 1.0], dtype=jnp.float8_e4m3fn),
        "mask": np.array([True, False]),
        "scalar": np.float32(2.5),
        "key": key,
        "by_client": {3: np.zeros(2, np.float32), 11: np.ones(2, np.float32)},
        "nested": [[{"a": ()}], []],
        "unicode ключ": np.zeros((), np.float16),
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(MLP.build(), 0, state=state)
        got = ckpt.restore(**GIVEN).state
    assert set(got) == set(state)
    for name in state:
        if name not in ("undefined", "key", "pair"):
            assert same_bits(got[name], state[name]), name
    assert np.isnan(got["undefined"]) and isinstance(got["undefined"], float)
    assert type(got["pair"]) is tuple and same_bits(got["pair"][:2], state["pair"][:2])
    assert isinstance(got["pair"][0], np.int8) and isinstance(got["pair"][2], jax.Array)
    assert same_bits(got["pair"][2], state["pair"][2])
    assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(got["key"]), jax.random.key_data(key))
    assert isinstance(got["m_t"][0], np.ndarray) and isinstance(got["f8"], jax.Array)
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    assert type(got["by_client"]) is dict and list(got["by_client"]) == [3, 11]


def test_state_file_is_standard_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    state = {"mu": {"w": np.arange(4, dtype=np.float32)}, "count": np.int32(3)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(MLP.build(), 0, state=state)
    loaded = load_file(str(tmp_path / "round-00000000" / "state.safetensors"))
    assert sorted(loaded) == ["$.count", "$.mu.w"]
    assert np.array_equal(loaded["$.mu.w"], state["mu"]["w"])


def test_optax_state_needs_its_template_and_comes_back_as_optax_types(tmp_path: Path) -> None:
    model = MLP.build()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = opt.init(model.get_weights().coefs)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 0, state=state)
        with pytest.raises(StateMismatchError, match=r"(?s)state_like.*\$\[1\]\[0\]: "
                           r"optax\._src\.transform:ScaleByAdamState"):
            ckpt.restore(**GIVEN)
        r = ckpt.restore(**GIVEN, state_like=state)
    assert same_bits(r.state, state)
    assert jax.tree_util.tree_structure(r.state) == jax.tree_util.tree_structure(state)


class Point(collections.namedtuple("Point", "x y")):
    """A named tuple of the tests' own (stored with its class name and fields)."""


@jax.tree_util.register_pytree_with_keys_class
class Pair:
    """A registered pytree node of the tests' own (not a named tuple)."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def tree_flatten_with_keys(self) -> tuple[Any, None]:
        key = jax.tree_util.GetAttrKey
        return ((key("a"), self.a), (key("b"), self.b)), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Any) -> Pair:
        return cls(*children)


def test_a_registered_node_is_rebuilt_from_its_template(tmp_path: Path) -> None:
    state = [Pair(np.ones(2, np.float32), {"n": 3})]
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(MLP.build(), 0, state=state)
        with pytest.raises(StateMismatchError, match=r"\$\[0\]: test_checkpoint:Pair"):
            ckpt.restore(**GIVEN)
        with pytest.raises(StateMismatchError, match=r"\$\[0\]: stored a Pair node"):
            ckpt.restore(**GIVEN, state_like=[(1, 2)])
        with pytest.raises(StateMismatchError, match=r"\$\[0\]\.b: stored a dict"):
            ckpt.restore(**GIVEN, state_like=[Pair(np.ones(2, np.float32), 3)])
        got = ckpt.restore(**GIVEN, state_like=[Pair(np.zeros(2, np.float32), {"n": 0})]).state
    assert isinstance(got[0], Pair) and got[0].b == {"n": 3}
    assert same_bits(got[0].a, state[0].a)


def test_state_like_mismatches_are_all_named(tmp_path: Path) -> None:
    state = {"p": Point(np.zeros(2, np.float32), 1), "l": [np.ones(3, np.float32), 2],
             "d": {"a": 1, "b": np.zeros((2, 2), np.int32)}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(MLP.build(), 0, state=state)
        like = {"p": Point(np.zeros(3, np.float32), 1), "l": [np.ones(3, np.float32)],
                "d": {"a": 1, "c": np.zeros((2, 2), np.int32)}}
        with pytest.raises(StateMismatchError) as info:
            ckpt.restore(**GIVEN, state_like=like)
        message = str(info.value)
        assert "$.p.x: stored float32[2], the template has float32[3]" in message
        assert "$.l: stored 2 items, the template has 1" in message
        assert "$.d: dict keys differ: stored only ['b'], template only ['c']" in message
        assert "(3 problem(s))" in message
        with pytest.raises(StateMismatchError, match=r"\$: stored a dict, the template has a list"):
            ckpt.restore(**GIVEN, state_like=[])
        other = collections.namedtuple("Other", "x y")
        with pytest.raises(StateMismatchError, match=r"\$\.p: stored a named tuple Point"):
            ckpt.restore(**GIVEN, state_like={**state, "p": other(1, 2)})
        r = ckpt.restore(**GIVEN, state_like=state)
    assert type(r.state["p"]) is Point and same_bits(r.state, state)


def test_state_that_cannot_be_stored_is_refused_at_save_naming_every_path(
    tmp_path: Path,
) -> None:
    state = {"ok": np.zeros(1), "obj": object(), "mixed": {1: 0, "a": 1},
             "strings": np.array(["a"]), "deep": [Path("x")]}
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(StateMismatchError) as info:
            ckpt.save(MLP.build(), 0, state=state)
        assert ckpt.rounds() == []
    message = str(info.value)
    for where in ("$.obj: builtins.object", "$.mixed: dict keys must be all strings or all "
                  "integers", "$.strings:", "$.deep[0]: pathlib"):
        assert where in message, where


def test_shape_mismatch_on_restore_names_every_weight(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(MLP.build(), 0)
        with pytest.raises(WeightsMismatchError) as info:
            ckpt.restore(model=frozen_mlp_model, loss=xent_loss)
    message = str(info.value)
    for name in ("mlp/~/linear_0:w", "encoder:w", "head:b"):
        assert name in message, name


# --- damaged rounds --------------------------------------------------------------------------


def _damage(folder: Path, how: str, model: HaikuModel) -> None:
    record = folder / "round.json"
    if how == "model tensor":
        flip_tensor_byte(folder / "model.hkz", host(model)["mlp/~/linear_1:w"])
    elif how == "model manifest":
        data = bytearray((folder / "model.hkz").read_bytes())
        at = data.find(b'"data_type":"float32"')
        data[at + 14] ^= 0x01  # float32 -> float22... inside manifest.json
        (folder / "model.hkz").write_bytes(bytes(data))
    elif how == "model truncated":
        data = (folder / "model.hkz").read_bytes()
        (folder / "model.hkz").write_bytes(data[:-10])
    elif how == "model missing":
        (folder / "model.hkz").unlink()
    elif how == "state tensor":
        flip_tensor_byte(folder / "state.safetensors", np.arange(8, dtype=np.float32), 5)
    elif how == "state header":
        data = bytearray((folder / "state.safetensors").read_bytes())
        data[10] ^= 0x20
        (folder / "state.safetensors").write_bytes(bytes(data))
    elif how == "state missing":
        (folder / "state.safetensors").unlink()
    elif how == "record metrics":
        record.write_bytes(record.read_bytes().replace(b'"loss":0.5', b'"loss":0.1'))
    elif how == "record not json":
        record.write_bytes(b"{" + record.read_bytes())
    elif how == "record digest":
        text = record.read_bytes()
        digest = json.loads(text)["model"]["manifest_sha256"]
        record.write_bytes(text.replace(digest.encode(), b"0" * 64))
    elif how == "record round":
        record.write_bytes(record.read_bytes().replace(b'"round":2', b'"round":3'))
    else:  # pragma: no cover
        raise AssertionError(how)


DAMAGE = ["model tensor", "model manifest", "model truncated", "model missing", "state tensor",
          "state header", "state missing", "record not json", "record digest", "record round"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_round_is_refused_by_restore_k_and_skipped_by_restore(
    tmp_path: Path, how: str
) -> None:
    model = MLP.build()
    state = {"m": np.arange(8, dtype=np.float32)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 1, state=state, metrics={"loss": 0.9})
        good = host(model)
        step(model)
        ckpt.save(model, 2, state=state, metrics={"loss": 0.5})
    _damage(tmp_path / "round-00000002", how, model)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(HkstoreError) as info:
        ckpt.restore(2, **GIVEN)
    assert isinstance(info.value, IntegrityError | ArchiveFormatError), type(info.value)
    with pytest.warns(CheckpointWarning, match=r"skipping round 2 of .*does not verify") as caught:
        r = ckpt.restore(**GIVEN)
    assert len(caught) == 1
    assert r.round == 1 and same_bits(host(r.model), good)


def test_a_damaged_pickle_member_is_refused_even_when_the_caller_gives_the_functions(
    tmp_path: Path,
) -> None:
    model = MLP.build()
    with Checkpointer(tmp_path, functions="pickle") as ckpt:
        ckpt.save(model, 1)
    path = tmp_path / "round-00000001" / "model.hkz"
    with open_archive(path) as archive:
        at = archive.members["functions.pkl.zst"].data_offset + 20
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match=r"functions\.pkl\.zst"):
        Checkpointer(tmp_path).restore(1, **GIVEN)


def test_a_changed_metric_in_an_unsigned_record_is_not_a_digest_failure(tmp_path: Path) -> None:
    """The record is the root of the digests: unsigned, a change to it that keeps it
    consistent is undetectable; signing it is what makes it tamper-evident (tested above)."""
    model = MLP.build()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 2, metrics={"loss": 0.5})
    _damage(tmp_path / "round-00000002", "record metrics", model)
    assert Checkpointer(tmp_path).restore(2, **GIVEN).metrics == {"loss": 0.1}


def test_restore_raises_listing_every_round_when_none_verifies(tmp_path: Path) -> None:
    model = MLP.build()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(model, 1)
        ckpt.save(model, 2)
    for n in (1, 2):
        _damage(tmp_path / f"round-0000000{n}", "model tensor", model)
    with pytest.warns(CheckpointWarning) as caught, pytest.raises(
            CheckpointNotFoundError, match=r"(?s)no round verifies \(2 tried\).*round 2: "
            r"DigestMismatchError.*round 1: DigestMismatchError"):
        Checkpointer(tmp_path).restore(**GIVEN)
    assert len(caught) == 2


def test_a_round_folder_without_record_is_not_listed(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        save_rounds(ckpt, [1, 2])
    (tmp_path / "round-00000002" / "round.json").unlink()
    (tmp_path / "round-0000003").mkdir()  # not a canonical name
    ckpt = Checkpointer(tmp_path)
    assert ckpt.rounds() == [1] and ckpt.restore(**GIVEN).round == 1


# --- atomicity, clean-up, write failures ----------------------------------------------------


def test_stale_temp_folders_are_removed_when_a_writer_opens(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        save_rounds(ckpt, [1])
    for name in (".tmp-round-00000002-0a1b2c3d", ".del-round-00000000-00ff00ff"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.hkz").write_bytes(b"partial")
    Checkpointer(tmp_path).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "history", "round-00000001"]


def test_an_interrupted_overwrite_puts_the_old_round_back(tmp_path: Path) -> None:
    """A crash between moving the old round aside and renaming the new one into place (the
    two-rename fallback, where folders cannot be swapped atomically)."""
    from hkstore.store import RoundDirectory, open_round

    with Checkpointer(tmp_path) as ckpt:
        save_rounds(ckpt, [1])
    os.rename(tmp_path / "round-00000001", tmp_path / ".old-round-00000001-0badf00d")
    (tmp_path / ".tmp-round-00000001-12345678").mkdir()
    # readers, before any writer cleans up, still see the round, from the folder aside
    folder = RoundDirectory(tmp_path)
    assert folder.rounds() == [1]
    open_round(folder, 1).verify()
    assert main(["verify", str(tmp_path)]) == 0
    assert Checkpointer(tmp_path).rounds() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "history", "round-00000001"]


WRITER = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from helpers_models import CASES
import hkstore
from hkstore.model import set_device_policy
set_device_policy(gpu=False)
big = CASES[0].build()
ckpt = hkstore.Checkpointer({path!r})
ckpt.save(big, 1, state={{"m": __import__("numpy").zeros(10, "float32")}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
try:
    ckpt.save(big, 2, state={{"m": __import__("numpy").zeros(4000, "float32")}})
except hkstore.errors.CheckpointWriteError as exc:
    print("ERROR", exc)
print("rounds", ckpt.rounds())
"""


def test_a_write_failure_mid_save_leaves_earlier_rounds_and_no_temp_folder(
    tmp_path: Path,
) -> None:
    """A real one: RLIMIT_FSIZE in a subprocess makes the state file's write fail (EFBIG)."""
    path = tmp_path / "ck"
    code = WRITER.format(tests=str(REPO / "tests"), path=str(path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=subprocess_env(), timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ERROR ") and ".tmp-round-00000002-" in lines[0], lines
    assert "state.safetensors: cannot write: File too large" in lines[0], lines
    assert lines[1] == "rounds [1]"
    leftovers = [p.name for p in path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []  # removed by the failed save itself
    ckpt = Checkpointer(path)
    assert ckpt.rounds() == [1] and ckpt.restore(**GIVEN).round == 1


# --- background saving ------------------------------------------------------------------------


def test_background_save_writes_what_the_model_held_at_save_time(tmp_path: Path) -> None:
    model = MLP.build()
    # 32 MB of numpy state: the worker is still writing it when the caller changes it
    state = {"numpy": np.arange(8 << 20, dtype=np.float32), "jax": jnp.ones(3)}
    with Checkpointer(tmp_path, background=True) as ckpt:
        expected_weights, expected_rng = host(model), model.rng_state
        expected_state = {"numpy": state["numpy"].copy(), "jax": state["jax"]}
        ckpt.save(model, 1, state=state)
        state["numpy"] += 100  # change everything right away, while the worker writes
        for i in range(3):
            step(model, seed=i)
        ckpt.save(model, 2)
        ckpt.wait()
        assert ckpt.rounds() == [1, 2]
        r = ckpt.restore(1, **GIVEN)
    assert same_bits(host(r.model), expected_weights) and r.model.rng_state == expected_rng
    assert not same_bits(host(r.model), host(model))
    assert same_bits(r.state, expected_state)


def test_background_save_of_a_model_state_copies_its_numpy_weights(tmp_path: Path) -> None:
    snapshot = MLP.build().export_state()
    numpy_state = dataclasses.replace(
        snapshot, weights={k: np.array(v) for k, v in snapshot.weights.items()})
    expected = {k: v.copy() for k, v in numpy_state.weights.items()}
    with Checkpointer(tmp_path, background=True) as ckpt:
        ckpt.save(numpy_state, 1)
        for value in numpy_state.weights.values():
            value += 1.0  # the caller reuses its buffers right away
        ckpt.wait()
        got = host(ckpt.restore(**GIVEN).model)
    assert same_bits(got, expected)


def test_a_checkpointer_dropped_without_close_releases_its_lock(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(MLP.build(), 1)
    del ckpt
    gc.collect()
    with Checkpointer(tmp_path) as again:
        again.save(MLP.build(), 2)


def _plant(folder: Path, n: int) -> None:
    """Make round ``n`` appear behind the writer's back: its rename then fails (a real
    failure on the worker, after ``save()`` has returned)."""
    (folder / f"round-{n:08d}").mkdir()
    (folder / f"round-{n:08d}" / "round.json").write_bytes(b"{}")


def _unplant(folder: Path, n: int) -> None:
    (folder / f"round-{n:08d}" / "round.json").unlink()
    (folder / f"round-{n:08d}").rmdir()


def test_background_errors_surface_at_the_next_save_wait_or_close(tmp_path: Path) -> None:
    model = MLP.build()
    ckpt = Checkpointer(tmp_path, background=True)
    ckpt.save(model, 1)
    ckpt.wait()
    _plant(tmp_path, 2)
    ckpt.save(model, 2)  # returns: the round is written on the worker
    with pytest.raises(CheckpointExistsError, match="round 2"):
        ckpt.wait()
    ckpt.wait()  # raised once, then forgotten
    _unplant(tmp_path, 2)
    _plant(tmp_path, 4)
    ckpt.save(model, 4)
    with pytest.raises(CheckpointExistsError, match="round 4"):
        ckpt.save(model, 5)  # the error of save 4 surfaces here; save 5 does not start
    ckpt.wait()
    assert 5 not in ckpt.rounds()
    _unplant(tmp_path, 4)
    _plant(tmp_path, 6)
    ckpt.save(model, 6)
    with pytest.raises(CheckpointExistsError, match="round 6"):
        ckpt.close()
    _unplant(tmp_path, 6)
    assert Checkpointer(tmp_path).rounds() == [1]


def test_an_error_in_a_with_block_keeps_the_background_error_as_a_note(tmp_path: Path) -> None:
    model = MLP.build()
    with pytest.raises(KeyError) as info:
        with Checkpointer(tmp_path, background=True) as ckpt:
            ckpt.save(model, 0)
            ckpt.wait()
            _plant(tmp_path, 1)
            ckpt.save(model, 1)
            raise KeyError("training failed")
    assert any("CheckpointExistsError" in note for note in info.value.__notes__)


# --- the lock ---------------------------------------------------------------------------------


def test_a_second_writer_in_the_same_process_is_refused_naming_the_holder(
    tmp_path: Path,
) -> None:
    model = MLP.build()
    first = Checkpointer(tmp_path)
    first.save(model, 1)
    second = Checkpointer(tmp_path)
    assert second.rounds() == [1]  # reading needs no lock
    assert second.restore(**GIVEN).round == 1
    with pytest.raises(CheckpointLockedError, match=rf"held by pid {os.getpid()} on host "):
        second.save(model, 2)
    first.close()
    second.save(model, 2)  # free once closed
    second.close()


HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers_models import CASES
import hkstore
from hkstore.model import set_device_policy
set_device_policy(gpu=False)
ckpt = hkstore.Checkpointer({path!r})
ckpt.save(CASES[0].build(), 1)
print("holding", flush=True)
time.sleep(120)
"""


def test_another_process_holding_the_lock_is_named_and_its_death_frees_it(
    tmp_path: Path,
) -> None:
    code = HOLDER.format(tests=str(REPO / "tests"), path=str(tmp_path))
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          env=subprocess_env()) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
            ckpt = Checkpointer(tmp_path)
            with pytest.raises(CheckpointLockedError, match=rf"held by pid {proc.pid} "):
                ckpt.save(MLP.build(), 2)
            (tmp_path / ".tmp-round-00000002-deadbeef").mkdir()  # the holder's live temp folder
            Checkpointer(tmp_path).close()
            assert (tmp_path / ".tmp-round-00000002-deadbeef").exists()  # left alone: locked
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
    ckpt.save(MLP.build(), 2)  # SIGKILL released the lock: no manual clean-up
    ckpt.close()
    assert Checkpointer(tmp_path).rounds() == [1, 2]
    assert not (tmp_path / ".tmp-round-00000002-deadbeef").exists()


def test_restore_exactly_resumes_the_random_stream(tmp_path: Path) -> None:
    """A model that draws random numbers (noise in its forward pass) continues the same way."""
    model = HaikuModel(noisy_model, mse_loss, seed=1)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    x = np.ones((4, 3), np.float32)
    y = np.zeros((4, 1), np.float32)
    model.compute_batch_gradients((x, y, None))
    with Checkpointer(tmp_path, functions="none") as ckpt:
        ckpt.save(model, 1)
        r = ckpt.restore(model=noisy_model, loss=mse_loss)
    a = model.compute_batch_gradients((x, y, None))
    b = r.model.compute_batch_gradients((x, y, None))
    assert same_bits(a.coefs, b.coefs)


def test_no_warning_on_a_clean_restore(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        save_rounds(ckpt, [1, 2])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ckpt.restore(**GIVEN).round == 2


def test_the_readme_example_runs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- example:checkpoint -->\n```python\n(.*?)\n```", text, re.S)
    assert match, "README.md has no checkpoint example"
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        exec(compile(match.group(1), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["on disk [2, 3, 4] best 4 saved 5", "on disk [7, 8, 9] best 9 saved 10"]
    assert "`on disk [2, 3, 4] best 4 saved 5`, then `on disk [7, 8, 9] best 9 saved\n10`" in text
