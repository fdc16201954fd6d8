"""The one thread-pool policy of the store: how many workers, and how jobs run on them.

Saving (hashing and CRC beside the write), a verified load, lazy tensor reads and ``verify``
all run their jobs through :class:`Scheduler`. By default it uses every core the process may
run on (``os.sched_getaffinity``, so a container or ``taskset`` limit is honoured), falling
back to ``os.cpu_count()``; every entry point takes ``workers=`` to override it. The jobs
(reads with ``os.preadv``, ``hashlib`` and ``blake3`` hashing, CRC-32, ``np.copyto``) release
the GIL, so threads scale across cores.

Policy, measured on a 2-core box (``tools/weights_speed.py``, ``tools/digest_speed.py``):

- below :data:`INLINE_BYTES` of work a call runs on the calling thread (a pool hand-off cost
  more than it saved on a 0.6 MB member: 1.35 ms against 0.73 ms);
- one pool per call, created on entry and joined on exit, so no thread outlives the call and
  nothing is shared between callers (thread start-up is ~0.1 ms, noise next to 1 MB of work);
- jobs that wait on other jobs never run on the pool (no nested pools, no deadlock), and a
  BLAKE3 hash that uses the ``blake3`` package's own threads runs only while the pool is idle,
  so the process never runs more busy threads than ``workers``.

Example:
    >>> with Scheduler(2) as pool:
    ...     pool.map(len, [b"ab", b"abc"])
    [2, 3]
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["INLINE_BYTES", "Scheduler", "available_cores", "resolve_workers"]

T = TypeVar("T")
R = TypeVar("R")

#: below this many bytes of work, a call runs its jobs on the calling thread
INLINE_BYTES = 1 << 20


def available_cores() -> int:
    """Return how many cores this process may run on (at least 1).

    Example:
        >>> available_cores() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """Return the worker count to use: ``workers``, or every available core when ``None``.

    Raises:
        TypeError: ``workers`` is not an int (or is a bool).
        ValueError: ``workers`` is below 1.

    Example:
        >>> resolve_workers(3)
        3
    """
    if workers is None:
        return available_cores()
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int >= 1 or None, got {type(workers).__name__}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


class Scheduler:
    """Runs a call's jobs on ``workers`` threads (inline when ``workers`` is 1).

    Use it as a context manager: the pool starts on entry (only when ``workers > 1``) and is
    joined on exit; after an error the jobs not yet started are cancelled and the running
    ones awaited, so nothing touches the caller's buffers after the call returns or raises.

    Args:
        workers: threads; ``None`` for every available core (see :func:`available_cores`).
        work_bytes: the call's total work, when known: below :data:`INLINE_BYTES` the jobs
            run on the calling thread.

    Attributes:
        workers: threads that run jobs (1 when inline).
    """

    def __init__(self, workers: int | None = None, *, work_bytes: int | None = None) -> None:
        count = resolve_workers(workers)
        if work_bytes is not None and work_bytes < INLINE_BYTES:
            count = 1
        self.workers = count
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Scheduler:
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hkstore")
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=exc_type is not None)

    def submit(self, fn: Callable[..., R], /, *args: Any) -> Future[R]:
        """Start ``fn(*args)`` on a worker (or run it now, inline); return its future."""
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered by .result(), as a pool would
            future.set_exception(exc)
        return future

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Run ``fn`` on every item; return the results in order (the first error raises)."""
        futures = [self.submit(fn, item) for item in items]
        return [future.result() for future in futures]

    def window(self, fn: Callable[[T], R], items: Iterable[T], size: int) -> Iterator[R]:
        """Yield ``fn(item)`` in order, with at most ``size`` jobs started but not yet yielded.

        Bounds memory when each result holds data (a batch of tensors being checked).
        """
        pending: deque[Future[R]] = deque()
        for item in items:
            if len(pending) >= max(1, size):
                yield pending.popleft().result()
            pending.append(self.submit(fn, item))
        while pending:
            yield pending.popleft().result()
