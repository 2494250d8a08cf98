"""The processor against the real storage emulator, with a fake engine (the cog seam):
duplicate checks, generation preconditions, failure reports and error classification."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import io
import json
import logging
import math
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from handlers.clients import storage_client
from handlers.errors import TransientError, Undeliverable
from handlers.events import JobRequest, ObjectEvent
from handlers.processor import (
    FINISH_BASE_SECONDS,
    FINISH_MEGAPIXELS_PER_SECOND,
    MAX_ATTEMPTS,
    MAX_RETRY_SECONDS,
    OUT_OF_MEMORY_ATTEMPTS,
    OUT_OF_MEMORY_RETRY_SECONDS,
    STOPPED_WORKER_LIMIT,
    Outcome,
    Processor,
    last_try,
)
from handlers.results import ResultPublisher
from handlers.storage import Store
from image.errors import DeviceFailed, JobTooLong, ModelError, OutOfDeviceMemory
from scripts.fault_proxy import Rule

from .conftest import PROJECT, png_bytes, wait_for

# Request lines as the fault proxy (tests/conftest.py's `proxy`) sees them, percent-decoded.
UPLOAD = r"^POST /upload/storage/v1/b/"


class FakeEngine:
    """Doubles the size for 'upscale', mirrors otherwise; can fail or interfere on demand."""

    def __init__(self, fail_with: Exception | None = None, before_return=None):
        self.fail_with = fail_with
        self.before_return = before_return
        self.calls = 0
        self.budgets = []

    def run(self, chain, image, params, seed, max_seconds=None, withdrawn=None, started=None):
        if started is not None:  # as image.engine.Engine does, holding the device
            started()
        self.calls += 1
        self.budgets.append(max_seconds() if callable(max_seconds) else max_seconds)
        if self.fail_with:
            raise self.fail_with
        for op in chain:
            image = image.resize((image.width * 2, image.height * 2)) if op == "upscale" else image.transpose(0)
        if self.before_return:
            self.before_return()
        return image

    def output_size(self, chain, size, format):
        for op in chain:
            size = (size[0] * 2, size[1] * 2) if op == "upscale" else size
        return size

    def model_id(self, chain):
        return ",".join(f"fake/{op}@0123" for op in chain)


def _processor(settings, engine, **overrides):
    settings = settings.replace(**overrides) if overrides else settings
    return Processor(engine=engine, store=Store(storage_client(settings)), settings=settings)


def _upload(bucket, name, data=None, metadata=None):
    blob = bucket.blob(name)
    blob.metadata = metadata
    blob.upload_from_string(data if data is not None else png_bytes(), content_type="image/png")
    return blob


def _event(blob):
    blob.reload()
    return ObjectEvent("finalize", blob.bucket.name, blob.name, str(blob.generation),
                       dict(blob.metadata or {}), blob.size, blob.content_type)


def _report(bucket, name):
    blob = bucket.get_blob(name)
    assert blob is not None, f"no failure report at {name}"
    return json.loads(blob.download_as_bytes())


def test_success_writes_output_with_contract_metadata(settings, bucket):
    source = _upload(bucket, "incoming/upscale/holiday/cat.png", metadata={"imagen-params": '{"seed": 7}'})
    outcome = _processor(settings, FakeEngine()).handle(_event(source), message_id="m-1")
    assert outcome.status == "succeeded"
    assert outcome.output == f"gs://{bucket.name}/processed/upscale/holiday/cat.png"
    blob = bucket.get_blob("processed/upscale/holiday/cat.png")
    assert blob.content_type == "image/png"
    assert Image.open(io.BytesIO(blob.download_as_bytes())).size == (128, 96)
    meta = blob.metadata
    assert meta["imagen-source"] == f"gs://{bucket.name}/incoming/upscale/holiday/cat.png"
    assert meta["imagen-source-generation"] == str(source.generation)
    assert meta["imagen-operation"] == "upscale"
    assert json.loads(meta["imagen-params"]) == {"seed": 7}
    assert meta["imagen-model"] == "fake/upscale@0123"
    assert meta["imagen-version"] and float(meta["imagen-seconds"]) >= 0


def test_seconds_leave_out_the_wait_for_the_gpu_behind_another_job(settings, bucket):
    """imagen-seconds, the outcome's and the histogram's: the job's own time. A prefetched job
    waited behind the one on the GPU, and its seconds doubled under any backlog."""

    class Behind(FakeEngine):
        def run(self, *args, started=None, **kwargs):
            time.sleep(1.5)  # the job before it, on the GPU
            return super().run(*args, started=started, **kwargs)

    source = _upload(bucket, "incoming/upscale/queued.png")
    began = time.perf_counter()
    outcome = _processor(settings, Behind()).handle(_event(source))
    elapsed = time.perf_counter() - began
    assert outcome.status == "succeeded" and outcome.seconds < elapsed - 1.4
    assert float(bucket.get_blob("processed/upscale/queued.png").metadata["imagen-seconds"]) == outcome.seconds


def test_a_second_delivery_of_one_output_in_a_worker_waits_for_the_first_and_runs_no_model(settings, bucket):
    """A duplicate delivery (or a job message beside the notification) in the same worker:
    it waited only for the GPU, then ran the model again and found the output at its upload.
    It now waits for the first delivery to end, and is skipped as a duplicate."""
    import threading

    class Slow(FakeEngine):
        def __init__(self):
            super().__init__()
            self.device, self.running = threading.Lock(), threading.Event()

        def run(self, *args, **kwargs):
            with self.device:  # one job at a time, as the real engine
                self.running.set()
                time.sleep(1.0)
                return super().run(*args, **kwargs)

    source = _upload(bucket, "incoming/upscale/twice.png")
    engine = Slow()
    processor = _processor(settings, engine)
    outcomes = {}
    first = threading.Thread(target=lambda: outcomes.setdefault("first", processor.handle(_event(source),
                                                                                         message_id="m-1")))
    first.start()
    assert engine.running.wait(30)
    second = processor.handle(_event(source), message_id="m-2", attempt=1)
    first.join(30)
    assert outcomes["first"].status == "succeeded" and engine.calls == 1
    assert second.status == "skipped" and second.reason.startswith("duplicate: the output already exists")
    assert not processor._outputs  # nothing held once both ended

    # A stopping worker hands the waiting one back rather than wait out the first job.
    stop = threading.Event()
    source = _upload(bucket, "incoming/upscale/again.png")
    engine.running.clear()
    first = threading.Thread(target=lambda: processor.handle(_event(source), message_id="m-3"))
    first.start()
    assert engine.running.wait(30)
    stop.set()
    with pytest.raises(TransientError, match="handed back while another delivery of the same output ran"):
        processor.handle(_event(source), message_id="m-4", attempt=1, withdrawn=stop.is_set)
    first.join(30)
    assert engine.calls == 2 and not processor._outputs


def test_redelivery_is_acked_without_gpu_work(settings, bucket):
    source = _upload(bucket, "incoming/upscale/a.png")
    engine = FakeEngine()
    processor = _processor(settings, engine)
    assert processor.handle(_event(source)).status == "succeeded"
    first = bucket.get_blob("processed/upscale/a.png").generation
    again = processor.handle(_event(source))
    assert again.status == "skipped" and "duplicate" in again.reason
    assert engine.calls == 1
    assert bucket.get_blob("processed/upscale/a.png").generation == first


def test_new_parameters_redo_the_job(settings, bucket):
    source = _upload(bucket, "incoming/comic/a.png")
    processor = _processor(settings, FakeEngine())
    processor.handle(_event(source))
    source.metadata = {"imagen-params": '{"format": "png", "seed": 3}'}
    source.patch()
    assert processor.handle(_event(source)).status == "succeeded"


def test_newer_generation_replaces_and_older_never_overwrites(settings, bucket):
    old = _upload(bucket, "incoming/upscale/v.png", png_bytes(seed=1))
    old_event = _event(old)
    new = _upload(bucket, "incoming/upscale/v.png", png_bytes(seed=2))
    new_event = _event(new)
    assert int(new_event.generation) > int(old_event.generation)
    processor = _processor(settings, FakeEngine())
    assert processor.handle(new_event).status == "succeeded"
    written = bucket.get_blob("processed/upscale/v.png")
    late = processor.handle(old_event)
    assert late.status == "skipped" and "newer generation" in late.reason
    after = bucket.get_blob("processed/upscale/v.png")
    assert after.generation == written.generation
    assert after.metadata["imagen-source-generation"] == new_event.generation


def test_a_late_event_for_an_older_generation_never_replaces_the_newer_ones_report(settings, bucket):
    """Both generations with bad parameters, the newer reported first: the older's late
    event replaced that report with its own, so `submit --wait` for the newer one timed out
    and backfill queued it again."""
    old = _event(_upload(bucket, "incoming/upscale/c.png", metadata={"imagen-params": '{"steps": -1}'}))
    new = _event(_upload(bucket, "incoming/upscale/c.png", metadata={"imagen-params": '{"steps": -2}'}))
    processor = _processor(settings, FakeEngine())
    assert processor.handle(new).status == "failed"
    late = processor.handle(old)
    assert late.status == "skipped" and f"generation {new.generation} now" in late.reason
    assert _report(bucket, "failed/upscale/c.png.json")["generation"] == new.generation


def test_a_job_message_for_an_older_generation_never_replaces_the_newer_ones_report(settings, bucket):
    """Reports are per path: a job message naming an older generation (a backfill listed it
    just before a new upload) that failed wrote over the newer generation's report."""
    old = _upload(bucket, "uploads/d.png", metadata={"imagen-params": '{"steps": -1}'})
    old_generation = str(old.generation)
    new = _upload(bucket, "uploads/d.png", metadata={"imagen-params": '{"steps": -2}'})
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    failed = processor.handle(JobRequest(bucket.name, "uploads/d.png", "upscale", {"steps": -2},
                                         generation=str(new.generation)), message_id="m-new")
    assert failed.status == "failed"
    late = processor.handle(JobRequest(bucket.name, "uploads/d.png", "upscale", {"steps": -1},
                                       generation=old_generation), message_id="m-old")
    assert late.status == "skipped" and f"about generation {new.generation}, newer" in late.reason
    report = bucket.get_blob("failed/upscale/uploads/d.png.json")
    assert json.loads(report.download_as_bytes())["generation"] == str(new.generation)
    assert report.metadata == {"imagen-source": f"gs://{bucket.name}/uploads/d.png",
                               "imagen-source-generation": str(new.generation), "imagen-message-id": "m-new"}
    # The same generation's report, or an older one's, is replaced.
    again = processor.handle(JobRequest(bucket.name, "uploads/d.png", "upscale", {"steps": -3},
                                        generation=str(new.generation)))
    assert again.status == "failed" and _report(bucket, "failed/upscale/uploads/d.png.json")["params"] == {"steps": -3}


def test_a_report_naming_a_generation_never_reached_or_another_source_is_replaced(settings, bucket):
    """What a report names is trusted only for its own source, and only where the source got
    that far: a job message's typo'd generation (a report that it "does not exist") kept every
    real failure of the object from being reported; and two sources routed to one report
    place (a job message for one folder's object, an upload in another's) are not generations
    of one another."""
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    source = _upload(bucket, "uploads/typo.png", metadata={"imagen-params": '{"steps": -1}'})
    ahead = str(source.generation + 10**9)
    typo = processor.handle(JobRequest(bucket.name, "uploads/typo.png", "upscale", {}, generation=ahead))
    assert typo.status == "failed" and typo.error["message"].endswith(f"does not exist at generation {ahead}")
    real = processor.handle(JobRequest(bucket.name, "uploads/typo.png", "upscale", {"steps": -1},
                                       generation=str(source.generation)))
    assert real.status == "failed"
    assert _report(bucket, "failed/upscale/uploads/typo.png.json")["generation"] == str(source.generation)

    older = _upload(bucket, "incoming/remove-background/p.png")
    newer = _event(_upload(bucket, "incoming/upscale/p.png", metadata={"imagen-params": '{"steps": -1}'}))
    assert processor.handle(newer).status == "failed"
    other = processor.handle(JobRequest(bucket.name, older.name, "upscale", {"steps": -2},
                                        generation=str(older.generation)))
    assert other.status == "failed"
    assert _report(bucket, "failed/upscale/p.png.json")["source"] == f"gs://{bucket.name}/{older.name}"


