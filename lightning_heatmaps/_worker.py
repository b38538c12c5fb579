"""A background thread that runs sink work (scalars, rendering, files) off the training loop."""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable

from lightning_heatmaps._ranks import rank_zero_warn


class BackgroundWriter:
    """Runs submitted jobs in order on one daemon thread.

    A job submitted with a ``key`` replaces a still-pending job of the same key (a newer image makes
    an older, not yet drawn one pointless); jobs without a key always run. An exception in a job is
    reported once and never reaches the training loop.

    Example:
        >>> writer = BackgroundWriter("example")
        >>> done = []
        >>> writer.submit(lambda: done.append(1))
        >>> writer.close()
        True
        >>> done
        [1]
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: deque[tuple[Hashable | None, Callable[[], None]]] = deque()
        self._condition = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.jobs_run = 0
        self.cpu_seconds = 0.0  # CPU time of this thread spent in jobs (the cost of working off-thread)

    def submit(self, job: Callable[[], None], key: Hashable | None = None) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError(f"{self.name}: the background writer is closed.")
            if key is not None:
                for index, (pending_key, _) in enumerate(self._jobs):
                    if pending_key == key:
                        del self._jobs[index]
                        break
            self._jobs.append((key, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"lightning-heatmaps-{self.name}", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._jobs and not self._closed:
                    self._condition.wait()
                if not self._jobs:
                    return
                _, job = self._jobs.popleft()
                self._busy = True
            started = time.thread_time()
            try:
                job()
            except Exception as error:  # never let a sink or renderer error kill training
                self.errors += 1
                if self.errors == 1:
                    rank_zero_warn(
                        f"{self.name}: writing heatmaps failed ({type(error).__name__}: {error}); training goes on. "
                        f"Later failures are counted, not reported.\n{traceback.format_exc(limit=4)}"
                    )
            finally:
                self.cpu_seconds += time.thread_time() - started
                self.jobs_run += 1
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; returns ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._jobs or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Run what is pending, then stop the thread; returns ``False`` if it did not finish in time."""
        finished = self.flush(timeout)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0 if finished else 0.0)
        return finished
