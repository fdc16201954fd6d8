"""CheckpointedStrategy and resume in one process: what each round holds, real round numbers,
the state table (nested DP wrappers, NumPy's global generator, caller-named attributes), and
bad input -- a checkpoint of another strategy class, a foreign directory, a model that does
not fit -- refused with what is at fault named, changing nothing."""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any

import flower_app
import numpy as np
import pytest
import runs
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
    FedXgbBagging,
    Strategy,
)

import hkstore
from hkstore.errors import (
    CheckpointExistsError,
    CheckpointWarning,
    StrategyStateError,
    WeightsMismatchError,
)
from hkstore.integrations.flower import (
    STATE_FORMAT,
    STATE_TABLE,
    CheckpointedStrategy,
    array_to_numpy,
    resume,
    to_arrayrecord,
)


def wrapped(inner: Strategy, directory: Path, **kwargs: Any) -> CheckpointedStrategy:
    return CheckpointedStrategy(inner, hkstore.Checkpointer(directory),
                                like=flower_app.make_model(), **kwargs)


def start(strategy: CheckpointedStrategy, arrays: ArrayRecord, rounds: int,
          **kwargs: Any) -> Any:
    return strategy.start(runs.grid(), arrays, num_rounds=rounds, train_config=runs.train_config(),
                          **kwargs)


def test_each_round_holds_model_state_random_and_history(tmp_path: Path) -> None:
    random.seed(runs.RUN_SEED)
    strategy = wrapped(runs.make_strategy("fedadam"), tmp_path)
    result = start(strategy, to_arrayrecord(flower_app.make_model()), 2)
    strategy.checkpointer.close()
    assert strategy.last_round == 2
    ckpt = hkstore.Checkpointer(tmp_path)
    assert ckpt.rounds() == [1, 2]
    r = ckpt.restore(model=flower_app.forward, loss=flower_app.loss)
    assert r.round == 2
    # the archive is the float32 model it is for; FedAdam's float64 values are in the state
    assert {str(v.dtype) for v in r.model.get_weights().coefs.values()} == {"float32"}
    final = {k: array_to_numpy(v, where=k) for k, v in result.arrays.items()}
    assert {str(v.dtype) for v in final.values()} == {"float64"}
    state = r.state
    assert state["format"] == STATE_FORMAT and state["version"] == 1 and state["round"] == 2
    assert state["arrays"]["names"] == list(final)
    assert state["arrays"]["exact_names"] == list(final)
    for name, value in zip(state["arrays"]["exact_names"], state["arrays"]["exact"], strict=True):
        assert value.tobytes() == final[name].tobytes()
    assert state["strategy"]["class"] == "flwr.serverapp.strategy.fedadam:FedAdam"
    assert sorted(state["strategy"]["attributes"]) == ["current_arrays", "m_t", "v_t"]
    m_t = state["strategy"]["attributes"]["m_t"]
    assert m_t["kind"] == "dict" and m_t["names"] == list(strategy.inner.m_t)
    assert all(a.tobytes() == strategy.inner.m_t[n].tobytes()
               for n, a in zip(m_t["names"], m_t["values"], strict=True))
    assert tuple(int(w) for w in state["random"]["python"]["internal"]) == random.getstate()[1]
    assert sorted(state["history"]["train"]) == [1, 2]
    # the round's numbers are its metrics (keep_best ranks them); the history has them all
    assert sorted(r.metrics) == ["evaluate.eval_loss", "train.train_loss"]
    assert r.metrics["train.train_loss"] == result.train_metrics_clientapp[2]["train_loss"]
    assert [h["round"] for h in ckpt.history()] == [1, 2]


def test_round_numbers_after_resume_are_the_real_ones(tmp_path: Path) -> None:
    seen: list[int] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(server_round)
        return MetricRecord({"round_seen": server_round})

    random.seed(runs.RUN_SEED)
    first = wrapped(runs.make_strategy("fedavg"), tmp_path)
    start(first, to_arrayrecord(flower_app.make_model()), 2, evaluate_fn=evaluate_fn)
    first.checkpointer.close()
    assert seen == [0, 1, 2]

    grid = runs.grid()
    again = wrapped(runs.make_strategy("fedavg"), tmp_path)
    last, arrays = resume(again.checkpointer, again, like=flower_app.make_model())
    assert (last, again.last_round) == (2, 2)
    result = again.start(grid, arrays, num_rounds=2, train_config=runs.train_config(),
                         evaluate_fn=evaluate_fn)
    # no initial evaluation on resume (round 2's arrays were evaluated as round 2's)
    assert seen == [0, 1, 2, 3, 4]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2, 3, 4]
    assert result.evaluate_metrics_serverapp[4]["round_seen"] == 4
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]
    assert sorted(again.history().train_metrics_clientapp) == [1, 2, 3, 4]
    assert hkstore.Checkpointer(tmp_path).rounds() == [1, 2, 3, 4]