def test_a_report_written_meanwhile_is_looked_at_again_not_overwritten(settings, bucket):
    """Between the look at the report's place and the write, a newer generation's report
    landed: the write's precondition fails, and the second look finds it."""
    old = _upload(bucket, "incoming/upscale/e.png", metadata={"imagen-params": '{"steps": -1}'})
    old_event = _event(old)
    new_event = _event(_upload(bucket, "incoming/upscale/e.png", metadata={"imagen-params": '{"steps": -2}'}))
    processor = _processor(settings, FakeEngine())
    processor._newer_generation = lambda job: None  # the live generation looked up before the upload
    stat = processor._store.stat

    def newer_report_lands(bucket_name, name, **kwargs):
        state = stat(bucket_name, name, **kwargs)
        if name.startswith("failed/") and state is None:
            assert _processor(settings, FakeEngine()).handle(new_event).status == "failed"
        return state

    processor._store.stat = newer_report_lands
    late = processor.handle(old_event)
    assert late.status == "skipped" and f"about generation {new_event.generation}" in late.reason
    assert _report(bucket, "failed/upscale/e.png.json")["generation"] == new_event.generation


def test_a_late_event_on_a_bucket_keeping_versions_is_superseded_not_run(settings, gcs):
    """Where a bucket keeps noncurrent versions, an older generation can still be read: its
    late event ran the model on content the user had replaced and wrote its output."""
    versioned = gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    versioned.versioning_enabled = True
    versioned.patch()
    old_event = _event(_upload(versioned, "incoming/upscale/f.png", png_bytes(seed=1)))
    new_event = _event(_upload(versioned, "incoming/upscale/f.png", png_bytes(seed=2)))
    engine = FakeEngine()
    late = _processor(settings, engine).handle(old_event)
    assert late.status == "skipped" and "no longer the live version" in late.reason
    assert engine.calls == 0 and versioned.get_blob("processed/upscale/f.png") is None
    assert _processor(settings, engine).handle(new_event).status == "succeeded"


def test_older_output_is_replaced_by_newer_generation(settings, bucket):
    processor = _processor(settings, FakeEngine())
    first = _event(_upload(bucket, "incoming/upscale/w.png", png_bytes(seed=1)))
    processor.handle(first)
    second = _event(_upload(bucket, "incoming/upscale/w.png", png_bytes(seed=2)))
    assert processor.handle(second).status == "succeeded"
    meta = bucket.get_blob("processed/upscale/w.png").metadata
    assert meta["imagen-source-generation"] == second.generation


def test_deleted_source_is_skipped_as_superseded(settings, bucket):
    source = _upload(bucket, "incoming/upscale/gone.png")
    event = _event(source)
    source.delete()
    outcome = _processor(settings, FakeEngine()).handle(event)
    assert outcome.status == "skipped" and "no longer exists" in outcome.reason


@pytest.mark.parametrize(
    "name, data, metadata, error_type, report_name",
    [
        ("incoming/upscale/bad.png", b"\x89PNG\r\n\x1a\n truncated", None, "ImageDecodeError",
         "failed/upscale/bad.png.json"),
        ("incoming/upscale/p.png", None, {"imagen-params": '{"steps": -4}'}, "InvalidParameter",
         "failed/upscale/p.png.json"),
        ("incoming/upscale/j.png", None, {"imagen-params": "{not json"}, "InvalidParameter",
         "failed/upscale/j.png.json"),
        ("incoming/sharpen/s.png", None, None, "UnknownOperation", "failed/sharpen/s.png.json"),
        ("incoming/loose.png", None, None, "InvalidParameter", "failed/_none/loose.png.json"),
    ],
)
def test_bad_input_gets_a_failure_report(settings, bucket, name, data, metadata, error_type, report_name):
    source = _upload(bucket, name, data, metadata)
    engine = FakeEngine()
    outcome = _processor(settings, engine).handle(_event(source))
    assert outcome.status == "failed"
    report = _report(bucket, report_name)
    assert report["source"] == f"gs://{bucket.name}/{name}"
    assert report["generation"] == str(source.generation)
    assert report["error"]["type"] == error_type and report["error"]["message"]
    assert set(report) == {"source", "generation", "operation", "params", "error", "attempt", "time"}
    assert engine.calls == 0
    assert not list(bucket.list_blobs(prefix="processed/"))


def test_oversize_source_fails_before_download(settings, bucket):
    source = _upload(bucket, "incoming/upscale/big.png", png_bytes((200, 200)))
    outcome = _processor(settings, FakeEngine(), max_bytes=1000).handle(_event(source))
    assert outcome.status == "failed" and outcome.error["type"] == "ImageTooLarge"


def test_a_gzip_encoded_upload_is_unpacked_under_the_size_limit(settings, bucket):
    # `gcloud storage cp -Z` stores files gzip-compressed; the client library would unpack
    # one whole, whatever it unpacks to, before any size check.
    def upload_gzipped(name, data):
        blob = bucket.blob(name)
        blob.content_encoding = "gzip"
        blob.upload_from_string(gzip.compress(data), content_type="image/png")
        return blob

    engine = FakeEngine()
    png = png_bytes((64, 48))
    outcome = _processor(settings, engine).handle(_event(upload_gzipped("incoming/upscale/z.png", png)))
    assert outcome.status == "succeeded"
    output = Image.open(io.BytesIO(bucket.get_blob("processed/upscale/z.png").download_as_bytes()))
    assert engine.calls == 1 and output.size == (128, 96)
    bomb = upload_gzipped("incoming/upscale/bomb.png", png + bytes(10_000_000))  # 10 MB of zeros: ~10 kB stored
    outcome = _processor(settings, engine, max_bytes=1_000_000).handle(_event(bomb))
    assert outcome.status == "failed" and outcome.error["type"] == "ImageTooLarge"
    assert "unpacks to more than 1000000 bytes" in outcome.error["message"]
    assert engine.calls == 1


def test_parameters_cloud_storage_could_not_keep_fail_before_the_gpu(settings, bucket):
    # imagen-params escapes what is not ASCII (6 bytes a character), and Cloud Storage keeps
    # 4 KiB a metadata value: 700 Chinese characters are 4.2 kB (within the 8 KiB of all the
    # metadata together, which is all the check counted once).
    params = {"prompt": "\u732b" * 700}
    engine = FakeEngine()
    source = _upload(bucket, "incoming/upscale/long-prompt.png", metadata={"imagen-params": json.dumps(params)})
    outcome = _processor(settings, engine).handle(_event(source))
    assert outcome.status == "failed" and outcome.error["type"] == "InvalidParameter"
    assert "more than the 4096 Cloud Storage keeps for one value" in outcome.error["message"]
    assert "shorten the prompts" in outcome.error["message"] and engine.calls == 0
    # The longest prompts in ASCII fit, and so do 600 such characters.
    for params in ({"prompt": "a" * 1000, "negative_prompt": "b" * 1000}, {"prompt": "\u732b" * 600}):
        source = _upload(bucket, "incoming/upscale/long-prompt.png", metadata={"imagen-params": json.dumps(params)})
        assert _processor(settings, engine).handle(_event(source)).status == "succeeded"


def test_unsafe_name_report_stays_under_the_failure_prefix(settings, bucket):
    source = _upload(bucket, "incoming/upscale/../../escape.png")
    outcome = _processor(settings, FakeEngine()).handle(_event(source))
    assert outcome.status == "failed" and outcome.error["type"] == "UnsafeObjectName"
    names = [blob.name for blob in bucket.list_blobs()]
    reports = [name for name in names if name.startswith("failed/upscale/_unsafe/")]
    assert len(reports) == 1 and set(names) == {source.name, reports[0]}


def test_event_for_our_own_output_writes_nothing(settings, bucket, caplog):
    processor = _processor(settings, FakeEngine())
    processor.handle(_event(_upload(bucket, "incoming/upscale/o.png")))
    before = {blob.name: blob.generation for blob in bucket.list_blobs()}
    output = bucket.get_blob("processed/upscale/o.png")
    assert processor.handle(_event(output)).status == "ignored"
    # Even a copy of an output dropped back into incoming/ is recognised by its metadata.
    bucket.copy_blob(output, bucket, "incoming/upscale/o-copy.png")
    copy = _event(bucket.get_blob("incoming/upscale/o-copy.png"))
    with caplog.at_level(logging.INFO, logger="imagen.processor"):
        assert processor.handle(copy).status == "ignored"
    ignored = [r for r in caplog.records if r.getMessage().startswith("event ignored")]
    assert ignored[-1].fields["source"] == f"gs://{bucket.name}/incoming/upscale/o-copy.png"  # which upload
    assert ignored[-1].fields["generation"] == copy.generation and ignored[-1].fields["event"] == "finalize"
    after = {blob.name: blob.generation for blob in bucket.list_blobs()}
    assert {k: v for k, v in after.items() if k != "incoming/upscale/o-copy.png"} == before


def test_operation_served_elsewhere_is_acked(settings, bucket):
    source = _upload(bucket, "incoming/comic/a.png")
    engine = FakeEngine()
    outcome = _processor(settings, engine, operations=("upscale",)).handle(_event(source))
    assert outcome.status == "skipped" and engine.calls == 0


def test_filtered_subscription_reports_what_it_cannot_serve(settings, bucket):
    """On a deployment whose subscriptions are filtered by folder (Terraform's default), an
    upload whose imagen-operation metadata names another pool's operation reached only this
    pool: a report says where to put it, instead of an ack that loses it."""
    source = _upload(bucket, "incoming/upscale/moved.png", metadata={"imagen-operation": "comic"})
    engine = FakeEngine()
    processor = _processor(settings, engine, operations=("upscale",), filtered_subscription=True)
    outcome = processor.handle(_event(source))
    assert outcome.status == "failed" and engine.calls == 0
    report = _report(bucket, "failed/comic/moved.png.json")
    assert report["error"]["type"] == "OperationNotServed"
    assert "upload it under incoming/comic/ instead" in report["error"]["message"]
    assert "this worker pool (upscale) does not serve" in report["error"]["message"]
    # A chain gets its own advice; the pool's own operations run as before.
    chained = _upload(bucket, "incoming/upscale/chained.png",
                      metadata={"imagen-operation": "remove-background,upscale"})
    assert processor.handle(_event(chained)).status == "failed"
    message = _report(bucket, "failed/remove-background,upscale/chained.png.json")["error"]["message"]
    assert "upload it under incoming/remove-background,upscale/ instead, or publish a job message" in message
    assert "operation=remove-background,upscale, where a worker pool serves the whole chain" in message
    own = _upload(bucket, "incoming/upscale/own.png")
    assert processor.handle(_event(own)).status == "succeeded" and engine.calls == 1


def test_unfiltered_deployment_reports_once_what_no_pool_serves(settings, bucket):
    """Eventarc, or subscriptions without filters: every pool receives every job. One that
    none of the deployment's pools serves (an operation left out, a chain) gets one report,
    from the pool of the first deployed operation; the others skip it, as they skip the jobs
    of another pool."""
    deployed = {"deployed_operations": ("upscale", "comic")}
    engines = {op: FakeEngine() for op in deployed["deployed_operations"]}
    pools = {op: _processor(settings, engines[op], operations=(op,), **deployed) for op in engines}
    for name, operation in (("incoming/enhance/left-out.png", "enhance"), ("incoming/comic,upscale/chain.png", "comic,upscale")):
        event = _event(_upload(bucket, name))
        assert pools["upscale"].handle(event).status == "failed"
        skipped = pools["comic"].handle(event)
        assert skipped.status == "skipped" and "the upscale pool reports it" in skipped.reason
        report = _report(bucket, f"failed/{operation}/{name.rsplit('/', 1)[1]}.json")
        assert report["error"]["type"] == "OperationNotDeployed"
        assert "no worker pool of this deployment serves" in report["error"]["message"]
    # Another pool's job is skipped without a report (counted "elsewhere", not with this
    # pool's own skips: N - 1 of them per job); its own pool runs it.
    from prometheus_client import REGISTRY

    def counted(status):
        return REGISTRY.get_sample_value("imagen_jobs_total", {"operation": "comic", "status": status}) or 0.0

    before = {status: counted(status) for status in ("elsewhere", "skipped")}
    other = _event(_upload(bucket, "incoming/comic/mine.png"))
    elsewhere = pools["upscale"].handle(other)
    assert elsewhere.status == "skipped" and elsewhere.elsewhere
    assert (counted("elsewhere") - before["elsewhere"], counted("skipped") - before["skipped"]) == (1, 0)
    assert pools["comic"].handle(other).status == "succeeded"
    assert engines["upscale"].calls == 0 and engines["comic"].calls == 1
    assert not bucket.get_blob("failed/comic/mine.png.json")


