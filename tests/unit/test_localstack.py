"""The local stack's shutdown: every service is stopped, whatever one of them raises."""

from __future__ import annotations

import pytest

from handlers.localstack import _stop_each


class _Service:
    def __init__(self, log: list, name: str, fails: BaseException | None = None):
        self.log, self.name, self.fails = log, name, fails

    def stop(self):
        self.log.append(self.name)
        if self.fails:
            raise self.fails


def test_a_failing_stop_still_stops_the_emulators_then_propagates():
    """A second Ctrl-C while the worker drains interrupts its stop: the emulators (a Java
    process, fake-gcs-server) must still go, or they outlive `make demo`."""
    stopped: list[str] = []
    services = [_Service(stopped, "worker", KeyboardInterrupt()), _Service(stopped, "serve", RuntimeError("gone")),
                _Service(stopped, "storage"), _Service(stopped, "pubsub")]
    with pytest.raises(KeyboardInterrupt):
        _stop_each(services)
    assert stopped == ["worker", "serve", "storage", "pubsub"]