def test_clients_see_the_real_round_in_their_config(tmp_path: Path) -> None:
    random.seed(runs.RUN_SEED)
    first = wrapped(FedAvg(fraction_evaluate=0.0), tmp_path)
    start(first, to_arrayrecord(flower_app.make_model()), 1)
    first.checkpointer.close()
    again = wrapped(FedAvg(fraction_evaluate=0.0), tmp_path)
    _, arrays = resume(again.checkpointer, again, like=flower_app.make_model())
    config = runs.train_config()
    again.start(runs.grid(), arrays, num_rounds=1, train_config=config)
    assert config["server-round"] == 2  # what FedAvg put into the messages of that round


def dp_strategy() -> Strategy:
    return DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_available_nodes=6),
        noise_multiplier=0.05, num_sampled_clients=3, initial_clipping_norm=0.5)


def dp_runs(tmp_path: Path, rounds: int) -> tuple[dict[str, Any], float]:
    """A DP run of ``rounds`` straight (its exact final arrays), and the first round of the
    same run saved to ``tmp_path / "resumed"`` (its clipping norm after that round)."""
    random.seed(runs.RUN_SEED)
    np.random.seed(7)
    straight = wrapped(dp_strategy(), tmp_path / "straight")
    expected = runs.exact(start(straight, to_arrayrecord(flower_app.make_model()), rounds).arrays)
    random.seed(runs.RUN_SEED)
    np.random.seed(7)
    first = wrapped(dp_strategy(), tmp_path / "resumed")
    start(first, to_arrayrecord(flower_app.make_model()), 1)
    first.checkpointer.close()
    return expected, first.inner.clipping_norm


def test_dp_adaptive_clipping_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Its clipping norm, its wrapped strategy and NumPy's global generator (its noise)."""
    expected, norm_after_1 = dp_runs(tmp_path, 3)
    random.seed(1)  # the process's random states move on; resume must put them back
    np.random.seed(1)
    again = wrapped(dp_strategy(), tmp_path / "resumed")
    _, arrays = resume(again.checkpointer, again, like=flower_app.make_model())
    assert again.inner.clipping_norm == norm_after_1 != 0.5
    assert runs.exact(start(again, arrays, 2).arrays) == expected
    tree = hkstore.Checkpointer(tmp_path / "resumed").restore(
        model=flower_app.forward, loss=flower_app.loss).state["strategy"]
    assert tree["nested"]["strategy"]["class"] == "flwr.serverapp.strategy.fedavg:FedAvg"
    assert sorted(tree["attributes"]) == ["clipping_norm", "current_arrays"]


def test_numpy_random_state_is_what_dp_needs(tmp_path: Path) -> None:
    """The control: without NumPy's generator put back, the DP run ends elsewhere."""
    expected, _ = dp_runs(tmp_path, 2)
    again = wrapped(dp_strategy(), tmp_path / "resumed")
    _, arrays = resume(again.checkpointer, again, like=flower_app.make_model())
    np.random.seed(1)  # undo what resume put back
    assert runs.exact(start(again, arrays, 1).arrays) != expected