def test_unfiltered_deployment_reports_a_bad_operation_once_and_refuses_a_job_once(settings, bucket):
    """Where every pool receives every job, a job naming no valid operation (a typo'd folder,
    an upload with no folder) is reported by the first deployed operation's pool only, and a
    job message the allowlist refuses is dead-lettered only by the pool that would run it."""
    deployed = {"deployed_operations": ("upscale", "comic"),
                "allowed_buckets": frozenset({"partner-bucket", bucket.name})}
    pools = {op: _processor(settings, FakeEngine(), operations=(op,), **deployed) for op in ("upscale", "comic")}
    for name, report_name in (("incoming/upscal/typo.png", "failed/upscal/typo.png.json"),
                              ("incoming/enhance,comic,enhance/twice.png", "failed/enhance,comic,enhance/twice.png.json")):
        event = _event(_upload(bucket, name, metadata={"imagen-params": '{"steps": 5}'}))
        skipped = pools["comic"].handle(event)
        assert skipped.status == "skipped" and "names no valid operation; the upscale pool reports it" in skipped.reason
        assert pools["upscale"].handle(event).status == "failed"
        assert _report(bucket, report_name)["params"] == {"steps": 5}  # the object, as uploaded
    refused = JobRequest("elsewhere-bucket", "uploads/p.png", "comic", {})  # never looked at
    assert pools["upscale"].handle(refused).status == "skipped"  # not its job: acked, not refused
    with pytest.raises(Undeliverable, match="IMAGEN_ALLOWED_BUCKETS"):
        pools["comic"].handle(refused)
    # Refused and misnamed: the refusal is what the reporting pool says (fixing the name alone
    # would not help).
    with pytest.raises(Undeliverable, match="IMAGEN_ALLOWED_BUCKETS"):
        pools["upscale"].handle(JobRequest("elsewhere-bucket", "uploads/p.png", "upscal", {}))
    # Parameters JSON cannot hold stay the text they were: a report is strict JSON.
    nan = _event(_upload(bucket, "incoming/upscal/nan.png", metadata={"imagen-params": '{"steps": NaN}'}))
    assert pools["upscale"].handle(nan).status == "failed"
    assert _report(bucket, "failed/upscal/nan.png.json")["params"] == '{"steps": NaN}'
    # A job message's JSON may hold them too (Python reads NaN): still text in the report.
    request = JobRequest(bucket.name, "incoming/upscal/nan-job.png", "upscal", {"steps": math.nan})
    assert pools["upscale"].handle(request).status == "failed"
    assert _report(bucket, "failed/upscal/nan-job.png.json")["params"] == '{"steps": NaN}'


def test_a_report_clips_what_a_message_made_up(settings, bucket):
    # A 100,000-character operation: the report is written (under _invalid) and stays small.
    _upload(bucket, "uploads/long.png")
    request = JobRequest(bucket.name, "uploads/long.png", "x" * 100_000, {})
    outcome = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name})).handle(request)
    assert outcome.status == "failed"
    [blob] = [b for b in bucket.list_blobs(prefix="failed/") if b.name.endswith("long.png.json")]
    assert blob.size < 20_000
    report = json.loads(blob.download_as_bytes())
    assert report["operation"].endswith("(96000 more characters)") and report["source"].endswith("uploads/long.png")


def test_job_message_with_explicit_output(settings, bucket):
    _upload(bucket, "uploads/p.png")
    request = JobRequest(bucket.name, "uploads/p.png", "upscale", {"format": "webp"},
                         f"gs://{bucket.name}/results/p.webp")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    outcome = processor.handle(request)
    assert outcome.status == "succeeded" and outcome.output.endswith("/results/p.webp")
    blob = bucket.get_blob("results/p.webp")
    assert blob.content_type == "image/webp" and blob.metadata["imagen-source-generation"]
    # An output named as an image format imagen does not write got PNG data under that name.
    gif = JobRequest(bucket.name, "uploads/p.png", "upscale", {}, f"gs://{bucket.name}/results/p.gif")
    outcome = processor.handle(gif)
    assert outcome.status == "failed" and outcome.error == {
        "type": "InvalidParameter",
        "message": "output 'p.gif' names a .gif file, which imagen does not write: name it .png, .webp or .jpg"}
    assert bucket.get_blob("results/p.gif") is None
    clash = JobRequest(bucket.name, "uploads/p.png", "upscale", {"format": "jpeg"}, f"gs://{bucket.name}/results/q.png")
    assert processor.handle(clash).error["message"].startswith(
        "output 'q.png' names a png file but the format parameter is jpeg: make them agree")


def test_an_explicit_output_replaces_imagens_own_but_never_a_users_object(settings, bucket):
    _upload(bucket, "uploads/p.png")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    # The user's own file: refused with a report, the file untouched.
    bucket.blob("results/mine.png").upload_from_string(b"keep me", content_type="image/png")
    mine = JobRequest(bucket.name, "uploads/p.png", "upscale", {}, f"gs://{bucket.name}/results/mine.png")
    outcome = processor.handle(mine)
    assert outcome.status == "failed" and "not written by imagen" in outcome.reason
    assert bucket.get_blob("results/mine.png").download_as_bytes() == b"keep me"
    assert bucket.get_blob("failed/upscale/uploads/p.png.json") is not None
    # An earlier imagen output at that name: replaced when the job asks for other parameters.
    ours = JobRequest(bucket.name, "uploads/p.png", "upscale", {}, f"gs://{bucket.name}/results/ours.png")
    assert processor.handle(ours).status == "succeeded"
    again = JobRequest(bucket.name, "uploads/p.png", "upscale", {"seed": 7}, f"gs://{bucket.name}/results/ours.png")
    assert processor.handle(again).status == "succeeded"
    assert '"seed":7' in bucket.get_blob("results/ours.png").metadata["imagen-params"]


def test_job_message_format_follows_the_output_extension(settings, bucket):
    _upload(bucket, "uploads/q.png")
    request = JobRequest(bucket.name, "uploads/q.png", "comic", {}, f"gs://{bucket.name}/results/q.jpg")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    assert processor.handle(request).status == "succeeded"
    assert bucket.get_blob("results/q.jpg").content_type == "image/jpeg"


def _jobs_counted(status):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("imagen_jobs_total", {"operation": "upscale", "status": status}) or 0


def test_job_message_from_a_bucket_not_allowed_is_refused_unread(settings, bucket):
    """Refused before any read; its report would land in a bucket outside the allowlist, so
    nothing is written there and the message is left to the dead-letter topic."""
    _upload(bucket, "uploads/p.png")
    engine = FakeEngine()
    before = _jobs_counted("refused"), _jobs_counted("retried")
    processor = _processor(settings, engine, allowed_buckets=frozenset({"partner-bucket"}))
    with pytest.raises(Undeliverable, match=f"may not read gs://{bucket.name}: it is not in IMAGEN_ALLOWED_BUCKETS "
                                            r"\(partner-bucket\)") as raised:
        processor.handle(JobRequest(bucket.name, "uploads/p.png", "upscale", {}))
    assert [blob.name for blob in bucket.list_blobs()] == ["uploads/p.png"]
    assert engine.calls == 0
    # Counted by whoever moves it (refused) or cannot (retried): the worker, serve; here neither.
    assert (_jobs_counted("refused"), _jobs_counted("retried")) == before and raised.value.operation == "upscale"


def test_job_message_with_no_allowlist_set_is_reported_saying_what_to_set(settings, bucket):
    """DESIGN.md: with IMAGEN_ALLOWED_BUCKETS unset, job messages are refused with a failure
    report that says so, where the sender looks for its result; it was a dead letter the
    sender never saw (`imagen submit`-style waits timed out)."""
    _upload(bucket, "uploads/p.png")
    engine = FakeEngine()
    outcome = _processor(settings, engine).handle(JobRequest(bucket.name, "uploads/p.png", "upscale", {}),
                                                  attempt=1)
    assert outcome.status == "failed" and engine.calls == 0
    report = _report(bucket, "failed/upscale/uploads/p.png.json")
    assert report["error"] == {"type": "SourceNotAllowed", "message": (
        "job messages are refused here: IMAGEN_ALLOWED_BUCKETS is unset; set it to the buckets job messages "
        "may read (Terraform: allowed_buckets)")}
    assert sorted(blob.name for blob in bucket.list_blobs()) == ["failed/upscale/uploads/p.png.json", "uploads/p.png"]
    # The same message again (Pub/Sub delivers at least once) is answered as the first was, over
    # its own refusal: it was dead-lettered for the report the first delivery wrote.
    again = _processor(settings, engine).handle(JobRequest(bucket.name, "uploads/p.png", "upscale", {}), attempt=2)
    assert again.status == "failed" and again.error["type"] == "SourceNotAllowed"
    assert bucket.get_blob("failed/upscale/uploads/p.png.json").metadata == {"imagen-refusal": "job messages are "
                                                                                               "not enabled"}
    # Never over a report already there (the upload's own reason, a newer generation's): it
    # replaced it unguarded. The dead-letter topic keeps the message.
    _upload(bucket, "incoming/upscale/broken.png", b"not a picture")
    assert _processor(settings, engine).handle(_event(bucket.get_blob("incoming/upscale/broken.png"))).status == \
        "failed"
    with pytest.raises(Undeliverable, match="IMAGEN_ALLOWED_BUCKETS is unset.*no failure report written: gs://.*"
                                            "already holds a failure report: left as it is; the message goes to "
                                            "the dead-letter topic"):
        _processor(settings, engine).handle(JobRequest(bucket.name, "incoming/upscale/broken.png", "upscale", {},
                                                       generation="1"), attempt=1)
    assert _report(bucket, "failed/upscale/broken.png.json")["error"]["type"] == "ImageDecodeError"
    bucket.delete_blob("failed/upscale/broken.png.json")
    bucket.delete_blob("incoming/upscale/broken.png")
    # A bucket that cannot take the report (here: none by that name): the dead-letter topic keeps it.
    before = _jobs_counted("refused"), _jobs_counted("retried")
    with pytest.raises(Undeliverable, match="IMAGEN_ALLOWED_BUCKETS is unset.*no failure report written: cannot "
                                            "write failure report gs://imagen-no-such-bucket-"):
        _processor(settings, engine).handle(
            JobRequest(f"imagen-no-such-bucket-{uuid.uuid4().hex[:8]}", "a.png", "upscale", {}), attempt=1)
    assert (_jobs_counted("refused"), _jobs_counted("retried")) == before
    # Never a report in a bucket of code the workers run, whatever a message names.
    for code in ({"compile_cache": f"gs://{bucket.name}/kernels"}, {"model_mirror": f"gs://{bucket.name}/models"}):
        with pytest.raises(Undeliverable, match="no failure report: the message goes to the dead-letter topic"):
            _processor(settings, engine, **code).handle(JobRequest(bucket.name, "uploads/p.png", "upscale", {}),
                                                        attempt=1)
    assert sorted(blob.name for blob in bucket.list_blobs()) == ["failed/upscale/uploads/p.png.json", "uploads/p.png"]


def test_a_notification_from_a_bucket_no_job_may_read_is_refused_unread(settings, bucket, gcs):
    """Notifications are told apart by attributes any publisher on the topic can set: one
    naming a bucket outside a set allowlist, or the compile cache's (code the workers run),
    read it and wrote the output where the deployment never meant."""
    other = gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    forged = _event(_upload(other, "incoming/upscale/private.png"))
    engine = FakeEngine()
    with pytest.raises(Undeliverable, match="notifications may not read gs://.*list every bucket whose notifications"):
        _processor(settings, engine, allowed_buckets=frozenset({bucket.name})).handle(forged)
    with pytest.raises(Undeliverable, match="holds code the workers run"):
        _processor(settings, engine, compile_cache=f"gs://{other.name}/compiled").handle(forged)
    assert engine.calls == 0 and [blob.name for blob in other.list_blobs()] == ["incoming/upscale/private.png"]
    # A listed bucket's, and any where no list is set, as before.
    assert _processor(settings, engine, allowed_buckets=frozenset({other.name})).handle(forged).status == "succeeded"


def test_job_message_refused_for_its_parameters_is_reported_in_an_allowed_bucket(settings, bucket):
    _upload(bucket, "uploads/p.png")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    outcome = processor.handle(JobRequest(bucket.name, "uploads/p.png", "upscale", {"steps": "many"}))
    assert outcome.status == "failed"
    assert _report(bucket, "failed/upscale/uploads/p.png.json")["error"]["type"] == "InvalidParameter"


