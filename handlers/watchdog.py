"""Stops `imagen serve` and `imagen worker` when a job is stuck on the GPU.

A job's budget is checked at every denoising step and tile, so a job far past it is stuck
inside one: a CUDA call that never returns after a GPU fault, or a deadlock. Nothing inside
the job can end it, and the process would otherwise hold its messages for ever (the pull
worker's leases run out and the client library takes more) or, behind Cloud Run, take push
after push that waits for the device. Ending the process hands every message back to Pub/Sub
and lets the platform start a new one, as after a failed GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("imagen.watchdog")

GRACE_SECONDS = 300
"""How far past its budget a job may still be on the GPU: far more than any one step or tile
takes, on any GPU imagen runs on."""


def watch(engine, on_hung: Callable[[], None], *, grace: float = GRACE_SECONDS,
          interval: float = 30.0) -> threading.Thread:
    """Check `engine.overdue(grace)` every `interval` seconds, in a daemon thread; once a job
    is overdue, log it (CRITICAL) and call `on_hung()`, which ends the process."""

    def run() -> None:
        while True:
            time.sleep(interval)
            if (what := engine.overdue(grace)) is not None:
                # In the job's context: the line carries its id, source and message, so the
                # object that hung the GPU can be found (JobStoppedWorker's reports send people here).
                message = ("a job is stuck on the GPU: %s; stopping, so that a new process takes over and Pub/Sub "
                           "redelivers its messages")
                if (context := engine.busy_context()) is not None:
                    context.run(log.critical, message, what)
                else:
                    log.critical(message, what)
                on_hung()
                return

    thread = threading.Thread(target=run, name="imagen-watchdog", daemon=True)
    thread.start()
    return thread
