"""Peak resident memory of a benchmark process: the two Linux figures the benchmarks read.

``reset_peak()`` writes ``5`` to ``/proc/self/clear_refs``, which resets ``VmHWM`` (the RSS
high-water mark) to the current RSS, so that the peak of one operation can be read after it;
``proc_status("VmRSS")`` / ``proc_status("VmHWM")`` read the figures. Shared by
``tools/bench.py`` (loads) and ``tools/bench_checkpoint.py`` (background saves).
"""

from __future__ import annotations

__all__ = ["proc_status", "reset_peak"]


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (0 when unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> str:
    """Reset ``VmHWM`` to the current RSS; return how the peak will be measured."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return "VmHWM (not reset)"
    return "clear_refs"