def test_job_message_for_a_missing_object_is_reported_not_skipped(settings, bucket):
    """An upload deleted before its event is skipped; a job message naming an object that
    does not exist is the sender's mistake: a failure report says so."""
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    outcome = processor.handle(JobRequest(bucket.name, "uploads/typo.png", "upscale", {}))
    assert outcome.status == "failed"
    report = _report(bucket, "failed/upscale/uploads/typo.png.json")["error"]
    assert report == {"type": "StoragePermanentError", "message": f"gs://{bucket.name}/uploads/typo.png does not exist"}
    # The same with a generation named: it was skipped in silence, as a replaced source is.
    outcome = processor.handle(JobRequest(bucket.name, "uploads/typo2.png", "upscale", {}, generation="123"))
    assert outcome.status == "failed" and outcome.error["type"] == "StoragePermanentError"
    # A generation since replaced is superseded, as for a notification: skipped.
    source = _upload(bucket, "uploads/kept.png", png_bytes(seed=1))
    old_generation = str(source.generation)
    _upload(bucket, "uploads/kept.png", png_bytes(seed=2))
    outcome = processor.handle(JobRequest(bucket.name, "uploads/kept.png", "upscale", {}, generation=old_generation))
    assert outcome.status == "skipped" and "no longer exists" in outcome.reason
    # A generation newer than the live one never was: reported too.
    later = str(int(old_generation) + 10**9)
    outcome = processor.handle(JobRequest(bucket.name, "uploads/kept.png", "upscale", {}, generation=later))
    assert outcome.status == "failed" and outcome.error["message"].endswith(f"does not exist at generation {later}")


def test_a_job_messages_source_replaced_as_its_job_starts_is_retried_for_its_new_generation(settings, bucket):
    """Without a generation a job message means the live object: replaced between the look-up
    and the download, it was skipped, and no event would bring the new generation to it."""
    _upload(bucket, "uploads/moving.png", png_bytes(seed=1))
    _upload(bucket, "uploads/moving-too.png", png_bytes(seed=1))
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    read = processor._store.read_source

    def replaced_first(bucket_name, name, *args, **kwargs):
        processor._store.read_source = read
        _upload(bucket, name, png_bytes(seed=2))
        return read(bucket_name, name, *args, **kwargs)

    processor._store.read_source = replaced_first
    with pytest.raises(TransientError, match="replaced as the job started"):
        processor.handle(JobRequest(bucket.name, "uploads/moving.png", "upscale", {}), attempt=1)
    assert processor.handle(JobRequest(bucket.name, "uploads/moving.png", "upscale", {}),
                            attempt=2).status == "succeeded"
    # Replaced on the last try: a report, not a skip (no event would bring the job back).
    processor._store.read_source = replaced_first
    outcome = processor.handle(JobRequest(bucket.name, "uploads/moving-too.png", "upscale", {}),
                               attempt=MAX_ATTEMPTS)
    assert outcome.status == "failed" and "replaced as the job started" in outcome.error["message"]


def test_a_refused_job_message_naming_a_generation_looks_at_nothing_in_that_bucket(settings, bucket, gcs):
    """Its refusal (a dead letter) comes before anything: the check for a newer generation,
    made before a report, looked at the object in the bucket it may not read, skipped the
    message if one was there, and said its generation in the reason."""
    other = gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    _upload(other, "private.png")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    with pytest.raises(Undeliverable, match="IMAGEN_ALLOWED_BUCKETS"):
        processor.handle(JobRequest(other.name, "private.png", "upscale", {}, generation="1"))


def test_transient_faults_retry_then_report_on_the_last_attempt(settings, bucket):
    source = _upload(bucket, "incoming/upscale/t.png")
    processor = _processor(settings, FakeEngine(fail_with=ModelError("CUDA error: unspecified launch failure")))
    with pytest.raises(TransientError):
        processor.handle(_event(source), attempt=1)
    with pytest.raises(TransientError):
        processor.handle(_event(source))  # no attempt number and no time: the transport's to bound
    with pytest.raises(TransientError):
        processor.handle(_event(source), attempt=MAX_ATTEMPTS - 1)
    outcome = processor.handle(_event(source), attempt=MAX_ATTEMPTS)
    assert outcome.status == "failed"
    assert _report(bucket, "failed/upscale/t.png.json")["attempt"] == MAX_ATTEMPTS


def test_every_line_of_a_job_carries_the_fields_users_filter_on(settings, bucket, caplog):
    # One Cloud Logging filter (operation, message id, attempt) finds each line of a job,
    # a failure found before the job is planned included.
    bad = _upload(bucket, "incoming/upscale/p.png", metadata={"imagen-params": '{"steps": 500}'})
    flaky = _upload(bucket, "incoming/upscale/t.png")
    with caplog.at_level(logging.INFO, logger="imagen.processor"):
        _processor(settings, FakeEngine()).handle(_event(bad), message_id="m-1", attempt=2)
        with pytest.raises(TransientError):
            _processor(settings, FakeEngine(fail_with=ModelError("CUDA error"))).handle(
                _event(flaky), message_id="m-2", attempt=1)
    lines = {record.getMessage().split(":")[0]: record.fields for record in caplog.records}
    assert set(lines) == {"job failed", "job started", "job on the GPU", "job failed on this instance"}
    for fields in lines.values():
        assert {"job_id", "message_id", "source", "generation", "operation", "attempt"} <= set(fields)
        assert fields["operation"] == "upscale" and fields["job_id"] == fields["message_id"]
    assert lines["job failed"]["attempt"] == 2 and lines["job failed"]["error"]["type"] == "InvalidParameter"
    assert lines["job failed on this instance"]["error"] == {"type": "ModelError", "message": "CUDA error"}


def test_a_model_fault_on_its_last_try_is_one_error_line(settings, bucket, caplog):
    """'job failed on this instance' (ERROR) came before the report's 'job failed' (ERROR) on
    the last try too: two notifications of the errors alert, the first reading as a retry."""
    source = _upload(bucket, "incoming/upscale/last.png")
    with caplog.at_level(logging.INFO, logger="imagen.processor"):
        outcome = _processor(settings, FakeEngine(fail_with=ModelError("a model fault"))).handle(
            _event(source), message_id="m-9", attempt=MAX_ATTEMPTS)
    assert outcome.status == "failed"
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("job failed: a model fault"), errors


def test_the_engines_lines_carry_the_generation_a_job_message_did_not_name(settings, bucket):
    """The job's context kept the generation as the message brought it: a job message's
    engine and watchdog lines (the GPU's CRITICAL one too) said generation null while the
    processor's said the real one."""
    from handlers.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    engine_log = logging.getLogger("imagen.engine")
    engine_log.addHandler(handler)
    source = _upload(bucket, "uploads/g.png")
    try:
        engine = FakeEngine(before_return=lambda: engine_log.warning("an engine line"))
        processor = _processor(settings, engine, allowed_buckets=frozenset({bucket.name}))
        assert processor.handle(JobRequest(bucket.name, "uploads/g.png", "comic", {}), message_id="j-7").status == \
            "succeeded"
    finally:
        engine_log.removeHandler(handler)
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"] == "an engine line" and line["generation"] == str(source.generation)
    assert line["operation"] == "comic" and line["message_id"] == "j-7"


def test_out_of_gpu_memory_gets_a_second_delivery_then_a_report(settings, bucket, caplog):
    """Another instance (or this one later) may have the memory; a second run out of memory
    settles it, unless a background compile held memory, when the usual attempts remain.
    Its lines are warnings: mostly the input's size, not a fault for the errors alert."""
    source = _upload(bucket, "incoming/upscale/big.png")
    message = "upscale ran out of GPU memory on a 64x64 input (CUDA out of memory. Tried to allocate 9.00 GiB)"
    processor = _processor(settings, FakeEngine(fail_with=OutOfDeviceMemory(message)))
    with pytest.raises(TransientError):
        processor.handle(_event(source), attempt=1)
    just_sent = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=15)
    assert processor.handle(_event(source), attempt=OUT_OF_MEMORY_ATTEMPTS, sent=just_sent).status == "failed"
    report = _report(bucket, "failed/upscale/big.png.json")
    assert report["attempt"] == OUT_OF_MEMORY_ATTEMPTS == 2
    assert report["error"] == {"type": "OutOfDeviceMemory", "message": message}
    compiling = _processor(settings, FakeEngine(fail_with=OutOfDeviceMemory(message, compiling=True)))
    other = _upload(bucket, "incoming/upscale/while-compiling.png")
    with pytest.raises(TransientError):
        compiling.handle(_event(other), attempt=OUT_OF_MEMORY_ATTEMPTS)
    assert compiling.handle(_event(other), attempt=MAX_ATTEMPTS).status == "failed"
    assert {r.levelname for r in caplog.records if r.name == "imagen.processor"} <= {"INFO", "WARNING"}


class _ProcessDied(BaseException):
    """What the processor sees of a process killed under it (os._exit, SIGKILL, a native
    crash): nothing after it runs; a BaseException escapes every handler of the job."""


def test_a_job_that_keeps_killing_its_worker_is_reported_not_retried_to_the_dead_letter_topic(settings, bucket):
    # A native crash or an out-of-memory kill ends the process mid-job: no handler runs, so
    # each delivery died silently until the dead-letter policy's 20th, each a restart and a
    # model load. Redeliveries keep a marker while they run; one left behind is a death.
    source = _upload(bucket, "incoming/upscale/killer.png")
    marker = "failed/upscale/killer.png.json.running"
    killer = _processor(settings, FakeEngine(fail_with=_ProcessDied()))
    with pytest.raises(_ProcessDied):
        killer.handle(_event(source), attempt=1)  # a first delivery writes no marker
    assert bucket.get_blob(marker) is None
    for attempt in range(2, 2 + STOPPED_WORKER_LIMIT):
        with pytest.raises(_ProcessDied):
            killer.handle(_event(source), attempt=attempt)
        assert json.loads(bucket.blob(marker).download_as_bytes())["stopped"] == attempt - 2
    engine = FakeEngine()
    outcome = _processor(settings, engine).handle(_event(source), attempt=2 + STOPPED_WORKER_LIMIT)
    assert outcome.status == "failed" and engine.calls == 0  # not run a fifth time
    report = _report(bucket, "failed/upscale/killer.png.json")
    assert report["error"]["type"] == "JobStoppedWorker" and report["attempt"] == 5 == MAX_ATTEMPTS
    assert "its worker stopped, 3 deliveries in a row" in report["error"]["message"]
    assert bucket.get_blob(marker) is None


def test_a_marker_larger_than_any_imagen_writes_is_not_read_whole(settings, bucket):
    """A running marker is read holding the GPU, on every redelivery: one planted at the
    marker's name (anyone who may write the bucket's failed/), gigabytes large, was downloaded
    whole and could take the worker's memory. Read as no marker, and replaced."""
    from handlers.storage import MAX_REPORT_BYTES

    source = _upload(bucket, "incoming/upscale/big.png")
    marker = "failed/upscale/big.png.json.running"
    planted = json.dumps({"generation": str(source.generation), "stopped": 2, "pad": "x" * MAX_REPORT_BYTES})
    bucket.blob(marker).upload_from_string(planted)
    store = Store(storage_client(settings))
    assert store.read_report(bucket.name, marker) is None
    assert store.read_report(bucket.name, marker[:-len(".running")]) is None  # none there
    with pytest.raises(_ProcessDied):
        _processor(settings, FakeEngine(fail_with=_ProcessDied())).handle(_event(source), attempt=2)
    assert json.loads(bucket.blob(marker).download_as_bytes())["stopped"] == 0  # counted from nothing
    bucket.blob(marker).upload_from_string(json.dumps({"generation": str(source.generation), "stopped": 1}))
    assert store.read_report(bucket.name, marker)["stopped"] == 1  # what imagen writes still reads


def test_a_stopped_worker_report_that_cannot_be_written_keeps_the_count(settings, bucket, proxy,
                                                                       short_storage_deadlines):
    source = _upload(bucket, "incoming/upscale/killer.png")
    marker = "failed/upscale/killer.png.json.running"
    killer = _processor(settings, FakeEngine(fail_with=_ProcessDied()))
    for attempt in range(2, 2 + STOPPED_WORKER_LIMIT):
        with pytest.raises(_ProcessDied):
            killer.handle(_event(source), attempt=attempt)
    # Cloud Storage answers the report's upload with 503s past the client's retry deadline
    # (the marker's own writes go through: its name ends in .running).
    proxy.add(Rule(UPLOAD, body=rb'"name": ?"failed/upscale/killer\.png\.json"', status=503))
    processor = _processor(settings, FakeEngine(), storage_emulator_host=proxy.url)
    with pytest.raises(TransientError, match="cannot write failure report"):
        processor.handle(_event(source), attempt=5)
    assert proxy.count(UPLOAD, faults_only=True) >= 1
    assert json.loads(bucket.blob(marker).download_as_bytes())["stopped"] == STOPPED_WORKER_LIMIT - 1
    engine = FakeEngine()
    assert _processor(settings, engine).handle(_event(source), attempt=6).status == "failed" and engine.calls == 0
    assert _report(bucket, "failed/upscale/killer.png.json")["error"]["type"] == "JobStoppedWorker"


