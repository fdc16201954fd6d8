"""hkstore.integrations.flower: hkstore models in Flower, and Flower runs that resume exactly.

``pip install 'hkstore[flower]'`` (flwr >= 1.42, its message API: ``flwr.app``,
``flwr.serverapp``, ``flwr.clientapp``). Every name is resolved on first use (importing flwr
and jax then); without flwr, touching one raises
:class:`~hkstore.errors.MissingDependencyError` naming the extra.

- **weights as records** (``_records``): :func:`to_arrayrecord` (a model's weights as an
  ``ArrayRecord``, dtypes kept, bfloat16 included) and :func:`from_arrayrecord` (an
  ``ArrayRecord`` checked against a model: every missing, extra, reshaped or retyped tensor
  named; bfloat16 read as bfloat16; FedAdam's float64 cast back to float32 with one warning).
- **checkpoint and resume** (``_strategy``): :class:`CheckpointedStrategy` wraps any
  ``flwr.serverapp.strategy.Strategy`` and saves each round through
  :class:`hkstore.Checkpointer`; :func:`resume` puts the last round back and returns
  ``(last_round, arrays)`` for ``strategy.start``, which then continues with the real round
  numbers.
- **the state table** (``_state``): :data:`STATE_TABLE`, what each Flower strategy class
  changes while it runs (never guessed from ``vars()``); ``_history`` keeps the run's metrics
  by real round number.

Example:
    >>> from flwr.serverapp.strategy import FedAdam
    >>> from hkstore.integrations.flower import CheckpointedStrategy, resume
    >>> strategy = CheckpointedStrategy(FedAdam(), hkstore.Checkpointer("runs/fl"), like=model)
    >>> last_round, arrays = resume(strategy.checkpointer, strategy, like=model)
    >>> strategy.start(grid, arrays, num_rounds=5)  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from hkstore.errors import MissingDependencyError

if TYPE_CHECKING:
    from hkstore.integrations.flower._records import array_to_numpy as array_to_numpy
    from hkstore.integrations.flower._records import from_arrayrecord as from_arrayrecord
    from hkstore.integrations.flower._records import to_arrayrecord as to_arrayrecord
    from hkstore.integrations.flower._state import STATE_TABLE as STATE_TABLE
    from hkstore.integrations.flower._state import StateSpec as StateSpec
    from hkstore.integrations.flower._strategy import STATE_FORMAT as STATE_FORMAT
    from hkstore.integrations.flower._strategy import (
        CheckpointedStrategy as CheckpointedStrategy,
    )
    from hkstore.integrations.flower._strategy import resume as resume

#: name -> the module defining it (each imports flwr).
_NAMES: dict[str, str] = {
    "array_to_numpy": "_records",
    "from_arrayrecord": "_records",
    "to_arrayrecord": "_records",
    "STATE_TABLE": "_state",
    "StateSpec": "_state",
    "STATE_FORMAT": "_strategy",
    "CheckpointedStrategy": "_strategy",
    "resume": "_strategy",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'hkstore.integrations.flower' has no attribute {name!r}")
    try:
        if find_spec("flwr") is None:
            raise ImportError("No module named 'flwr'")
        found = import_module(f"hkstore.integrations.flower.{module}")
    except MissingDependencyError:
        raise  # jax or haiku missing: that error names its own extra
    except ImportError as exc:
        raise MissingDependencyError(
            f"hkstore.integrations.flower.{name} needs Flower, flwr >= 1.42 ({exc}); install "
            "it with pip install 'hkstore[flower]'") from exc
    value = getattr(found, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
