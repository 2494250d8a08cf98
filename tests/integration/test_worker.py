"""The pull worker's prefetch: the next job downloads and decodes while the GPU works."""

from __future__ import annotations

import threading

import pytest

from handlers.clients import storage_client
from handlers.errors import TransientError
from handlers.processor import Processor
from handlers.storage import Store
from handlers.worker import PullWorker
from image.errors import DeviceFailed, Withdrawn

from .conftest import png_bytes, wait_for
from .test_processor import FakeEngine


class OneGpuEngine(FakeEngine):
    """Runs one job at a time, like image.engine.Engine, and records when jobs arrive. A job
    holds the "GPU" until `release` is set (at once when another job arrives, with
    `release_on_arrival`) or `hold` seconds pass: the tests wait for what they look for
    instead of betting on a loaded machine's timing."""

    def __init__(self, hold: float = 30.0, release_on_arrival: bool = False):
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.release = threading.Event()
        self._hold, self._release_on_arrival = hold, release_on_arrival
        self._lock = threading.Lock()

    def run(self, chain, image, params, seed, max_seconds=None, withdrawn=None, started=None):
        job = seed
        self.events.append(("arrived", job))  # download and decode are done by now
        if self._release_on_arrival and len([kind for kind, _ in self.events if kind == "arrived"]) > 1:
            self.release.set()
        with self._lock:
            if withdrawn is not None and withdrawn():  # as image.engine.Engine does
                self.events.append(("withdrawn", job))
                raise Withdrawn("stopping")
            if started is not None:
                started()
            self.events.append(("start", job))
            self.release.wait(self._hold)
            self.events.append(("end", job))
        return super().run(chain, image, params, seed)


