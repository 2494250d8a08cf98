"""`imagen worker`'s signals: the first lets the job on the GPU finish, a second ends the
process at once (tests/integration/test_end_to_end.py runs it for real)."""

from __future__ import annotations

import json
import signal

from handlers import worker as worker_module
from handlers.worker import PullWorker


def test_only_a_second_signal_ends_the_worker_at_once(monkeypatch, capfd):
    exits = []
    monkeypatch.setattr(worker_module.os, "_exit", exits.append)
    worker = PullWorker(None, "projects/p/subscriptions/s", None)
    worker.stop()  # the GPU failed or the stream died: stopping, with no signal yet
    worker._on_signal(signal.SIGTERM, None)  # the platform's only SIGTERM: the drain goes on
    assert exits == []
    worker._on_signal(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]
    [line] = capfd.readouterr().out.splitlines()  # one JSON line, written without logging's locks
    entry = json.loads(line)
    assert {key: entry[key] for key in ("severity", "logger", "subscription", "message")} == {
        "severity": "WARNING", "logger": "imagen.worker", "subscription": "projects/p/subscriptions/s",
        "message": "SIGTERM again: stopping now; the jobs in hand go back to Pub/Sub when their leases run out"}
