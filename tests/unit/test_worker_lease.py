"""How long `imagen worker` leases a message: long enough for the jobs ahead of it and its own
budget, so Pub/Sub never redelivers a job that is still running."""

from __future__ import annotations

from handlers.cli.worker import TRANSFER_SECONDS, lease_budget


def test_the_lease_covers_the_jobs_ahead_and_the_jobs_own_budget():
    # One engine runs one job at a time: the last message in hand waits for all the others.
    per_job = 3600 + TRANSFER_SECONDS
    assert lease_budget(3600, concurrency=1, prefetch=0) == per_job
    assert lease_budget(3600, concurrency=1, prefetch=1) == 2 * per_job  # waits for one job first
    assert lease_budget(3600, concurrency=2, prefetch=1) == 3 * per_job
    assert lease_budget(600, concurrency=4, prefetch=0) == 4 * (600 + TRANSFER_SECONDS)