def test_a_redelivery_that_ends_leaves_no_marker_and_counts_no_death(settings, bucket):
    # Every end the process sees removes the marker: a transient fault, a hand-back, a
    # report, a success; a GPU that failed (the process stops) leaves it, as a crash would.
    source = _upload(bucket, "incoming/upscale/flaky.png")
    marker = "failed/upscale/flaky.png.json.running"
    for attempt in range(2, 2 + STOPPED_WORKER_LIMIT):
        with pytest.raises(TransientError):
            _processor(settings, FakeEngine(fail_with=ModelError("CUDA error: busy"))).handle(
                _event(source), attempt=attempt)
        assert bucket.get_blob(marker) is None
    engine = FakeEngine()
    assert _processor(settings, engine).handle(_event(source), attempt=5).status == "succeeded" and engine.calls == 1
    assert bucket.get_blob(marker) is None
    # A delivery without an attempt number keeps it only when it may be a redelivery (old).
    gpu = _upload(bucket, "incoming/upscale/gpu.png")
    breaks = _processor(settings, FakeEngine(fail_with=DeviceFailed("the GPU failed")))
    with pytest.raises(TransientError):
        breaks.handle(_event(gpu), sent=datetime.datetime.now(datetime.UTC))
    assert bucket.get_blob("failed/upscale/gpu.png.json.running") is None
    with pytest.raises(TransientError):
        breaks.handle(_event(gpu), sent=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5))
    assert json.loads(bucket.blob("failed/upscale/gpu.png.json.running").download_as_bytes())["stopped"] == 0
    # A job that dies before it holds the device (prefetched behind the one that took the
    # process down, or refused by a GPU that failed under another job) is not counted.
    waiting = _upload(bucket, "incoming/upscale/waiting.png")

    class DiesBeforeTheDevice(FakeEngine):
        def run(self, *args, started=None, **kwargs):
            raise self.fail_with

    for attempt in range(2, 3 + STOPPED_WORKER_LIMIT):
        with pytest.raises((_ProcessDied, TransientError)):
            _processor(settings, DiesBeforeTheDevice(fail_with=_ProcessDied() if attempt % 2 else DeviceFailed(
                "the GPU failed in an earlier job"))).handle(_event(waiting), attempt=attempt)
    assert bucket.get_blob("failed/upscale/waiting.png.json.running") is None
    assert _processor(settings, FakeEngine()).handle(_event(waiting), attempt=9).status == "succeeded"
    # A marker of an older generation is not this one's.
    gpu = _upload(bucket, "incoming/upscale/gpu.png", png_bytes(seed=3))
    assert _processor(settings, FakeEngine()).handle(_event(gpu), attempt=2).status == "succeeded"
    assert bucket.get_blob("failed/upscale/gpu.png.json.running") is None


def test_deliveries_without_an_attempt_number_stop_retrying_by_age(settings, bucket):
    """Eventarc counts no attempts: a transient fault is retried while the event is young,
    and ends in a report MAX_RETRY_SECONDS after it, instead of 24 h of GPU retries."""
    source = _upload(bucket, "incoming/upscale/old.png")
    processor = _processor(settings, FakeEngine(fail_with=ModelError("CUDA out of memory")))
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(TransientError):
        processor.handle(_event(source), sent=now - datetime.timedelta(seconds=MAX_RETRY_SECONDS - 60))
    assert bucket.get_blob("failed/upscale/old.png.json") is None
    outcome = processor.handle(_event(source), sent=now - datetime.timedelta(seconds=MAX_RETRY_SECONDS + 60))
    assert outcome.status == "failed"
    report = _report(bucket, "failed/upscale/old.png.json")
    assert report["attempt"] is None
    assert report["error"] == {"type": "ModelError", "message":
                               "CUDA out of memory (still failing 31 min after the event: retries end here)"}


def test_out_of_gpu_memory_without_attempt_numbers_ends_sooner(settings, bucket):
    """Eventarc: out of GPU memory with no compile running is reported once the event is
    OUT_OF_MEMORY_RETRY_SECONDS old (time for a second delivery), not after half an hour."""
    source = _upload(bucket, "incoming/upscale/huge.png")
    message = "upscale ran out of GPU memory on a 64x64 input (CUDA error: out of memory)"
    processor = _processor(settings, FakeEngine(fail_with=OutOfDeviceMemory(message)))
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(TransientError):
        processor.handle(_event(source), sent=now - datetime.timedelta(seconds=30))
    outcome = processor.handle(_event(source), sent=now - datetime.timedelta(seconds=OUT_OF_MEMORY_RETRY_SECONDS))
    assert outcome.status == "failed" and OUT_OF_MEMORY_RETRY_SECONDS < MAX_RETRY_SECONDS
    assert _report(bucket, "failed/upscale/huge.png.json")["error"]["message"] == (
        f"{message} (still failing {OUT_OF_MEMORY_RETRY_SECONDS // 60} min after the event: retries end here)")
    compiling = _processor(settings, FakeEngine(fail_with=OutOfDeviceMemory(message, compiling=True)))
    other = _upload(bucket, "incoming/upscale/while-compiling.png")
    with pytest.raises(TransientError):  # a compile held memory: the usual half hour
        compiling.handle(_event(other), sent=now - datetime.timedelta(seconds=OUT_OF_MEMORY_RETRY_SECONDS))

    class SlowToRunOut(FakeEngine):  # the window passes while the first delivery runs
        def run(self, *args, **kwargs):
            time.sleep(2)
            return super().run(*args, **kwargs)

    long_job = _upload(bucket, "incoming/upscale/long.png")
    with pytest.raises(TransientError):  # judged by its age when it started: one more delivery
        _processor(settings, SlowToRunOut(fail_with=OutOfDeviceMemory(message))).handle(
            _event(long_job), sent=datetime.datetime.now(datetime.UTC)
            - datetime.timedelta(seconds=OUT_OF_MEMORY_RETRY_SECONDS - 1))


def test_the_attempt_number_wins_over_the_age():
    now = datetime.datetime.now(datetime.UTC)
    old = now - datetime.timedelta(days=1)
    assert last_try(1, old) is None  # a dead-letter policy counts: five tries, whatever the age
    assert last_try(MAX_ATTEMPTS, None) == ""
    assert last_try(None, None) is None
    assert last_try(None, old).startswith(" (still failing 1440 min")


def test_a_redelivery_of_a_message_that_ended_in_a_report_is_not_run_again(settings, bucket):
    """A push request cut off before its answer (Eventarc's subscription gives 10 s unless
    told more) is delivered again after the job wrote its report: the same message acks
    without a second run on the GPU; another message for the same upload runs."""
    source = _upload(bucket, "incoming/upscale/slow.png")
    engine = FakeEngine(fail_with=JobTooLong("upscale ran past its 510 s budget"))
    processor = _processor(settings, engine)
    assert processor.handle(_event(source), message_id="m-1", attempt=1).status == "failed"
    assert bucket.get_blob("failed/upscale/slow.png.json").metadata == {
        "imagen-message-id": "m-1", "imagen-source": f"gs://{bucket.name}/incoming/upscale/slow.png",
        "imagen-source-generation": str(source.generation)}
    again = processor.handle(_event(source), message_id="m-1", attempt=2)
    assert again.status == "skipped" and engine.calls == 1
    assert again.reason == (f"duplicate: this message already ended in the failure report "
                            f"gs://{bucket.name}/failed/upscale/slow.png.json")
    assert processor.handle(_event(source), message_id="m-1").status == "skipped"  # Eventarc: no attempt
    assert processor.handle(_event(source), message_id="m-2", attempt=2).status == "failed"  # another message
    assert engine.calls == 2


@pytest.mark.parametrize("error", [ModelError("CUDA error: something of this instance's"),
                                   JobTooLong("over its time budget on this slower instance")],
                         ids=["lasting-fault", "out-of-time"])
def test_a_last_try_whose_job_another_delivery_finished_is_skipped_not_failed(settings, bucket, error):
    # Two deliveries of one job at once: the one whose fault lasted (or which ran out of time,
    # a failure of this run, not of the input) must not write a report (and a "failed"
    # result) beside the output the other wrote.
    source = _upload(bucket, "incoming/upscale/race.png")

    class LosesTheRace(FakeEngine):
        def run(self, *args, **kwargs):
            assert _processor(settings, FakeEngine()).handle(_event(source)).status == "succeeded"
            raise error

    outcome = _processor(settings, LosesTheRace()).handle(_event(source), attempt=MAX_ATTEMPTS)
    assert outcome.status == "skipped" and outcome.reason.startswith("duplicate: the output already exists")
    assert bucket.get_blob("failed/upscale/race.png.json") is None


def test_a_last_try_before_the_generation_is_known_still_gets_its_report(settings, bucket, proxy,
                                                                         short_storage_deadlines):
    # A job message names no generation; when looking the source up keeps failing, the last
    # try's report has none either (and no crash looking for an output of it).
    _upload(bucket, "uploads/flaky.png")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}),
                           storage_emulator_host=proxy.url)
    job = JobRequest(bucket.name, "uploads/flaky.png", "upscale", {})
    assert processor.handle(job).status == "succeeded"  # an earlier request's output exists
    # Cloud Storage answers the source's metadata with 503s past the client's retry deadline.
    source_metadata = r"^GET /storage/v1/b/[^/]+/o/uploads/flaky\.png\?"
    proxy.add(Rule(source_metadata, status=503))
    outcome = processor.handle(job, message_id="m-7", attempt=MAX_ATTEMPTS)
    assert proxy.count(source_metadata, faults_only=True) >= 1
    assert outcome.status == "failed" and outcome.error["type"] == "TransientError"
    report = bucket.get_blob("failed/upscale/uploads/flaky.png.json")
    assert json.loads(report.download_as_bytes())["generation"] is None and not report.metadata


def test_five_fast_deliveries_are_not_the_last_before_the_event_is_half_an_hour_old():
    # An instance whose GPU fails every job in a second gets the redeliveries too: five
    # attempts take Pub/Sub's first ~150 s of backoff, too soon to give a job up.
    now = datetime.datetime.now(datetime.UTC)
    assert last_try(MAX_ATTEMPTS, now - datetime.timedelta(seconds=160), now=now) is None
    assert last_try(MAX_ATTEMPTS + 3, now - datetime.timedelta(seconds=MAX_RETRY_SECONDS - 1), now=now) is None
    assert last_try(MAX_ATTEMPTS, now - datetime.timedelta(seconds=MAX_RETRY_SECONDS), now=now) == ""
    assert last_try(MAX_ATTEMPTS - 1, now - datetime.timedelta(days=1), now=now) is None
    # Out of memory twice settles it at once: a third try would spend its GPU time again.
    soon = now - datetime.timedelta(seconds=20)
    assert last_try(OUT_OF_MEMORY_ATTEMPTS, soon, OUT_OF_MEMORY_ATTEMPTS, OUT_OF_MEMORY_RETRY_SECONDS,
                    now=now, by_age_too=False) == ""


def test_a_job_past_its_time_budget_fails_once_with_a_report(tiny_settings, engine, bucket):
    # The real (tiny) engine: the upscale stops at its first denoising step past the budget,
    # and the job ends at once (a retry would take as long) instead of being redelivered.
    source = _upload(bucket, "incoming/upscale/slow.png")
    processor = Processor(engine=engine, store=Store(storage_client(tiny_settings)), settings=tiny_settings,
                          max_job_seconds=1e-9)
    outcome = processor.handle(_event(source), attempt=1)
    assert outcome.status == "failed"
    error = _report(bucket, "failed/upscale/slow.png.json")["error"]
    assert error["type"] == "JobTooLong"
    assert "past the job's time budget of 1e-09 s; a retry would take as long" in error["message"]
    assert not list(bucket.list_blobs(prefix="processed/"))
    roomy = Processor(engine=engine, store=Store(storage_client(tiny_settings)), settings=tiny_settings,
                      max_job_seconds=3600, job_seconds=3720)  # the worker's: the engine sizes the output
    assert roomy.handle(_event(_upload(bucket, "incoming/upscale/fast.png")), attempt=1).status == "succeeded"