class CountingFedAvg(FedAvg):
    """A subclass with state of its own: the table cannot know it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds_aggregated = 0
        self.scale = np.ones(2, np.float32)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        self.rounds_aggregated += 1
        self.scale = self.scale * 1.5
        return super().aggregate_train(server_round, replies)


def test_unknown_strategy_classes_are_refused_unless_attributes_are_named(
        tmp_path: Path) -> None:
    with pytest.raises(StrategyStateError) as info:
        wrapped(CountingFedAvg(), tmp_path)
    text = str(info.value)
    assert "test_flower_strategy:CountingFedAvg is not in hkstore's state table" in text
    assert "state_attributes=[...]" in text and "FedAdam" in text
    with pytest.raises(StrategyStateError, match=r"no attribute\(s\) 'nope'"):
        wrapped(CountingFedAvg(), tmp_path, state_attributes=["rounds_aggregated", "nope"])
    with pytest.raises(StrategyStateError, match="is not in hkstore's state table"):
        wrapped(FedXgbBagging(), tmp_path)
    assert FedXgbBagging not in STATE_TABLE

    random.seed(runs.RUN_SEED)
    first = wrapped(CountingFedAvg(fraction_evaluate=0.0), tmp_path,
                    state_attributes=["rounds_aggregated", "scale"])
    start(first, to_arrayrecord(flower_app.make_model()), 2)
    first.checkpointer.close()
    again = wrapped(CountingFedAvg(fraction_evaluate=0.0), tmp_path,
                    state_attributes=["rounds_aggregated", "scale"])
    resume(again.checkpointer, again, like=flower_app.make_model())
    assert again.inner.rounds_aggregated == 2
    assert again.inner.scale.tobytes() == (np.ones(2, np.float32) * 2.25).tobytes()


def test_attributes_that_cannot_be_stored_are_named(tmp_path: Path) -> None:
    inner = CountingFedAvg(fraction_evaluate=0.0)
    inner.extra = {"ok": [1.5, np.zeros(2)], "bad": object()}  # type: ignore[attr-defined]
    strategy = wrapped(inner, tmp_path, state_attributes=["rounds_aggregated", "extra"])
    with pytest.raises(StrategyStateError, match=r"strategy.extra\['bad'\]: a builtins.object "
                                                 r"cannot be stored"):
        start(strategy, to_arrayrecord(flower_app.make_model()), 1)
    assert hkstore.Checkpointer(tmp_path).rounds() == []


def fedavg_round(directory: Path) -> None:
    random.seed(runs.RUN_SEED)
    strategy = wrapped(FedAvg(fraction_evaluate=0.0), directory)
    start(strategy, to_arrayrecord(flower_app.make_model()), 1)
    strategy.checkpointer.close()


def test_checkpoint_of_another_strategy_class_is_refused_changing_nothing(
        tmp_path: Path) -> None:
    fedavg_round(tmp_path)
    again = wrapped(FedAdam(), tmp_path)
    random.seed(5)
    before = random.getstate(), np.random.get_state()[1].tobytes()
    with pytest.raises(StrategyStateError) as info:
        resume(again.checkpointer, again, like=flower_app.make_model())
    assert str(info.value) == (
        "resume: round 1's strategy state does not fit this strategy:\n"
        "  - strategy: the checkpoint was written by flwr.serverapp.strategy.fedavg:FedAvg, "
        "this strategy is flwr.serverapp.strategy.fedadam:FedAdam")
    assert (random.getstate(), np.random.get_state()[1].tobytes()) == before
    assert again.last_round == 0 and again.inner.m_t is None
    with pytest.raises(CheckpointExistsError):  # still not resumed: start refuses
        start(again, to_arrayrecord(flower_app.make_model()), 1)


def test_checkpoint_with_other_state_attributes_is_refused(tmp_path: Path) -> None:
    fedavg_round(tmp_path)
    again = wrapped(FedAvg(), tmp_path, state_attributes=["fraction_train"])
    with pytest.raises(StrategyStateError, match=r"the checkpoint keeps attributes \[\], this "
                                                 r"strategy keeps \['fraction_train'\]"):
        resume(again.checkpointer, again, like=flower_app.make_model())


def test_a_plain_checkpoint_is_not_a_strategy_checkpoint(tmp_path: Path) -> None:
    with hkstore.Checkpointer(tmp_path) as ckpt:
        ckpt.save(flower_app.make_model(), 3, state={"step": 3})
    again = wrapped(FedAvg(), tmp_path)
    with pytest.raises(StrategyStateError, match=r"round 3 of .* has no Flower strategy state"):
        resume(again.checkpointer, again, like=flower_app.make_model())


def test_a_model_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    fedavg_round(tmp_path)
    other = hkstore.HaikuModel(flower_app.forward, flower_app.loss, seed=0)
    other.initialize({"data_type": "float32", "features_shape": (5,)})
    again = CheckpointedStrategy(FedAvg(), hkstore.Checkpointer(tmp_path), like=other)
    with pytest.raises(WeightsMismatchError, match="mlp/~/linear_0:w"):
        resume(again.checkpointer, again, like=other)
    assert again.last_round == 0


def test_a_fresh_run_refuses_a_directory_that_holds_rounds(tmp_path: Path) -> None:
    fedavg_round(tmp_path)
    grid = runs.grid()
    strategy = wrapped(FedAvg(), tmp_path)
    with pytest.raises(CheckpointExistsError, match=r"already holds rounds up to 1: call resume"):
        strategy.start(grid, to_arrayrecord(flower_app.make_model()), num_rounds=1)
    assert grid.messages_sent == []  # nothing ran


def test_resume_from_an_empty_directory_starts_at_round_one(tmp_path: Path) -> None:
    model = flower_app.make_model()
    strategy = wrapped(FedAvg(fraction_evaluate=0.0), tmp_path)
    last, arrays = resume(strategy.checkpointer, strategy, like=model)
    assert last == 0
    assert runs.exact(arrays) == runs.exact(to_arrayrecord(model))
    start(strategy, arrays, 1)
    assert hkstore.Checkpointer(tmp_path).rounds() == [1]


def test_a_corrupt_last_round_is_skipped_and_rewritten(tmp_path: Path) -> None:
    random.seed(runs.RUN_SEED)
    first = wrapped(FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_available_nodes=6),
                    tmp_path)
    expected = runs.exact(start(first, to_arrayrecord(flower_app.make_model()), 2).arrays)
    first.checkpointer.close()
    state_file = tmp_path / "round-00000002" / "state.safetensors"
    data = bytearray(state_file.read_bytes())
    data[-1] ^= 0xFF
    state_file.write_bytes(bytes(data))
    again = wrapped(FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_available_nodes=6),
                    tmp_path)
    with pytest.warns(CheckpointWarning, match="skipping round 2"):
        last, arrays = resume(again.checkpointer, again, like=flower_app.make_model())
    assert last == 1
    assert runs.exact(start(again, arrays, 1).arrays) == expected  # round 2 again, the same
    assert hkstore.Checkpointer(tmp_path).restore(
        model=flower_app.forward, loss=flower_app.loss).round == 2


def test_the_wrapper_delegates_and_checks_its_arguments(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    inner = FedAvg(fraction_train=0.25)
    strategy = wrapped(inner, tmp_path)
    assert strategy.fraction_train == 0.25 and strategy.inner is inner
    with pytest.raises(AttributeError):
        strategy.no_such_attribute  # noqa: B018
    with caplog.at_level(logging.INFO, logger="hkstore.integrations.flower"):
        strategy.summary()
    assert "rounds saved to" in caplog.text
    with pytest.raises(TypeError, match="not already wrapped"):
        wrapped(strategy, tmp_path)
    with pytest.raises(TypeError, match=r"must be an hkstore\.Checkpointer"):
        CheckpointedStrategy(FedAvg(), str(tmp_path), like=flower_app.make_model())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a list of names, not a str"):
        wrapped(FedAvg(), tmp_path, state_attributes="m_t")
    with pytest.raises(hkstore.errors.NotInitializedError):
        CheckpointedStrategy(FedAvg(), hkstore.Checkpointer(tmp_path),
                             like=hkstore.HaikuModel(flower_app.forward, flower_app.loss))
    with pytest.raises(TypeError, match="resume: strategy must be a CheckpointedStrategy"):
        resume(hkstore.Checkpointer(tmp_path), FedAvg(), like=flower_app.make_model())  # type: ignore[arg-type]


def test_signed_rounds_and_a_trust_that_requires_signatures(tmp_path: Path) -> None:
    key = hkstore.HmacKey(b"0123456789abcdef0123456789abcdef")
    random.seed(runs.RUN_SEED)
    strategy = CheckpointedStrategy(FedAvg(fraction_evaluate=0.0),
                                    hkstore.Checkpointer(tmp_path / "signed", signer=key),
                                    like=flower_app.make_model())
    start(strategy, to_arrayrecord(flower_app.make_model()), 1)
    strategy.checkpointer.close()
    fedavg_round(tmp_path / "unsigned")
    trust = hkstore.Trust(keys=[key], require_signature=True)
    for name, ok in (("signed", True), ("unsigned", False)):
        again = wrapped(FedAvg(), tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            if ok:
                assert resume(again.checkpointer, again, like=flower_app.make_model(),
                              trust=trust)[0] == 1
            else:
                with pytest.raises(hkstore.errors.CheckpointNotFoundError, match="unsigned"):
                    resume(again.checkpointer, again, like=flower_app.make_model(), trust=trust)


def test_a_table_entry_whose_attributes_moved_is_refused(tmp_path: Path) -> None:
    """What a later Flower renaming FedAdam's moments would meet: a refusal naming them."""
    inner = FedAdam()
    del inner.m_t
    with pytest.raises(StrategyStateError, match=r"strategy \(FedAdam\): no attribute\(s\) 'm_t' "
                                                 r"in flwr 1\.42\.0 \(hkstore's state table is "
                                                 r"written for flwr 1\.42\)"):
        wrapped(inner, tmp_path)
