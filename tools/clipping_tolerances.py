"""Measure how far the fast clipping path is from the per-sample path, per model and weight kind.

Usage (from a checkout, in the dev venv)::

    python tools/clipping_tolerances.py

For every model of ``tests/test_clipping.py`` and ``max_norm`` 1e-6 (every sample clipped)
and 1e6 (none), prints the worst relative error ``max|fast - per-sample| / max|per-sample|``
over the weights, then the worst per weight kind (the method ``last_clipping`` reports). The
tests assert 1e-5 in float32; this prints what is actually reached.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    logging.disable(logging.WARNING)  # the fallback warnings are expected here
    import test_clipping as cases

    from hkstore.model import set_device_policy

    set_device_policy(gpu=False)
    by_method: dict[str, float] = {}
    for case in cases.CASES:
        model, batch = case.build(), case.batch()
        worst = []
        for bound in (1e-6, 1e6):
            fast, slow, report = cases.both_paths(model, batch, bound)
            worst.append(cases.rel_error(fast, slow))
            for name in fast:
                error = cases.rel_error({name: fast[name]}, {name: slow[name]})
                method = report.methods[name].split(",")[0]
                if method.startswith("per-sample:"):
                    method = "per-sample (fallback)"
                by_method[method] = max(by_method.get(method, 0.0), error)
        print(f"{case.name:16s} binding {worst[0]:.1e}  not binding {worst[1]:.1e}")
    print()
    for method, error in sorted(by_method.items()):
        print(f"{method:30s} {error:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