def test_the_device_budget_leaves_room_to_fetch_encode_and_upload(settings, bucket, monkeypatch, proxy):
    """With a limit on the whole job (a push request's), the model gets what the input's
    download and the output's encode and upload leave, at most --max-job-seconds; a job with
    nothing left does not run only to be cut off and redelivered to run again."""

    def processor(engine, job_seconds, settings=settings):
        return Processor(engine=engine, store=Store(storage_client(settings)), settings=settings,
                         max_job_seconds=510, job_seconds=job_seconds)

    small = FakeEngine()
    assert processor(small, 585).handle(_event(_upload(bucket, "incoming/upscale/b1.png")), attempt=1).status == "succeeded"
    # A 128x128 output needs seconds, not the request's 75 spare (less the moment it waited for the GPU).
    assert small.budgets == [pytest.approx(510, abs=1)]

    class Huge(FakeEngine):
        def output_size(self, chain, size, format):
            return 16384, 16384  # a 4096-wide upscale: 268 megapixels

    huge = Huge()
    png = _upload(bucket, "incoming/upscale/b2.png")
    assert processor(huge, 550).handle(_event(png), attempt=1).status == "succeeded"
    finish = FINISH_BASE_SECONDS + 16384 * 16384 / 1e6 / FINISH_MEGAPIXELS_PER_SECOND["png"]
    assert finish > 40  # more than the request's margin beyond --max-job-seconds
    [budget] = huge.budgets
    assert 550 - finish - 5 < budget < 550 - finish
    # JPEG encodes far faster: the model keeps its whole budget.
    jpeg = _upload(bucket, "incoming/upscale/b3.png", metadata={"imagen-params": '{"format": "jpeg"}'})
    assert processor(huge, 550).handle(_event(jpeg), attempt=1).status == "succeeded"
    assert huge.budgets[1] == pytest.approx(510, abs=1)

    # An output that could never be finished in time: a report at once, no GPU time, no
    # retry, naming what would fit (not webp: it holds at most 16383 pixels a side).
    never = Huge()
    source = _upload(bucket, "incoming/upscale/b4.png")
    outcome = processor(never, 82).handle(_event(source), attempt=1)  # jpeg fits, just
    assert outcome.status == "failed" and never.calls == 0
    error = _report(bucket, "failed/upscale/b4.png.json")["error"]
    assert error["type"] == "JobTooLong"
    assert error["message"] == (
        f"no time left for the model: encoding and uploading its 16384x16384 png output takes about {finish:.0f} s "
        "of the job's 82 s; a retry would take as long. Format jpeg or a smaller image fits"
    )

    # An input that came slowly: retried (the next delivery may be quicker), reported on the
    # last attempt like any transient fault.
    monkeypatch.setattr("handlers.processor.MIN_MODEL_SECONDS", 1.0)
    monkeypatch.setattr("handlers.processor.FETCH_ALLOWANCE_SECONDS", 0.0)
    monkeypatch.setattr("handlers.processor.FINISH_BASE_SECONDS", 0.0)
    slow = processor(FakeEngine(), 2.0, settings.replace(storage_emulator_host=proxy.url))
    slow_download = r"^GET /download/storage/v1/b/[^/]+/o/incoming/upscale/b[56]\.png\?"
    proxy.add(Rule(slow_download, status=None, stall=1.5))  # each download answered 1.5 s late
    with pytest.raises(TransientError, match=r"fetching and decoding the input took \d+ s.*retried"):
        slow.handle(_event(_upload(bucket, "incoming/upscale/b5.png")), attempt=1)
    last = slow.handle(_event(_upload(bucket, "incoming/upscale/b6.png")), attempt=MAX_ATTEMPTS)
    assert last.status == "failed"
    assert _report(bucket, "failed/upscale/b6.png.json")["error"]["type"] == "TransientError"
    assert proxy.count(slow_download, faults_only=True) == 2

    # Without a limit on the whole job (the one-shot CLI), the device budget is all there is.
    unlimited = Huge()
    assert processor(unlimited, None).handle(_event(_upload(bucket, "incoming/upscale/b7.png")), attempt=1).status == "succeeded"
    assert unlimited.budgets == [510]


def test_a_job_that_waited_for_the_gpu_gets_what_is_left_of_its_request(settings, bucket, monkeypatch):
    """imagen serve taking several requests at once (self-hosted behind push): the budget ran
    from when the device was the job's, so a job that waited behind others got its whole 510 s
    and outlived the request: cut off, redelivered, run again. The wait now comes off, and a
    job left too little is handed back (503) before any work. The pull worker's wait does not
    count: its lease is extended for the jobs ahead (both built as serve and worker build them)."""
    from handlers.service import build_processor

    monkeypatch.setattr("handlers.processor.MIN_MODEL_SECONDS", 2.0)
    monkeypatch.setattr("handlers.processor.FETCH_ALLOWANCE_SECONDS", 0.0)
    monkeypatch.setattr("handlers.processor.FINISH_BASE_SECONDS", 0.0)

    class Queued(FakeEngine):  # the device is someone else's for `wait` seconds first
        def __init__(self, wait, fail_with=None):
            super().__init__(fail_with=fail_with)
            self.wait = wait

        def run(self, *args, started=None, **kwargs):
            def after_the_wait():
                time.sleep(self.wait)
                started()

            return super().run(*args, started=after_the_wait, **kwargs)

    def serve(engine, job_seconds=4.0):  # as handlers/cli/serve.py builds it (a 4 s request)
        return build_processor(settings, engine, max_job_seconds=4, job_seconds=job_seconds, wait_counts=True)

    def worker(engine):  # as handlers/cli/worker.py builds it
        return build_processor(settings, engine, max_job_seconds=4, job_seconds=4 + 120)

    waited = Queued(1.0)
    assert serve(waited).handle(_event(_upload(bucket, "incoming/upscale/q1.png")), attempt=1).status == "succeeded"
    [budget] = waited.budgets
    assert 2.0 < budget < 3.0  # the request's 4 s less the second it waited (and the download)
    # A request with time to spare keeps the whole device budget: only what the wait took
    # from the request counts, not the wait itself.
    roomy = Queued(1.0)
    assert serve(roomy, 585).handle(_event(_upload(bucket, "incoming/upscale/q5.png")), attempt=1).status == \
        "succeeded"
    assert roomy.budgets == [4]
    starved = Queued(2.5)
    with pytest.raises(TransientError, match=r"waited \d s for the GPU behind other jobs: too little of the request "
                                             r"is left for the model; handed back"):
        serve(starved).handle(_event(_upload(bucket, "incoming/upscale/q2.png")), attempt=MAX_ATTEMPTS)
    assert starved.calls == 0 and not list(bucket.list_blobs(prefix="failed/"))  # no work, no report
    # Stopped at what the wait left: retried, not reported for its input (alone it may fit).
    cut = Queued(1.0, fail_with=JobTooLong("upscale tile 3: stopped after 3 s, past the job's time budget"))
    with pytest.raises(TransientError, match=r"its budget was cut by \d s of waiting for the GPU .*retried"):
        serve(cut).handle(_event(_upload(bucket, "incoming/upscale/q4.png")), attempt=1)
    for patient in (Queued(1.0), Queued(2.5)):
        name = f"incoming/upscale/q3-{patient.wait}.png"
        assert worker(patient).handle(_event(_upload(bucket, name)), attempt=1).status == "succeeded"
        assert patient.budgets == [4]


def test_unexpected_errors_are_retried_not_crashing(settings, bucket, caplog):
    source = _upload(bucket, "incoming/upscale/u.png")
    buggy = _processor(settings, FakeEngine(fail_with=ZeroDivisionError("bug")))
    with pytest.raises(TransientError, match="ZeroDivisionError"):
        buggy.handle(_event(source), attempt=1)
    assert not list(bucket.list_blobs(prefix="failed/"))
    # The last try ends it in a report naming the bug, like any fault that persisted; the
    # stack trace is in the log, where a bug is looked for.
    outcome = buggy.handle(_event(source), attempt=MAX_ATTEMPTS)
    assert outcome.status == "failed"
    report = _report(bucket, "failed/upscale/u.png.json")
    assert report["error"] == {"type": "ZeroDivisionError", "message": "bug"} and report["attempt"] == MAX_ATTEMPTS
    traced = [r.exc_info[0] for r in caplog.records
              if r.getMessage() == "unexpected error in job: ZeroDivisionError: bug" and r.exc_info]
    assert traced == [ZeroDivisionError, ZeroDivisionError]  # each delivery's, its summary saying what
    [ended] = [r for r in caplog.records if r.getMessage().startswith("job failed: ")]
    assert ended.levelname == "ERROR"  # a fault that outlasted its retries is the operator's


def test_concurrent_writer_wins_and_loser_acks(settings, bucket):
    """Two workers get the same message: the second writer hits the precondition and acks."""
    source = _upload(bucket, "incoming/upscale/race.png")
    event = _event(source)
    rival = _processor(settings, FakeEngine())

    def rival_finishes_first():
        assert rival.handle(event).status == "succeeded"

    loser = _processor(settings, FakeEngine(before_return=rival_finishes_first))
    outcome = loser.handle(event)
    assert outcome.status == "skipped" and "duplicate" in outcome.reason
    assert len(list(bucket.list_blobs(prefix="processed/"))) == 1


def test_an_older_result_landing_while_the_job_runs_is_replaced_not_redone(settings, bucket):
    """The output of an older generation, or of other parameters, written between this job's
    check and its write: this job's result replaces it, as it would have found it there.
    It used to be a retry: the whole GPU job again, and on the last attempt a report while
    the older result stayed."""
    old = _upload(bucket, "incoming/upscale/r.png", png_bytes(seed=1))
    old_event = _event(old)
    new_event = _event(_upload(bucket, "incoming/upscale/r.png", png_bytes(seed=2)))

    def older_job_writes():  # it downloaded generation 1 before generation 2 replaced it
        blob = bucket.blob("processed/upscale/r.png")
        blob.metadata = {"imagen-source": f"gs://{bucket.name}/incoming/upscale/r.png",
                         "imagen-source-generation": old_event.generation, "imagen-operation": "upscale",
                         "imagen-params": "{}"}
        blob.upload_from_string(b"older", content_type="image/png")

    engine = FakeEngine(before_return=older_job_writes)
    outcome = _processor(settings, engine).handle(new_event, attempt=MAX_ATTEMPTS)
    assert outcome.status == "succeeded" and engine.calls == 1
    assert bucket.get_blob("processed/upscale/r.png").metadata["imagen-source-generation"] == new_event.generation
    # Other parameters of the same generation, as a job message would bring: replaced too.
    _upload(bucket, "uploads/race.png")
    allowed = frozenset({bucket.name})
    rival = _processor(settings, FakeEngine(), allowed_buckets=allowed)
    engine = FakeEngine(before_return=lambda: rival.handle(
        JobRequest(bucket.name, "uploads/race.png", "upscale", {"seed": 7})))
    request = JobRequest(bucket.name, "uploads/race.png", "upscale", {"seed": 1})
    assert _processor(settings, engine, allowed_buckets=allowed).handle(request, attempt=1).status == "succeeded"
    assert json.loads(bucket.get_blob("processed/upscale/uploads/race.png").metadata["imagen-params"])["seed"] == 1
    assert engine.calls == 1


def test_a_refusal_after_a_lost_write_race_is_judged_as_any_output_refusal(settings, bucket, proxy):
    """Raised inside the handler of the lost race, the refusal passed the handler beside it:
    retried, GPU work and all, where a job message's output outside the output prefix fails
    for good (OutputNotWritable)."""
    _upload(bucket, "uploads/race.png")
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}),
                           storage_emulator_host=proxy.url)
    # The look before the job finds no output; its write loses the race (412: another writer's
    # generation is there); the look at the winner is refused (403).
    output_metadata = r"^GET /storage/v1/b/[^/]+/o/exports/r\.png\?"
    proxy.add(Rule(output_metadata, status=None, times=1))  # forwarded as it is
    proxy.add(Rule(UPLOAD, body=rb'"name": ?"exports/r\.png"', status=412, times=1))
    proxy.add(Rule(output_metadata, status=403))
    request = JobRequest(bucket.name, "uploads/race.png", "upscale", {}, output=f"gs://{bucket.name}/exports/r.png")
    outcome = processor.handle(request, attempt=1)
    assert outcome.status == "failed" and outcome.error["type"] == "OutputNotWritable"
    assert proxy.count(UPLOAD, faults_only=True) == 1
    looks = [seen.status for seen in proxy.seen if re.search(output_metadata, seen.line)]
    assert looks[:2] == [404, 403]  # none there before the job; refused after the race


