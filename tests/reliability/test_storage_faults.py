"""Storage faults: a fault-injecting proxy (scripts/fault_proxy.py) between the processor's
storage client (STORAGE_EMULATOR_HOST = the proxy) and fake-gcs-server.

Transient faults (503s, stalls, an answer lost after the write) are retried with
google-cloud-storage's own backoff and the job completes with one output, written once.
Permanent ones (403, 404) end in a failure report (or a skip, for a source that is gone)
after a single request: no retry storm, and the pull worker acks.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from click.testing import CliRunner

from handlers import storage as storage_module
from handlers.cli import main
from handlers.clients import storage_client
from handlers.errors import TransientError
from handlers.events import JobRequest, ObjectEvent
from handlers.localstack import EVENTS_TOPIC
from handlers.processor import Processor
from handlers.storage import Store
from handlers.worker import PullWorker
from scripts.fault_proxy import Rule
from tests.integration.conftest import png_bytes, wait_for
from tests.integration.test_processor import FakeEngine
from tests.reliability.conftest import assert_within_layout

pytestmark = pytest.mark.integration

SOURCE = "incoming/upscale/photo.png"
OUTPUT = "processed/upscale/photo.png"
REPORT = "failed/upscale/photo.png.json"
# Request lines as the proxy sees them (percent-decoded): metadata, media download, upload.
SOURCE_META = rf"^GET /storage/v1/b/[^/]+/o/{SOURCE}\?"
SOURCE_DOWNLOAD = rf"^GET /download/storage/v1/b/[^/]+/o/{SOURCE}\?"
SOURCE_ANY = rf"/o/{SOURCE}\?"
UPLOAD = r"^POST /upload/storage/v1/b/"
# Multipart uploads name their object in the metadata part of the body.
OUTPUT_BODY = rb'"name": ?"processed/upscale/photo\.png"'
REPORT_BODY = rb'"name": ?"failed/upscale/broken\.png\.json"'


@pytest.fixture
def through_proxy(settings, proxy):
    """Build a processor whose storage client talks to the proxy, as a worker with
    STORAGE_EMULATOR_HOST pointing at it would."""

    def build(engine=None, **overrides) -> Processor:
        proxied = settings.replace(storage_emulator_host=proxy.url, **overrides)
        store = Store(storage_client(proxied))
        return Processor(engine=engine or FakeEngine(), store=store, settings=proxied)

    return build


def _upload(bucket, name=SOURCE, data=None) -> ObjectEvent:
    """Upload straight to the emulator (not through the proxy); the event a notification gives."""
    blob = bucket.blob(name)
    blob.upload_from_string(png_bytes() if data is None else data, content_type="image/png")
    blob.reload()
    return ObjectEvent(
        "finalize", bucket.name, name, str(blob.generation), {}, blob.size, "image/png"
    )


def _output_generation(bucket):
    blob = bucket.get_blob(OUTPUT)
    return blob.generation if blob else None


def test_503s_and_a_stall_are_retried_and_the_job_completes(bucket, proxy, through_proxy):
    event = _upload(bucket)
    proxy.add(Rule(SOURCE_META, status=503, times=1))
    proxy.add(Rule(SOURCE_DOWNLOAD, status=503, times=2))
    proxy.add(Rule(SOURCE_DOWNLOAD, status=None, stall=1.0, times=1))  # slow, within the timeout
    proxy.add(Rule(UPLOAD, body=OUTPUT_BODY, status=503, times=1))
    engine = FakeEngine()
    started = time.monotonic()
    outcome = through_proxy(engine).handle(event)
    assert outcome.status == "succeeded"
    assert engine.calls == 1
    assert proxy.count(SOURCE_META, faults_only=True) == 1
    assert proxy.count(SOURCE_DOWNLOAD) == 3  # two 503s, then the stalled one that succeeded
    assert proxy.count(UPLOAD, faults_only=True) == 1
    assert time.monotonic() - started >= 1.0  # the stall was waited out, not cut short
    assert assert_within_layout(bucket, {SOURCE})["outputs"] == [OUTPUT]


def test_stall_past_the_timeout_is_retried(bucket, proxy, through_proxy, monkeypatch):
    # TIMEOUT_SECONDS is 120 s in production; 1 s here so a 3 s stall is a timeout.
    monkeypatch.setattr(storage_module, "TIMEOUT_SECONDS", 1)
    event = _upload(bucket)
    proxy.add(Rule(SOURCE_DOWNLOAD, status=None, stall=3.0, times=1))
    outcome = through_proxy().handle(event)
    assert outcome.status == "succeeded"
    assert proxy.count(SOURCE_DOWNLOAD) == 2  # the stalled attempt timed out, the retry worked


def test_answer_lost_after_the_write_leaves_one_output_written_once(bucket, proxy, through_proxy):
    """The upload lands, its answer is lost (503): the retry meets the generation precondition,
    the processor finds its own output (its very metadata) and succeeds, as the job did. No
    second write."""
    event = _upload(bucket)
    proxy.add(Rule(UPLOAD, body=OUTPUT_BODY, status=503, after_forward=True, times=1))
    outcome = through_proxy().handle(event)
    assert outcome.status == "succeeded" and outcome.seconds is not None
    first = _output_generation(bucket)
    assert first is not None
    assert proxy.count(UPLOAD) == 2  # the write, and the retry refused by ifGenerationMatch=0
    again = through_proxy().handle(event)  # a redelivery, for good measure
    assert again.status == "skipped" and _output_generation(bucket) == first


@pytest.mark.parametrize(
    "rule, expect, error, target",
    [
        (Rule(SOURCE_ANY, status=403), "failed", "StoragePermanentError", SOURCE_ANY),
        # A source that is gone is superseded (deleted or replaced): skipped, as DESIGN.md says.
        (Rule(SOURCE_ANY, status=404), "skipped", None, SOURCE_ANY),
    ],
    ids=["source-403", "source-404"],
)
def test_permanent_errors_end_after_one_request(
    bucket, proxy, through_proxy, rule, expect, error, target
):
    event = _upload(bucket)
    proxy.add(rule)
    engine = FakeEngine()
    outcome = through_proxy(engine).handle(event)
    assert outcome.status == expect
    faulted = proxy.count(target, faults_only=True)
    assert faulted == 1, f"{faulted} requests refused: a retry storm"
    found = assert_within_layout(bucket, {SOURCE})
    assert not found["outputs"]
    if error:
        assert found["reports"] == [REPORT]
        report = json.loads(bucket.get_blob(REPORT).download_as_bytes())
        assert report["error"]["type"] == error and str(rule.status) in report["error"]["message"]
    else:
        assert not found["reports"]


@pytest.mark.parametrize("status", [403, 404])
def test_an_output_write_refused_is_the_deployments_fault_and_retried(bucket, proxy, through_proxy, status):
    """A grant not yet propagated, or an output bucket not made yet: the job goes back to
    Pub/Sub (one request here, no storm) and gets a report only if it lasts, instead of
    failing for good after its GPU work."""
    event = _upload(bucket)
    proxy.add(Rule(UPLOAD, body=OUTPUT_BODY, status=status))
    with pytest.raises(TransientError, match=f"refused to write the output .*: {status} .*needs write access"):
        through_proxy().handle(event, attempt=1)
    assert proxy.count(UPLOAD, faults_only=True) == 1
    found = assert_within_layout(bucket, {SOURCE})
    assert not found["outputs"] and not found["reports"]


def test_an_output_refused_at_the_check_before_the_gpu_is_retried_like_its_write(bucket, proxy, through_proxy):
    """The look at the existing output, before any GPU work, is refused as the write would be
    (a separate output bucket whose grant is still propagating): the deployment's fault,
    retried, not a report for good for every job of a fresh deployment."""
    event = _upload(bucket)
    proxy.add(Rule(r"^GET /storage/v1/b/[^/]+/o/processed/upscale/photo\.png\?", status=403))
    engine = FakeEngine()
    with pytest.raises(TransientError, match="refused to read the output .*: 403 .*needs access"):
        through_proxy(engine).handle(event, attempt=1)
    assert proxy.count("processed", faults_only=True) == 1 and engine.calls == 0
    found = assert_within_layout(bucket, {SOURCE})
    assert not found["outputs"] and not found["reports"]


def test_an_output_a_job_message_names_outside_the_output_prefix_fails_when_refused(bucket, proxy, through_proxy):
    """Terraform's workers may write only under the output prefix: a job message that names
    another place fails once, with a report that says where to write, instead of redoing its
    GPU work at every retry. Under the prefix, a refusal stays the deployment's (above)."""
    _upload(bucket)
    proxy.add(Rule(UPLOAD, body=rb'"name": ?"exports/photo\.png"', status=403))
    request = JobRequest(bucket.name, SOURCE, "upscale", {}, output=f"gs://{bucket.name}/exports/photo.png")
    outcome = through_proxy(allowed_buckets=frozenset({bucket.name})).handle(request, attempt=1)
    assert outcome.status == "failed" and outcome.error["type"] == "OutputNotWritable"
    assert "outside 'processed/'" in outcome.error["message"] and "403" in outcome.error["message"]
    assert proxy.count(UPLOAD, faults_only=True) == 1
    assert bucket.get_blob(REPORT) is not None and bucket.get_blob("exports/photo.png") is None


