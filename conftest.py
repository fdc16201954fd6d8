"""Doctest collection of the package: modules that need an optional framework are skipped
here when it is not installed, and their doctests run in that framework's own venv instead
(``make test-declearn``). Nothing else is left out."""

from __future__ import annotations

import importlib.util

#: Modules whose import needs declearn: the engine part of hkstore.integrations.declearn.
_DECLEARN_MODULES = ["_engine.py", "_harden.py", "_model.py", "_policy.py", "_vector.py"]

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("declearn") is None:
    collect_ignore_glob += [f"hkstore/integrations/declearn/{name}" for name in _DECLEARN_MODULES]
