"""Doctest collection of the package: modules that need an optional framework are skipped
here when it is not installed, and their doctests run in that framework's own venv instead
(``make test-declearn``, ``make test-flower``). Nothing else is left out."""

from __future__ import annotations

import importlib.util

#: Modules whose import needs declearn: the engine part of hkstore.integrations.declearn.
_DECLEARN_MODULES = ["_engine.py", "_harden.py", "_model.py", "_policy.py", "_vector.py"]

#: Modules whose import needs flwr: all of hkstore.integrations.flower but its package file.
_FLOWER_MODULES = ["_history.py", "_records.py", "_state.py", "_strategy.py"]

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("declearn") is None:
    collect_ignore_glob += [f"hkstore/integrations/declearn/{name}" for name in _DECLEARN_MODULES]
if importlib.util.find_spec("flwr") is None:
    collect_ignore_glob += [f"hkstore/integrations/flower/{name}" for name in _FLOWER_MODULES]