def test_report_write_faults_retry_then_succeed(bucket, proxy, through_proxy):
    event = _upload(bucket, "incoming/upscale/broken.png", b"not an image")
    proxy.add(Rule(UPLOAD, body=REPORT_BODY, status=503, times=2))
    outcome = through_proxy().handle(event)
    assert outcome.status == "failed" and outcome.error["type"] == "ImageDecodeError"
    assert proxy.count(UPLOAD, faults_only=True) == 2
    assert bucket.get_blob("failed/upscale/broken.png.json") is not None


def test_report_that_cannot_be_written_sends_the_job_back(bucket, proxy, through_proxy, caplog):
    """A report refused for good is not dropped: the job goes back to Pub/Sub (and, after the
    dead-letter policy's attempts, to the dead-letter topic), and the log says why."""
    event = _upload(bucket, "incoming/upscale/broken.png", b"not an image")
    proxy.add(Rule(UPLOAD, body=REPORT_BODY, status=403))
    with pytest.raises(TransientError, match="cannot write failure report"):
        through_proxy().handle(event, message_id="m-1", attempt=3)
    assert proxy.count(UPLOAD, faults_only=True) == 1  # 403 is not retried in the process
    [line] = [record for record in caplog.records if record.levelname == "ERROR"]
    assert line.getMessage().startswith("job failed, and its failure report could not be written (")
    assert "403" in line.getMessage()
    assert line.fields["error"]["type"] == "ImageDecodeError" and line.fields["attempt"] == 3
    assert line.fields["job_id"] == "m-1" and line.fields["report"].endswith("/failed/upscale/broken.png.json")


