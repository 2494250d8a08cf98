"""How long `imagen worker` leases a message: long enough for the jobs ahead of it and its own
budget, so Pub/Sub never redelivers a job that is still running."""

from __future__ import annotations

from handlers.cli.worker import LEASE_MARGIN_SECONDS, TRANSFER_SECONDS, lease_budget


def test_the_lease_covers_the_jobs_ahead_and_the_jobs_own_budget():
    # One engine runs one job at a time: the last message in hand waits for all the others.
    # And a margin for what no job's budget counts: with --prefetch 0 the lease was the
    # budget exactly, and a compiled graph's swap or a slow encode outlasted it.
    per_job, margin = 3600 + TRANSFER_SECONDS, LEASE_MARGIN_SECONDS
    assert margin >= 120
    assert lease_budget(3600, concurrency=1, prefetch=0) == per_job + margin
    assert lease_budget(3600, concurrency=1, prefetch=1) == 2 * per_job + margin  # waits for one job first
    assert lease_budget(3600, concurrency=2, prefetch=1) == 3 * per_job + margin
    assert lease_budget(600, concurrency=4, prefetch=0) == 4 * (600 + TRANSFER_SECONDS) + margin