class SettlingWorker(PullWorker):
    """A PullWorker that records how it settled each real message (by object name): a job
    handed back must be nacked (redelivered), never acked (lost)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settled: dict[str, list[str]] = {}

    def handle(self, message) -> None:
        calls = self.settled.setdefault(message.attributes.get("objectId", ""), [])
        for name in ("ack", "nack"):
            settle = getattr(message, name)
            setattr(message, name, lambda name=name, settle=settle: (calls.append(name), settle())[1])
        super().handle(message)


def _start(worker) -> tuple[threading.Thread, dict]:
    """worker.run() in a thread of its own; what it raises lands under "error"."""
    raised = {}

    def run():
        try:
            worker.run(install_signal_handlers=False)
        except Exception as error:
            raised["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def _upload_two(bucket, operation):
    for index in (1, 2):
        bucket.blob(f"incoming/{operation}/{index}.png").upload_from_string(png_bytes(seed=index),
                                                                             content_type="image/png")


def _two_jobs_then_stop(worker, bucket, until, what, stopped=lambda: None):
    """Run `worker`, upload two seeded images, wait `until()`, stop it, call `stopped()` and
    wait for it to end."""
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    try:
        for index in (1, 2):
            blob = bucket.blob(f"incoming/upscale/{index}.png")
            blob.metadata = {"imagen-params": f'{{"seed": {index}}}'}
            blob.upload_from_string(png_bytes(seed=index), content_type="image/png")
        wait_for(until, timeout=60, what=what)
    finally:
        worker.stop()
        stopped()
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.mark.parametrize("prefetch", [0, 1])
def test_prefetch_overlaps_the_next_download_with_the_gpu(settings, bucket, subscriber, events_subscription,
                                                          prefetch):
    # With prefetch the first job holds the GPU until the second has arrived (decoded); without,
    # for 2.5 s, in which the second must not arrive (one message in hand at a time).
    engine = OneGpuEngine(release_on_arrival=True) if prefetch else OneGpuEngine(hold=2.5)
    processor = Processor(engine=engine, store=Store(storage_client(settings)), settings=settings)
    worker = PullWorker(subscriber, events_subscription, processor, concurrency=1, prefetch=prefetch)
    _two_jobs_then_stop(worker, bucket, lambda: len(list(bucket.list_blobs(prefix="processed/"))) == 2,
                        "two outputs")
    first_end = engine.events.index(("end", engine.events[0][1]))
    second_arrival = [i for i, (kind, job) in enumerate(engine.events)
                      if kind == "arrived" and job != engine.events[0][1]][0]
    if prefetch:
        assert second_arrival < first_end, engine.events  # decoded while the first job ran
    else:
        assert second_arrival > first_end, engine.events  # one message in hand at a time


def test_stopping_finishes_the_job_on_the_gpu_and_hands_back_the_waiting_one(
        settings, bucket, subscriber, events_subscription):
    """SIGTERM with a prefetched job waiting for the GPU: the running job finishes, the waiting
    one is handed back unrun (TransientError: the worker nacks it), so a drain takes one job's
    time (GKE's grace period). Its redelivery is Pub/Sub's: the emulator honours a nack sent
    after the stream closed only at the ack deadline, so it is not waited for here."""
    engine = OneGpuEngine()  # the first job holds the GPU until the worker is stopped
    processor = Processor(engine=engine, store=Store(storage_client(settings)), settings=settings)
    raised = {}
    handle = processor.handle

    def recording(event, **kwargs):
        try:
            return handle(event, **kwargs)
        except Exception as error:
            raised[event.name] = error
            raise

    processor.handle = recording
    worker = SettlingWorker(subscriber, events_subscription, processor, concurrency=1, prefetch=1)
    _two_jobs_then_stop(worker, bucket, lambda: [kind for kind, _ in engine.events].count("arrived") == 2 and
                        ("start", engine.events[0][1]) in engine.events, "one job running, one waiting",
                        stopped=engine.release.set)
    first, second = engine.events[0][1], 3 - engine.events[0][1]
    assert ("end", first) in engine.events and ("withdrawn", second) in engine.events, engine.events
    assert ("start", second) not in engine.events
    assert [blob.name for blob in bucket.list_blobs(prefix="processed/")] == [f"processed/upscale/{first}.png"]
    assert list(raised) == [f"incoming/upscale/{second}.png"]
    assert isinstance(raised[f"incoming/upscale/{second}.png"], TransientError)
    assert worker.settled == {f"incoming/upscale/{first}.png": ["ack"], f"incoming/upscale/{second}.png": ["nack"]}


def test_a_failed_gpu_stops_the_worker_so_its_platform_restarts_it(
        tiny_settings, tiny_cache, bucket, subscriber, events_subscription):
    """A CUDA error other than out of memory leaves the process's GPU unusable: the worker
    would fail every job fast, and so take most of them. The job prefetched behind it does
    not run on that GPU (nor gets a report: not its fault); the worker stops pulling, hands
    its messages back and raises DeviceFailed, so `imagen worker` exits 1 and is restarted."""
    from image.engine import DEVICE_FAILED, Engine

    engine = Engine(["remove-background"], tiny_cache, device="cpu")
    engine.setup()
    runs, second_arrived = [], threading.Event()

    def fails_the_gpu(*args, **kwargs):
        runs.append(1)
        # Fails once the second job waits for the device (or after 30 s).
        second_arrived.wait(30)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine._ops["remove-background"].process = fails_the_gpu
    processor = Processor(engine=engine, store=Store(storage_client(tiny_settings)), settings=tiny_settings)
    handed_back, handle, arrivals, engine_run = [], processor.handle, [], engine.run

    def arriving(*args, **kwargs):  # downloaded and decoded: waits for the device from here
        arrivals.append(1)
        if len(arrivals) == 2:
            second_arrived.set()
        return engine_run(*args, **kwargs)

    engine.run = arriving

    def recording(event, **kwargs):
        try:
            return handle(event, **kwargs)
        except TransientError as error:
            handed_back.append(error)
            raise

    processor.handle = recording
    worker = PullWorker(subscriber, events_subscription, processor, concurrency=1, prefetch=1,
                        device_failed=lambda: engine.state == DEVICE_FAILED)
    thread, raised = _start(worker)
    _upload_two(bucket, "remove-background")
    thread.join(timeout=90)
    assert not thread.is_alive(), "the worker kept pulling on a failed GPU"
    assert isinstance(raised.get("error"), DeviceFailed) and engine.state == DEVICE_FAILED
    assert runs == [1]  # the second job never ran on the failed GPU
    assert len(handed_back) == 2 and all("GPU failed" in str(error) for error in handed_back)
    assert not list(bucket.list_blobs(prefix="failed/")) and not list(bucket.list_blobs(prefix="processed/"))


def test_a_job_in_hand_is_leased_the_extension_from_its_first_renewal(settings, bucket, subscriber,
                                                                      events_subscription):
    """The client library renews a lease by the 99th percentile of the acks it has timed: 10 s
    before the first (and again after a run of quick skips), so a stall of 10 s would have
    Pub/Sub redeliver a running job. The worker's extension (60 s) is its minimum too."""
    engine = OneGpuEngine()  # holds the job until released
    processor = Processor(engine=engine, store=Store(storage_client(settings)), settings=settings)
    worker = PullWorker(subscriber, events_subscription, processor, concurrency=1, prefetch=0)
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    try:
        bucket.blob("incoming/upscale/leased.png").upload_from_string(png_bytes(), content_type="image/png")
        wait_for(lambda: any(kind == "start" for kind, _ in engine.events), timeout=60, what="a job on the GPU")
        manager = worker._future._StreamingPullFuture__manager  # the library's lease keeper reads this
        assert manager.ack_deadline == 60
    finally:
        worker.stop()
        engine.release.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_stream_that_dies_hands_back_the_job_waiting_for_the_gpu(settings, bucket, subscriber,
                                                                   events_subscription):
    """The subscription deleted or the worker's permissions lost mid-job: the stream ends with
    an error, and the library waits for the jobs in hand before saying so. The job on the GPU
    finishes, the one waiting for it is handed back instead of run for its whole budget, and
    run() raises the stream's error (imagen worker exits 1)."""
    engine = OneGpuEngine()  # the first job holds the GPU until released
    processor = Processor(engine=engine, store=Store(storage_client(settings)), settings=settings)
    worker = SettlingWorker(subscriber, events_subscription, processor, concurrency=1, prefetch=1)
    thread, raised = _start(worker)
    try:
        _upload_two(bucket, "upscale")
        wait_for(lambda: [kind for kind, _ in engine.events].count("arrived") == 2, timeout=60,
                 what="one job running, one waiting")
        manager = worker._future._StreamingPullFuture__manager
        manager.close(reason=RuntimeError("403 the subscription's permissions were lost"))  # as the library does
        wait_for(worker._stop.is_set, timeout=30, what="the worker told the stream stopped")
    finally:
        engine.release.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    first, second = [job for kind, job in engine.events if kind == "arrived"]
    assert ("end", first) in engine.events and ("withdrawn", second) in engine.events, engine.events
    assert ("start", second) not in engine.events
    assert "permissions were lost" in str(raised.get("error")), raised
    [done] = [blob.name.replace("processed/", "incoming/") for blob in bucket.list_blobs(prefix="processed/")]
    assert worker.settled == {done: ["ack"], ({"incoming/upscale/1.png", "incoming/upscale/2.png"} - {done}).pop():
                              ["nack"]}  # handed back, not lost