def test_a_lost_write_race_on_the_last_attempt_still_gets_its_report(settings, bucket):
    """Another job (other parameters) writes the same output before each of this job's
    writes: a retry; on the last delivery attempt a failure report, never a dead letter
    without one."""
    _upload(bucket, "uploads/race.png")
    allowed = frozenset({bucket.name})
    rival = _processor(settings, FakeEngine(), allowed_buckets=allowed)
    rival_seeds = iter(range(7, 20))

    def loser(attempt):  # whose every write finds a newer output than the one it saw
        processor = _processor(settings, FakeEngine(), allowed_buckets=allowed)
        write = processor._store.write_output

        def rival_writes_first(*args, **kwargs):
            request = JobRequest(bucket.name, "uploads/race.png", "upscale", {"seed": next(rival_seeds)})
            assert rival.handle(request).status == "succeeded"
            return write(*args, **kwargs)

        processor._store.write_output = rival_writes_first
        return processor.handle(JobRequest(bucket.name, "uploads/race.png", "upscale", {"seed": attempt}),
                                attempt=attempt)

    with pytest.raises(TransientError, match="changed while the job ran"):
        loser(1)
    assert loser(MAX_ATTEMPTS).status == "failed"
    assert _report(bucket, "failed/upscale/uploads/race.png.json")["error"]["type"] == "PreconditionLost"


def test_results_topic_gets_one_message_per_job(settings, bucket, publisher, subscriber):
    topic = publisher.topic_path(PROJECT, f"results-{uuid.uuid4().hex[:8]}")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, f"results-sub-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(name=sub, topic=topic)
    settings = settings.replace(results_topic=topic)
    processor = Processor(engine=FakeEngine(), store=Store(storage_client(settings)), settings=settings,
                          results=ResultPublisher(publisher, topic))
    good = _event(_upload(bucket, "incoming/upscale/r.png"))
    processor.handle(good)
    processor.handle(good)
    bad = _event(_upload(bucket, "incoming/upscale/bad.png", b"nope"))
    processor.handle(bad, message_id="m-bad", attempt=1)
    processor.handle(bad, message_id="m-bad", attempt=2)  # its answer lost: skipped, no output to name
    received = []

    def pulled():
        response = subscriber.pull(subscription=sub, max_messages=10, timeout=5)
        received.extend(response.received_messages)
        return len(received) >= 4

    wait_for(pulled, timeout=30, what="four result messages")
    by_status = {}
    for m in received:
        by_status.setdefault(m.message.attributes["status"], []).append(json.loads(m.message.data))
    assert {status: len(results) for status, results in by_status.items()} == {"succeeded": 1, "skipped": 2,
                                                                              "failed": 1}
    assert all(m.message.attributes["operation"] == "upscale" for m in received)
    [succeeded], [failed] = by_status["succeeded"], by_status["failed"]
    assert succeeded["output"].endswith("processed/upscale/r.png")
    assert succeeded["model"] == "fake/upscale@0123"
    assert failed["error"]["type"] == "ImageDecodeError" and failed["output"] is None
    assert set(succeeded) == {"source", "generation", "output", "model", "seconds", "error", "reason"}
    skipped = {result["source"].rsplit("/", 1)[1]: result for result in by_status["skipped"]}
    assert skipped["r.png"]["output"].endswith("processed/upscale/r.png") and "duplicate" in skipped["r.png"]["reason"]
    assert skipped["bad.png"]["output"] is None and "failure report" in skipped["bad.png"]["reason"]


def test_a_result_for_an_overlong_operation_is_still_published(settings, publisher, subscriber):
    """A failed job's operation is whatever its sender wrote: Pub/Sub takes at most 1024 bytes
    in an attribute, so the result carries the first 1024 (a whole character at the end)."""
    topic = publisher.topic_path(PROJECT, f"results-{uuid.uuid4().hex[:8]}")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, f"results-sub-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(name=sub, topic=topic)
    ResultPublisher(publisher, topic).publish(Outcome("failed", "gs://b/o.png", "1", "é" * 1000))
    response = subscriber.pull(subscription=sub, max_messages=1, timeout=10)
    assert response.received_messages[0].message.attributes["operation"] == "é" * 512


def test_two_sources_with_one_output_name_keep_the_first_result(settings, bucket):
    """photo.jpg and photo.png both map to processed/upscale/photo.png: the first keeps it while
    it lives, the other gets a report, and no redelivery swaps one result for the other."""
    processor = _processor(settings, FakeEngine())
    first = _upload(bucket, "incoming/upscale/photo.jpg")
    second = _upload(bucket, "incoming/upscale/photo.png")
    assert processor.handle(_event(first)).status == "succeeded"
    written = bucket.get_blob("processed/upscale/photo.png").generation

    outcome = processor.handle(_event(second))
    assert outcome.status == "failed"
    error = _report(bucket, "failed/upscale/photo.png.json")["error"]
    assert error["type"] == "OutputTaken"
    assert f"already holds the result of gs://{bucket.name}/incoming/upscale/photo.jpg" in error["message"]
    assert processor.handle(_event(first)).status == "skipped"  # a redelivery: still the first's
    assert bucket.get_blob("processed/upscale/photo.png").generation == written
    late = _event(second)
    _upload(bucket, "incoming/upscale/photo.png")  # replaced: the old event is late, not a conflict
    assert processor.handle(late).status == "skipped"
    second = bucket.get_blob("incoming/upscale/photo.png")

    first.delete()  # the first source is gone: the other may have the name
    assert processor.handle(_event(second)).status == "succeeded"
    meta = bucket.get_blob("processed/upscale/photo.png").metadata
    assert meta["imagen-source"] == f"gs://{bucket.name}/incoming/upscale/photo.png"


def test_the_same_name_in_two_buckets_is_told_as_such(settings, gcs, bucket):
    """Every source bucket's outputs share the output bucket (Terraform always sets it), and the
    path leaves the bucket out: the report said the sources differ in extension ("rename one
    of them (outputs drop the source's extension)"), which they do not."""
    partner = gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    processor = _processor(settings, FakeEngine(), output_bucket=bucket.name,
                           allowed_buckets=frozenset({bucket.name, partner.name}))
    _upload(partner, "incoming/upscale/cat.jpg")
    assert processor.handle(JobRequest(partner.name, "incoming/upscale/cat.jpg", "upscale", {}),
                            message_id="job-1").status == "succeeded"
    outcome = processor.handle(_event(_upload(bucket, "incoming/upscale/cat.jpg")))
    assert outcome.status == "failed" and outcome.error["type"] == "OutputTaken"
    message = outcome.error["message"]
    assert f"already holds the result of gs://{partner.name}/incoming/upscale/cat.jpg" in message
    assert "the sources are in different buckets" in message and 'name an "output" of its own' in message
    assert "extension" not in message


def test_a_job_message_refused_before_its_generation_was_known_reports_it(settings, bucket):
    """A bad field or bad parameters are refused before the source's generation is looked
    up: the report said generation null, carried no metadata, and replaced whatever report
    was there unguarded (submit --wait never matched it)."""
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    source = _upload(bucket, "incoming/upscale/bad.png")
    outcome = processor.handle(JobRequest(bucket.name, "incoming/upscale/bad.png", "upscale", {},
                                          problem="job message has unknown field(s): colour"), message_id="j-1")
    assert outcome.status == "failed" and outcome.generation == str(source.generation)
    report = bucket.get_blob("failed/upscale/bad.png.json")
    assert json.loads(report.download_as_bytes())["generation"] == str(source.generation)
    assert report.metadata["imagen-source-generation"] == str(source.generation)
    # Guarded like any report: a newer generation's stays.
    newer = _upload(bucket, "incoming/upscale/bad.png", b"not a picture")
    assert processor.handle(_event(newer)).status == "failed"
    stale = JobRequest(bucket.name, "incoming/upscale/bad.png", "upscale", {}, generation=str(source.generation),
                       problem="job message has unknown field(s): colour")
    assert processor.handle(stale, message_id="j-2").status == "skipped"
    assert json.loads(bucket.get_blob("failed/upscale/bad.png.json").download_as_bytes())["error"]["type"] == \
        "ImageDecodeError"


def test_a_success_removes_the_sources_earlier_failure_report(settings, bucket):
    """A report of a last try, then a success of the same generation (backfill --retry-failed, a
    delivery still in flight): both stayed, and failed/ listed a job that had succeeded."""
    source = _upload(bucket, "incoming/upscale/flaky.png")
    report = "failed/upscale/flaky.png.json"

    class Failing(FakeEngine):
        def run(self, *args, **kwargs):
            raise ModelError("a model fault on every try")

    assert _processor(settings, Failing()).handle(_event(source), attempt=5).status == "failed"
    assert bucket.get_blob(report) is not None
    assert _processor(settings, FakeEngine()).handle(_event(source), message_id="again").status == "succeeded"
    assert bucket.get_blob(report) is None
    # Another source's report at the same place (photo.jpg's beside photo.png's output) stays.
    other = "failed/upscale/other.png.json"
    theirs = bucket.blob(other)
    theirs.metadata = {"imagen-source": f"gs://{bucket.name}/incoming/upscale/elsewhere.png",
                       "imagen-source-generation": "1"}
    theirs.upload_from_string("{}", content_type="application/json")
    assert _processor(settings, FakeEngine()).handle(_event(_upload(bucket, "incoming/upscale/other.png"))).status \
        == "succeeded"
    assert bucket.get_blob(other) is not None
    # A job message's own output is another job's result: the upload's report stays.
    bad = _upload(bucket, "incoming/upscale/bad.png", metadata={"imagen-params": '{"steps": "many"}'})
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    assert processor.handle(_event(bad)).status == "failed"
    elsewhere = JobRequest(bucket.name, "incoming/upscale/bad.png", "upscale", {},
                           f"gs://{bucket.name}/custom/bad.png")
    assert processor.handle(elsewhere, message_id="j-1").status == "succeeded"
    assert bucket.get_blob("failed/upscale/bad.png.json") is not None


def test_a_notification_without_its_payload_takes_the_objects_metadata(settings, bucket, caplog):
    """payloadFormat NONE (gcloud's --payload-format=none) names the object but not its
    metadata: its imagen-params were taken as none (a PNG with the defaults, answered as done)
    and an object routed by imagen-operation alone was ignored, acked with nothing written."""
    processor = _processor(settings, FakeEngine())

    def bare(blob):
        event = _event(blob)
        return dataclasses.replace(event, metadata={}, size=None, described=False)

    with_params = _upload(bucket, "incoming/upscale/p.png", metadata={"imagen-params": '{"format": "webp"}'})
    outcome = processor.handle(bare(with_params))
    assert outcome.status == "succeeded" and outcome.output.endswith("processed/upscale/p.webp")
    routed = _upload(bucket, "uploads/q.png", metadata={"imagen-operation": "upscale"})
    assert processor.handle(bare(routed)).status == "succeeded"
    assert bucket.get_blob("processed/upscale/uploads/q.png") is not None
    # A look that fails is retried, said in a line of its own (it came before any job's).
    class Unreachable(Store):
        def stat(self, *args, **kwargs):
            raise TransientError("Cloud Storage answered 503")

    unreachable = Processor(engine=FakeEngine(), store=Unreachable(storage_client(settings)), settings=settings)
    with caplog.at_level(logging.INFO, logger="imagen.processor"), pytest.raises(TransientError):
        unreachable.handle(bare(routed), message_id="m-5", attempt=3)
    [line] = [r for r in caplog.records if r.getMessage().startswith("job will be retried: the object's metadata")]
    assert line.fields["message_id"] == "m-5" and line.fields["source"].endswith("/uploads/q.png")
    # What routing ignores or refuses by its name or bucket alone is not read.
    class Counting(Store):
        looked: list = []

        def stat(self, bucket_name, name, **kwargs):
            self.looked.append(name)
            return super().stat(bucket_name, name, **kwargs)

    counting = Processor(engine=FakeEngine(), store=Counting(storage_client(settings)),
                         settings=settings.replace(allowed_buckets=frozenset({"another-bucket"})))
    for name in ("processed/upscale/x.png", "failed/upscale/x.png.json.running", "incoming/upscale/folder/",
                 "incoming/upscale/in-a-bucket-not-listed.png"):
        blob = _upload(bucket, name)
        with contextlib.suppress(Undeliverable):  # the bucket not listed: refused, dead-lettered
            counting.handle(bare(blob))
    assert Counting.looked == []
    # Replaced since: the late event is left as it was, and its job skipped.
    late = bare(routed)
    _upload(bucket, "uploads/q.png", metadata={"imagen-operation": "upscale"})
    assert processor.handle(late).status in ("skipped", "ignored")