def test_pull_worker_acks_a_permanent_fault_once(
    bucket, proxy, through_proxy, subscriber, events_subscription
):
    """Through Pub/Sub: a 403 on the source gives one report and one ack, no redelivery."""
    processor = through_proxy()
    calls = []
    original = processor.handle

    def counting(event, **kwargs):
        if getattr(event, "name", None) == SOURCE:
            calls.append(kwargs.get("message_id"))
        return original(event, **kwargs)

    processor.handle = counting
    proxy.add(Rule(SOURCE_ANY, status=403))
    worker = PullWorker(subscriber, events_subscription, processor)
    thread = threading.Thread(
        target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    try:
        bucket.blob(SOURCE).upload_from_string(png_bytes(), content_type="image/png")
        wait_for(lambda: bucket.get_blob(REPORT), timeout=30, what="the failure report")
        time.sleep(3)  # a nack would be redelivered at once; an ack never
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert len(calls) == 1, calls
    assert proxy.count(SOURCE_ANY) == 1


def test_backfill_keeps_a_connection_per_worker(bucket, proxy, settings):
    # requests keeps 10 connections per host: with --workers 16, each read past the tenth at
    # once opened a connection of its own and dropped it after, with a warning each time (a
    # TLS handshake per object on the real service).
    for i in range(40):
        bucket.blob(f"incoming/upscale/p{i:02}.png").upload_from_string(png_bytes(), content_type="image/png")
    # Each object's reads take a while, so the 16 workers' reads overlap.
    proxy.add(Rule(r"^GET /storage/v1/b/[^/]+/o/", status=None, stall=0.2))
    dropped = []

    class Dropped(logging.Handler):
        def emit(self, record):
            if "pool is full" in record.getMessage():
                dropped.append(record.getMessage())

    handler = Dropped(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").addHandler(handler)
    env = {"STORAGE_EMULATOR_HOST": proxy.url, "PUBSUB_EMULATOR_HOST": settings.pubsub_emulator_host,
           "GOOGLE_CLOUD_PROJECT": settings.project or "imagen-local"}
    try:
        result = CliRunner().invoke(main, ["backfill", f"gs://{bucket.name}/incoming/", "--topic", EVENTS_TOPIC,
                                           "--dry-run", "--workers", "16"], env=env)
    finally:
        logging.getLogger("urllib3.connectionpool").removeHandler(handler)
    assert result.exit_code == 0 and "queued: 40" in result.output, result.output
    assert proxy.count(r"^GET /storage/v1/b/[^/]+/o/") >= 40
    assert dropped == []
