"""The engine's device lock (image/fair_lock.py): first come, first served."""

from __future__ import annotations

import threading
import time

import pytest

from image.fair_lock import FairLock


def _wait_until(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_waiters_get_the_lock_in_the_order_they_asked():
    # threading.Lock hands itself to any waiter: with the engine's polling, a job that came
    # later could run before one waiting through several jobs (past its lease).
    lock, order, queued = FairLock(), [], []
    lock.acquire()

    def job(name: str) -> None:
        queued.append(name)
        with lock:
            order.append(name)
            time.sleep(0.01)  # the device, briefly

    threads = []
    for name in "abcdef":
        threads.append(threading.Thread(target=job, args=(name,)))
        threads[-1].start()
        _wait_until(lambda n=name: n in queued and len(lock._queue) == len(queued))
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == list("abcdef")
    assert not lock.locked() and not lock._queue


def test_a_waiter_that_is_cancelled_or_times_out_leaves_the_queue_and_the_next_goes_on():
    lock, stop, results = FairLock(), threading.Event(), {}
    lock.acquire()
    first = threading.Thread(target=lambda: results.setdefault(
        "first", lock.acquire(cancelled=stop.is_set, poll=0.01)))
    first.start()
    _wait_until(lambda: len(lock._queue) == 1)
    second = threading.Thread(target=lambda: results.setdefault("second", lock.acquire()))
    second.start()
    _wait_until(lambda: len(lock._queue) == 2)
    stop.set()  # a stopping worker hands the first back while it waits
    first.join(10)
    assert results["first"] is False and len(lock._queue) == 1
    assert lock.acquire(timeout=0.05) is False and len(lock._queue) == 1
    assert lock.acquire(blocking=False) is False
    lock.release()
    second.join(10)
    assert results["second"] is True and lock.locked()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
