"""One background worker with one slot: at most one job in flight, its error kept for later.

:class:`BackgroundWorker` runs a Checkpointer's writes off the caller's thread. ``submit``
waits for the job in flight (so at most one runs, and rounds are written in the order they
were saved); a job's exception is kept and handed to whoever asks next (:meth:`take_error`),
never dropped. The worker thread is a normal (non-daemon) thread: a process that ends
normally finishes the job in flight first.

Example:
    >>> worker = BackgroundWorker()
    >>> worker.submit(lambda: 1 / 0)
    >>> worker.join(); type(worker.take_error()).__name__
    'ZeroDivisionError'
    >>> worker.shutdown()
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["BackgroundWorker"]


class BackgroundWorker:
    """A single worker thread, one job at a time, errors kept until taken."""

    def __init__(self, name: str = "hkstore-checkpoint") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._future: Future[None] | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a job is in flight."""
        return self._future is not None and not self._future.done()

    def join(self) -> None:
        """Wait for the job in flight (if any); keep its error for :meth:`take_error`."""
        future, self._future = self._future, None
        if future is None:
            return
        error = future.exception()
        if error is not None and self._error is None:
            self._error = error

    def take_error(self) -> BaseException | None:
        """Return (and forget) the error of a finished job, or ``None``."""
        error, self._error = self._error, None
        return error

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker once the job in flight has finished."""
        self.join()
        self._future = self._pool.submit(job)

    def shutdown(self) -> None:
        """Finish the job in flight and stop the thread (its error stays to be taken)."""
        self.join()
        self._pool.shutdown(wait=True)
