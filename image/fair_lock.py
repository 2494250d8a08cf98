"""A lock taken in the order it was asked for: the engine's hold on the device.

`threading.Lock` hands itself to whichever waiter the scheduler wakes, and the engine's waiter
polls (to notice a stopping worker), so a job that came later could take the device before
one that had waited through several jobs. The pull worker's lease limit counts on the jobs in
its hand running in the order they came (handlers/cli/worker.py, `lease_budget`): a job that
waited past it would be redelivered to another worker while this one still held it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable


class FairLock:
    """A non-reentrant lock whose waiters get it first come, first served."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False
        self._queue: collections.deque[object] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1, *,
                cancelled: Callable[[], bool] | None = None, poll: float = 1.0) -> bool:
        """Take the lock when it is free and every earlier waiter has had it; False, leaving the
        queue, once `timeout` seconds have passed (negative: no limit) or, asked every `poll`
        seconds while waiting, `cancelled()` is True (it must not take this lock)."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with self._changed:
            if not self._held and not self._queue:
                self._held = True
                return True
            if not blocking:
                return False
            turn = object()
            self._queue.append(turn)
            try:
                while self._held or self._queue[0] is not turn:
                    if cancelled is not None and cancelled():
                        return False
                    wait = poll if cancelled is not None else None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return False
                        wait = left if wait is None else min(wait, left)
                    self._changed.wait(wait)
                self._held = True
                return True
            finally:
                self._queue.remove(turn)
                self._changed.notify_all()  # whoever is first in line now looks again

    def release(self) -> None:
        with self._changed:
            if not self._held:
                raise RuntimeError("release of an unlocked FairLock")
            self._held = False
            self._changed.notify_all()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