def test_a_source_that_wins_the_output_name_while_the_job_runs_keeps_it(settings, bucket):
    # photo.jpg's result lands at processed/upscale/photo.png while photo.png's job runs: the
    # write's precondition fails, and the winner is another live source's: a report, once.
    first = _upload(bucket, "incoming/upscale/photo.jpg")
    second = _upload(bucket, "incoming/upscale/photo.png")

    class Overtaken(FakeEngine):
        def run(self, *args, **kwargs):
            assert _processor(settings, FakeEngine()).handle(_event(first)).status == "succeeded"
            return super().run(*args, **kwargs)

    outcome = _processor(settings, Overtaken()).handle(_event(second), attempt=1)
    assert outcome.status == "failed" and outcome.error["type"] == "OutputTaken"
    meta = bucket.get_blob("processed/upscale/photo.png").metadata
    assert meta["imagen-source"] == f"gs://{bucket.name}/incoming/upscale/photo.jpg"


def test_who_holds_an_output_and_whether_it_is_done_when_its_metadata_is_odd():
    # Metadata edited by hand, or a source that cannot be looked at.
    from handlers.errors import StoragePermanentError
    from handlers.processor import skip_reason, taken_by
    from handlers.storage import ObjectState

    from handlers.routing import Job

    job = Job("b", "incoming/upscale/photo.png", "5", "upscale", None, "photo.png")

    def held(source):
        return ObjectState(1, {"imagen-source": source, "imagen-source-generation": "x"}, 10)

    def refused(bucket, name):
        raise StoragePermanentError("403 Forbidden")

    assert taken_by(held("not a gs:// uri"), job, lambda b, n: None) is None  # cannot be looked at: not a claim
    assert taken_by(held("gs://b/other.jpg"), job, refused) == "gs://b/other.jpg"  # no access: assume it lives
    assert taken_by(held("gs://b/other.jpg"), job, lambda b, n: None) is None  # gone: the name is free
    assert skip_reason(held(job.source_uri), job, None) is None  # a generation that is no number: redo


def test_an_explicit_output_may_replace_another_sources_result(settings, bucket):
    processor = _processor(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    _upload(bucket, "uploads/a.png")
    _upload(bucket, "uploads/b.png")
    target = f"gs://{bucket.name}/processed/catalog/item.png"
    assert processor.handle(JobRequest(bucket.name, "uploads/a.png", "upscale", {}, target)).status == "succeeded"
    assert processor.handle(JobRequest(bucket.name, "uploads/b.png", "upscale", {}, target)).status == "succeeded"
    assert bucket.get_blob("processed/catalog/item.png").metadata["imagen-source"].endswith("/uploads/b.png")


_SEVERITIES = ["DEFAULT", "DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL", "ALERT", "EMERGENCY"]


def _logging_filter_matches(text: str, entry: dict) -> bool:
    """Cloud Logging's query language, the part monitoring.tf's metrics use (clauses joined
    by AND and OR, groups in parentheses: `jsonPayload.a.b="v"`, `=~"regex"`, `textPayload`,
    `severity>=LEVEL`), for one entry: a JSON line (Cloud Logging takes its `severity` for the
    entry's; `message` and the rest stay in jsonPayload), or {"textPayload": ..., "severity": ...}."""
    import re

    ands, ors = _top_level_parts(text, "AND"), _top_level_parts(text, "OR")
    # Cloud Logging binds OR tighter than AND, unlike most languages: a filter must say it.
    assert len(ands) == 1 or len(ors) == 1, f"AND and OR unparenthesised in {text!r}"
    if len(ands) > 1:
        return all(_logging_filter_matches(part, entry) for part in ands)
    if len(ors) > 1:
        return any(_logging_filter_matches(part, entry) for part in ors)
    clause = text.strip()
    if clause.startswith("(") and clause.endswith(")"):
        return _logging_filter_matches(clause[1:-1], entry)
    if clause.startswith("severity>="):
        return _SEVERITIES.index(entry["severity"]) >= _SEVERITIES.index(clause.removeprefix("severity>="))
    match = re.fullmatch(r'(jsonPayload\.[\w.]+|textPayload)(=~|=)"(.*)"', clause)
    assert match, f"cannot read {clause!r}"
    if match[1] == "textPayload":
        value = entry.get("textPayload")
    else:
        value = None if "textPayload" in entry else entry
        for key in match[1].split(".")[1:]:
            value = value.get(key) if isinstance(value, dict) else None
    return value is not None and bool(re.search(match[3], str(value)) if match[2] == "=~" else str(value) == match[3])


def _top_level_parts(text: str, word: str) -> list[str]:
    """`text` split at ` word ` outside parentheses and quoted strings."""
    parts, depth, quoted, start, at = [], 0, False, 0, 0
    while at < len(text):
        char = text[at]
        if char == '"' and text[at - 1] != "\\":
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif not quoted and depth == 0 and text.startswith(f" {word} ", at):
            parts.append(text[start:at])
            at = start = at + len(word) + 2
            continue
        at += 1
    return parts + [text[start:]]


def test_the_log_metrics_count_the_lines_the_workers_write(settings, bucket, caplog):
    # A log-based metric whose filter matches nothing never counts, and its alert never
    # fires: monitoring.tf's filters, against the JSON lines of a real failure and fault.
    from handlers.logs import JsonFormatter
    from tests.infra.conftest import TERRAFORM_DIR, expr, parse_terraform

    terraform = parse_terraform(TERRAFORM_DIR)
    failures, errors = (expr(terraform.locals[name]) for name in ("job_failure_filter", "error_filter"))
    bad = _upload(bucket, "incoming/comic/p.png", metadata={"imagen-params": '{"steps": 500}'})
    flaky = _upload(bucket, "incoming/upscale/t.png")
    with caplog.at_level(logging.INFO):
        _processor(settings, FakeEngine()).handle(_event(bad), message_id="m-1", attempt=1)
        with pytest.raises(TransientError):
            _processor(settings, FakeEngine(fail_with=ModelError("CUDA error"))).handle(_event(flaky), attempt=1)
    lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records]
    counted = [line["message"].split(":")[0] for line in lines if _logging_filter_matches(failures, line)]
    assert counted == ["job failed"]
    [failed] = [line for line in lines if _logging_filter_matches(failures, line)]
    assert (failed["operation"], failed["error"]["type"]) == ("comic", "InvalidParameter")  # the metric's labels
    assert [line["message"].split(":")[0] for line in lines if _logging_filter_matches(errors, line)] == [
        "job failed on this instance"]
    assert failed["severity"] == "WARNING"  # a bad input is the sender's to fix: no errors alert
    # A native crash writes no JSON line: faulthandler's text on stderr (as a worker sets it up).
    crash = subprocess.run([sys.executable, "-c", "import ctypes\nfrom handlers.logs import configure_logging\n"
                            "configure_logging(service=True)\nctypes.string_at(0)"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert crash.returncode != 0
    first = crash.stderr.splitlines()[0]
    for severity in ("DEFAULT", "ERROR"):  # whichever the platform gives stderr's text
        assert _logging_filter_matches(errors, {"textPayload": first, "severity": severity}), first
    assert not _logging_filter_matches(errors, {"textPayload": "a library's own line", "severity": "ERROR"})
    # Nor does an instance Cloud Run stops for memory (its own line, on the revision's system log).
    stopped = "Memory limit of 32768 MiB exceeded with 33012 MiB used. Consider increasing the memory limit"
    assert _logging_filter_matches(errors, {"textPayload": stopped, "severity": "ERROR"})


def test_a_failed_gpu_is_never_the_jobs_report_while_pub_sub_counts(settings, bucket, caplog):
    # With attempt numbers a job that breaks every GPU ends in the dead-letter topic; on
    # Eventarc (no dead-letter topic) the age bounds it, or it would restart instances for a day.
    source = _upload(bucket, "incoming/upscale/gpu.png")
    broken = _processor(settings, FakeEngine(fail_with=DeviceFailed("the GPU failed (illegal memory access)")))
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=MAX_RETRY_SECONDS + 60)
    with caplog.at_level(logging.INFO, logger="imagen.processor"), pytest.raises(TransientError):
        broken.handle(_event(source), attempt=MAX_ATTEMPTS + 10, sent=old)
    # One incident, one alert: the engine's CRITICAL line and the process's stop say it; the
    # job's own line is a warning, not a third ERROR for the errors alert and Error Reporting.
    [line] = [r for r in caplog.records if r.getMessage().startswith("job failed on this instance")]
    assert line.levelname == "WARNING"
    assert bucket.get_blob("failed/upscale/gpu.png.json") is None
    assert broken.handle(_event(source), sent=old).status == "failed"
    assert _report(bucket, "failed/upscale/gpu.png.json")["error"]["type"] == "DeviceFailed"


def test_a_job_that_waited_while_another_broke_the_gpu_goes_back_whatever_its_age(tiny_settings, engine,
                                                                                  bucket, monkeypatch):
    # A backlog's job waiting for the device (a prefetch; a second request) while another broke
    # it was refused by the engine and, on Eventarc (no attempt numbers) 30 minutes after its
    # event, reported as if it had broken the GPU: it never ran.
    from image.engine import DEVICE_FAILED

    monkeypatch.setattr(engine, "state", DEVICE_FAILED)  # as the job before it left the engine
    monkeypatch.setattr(engine, "error", RuntimeError("CUDA error: an illegal memory access was encountered"))
    source = _upload(bucket, "incoming/remove-background/waited.png")
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=MAX_RETRY_SECONDS + 60)
    with pytest.raises(TransientError, match="the GPU failed in an earlier job"):
        _processor(tiny_settings, engine).handle(_event(source), sent=old)
    assert bucket.get_blob("failed/remove-background/waited.png.json") is None


def test_failure_and_retry_lines_say_what_the_job_cost_and_library_lines_name_the_job(settings, bucket, caplog):
    """Only a success said its seconds and timings: a failure's or retry's GPU time could not
    be charted. And the engine's and libraries' lines during a job carried its id and source
    but not the operation, generation and attempt the README promises on every line."""
    from handlers.logs import JsonFormatter

    def library_warns():
        logging.getLogger("diffusers.pipelines").warning("a library warns")

    class Waits(FakeEngine):  # the device someone else's for a moment, then the model fails
        def run(self, *args, started=None, **kwargs):
            def after_a_wait():
                time.sleep(0.3)
                started()

            return super().run(*args, started=after_a_wait, **kwargs)

    class AsWritten(logging.Handler):  # formatted as it is emitted, inside the job's context
        def emit(self, record):
            entry = json.loads(JsonFormatter().format(record))
            lines[entry["message"].split(":")[0]] = entry

    lines, handler = {}, AsWritten()
    source = _upload(bucket, "incoming/upscale/cost.png")
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.INFO):
            for fault in (ModelError("CUDA error: launch failure"), TransientError("503 from Cloud Storage")):
                with pytest.raises(TransientError):
                    _processor(settings, Waits(fail_with=fault)).handle(_event(source), message_id="m-7",
                                                                        attempt=2)
            _processor(settings, FakeEngine(before_return=library_warns)).handle(_event(source), message_id="m-8",
                                                                                 attempt=1)
    finally:
        logging.getLogger().removeHandler(handler)
    for name in ("job failed on this instance", "job will be retried", "job succeeded"):
        assert lines[name]["seconds"] >= 0 and "operation" in lines[name]["timings"], name
        assert lines[name]["timings"]["gpu_wait"] >= 0, name  # apart from the model's own time
    for name in ("job failed on this instance", "job will be retried"):  # waited 0.3 s, failed at once
        assert lines[name]["timings"]["gpu_wait"] >= 0.3 > lines[name]["timings"]["operation"], name
    assert lines["job on the GPU"]["waited"] >= 0 and lines["job on the GPU"]["job_id"] == "m-8"
    library = lines["a library warns"]
    assert (library["job_id"], library["operation"], library["attempt"]) == ("m-8", "upscale", 1)
    assert library["generation"] == str(source.generation)


@pytest.mark.parametrize("text, message", [
    ('{"steps": 3, "steps": 4}', "imagen-params has duplicate key(s) 'steps'"),  # ran with 4, in silence
    ("{steps: 3}", "imagen-params is not valid JSON"),
    ("[3]", "imagen-params must be a JSON object"),
])
def test_an_uploads_params_that_cannot_be_read_one_way_are_reported(settings, bucket, text, message):
    source = _upload(bucket, "incoming/upscale/twice.png", metadata={"imagen-params": text})
    engine = FakeEngine()
    outcome = _processor(settings, engine).handle(_event(source))
    assert outcome.status == "failed" and outcome.error == {"type": "InvalidParameter", "message": message}
    assert engine.calls == 0
