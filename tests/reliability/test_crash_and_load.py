"""Crashes and concurrency on the emulator stack.

- Two `imagen worker` processes on one subscription, one SIGKILLed mid-run and restarted:
  every upload gets exactly one output, written once, and no failure report
  (scripts/load_test.py, small; run it with N=300 for the benchmark figures).
- Two processors given the same message at the same moment, on real threads: one output, and
  the loser meets the generation precondition and acks.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from handlers.events import parse_message, parse_push_envelope
from scripts.load_test import run_load
from tests.integration.conftest import png_bytes
from tests.integration.test_processor import FakeEngine
from tests.reliability.conftest import assert_within_layout, notification_envelope, processor_for

pytestmark = pytest.mark.integration


def test_sigkill_and_restart_during_load_loses_and_duplicates_nothing(
    pubsub_emulator, storage_emulator, tiny_cache, tmp_path
):
    report = run_load(
        20,
        pubsub_host=pubsub_emulator.host,
        storage_url=storage_emulator.url,
        model_cache_dir=tiny_cache,
        work_dir=tmp_path,
        kills=1,
        seed=6,
        timeout=240,
        settle=4,
        log=lambda *_: None,
    )
    print("\n".join(report.lines()))
    assert report.kills == 1
    assert (report.outputs, report.duplicates, report.lost, report.failures) == (20, 0, 0, 0), (
        report
    )
    assert report.jobs_started >= 20


def test_same_message_on_two_workers_at_once_gives_one_output(bucket, settings):
    """Both check (no output yet) and run the model at the same time; the first write wins,
    the second meets `ifGenerationMatch=0`, sees the winner's output and acks as a duplicate."""
    blob = bucket.blob("incoming/upscale/race.png")
    blob.upload_from_string(png_bytes(), content_type="image/png")
    envelope = notification_envelope(blob)
    both_ran = threading.Barrier(2, timeout=30)
    # Both have checked for an output and run the model before either returns; the second
    # returns half a second later. A loser tells the winner's write from its own retried one
    # by the job's seconds in the metadata, to the millisecond: two fake models released by
    # one barrier can finish in the same millisecond, and the loser then reports the winner's
    # (identical, correct) output as its own success instead of a duplicate (a CI run once).
    engines = [FakeEngine(before_return=both_ran.wait),
               FakeEngine(before_return=lambda: (both_ran.wait(), time.sleep(0.5)))]
    processors = [processor_for(settings, engine) for engine in engines]
    event = parse_message(parse_push_envelope(json.dumps(envelope).encode()))
    outcomes: list = [None, None]

    def deliver(index):
        outcomes[index] = processors[index].handle(event, message_id="same-message")

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    statuses = sorted(outcome.status for outcome in outcomes)
    assert statuses == ["skipped", "succeeded"], outcomes
    loser = next(outcome for outcome in outcomes if outcome.status == "skipped")
    assert "duplicate" in loser.reason
    assert all(engine.calls == 1 for engine in engines)  # both really ran: a true race
    found = assert_within_layout(bucket, {blob.name})
    assert found["outputs"] == ["processed/upscale/race.png"] and not found["reports"]
