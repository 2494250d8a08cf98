"""The job processor: one job from event to result.

    duplicate check -> download -> decode and validate -> operation(s) -> encode -> upload
    -> result message

Every error is classified: permanent ones (`InputError`) end in a failure report and an ack;
transient ones propagate as `TransientError` so the transport retries (nack / HTTP 503), until
the delivery attempt reaches MAX_ATTEMPTS (with no attempt number: until a delivery starts
MAX_RETRY_SECONDS after the event), when a failure report ends the retries. The GPU work
is behind the `engine` seam (`image.engine.Engine`, or a fake in unit tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from handlers import metrics, routing
from handlers.errors import (
    BadJobMessage,
    EventError,
    JobStoppedWorker,
    OperationNotDeployed,
    OperationNotServed,
    OutputNotWritable,
    OutputRefused,
    OutputTaken,
    PreconditionLost,
    ReportRefused,
    SourceNotAllowed,
    SourceSuperseded,
    StoragePermanentError,
    TransientError,
    Undeliverable,
    UnsafeObjectName,
)
from handlers.events import JobRequest, ObjectEvent, no_duplicate_keys, parse_gs_uri
from handlers.logs import clip, error_fields, job_context, job_context_learns
from handlers.routing import Ignored, Job, Layout
from handlers.storage import ObjectState, Store
from image.codec import CONTENT_TYPES, MAX_SIDE, decode_image, encode_image
from image.errors import (
    DeviceFailed,
    ImagenError,
    InputError,
    InvalidParameter,
    JobTooLong,
    OutOfDeviceMemory,
    Withdrawn,
)
from image.params import canonical_json, output_format, parse_chain, resolve_common, validate_params

log = logging.getLogger("imagen.processor")

# From this delivery attempt on, once the event is also MAX_RETRY_SECONDS old, a transient
# fault becomes a failure report, so the user learns why. The age as well: an instance that
# fails every job fast would otherwise spend five deliveries in Pub/Sub's first 150 s of
# backoff and turn a backlog into reports. infra/terraform's dead-letter
# policy allows more deliveries (20, ~2.3 h of backoff) for those that never reach a job
# (Cloud Run's 429 while every instance is busy).
MAX_ATTEMPTS = 5
# Out of GPU memory with no background compile holding memory: a second delivery (another
# instance, or this one later) settles it, whatever its age; more would each spend the GPU
# time again.
OUT_OF_MEMORY_ATTEMPTS = 2
# A delivery with no attempt number (Eventarc's CloudEvents; a subscription without a
# dead-letter policy) is judged by its age instead: one that starts this long after the
# event ends a transient fault in a failure report too (its age when it starts: a long job
# cannot spend the window in one try). Without it Eventarc retries, with GPU work each time,
# for its 24 h retention and then drops the event without a word. Pub/Sub's backoff (10 s
# doubling to 600 s) fits about eight tries in this window.
MAX_RETRY_SECONDS = 1800
# The same for a job out of GPU memory with no compile running: a delivery after the first
# (Pub/Sub's first backoff is 10 s) usually starts past it, short of MAX_RETRY_SECONDS' eight
# tries; only a first delivery that waited this long for an instance is its last.
OUT_OF_MEMORY_RETRY_SECONDS = 600
# A job's deliveries that died with their process while it held the device (a GPU that failed
# or hung, the host or the GPU killed for memory, a native crash in the models' libraries:
# nothing the processor sees end) before the next one reports it instead of running it
# (JobStoppedWorker). A redelivery keeps a marker beside the job's failure report from the
# moment it holds the device (routing.MARKER_SUFFIX), which every end the process sees removes; a
# marker found then is a delivery that died. Only the job on the device is marked: a job
# prefetched behind it (the pull worker) dies with it without being counted. Without a count
# such a job went round until the dead-letter policy's 20 deliveries, each a restart and a
# model load, and never got a report. A first delivery writes none (no cost on the usual path),
# so the report comes at the fifth delivery, like a transient fault's.
STOPPED_WORKER_LIMIT = 3
# Each read, write and delete of a marker, at most: the first two happen holding the device.
MARKER_SECONDS = 15
# How often a delivery waiting for another of the same output asks whether it is handed back.
OUTPUT_WAIT_POLL_SECONDS = 1.0
# Writes of a failure report, each over the report last seen there, before the job is retried.
REPORT_TRIES = 3
# A delivery with no attempt number (Eventarc) this long after its event may be a redelivery:
# it keeps the marker too (a fresh one, the usual case, does not). Long enough that a backlog's
# first deliveries mostly write none (on Eventarc every write is an event to every service).
REDELIVERY_AGE_SECONDS = 300
# At most, the look-up of a payload-less notification's metadata (`Processor._described`).
DESCRIBE_SECONDS = 30
# What a job needs after the model, to encode and upload its output (megapixels a second,
# both together, from Pillow's single-threaded encoders on noisy photos with room to spare:
# PNG ran at 12-13 Mpx/s (run-length deflate, which image/codec.py takes for photo-like
# pictures; graphics, on the default strategy, ran at 50 and more), WebP 7.6, JPEG 200 here), plus
# a few seconds for the upload to start and for a failure report. A 16384x16384 PNG (a
# 4096-wide upscale) needs about a minute.
FINISH_MEGAPIXELS_PER_SECOND = {"png": 6.0, "webp": 4.0, "jpeg": 25.0}
FINISH_BASE_SECONDS = 10.0
# Less than this left for the model is no time at all: it would stop at its first steps.
MIN_MODEL_SECONDS = 30.0
# What fetching and decoding an input normally takes, for telling an output too big to
# finish in time (a permanent failure) from an input that came slowly (retried).
FETCH_ALLOWANCE_SECONDS = 30.0
try:
    IMAGEN_VERSION = version("imagen")
except PackageNotFoundError:  # running from a source tree that is not installed
    IMAGEN_VERSION = "0+unknown"


def _finish_seconds(size: tuple[int, int], format: str) -> float:
    """About how long encoding and uploading an output of `size` as `format` takes."""
    return FINISH_BASE_SECONDS + size[0] * size[1] / 1e6 / FINISH_MEGAPIXELS_PER_SECOND[format]


class Engine(Protocol):
    def run(self, chain, image, params, seed: int, max_seconds: float | Callable[[], float | None] | None = None,
            withdrawn=None, started=None): ...

    def output_size(self, chain, size: tuple[int, int], format: str) -> tuple[int, int]: ...

    def model_id(self, chain) -> str: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job ended. `status`: succeeded, failed, skipped (acked, no work) or ignored."""

    status: str
    source: str | None = None
    generation: str | None = None
    operation: str | None = None
    output: str | None = None
    model: str | None = None
    seconds: float | None = None
    reason: str | None = None
    error: dict | None = None
    report: str | None = None  # gs:// URI of the failure report
    # Skipped as another pool's job, where every pool receives every job (Eventarc, unfiltered
    # subscriptions): counted apart from this pool's own skips (duplicates, superseded).
    elsewhere: bool | None = None


@dataclasses.dataclass
class _Marker:
    """The running marker of one attempt (`Processor._mark_running`): where it was written,
    and whether the attempt's end must leave it."""

    location: tuple[str, str] | None = None
    keep: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    chain: tuple[str, ...]
    params: dict  # validated, as the user gave them
    canonical: str  # imagen-params
    format: str
    output: tuple[str, str]

    @property
    def operation(self) -> str:
        return ",".join(self.chain)


class Processor:
    def __init__(self, *, engine: Engine, store: Store, settings, results=None,
                 max_job_seconds: float | None = None, job_seconds: float | None = None,
                 wait_counts: bool = False):
        """`max_job_seconds`: each job's budget on the device; past it the job fails with a
        report (JobTooLong) instead of holding the GPU until the request or lease ends.
        `job_seconds`: the time a job has in all, from its delivery to its upload (the push
        request's limit, a lease's share), not counting a wait for the device: the device's
        budget shrinks so that what came before and the output's encode and upload fit.
        `wait_counts`: a wait for the device counts too (a push request's time runs on while
        imagen serve's job waits behind others; a pull worker's lease is extended instead):
        the budget is taken again once the device is the job's, the wait counted as time spent,
        and a job left too little is handed back."""
        self._engine = engine
        self._max_job_seconds = max_job_seconds
        self._job_seconds = job_seconds
        self._wait_counts = wait_counts
        self._store = store
        self._layout = Layout.from_settings(settings)
        self._served = frozenset(settings.operations)
        self._allowed_buckets = settings.allowed_buckets
        self._code_buckets = settings.code_buckets  # code the workers run: never a job's (routing.bucket_refused)
        self._filtered = settings.filtered_subscription
        self._deployed = settings.deployed_operations
        self._max_bytes = settings.max_bytes
        self._max_pixels = settings.max_pixels
        self._results = results
        # Outputs an attempt in this process works on, each with the event its end sets: a
        # second delivery for the same output waits for the first (_take_output).
        self._outputs: dict[tuple[str, str], threading.Event] = {}
        self._outputs_lock = threading.Lock()

    def handle(
        self,
        event: ObjectEvent | JobRequest | Job,
        *,
        message_id: str | None = None,
        attempt: int | None = None,
        sent: datetime.datetime | None = None,
        withdrawn: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Run what `event` asks for. Raises TransientError when the job should be retried,
        also when `withdrawn()` is True while it waits for the GPU or once the GPU is free for
        it (a stopping worker). `attempt` is the delivery attempt when the transport counts them; otherwise `sent`
        (when the event happened or was published) bounds the retries (MAX_RETRY_SECONDS)."""
        if isinstance(event, ObjectEvent):
            try:
                event = self._described(event)
            except TransientError as error:  # before any job: its own line, and counted
                metrics.JOBS.labels("none", "retried").inc()
                log.warning("job will be retried: the object's metadata could not be read: %s", error,
                            extra={"fields": {"message_id": message_id, "source": f"gs://{event.bucket}/{event.name}",
                                              "generation": event.generation, "attempt": attempt,
                                              "error": error_fields(error)}})
                raise
            routed = routing.route_event(event, self._layout)
        elif isinstance(event, JobRequest):
            routed = routing.route_request(event, self._layout)
        else:
            routed = event
        if isinstance(routed, Ignored):
            metrics.JOBS.labels("none", "ignored").inc()
            fields = {"reason": routed.reason, "message_id": message_id,
                      "source": f"gs://{event.bucket}/{event.name}", "generation": event.generation}
            if isinstance(event, ObjectEvent):
                fields["event"] = event.kind
            log.info("event ignored: %s", routed.reason, extra={"fields": fields})
            return Outcome("ignored", reason=routed.reason)
        job_id = message_id or _job_id(routed)
        # The engine's and the libraries' lines during the job carry its id too.
        context = job_context({"job_id": job_id, "message_id": message_id, "source": routed.source_uri,
                               "generation": routed.generation, "operation": routed.operation, "attempt": attempt})
        with metrics.IN_FLIGHT.track_inprogress(), context:
            try:
                outcome = self._run(routed, job_id=job_id, message_id=message_id, attempt=attempt, sent=sent,
                                    withdrawn=withdrawn)
            except Undeliverable as error:  # to the dead-letter topic, unread: counted where it is moved
                error.operation = routed.operation
                raise
            except Exception:  # back to Pub/Sub: a transient fault, a hand-back, a report not written
                metrics.JOBS.labels(metrics.operation_label(routed.operation), "retried").inc()
                raise
        metrics.record_outcome(outcome)
        return outcome

    def _described(self, event: ObjectEvent) -> ObjectEvent:
        """A new object's notification without its payload (a bucket notification made with
        payloadFormat NONE) with the object's metadata looked up: it routes the object
        (imagen-operation) and holds its parameters (imagen-params), which were otherwise
        taken as none, the defaults answered as done. A source gone or replaced since is left
        as it is (its job is skipped; a newer generation has its own event); one that cannot
        be looked at is retried (TransientError) or routed by its path alone."""
        if event.described or routing.ignored_by_name(event, self._layout):
            return event  # ignored whatever its metadata says: nothing to read
        try:
            routing.check_safe_name(event.name)
        except UnsafeObjectName:
            return event  # reported as such, unread
        if event.bucket in self._code_buckets or (self._allowed_buckets and event.bucket not in self._allowed_buckets):
            return event  # refused, unread
        try:
            state = self._store.stat(event.bucket, event.name, timeout=DESCRIBE_SECONDS)
        except InputError:  # no access: its job says so
            return event
        if state is None or (event.generation is not None and str(state.generation) != event.generation):
            return event
        return dataclasses.replace(event, metadata=state.metadata, size=state.size, described=True)

    def _run(self, job: Job, *, job_id: str, message_id: str | None, attempt: int | None,
             sent: datetime.datetime | None, withdrawn: Callable[[], bool] | None) -> Outcome:
        """`_attempt`, then the running marker it left removed, whenever this process sees the
        attempt end: with an outcome, or with an error it hands back to Pub/Sub. Not where
        `_attempt` said to keep it (a GPU failure: the process stops, as a crash would, so a
        job that breaks every GPU it meets is counted; a JobStoppedWorker report that could not
        be written: the next delivery writes it), nor after a BaseException (the process is
        going down)."""
        marker = _Marker()
        try:
            outcome = self._attempt(job, job_id=job_id, message_id=message_id, attempt=attempt, sent=sent,
                                    withdrawn=withdrawn, marker=marker)
        except Exception:
            if not marker.keep:
                self._remove_marker(marker)
            raise
        self._remove_marker(marker)
        return outcome

    def _remove_marker(self, marker: _Marker) -> None:
        if marker.location is None:
            return
        try:
            self._store.delete(*marker.location, timeout=MARKER_SECONDS)
        except (TransientError, InputError) as error:
            # The next delivery, if any, would count a death that was none.
            log.warning("the job's running marker gs://%s/%s could not be removed: %s", *marker.location, error)

    def _attempt(self, job: Job, *, job_id: str, message_id: str | None, attempt: int | None,
                 sent: datetime.datetime | None, withdrawn: Callable[[], bool] | None,
                 marker: _Marker) -> Outcome:
        # Every line of the job carries these, so one filter finds them all (the operation as
        # the job names it until it is planned).
        fields = {"job_id": job_id, "message_id": message_id, "source": job.source_uri,
                  "generation": job.generation, "operation": job.operation, "attempt": attempt}
        timings: dict[str, float] = {}
        started = time.perf_counter()
        delivered = datetime.datetime.now(datetime.UTC)  # a delivery's age is judged at its start
        plan = None
        held = None  # the event of the output this attempt holds in self._outputs, once it does

        try:
            try:
                # Whose job it is first: where every pool receives every job, the pools that skip
                # it neither report nor refuse it (one report, one dead letter, not one per pool).
                skip, report = self._triage(job)
                if skip:
                    log.info("job skipped: %s", skip, extra={"fields": {**fields, "reason": skip}})
                    return Outcome("skipped", job.source_uri, job.generation, job.operation, reason=skip,
                                   elsewhere=True)
                routing.check_source_allowed(job, self._allowed_buckets, self._code_buckets)  # a refusal comes first
                if report:
                    raise report
                if job.problem:
                    raise BadJobMessage(job.problem)
                plan = plan_job(job, self._layout, self._served)
                fields["operation"] = plan.operation
                held, waited = self._take_output(plan.output, withdrawn, fields)
                if waited and not self._wait_counts:
                    # Its own time starts once the other delivery ended (a lease is extended
                    # meanwhile; a push request's time runs on, and counts, as for the GPU).
                    started = time.perf_counter()
                named = job.generation is not None  # by the event or message, not looked up here
                generation = job.generation or self._live_generation(job)
                job = dataclasses.replace(job, generation=generation)
                fields["generation"] = generation
                job_context_learns({"generation": generation, "operation": plan.operation})

                # Before any work: Cloud Storage would refuse the output's metadata at the end.
                check_params_fit(plan)
                with _timed(timings, "check"):
                    try:
                        existing = self._store.stat(*plan.output, output=True)
                    except OutputRefused as error:
                        raise self._refused(job, plan, error) from None
                check_replaceable(existing, job, plan)
                skip = skip_reason(existing, job, plan)
                if skip:
                    return self._skipped(job, plan, skip, fields, has_output=True)
                if message_id and attempt != 1 and (report := self._reported_before(job, message_id)):
                    return self._skipped(job, plan, f"duplicate: this message already ended in the failure report "
                                                    f"{report}", fields)
                log.info("job started", extra={"fields": fields})
                with _timed(timings, "download"):
                    try:
                        data = self._store.read_source(job.bucket, job.name, generation, self._max_bytes)
                    except SourceSuperseded:
                        if job.origin != "notification":
                            self._check_source_lives(job, named)
                        raise
                # After the download, which skips a late event for a source since replaced.
                self._check_not_taken(existing, job, plan)
                with _timed(timings, "decode"):
                    image = decode_image(data, max_bytes=self._max_bytes, max_pixels=self._max_pixels)
                common = resolve_common(plan.params, data)
                budget = self._device_budget(plan, image.size, time.perf_counter() - started)
                asked = time.perf_counter()

                wait_counts = self._wait_counts and self._job_seconds is not None
                device = {"budget": budget}

                def on_device() -> None:  # holding it: the wait behind another job (a prefetch) ends here
                    waited = timings["gpu_wait"] = round(time.perf_counter() - asked, 4)
                    log.info("job on the GPU", extra={"fields": {**fields, "waited": waited}})
                    if wait_counts:  # the request's time ran on while the job waited: budgeted again
                        try:
                            device["budget"] = self._device_budget(plan, image.size, time.perf_counter() - started)
                        except TransientError:  # too little left: cut off, it would be redelivered and run again
                            raise Withdrawn(f"waited {waited:.0f} s for the GPU behind other jobs: too little of the "
                                            f"request is left for the model; handed back to run later") from None
                    self._mark_running(job, attempt, sent, delivered, marker)

                try:
                    result = self._engine.run(
                        plan.chain, image, plan.params, common["seed"], max_seconds=lambda: device["budget"],
                        withdrawn=withdrawn, started=on_device)
                except JobTooLong as error:
                    if wait_counts and device["budget"] < budget:
                        # Its budget was what the wait left: alone on the GPU it may fit. Retried
                        # (reported like any lasting fault), not failed for good for its input.
                        raise TransientError(f"{error} (its budget was cut by {timings['gpu_wait']:.0f} s of waiting "
                                             f"for the GPU behind other requests; retried)") from error
                    raise
                finally:  # the models' own time apart from the wait, however the run ended
                    spent = time.perf_counter() - asked
                    waited = timings.setdefault("gpu_wait", round(spent, 4))  # never on the device: all waiting
                    timings["operation"] = round(max(spent - waited, 0.0), 4)
                with _timed(timings, "encode"):
                    encoded = encode_image(result, plan.format, common["quality"])
                model = self._engine.model_id(plan.chain)
                # The job's own time: a wait for the GPU behind another job (a prefetch) is the
                # worker's queue, not this job's cost (it is in the log line's timings).
                seconds = round(time.perf_counter() - started - timings["gpu_wait"], 3)
                metadata = output_metadata(job, plan, model, seconds)
                with _timed(timings, "upload"):
                    try:
                        skip = self._upload(job, plan, encoded, metadata, existing)
                    except OutputRefused as error:
                        raise self._refused(job, plan, error) from None
                    if skip:
                        return self._skipped(job, plan, skip, fields, has_output=True)
                self._clear_report(job, fields)
            finally:  # every outcome's line says what the job cost, failures and retries too
                fields.update(seconds=round(time.perf_counter() - started, 3), timings=timings)
                if held is not None:
                    self._release_output(plan.output, held)
        except SourceSuperseded as error:
            return self._skipped(job, plan, str(error), fields)
        except InputError as error:
            marker.keep = isinstance(error, JobStoppedWorker)  # until its report is written
            return self._failed(job, plan, error, attempt, fields)
        except TransientError as error:
            if (last := last_try(attempt, sent, now=delivered)) is not None:
                return self._failed(job, plan, error, attempt, fields, note=last)
            log.warning(
                "job will be retried: %s",
                error,
                extra={"fields": {**fields, "error": error_fields(error)}},
            )
            raise
        except Withdrawn as error:
            # Not a fault and no attempt spent on the GPU: back to Pub/Sub whatever the attempt.
            log.info("job handed back: %s", error, extra={"fields": fields})
            raise TransientError(str(error)) from error
        except ImagenError as error:
            marker.keep = isinstance(error, DeviceFailed)  # the process stops: counted, unless reported now
            # A model or configuration fault on this machine: another instance may do better.
            # Out of GPU memory is mostly the input's size: a warning, not the errors alert; a
            # failed GPU is the engine's CRITICAL line (with its stack) and the process's stop.
            last = last_try(attempt, sent, now=delivered, **_retries_for(error))
            # On the last try the report's line says it, once (an ERROR line more was one more
            # notification of the errors alert, and read as if the job would be retried).
            if last is None or isinstance(error, DeviceFailed):
                log.log(logging.WARNING if isinstance(error, (OutOfDeviceMemory, DeviceFailed)) else logging.ERROR,
                        "job failed on this instance: %s", error,
                        extra={"fields": {**fields, "error": error_fields(error)}})
            if last is not None:
                return self._failed(job, plan, error, attempt, fields, note=last)
            raise TransientError(str(error)) from error
        except Exception as error:
            log.exception("unexpected error in job: %s: %s", type(error).__name__, error,
                          extra={"fields": {**fields, "error": error_fields(error)}})
            if (last := last_try(attempt, sent, now=delivered)) is not None:
                return self._failed(job, plan, error, attempt, fields, note=last)
            raise TransientError(f"unexpected {type(error).__name__}: {error}") from error

        output_uri = f"gs://{plan.output[0]}/{plan.output[1]}"
        outcome = Outcome(
            "succeeded",
            job.source_uri,
            generation,
            plan.operation,
            output=output_uri,
            model=model,
            seconds=seconds,
        )
        log.info(
            "job succeeded: %s -> %s",
            job.source_uri,
            output_uri,
            extra={"fields": {**fields, "output": output_uri, "model": model, "seconds": seconds,
                              "timings": timings}},
        )
        self._publish(outcome)
        return outcome

    def _take_output(self, output: tuple[str, str], withdrawn: Callable[[], bool] | None,
                     fields: dict) -> tuple[threading.Event, bool]:
        """Hold `output` for this attempt (the event `_release_output` sets; whether it
        waited), first waiting while another attempt in this process holds it: a duplicate
        delivery of its message, or a job message beside its notification (a backfill), would
        otherwise wait only for the GPU, then run the whole model again before finding the
        first one's output at its upload. After the wait, the usual look at the output skips
        it. Handed back (Withdrawn) if the process starts stopping meanwhile."""
        waited = False
        while True:
            with self._outputs_lock:
                other = self._outputs.get(output)
                if other is None:
                    mine = self._outputs[output] = threading.Event()
                    return mine, waited
            if not waited:
                log.info("job waits for another delivery of the same output in this worker",
                         extra={"fields": fields})
                waited = True
            if withdrawn is not None and withdrawn():
                raise Withdrawn("handed back while another delivery of the same output ran: this process is "
                                "stopping")
            other.wait(OUTPUT_WAIT_POLL_SECONDS)

    def _release_output(self, output: tuple[str, str], mine: threading.Event) -> None:
        with self._outputs_lock:
            if self._outputs.get(output) is mine:
                del self._outputs[output]
        mine.set()

    def _upload(self, job: Job, plan: Plan, encoded: bytes, metadata: dict[str, str],
                 existing: ObjectState | None) -> str | None:
        """Write the output where `existing` still is (the generation precondition); None once
        written, or why the write is needless (another delivery's result is there)."""
        def write(over: ObjectState | None) -> None:
            self._store.write_output(*plan.output, encoded, content_type=CONTENT_TYPES[plan.format],
                                     metadata=metadata, if_generation_match=over.generation if over else 0)

        try:
            write(existing)
        except PreconditionLost:
            # Another delivery of this job (or a newer one) wrote first: look at what it
            # wrote. Anything else (and this look's own errors) goes to `_attempt`'s handlers,
            # the last attempt's report included.
            winner = self._store.stat(*plan.output, output=True)
            if _written_with(winner, metadata):
                return None  # our own write, whose answer was lost and retried
            if skip := skip_reason(winner, job, plan):
                return skip
            self._check_not_taken(winner, job, plan)  # another source won the race
            # An older generation's result (or other parameters') landed while this job ran:
            # this one replaces it, as it would have found it there. Raising would only redo
            # the GPU work, or on the last try report a job whose result was ready while the
            # older one stayed.
            check_replaceable(winner, job, plan)
            write(winner)
        return None

    def _refused(self, job: Job, plan: Plan, error: OutputRefused) -> ImagenError:
        """What Cloud Storage refusing the output means: the deployment's fault (a grant not yet
        propagated), retried; unless a job message named a place the workers may not use (only
        the output prefix is theirs), where every retry would be refused again."""
        prefix = self._layout.output_prefix
        if job.output is None or plan.output[1].startswith(prefix):
            return error
        return OutputNotWritable(f"{error}; the job message names an output outside {prefix!r}: name one under "
                                 f"gs://{plan.output[0]}/{prefix}")

    def _device_budget(self, plan: Plan, size: tuple[int, int], spent: float) -> float | None:
        """The job's seconds on the device: `max_job_seconds`, less what `job_seconds` cannot
        spare after the `spent` seconds so far and the output's encode and upload, so that the
        job ends inside its request or lease instead of being cut off and run again. Sizing
        the output checks the chain's and the format's size limits first (ImageTooLarge).

        Too little left: JobTooLong when the output alone could never be finished in time (a
        retry would not fit either); a TransientError, retried, when the input was slow to
        fetch (the next delivery may be quicker)."""
        if self._job_seconds is None:
            return self._max_job_seconds  # the engine checks the sizes as it runs
        width, height = self._engine.output_size(plan.chain, size, plan.format)

        def could_finish(format: str) -> bool:  # with a usual fetch and some model time
            spare = self._job_seconds - _finish_seconds((width, height), format)
            return max(width, height) <= MAX_SIDE[format] and spare >= MIN_MODEL_SECONDS + FETCH_ALLOWANCE_SECONDS

        finish = _finish_seconds((width, height), plan.format)
        left = self._job_seconds - spent - finish
        if left >= MIN_MODEL_SECONDS:
            return left if self._max_job_seconds is None else min(self._max_job_seconds, left)
        output = f"its {width}x{height} {plan.format} output"
        if not could_finish(plan.format):
            fits = [name for name in FINISH_MEGAPIXELS_PER_SECOND if could_finish(name)]
            raise JobTooLong(
                f"no time left for the model: encoding and uploading {output} takes about {finish:.0f} s of "
                f"the job's {self._job_seconds:g} s; a retry would take as long. "
                + (f"Format {' or '.join(fits)} or a smaller image fits" if fits else "A smaller image fits")
            )
        raise TransientError(
            f"no time left for the model: fetching and decoding the input took {spent:.0f} s, and {output} needs "
            f"about {finish:.0f} s to encode and upload, of the job's {self._job_seconds:g} s; retried (the "
            f"next delivery may fetch it faster)"
        )

    def _triage(self, job: Job) -> tuple[str | None, InputError | None]:
        """What this pool does with `job`: (why it skips it, None), (None, the error its report
        gives), or (None, None) to run it. A job naming no valid operation, or one this pool
        does not serve, is reported on a filtered subscription (no other pool received it) and
        where the pools are unknown; where every pool receives every job
        (IMAGEN_DEPLOYED_OPERATIONS), the first deployed operation's pool reports what no pool
        runs and the others skip it, as they skip another pool's jobs."""
        shared = not self._filtered and bool(self._deployed)
        # The pool that reports what no pool runs, when it is another one.
        reporter = self._deployed[0] if shared and self._deployed[0] not in self._served else None
        try:
            chain = job_chain(job, self._layout)
        except InputError as error:
            if reporter:
                return f"the job names no valid operation; the {reporter} pool reports it", None
            return None, error
        if set(chain) <= self._served:
            return None, None
        if self._filtered:
            return None, OperationNotServed(_not_served(job, chain, self._served, self._layout))
        if not self._deployed or (len(chain) == 1 and chain[0] in self._deployed):
            return (f"operation {job.operation!r} is not this worker's ({', '.join(sorted(self._served))}): "
                    f"left to the worker pool that serves it"), None
        if reporter:
            return f"operation {job.operation!r} is served by no worker pool; the {reporter} pool reports it", None
        return None, OperationNotDeployed(_not_deployed(job, self._deployed, self._layout))

    def _check_not_taken(self, existing: ObjectState | None, job: Job, plan: Plan) -> None:
        """OutputTaken when another live source's result holds the job's derived output
        (`taken_by`)."""
        other = taken_by(existing, job, self._store.stat)
        if other is not None:
            bucket, name = plan.output
            if other.startswith(f"gs://{job.bucket}/"):
                why = "rename one of them (outputs drop the source's extension)"
            else:  # the output path leaves the source's bucket out: the same name in another one
                why = (f"the sources are in different buckets, whose outputs share gs://{bucket}/"
                       f"{self._layout.output_prefix} (the path leaves the bucket out): rename one of them, or "
                       f"name an \"output\" of its own in the job message")
            raise OutputTaken(f"gs://{bucket}/{name} already holds the result of {other}, which maps to the same "
                              f"output name: {why}")

    def _mark_running(self, job: Job, attempt: int | None, sent: datetime.datetime | None,
                      delivered: datetime.datetime, marker: _Marker) -> None:
        """Called holding the device. On a redelivery, count the deliveries before it that
        died holding it (their marker is still there) and leave this one's marker (its place
        in `marker`); JobStoppedWorker once STOPPED_WORKER_LIMIT died. A marker that cannot
        be read or written within MARKER_SECONDS counts nothing: the job runs as it would
        without one."""
        redelivered = attempt > 1 if attempt is not None else \
            sent is not None and (delivered - sent).total_seconds() >= REDELIVERY_AGE_SECONDS
        if not redelivered:
            return
        bucket, name = routing.failure_location(job, self._layout)
        location = (bucket, name + routing.MARKER_SUFFIX)
        try:
            found = self._store.read_report(*location, timeout=MARKER_SECONDS)
        except (TransientError, InputError):
            return
        stopped = 0
        if found and str(found.get("generation")) == str(job.generation):
            previous = found.get("stopped")
            stopped = (previous if isinstance(previous, int) else 0) + 1  # the delivery that left it died
        marker.location = location
        if stopped >= STOPPED_WORKER_LIMIT:
            raise JobStoppedWorker(
                f"the job held the GPU each time its worker stopped, {stopped} deliveries in a row (the process "
                f"died: a GPU that failed or hung, the host or the GPU out of memory, a crash; the workers' logs "
                f"at those times say which): not run again. A smaller or re-encoded image may run; upload it "
                f"again, or queue it again with imagen backfill --retry-failed")
        record = {"source": job.source_uri, "generation": job.generation, "stopped": stopped, "attempt": attempt,
                  "time": datetime.datetime.now(datetime.UTC).isoformat()}
        try:
            self._store.write_report(*location, record, timeout=MARKER_SECONDS)
        except TransientError:
            marker.location = None

    def _reported_before(self, job: Job, message_id: str) -> str | None:
        """The failure report this very message ended in, on an earlier delivery whose answer
        Pub/Sub never got (a push request cut off, a lost ack): the redelivery acks without
        running the job again. Not looked at on a first delivery; a report that cannot be
        read is as none."""
        bucket, name = routing.failure_location(job, self._layout)
        try:
            report = self._store.stat(bucket, name)
        except (TransientError, InputError):
            return None
        if report and report.metadata.get(routing.MESSAGE_ID_KEY) == message_id and \
                report.metadata.get(routing.SOURCE_GENERATION_KEY) == str(job.generation):
            return f"gs://{bucket}/{name}"
        return None

    def _newer_generation(self, job: Job) -> int | None:
        """The source's live generation where it is newer than the job's; None otherwise, and
        where that cannot be told (no generation, the source gone or unreadable)."""
        if job.generation is None:
            return None
        try:
            live = self._store.stat(job.bucket, job.name)
        except (TransientError, InputError):
            return None
        return live.generation if live is not None and live.generation > int(job.generation) else None

    def _check_source_lives(self, job: Job, named: bool) -> None:
        """A job message's or command's source gone at its generation: one replaced by a newer
        generation is superseded (skipped), as a notification's is; but a source that does not
        exist, or not at a generation as new as the one named (which never was), is the
        sender's mistake, reported; and one replaced after its live generation was looked up
        is a transient fault (no event brings the new generation to the job: its next try
        takes it)."""
        live = int(self._live_generation(job))  # none at all: StoragePermanentError
        if named and live < int(job.generation):
            raise StoragePermanentError(f"{job.source_uri} does not exist at generation {job.generation}")
        if not named:
            raise TransientError(f"{job.source_uri} was replaced as the job started: its next try takes the new "
                                 f"generation")

    def skip_if_done(self, job: Job) -> Outcome | None:
        """`job` skipped (logged, and on the results topic) if its output already holds this
        generation's result with these parameters; None otherwise, or where looking fails (the
        job itself then says why). For a one-shot command, before it loads any model."""
        try:
            plan = plan_job(job, self._layout, self._served)
            if plan is None:
                return None
            job = dataclasses.replace(job, generation=job.generation or self._live_generation(job))
            reason = skip_reason(self._store.stat(*plan.output, output=True), job, plan)
        except (ImagenError, EventError):
            return None
        if not reason:
            return None
        fields = {"job_id": _job_id(job), "source": job.source_uri, "generation": job.generation,
                  "operation": plan.operation}
        return self._skipped(job, plan, reason, fields, has_output=True)

    def _live_generation(self, job: Job) -> str:
        """The source's current generation, for jobs that name none (job messages, the CLI):
        a source that does not exist is the sender's mistake, reported like any other."""
        state = self._store.stat(job.bucket, job.name)
        if state is None:
            raise StoragePermanentError(f"{job.source_uri} does not exist")
        return str(state.generation)

    def _skipped(self, job: Job, plan: Plan | None, reason: str, fields: dict, *,
                 has_output: bool = False) -> Outcome:
        """`has_output`: the output holds this source's result (this job's, or a newer
        generation's); otherwise (an earlier failure report, a source gone) none is named."""
        log.info("job skipped: %s", reason, extra={"fields": {**fields, "reason": reason}})
        outcome = Outcome(
            "skipped",
            job.source_uri,
            job.generation,
            plan.operation if plan else job.operation,
            output=f"gs://{plan.output[0]}/{plan.output[1]}" if plan and has_output else None,
            reason=reason,
        )
        self._publish(outcome)
        return outcome

    def _failed(
        self, job: Job, plan: Plan | None, error: Exception, attempt: int | None, fields: dict,
        note: str = "",
    ) -> Outcome:
        """Write the failure report; `note` (why retries ended) is appended to its message.
        No failure when another delivery of the job wrote its output meanwhile (a fault not
        the input's, or one of this run's: out of time, a worker stopped): skipped then, so the
        job does not end both ways; nor where the report there is a newer generation's."""
        bucket, name = routing.failure_location(job, self._layout)  # beside the source
        details = error_fields(error, note)
        # A bucket no job may read is not ours to look at or write in: the message goes to the
        # dead-letter topic. Where no allowlist is set (job messages were never enabled), a job
        # message's refusal is reported where its sender looks for the result, saying what to
        # set; a bucket that cannot take it dead-letters.
        if routing.bucket_refused(job, self._allowed_buckets, self._code_buckets):
            log.warning("job refused: %s", error, extra={"fields": {**fields, "error": details}})
            raise Undeliverable(f"{error} (no failure report: the message goes to the dead-letter topic)")
        unlisted = job.origin == "job-message" and bucket not in self._allowed_buckets
        if job.generation is None and not unlisted and not isinstance(error, StoragePermanentError):
            # Refused before its generation was looked up (a bad field, bad parameters): the
            # report says which generation it is about, as every report does, and is guarded
            # like theirs (it replaced even a newer generation's report, with generation null).
            with contextlib.suppress(TransientError, InputError):
                job = dataclasses.replace(job, generation=self._live_generation(job))
                fields["generation"] = job.generation
        if plan is not None and job.generation is not None:
            try:
                done = skip_reason(self._store.stat(*plan.output), job, plan)
            except (TransientError, InputError):
                done = None
            if done:
                return self._skipped(job, plan, done, fields, has_output=True)
        # A late event's report would replace the one of the source's live generation, whose own
        # event brings its job. Notifications only: a job message's or command's newer generation
        # gets no job of its own (nor may a refused one's bucket be looked at); and not where
        # the source itself was refused (a look would be too).
        if job.origin == "notification" and not isinstance(error, StoragePermanentError) and \
                (newer := self._newer_generation(job)) is not None:
            return self._skipped(job, plan, f"superseded: the source is generation {newer} now, whose own job "
                                            f"writes its result or report", fields)
        report = {  # what a message made up is clipped: a report is read by people
            "source": clip(job.source_uri),
            "generation": job.generation,
            "operation": clip(plan.operation if plan else job.operation),
            "params": plan.params if plan else _report_params(job.params),
            "error": details,
            "attempt": attempt,
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        report_uri = f"gs://{bucket}/{name}"
        # Which source generation and delivery wrote it, beside the report (its JSON is the
        # contract's): a redelivery of the same message finds it (`_reported_before`), an older
        # generation's job leaves it be (`_write_report`).
        written_by = {routing.REFUSAL_KEY: "job messages are not enabled"} if unlisted else {}
        if job.generation is not None:
            written_by[routing.SOURCE_KEY] = job.source_uri
            written_by[routing.SOURCE_GENERATION_KEY] = job.generation
            if fields.get("message_id"):
                written_by[routing.MESSAGE_ID_KEY] = fields["message_id"]
        try:
            if unlisted:
                self._write_refusal(bucket, name, report, written_by)
                newer = None
            else:
                newer = self._write_report(job, bucket, name, report, written_by)
        except Exception as write_error:
            if unlisted and isinstance(write_error, ReportRefused):  # a bucket we may not write in: leave it be
                log.warning("job refused, and its failure report could not be written (%s): %s", write_error, error,
                            extra={"fields": {**fields, "error": details, "report": report_uri}})
                raise Undeliverable(f"{error} (no failure report written: {write_error}; the message goes to the "
                                    f"dead-letter topic)") from None
            # The job's end would otherwise leave no line at all: it goes back to Pub/Sub.
            log.error("job failed, and its failure report could not be written (%s): %s", write_error,
                      details["message"], extra={"fields": {**fields, "error": details, "report": report_uri,
                                                            "report_error": error_fields(write_error)}})
            raise
        if newer is not None:
            return self._skipped(job, plan, f"superseded: the failure report {report_uri} is about generation "
                                            f"{newer}, newer than this job's: left as it is", fields)
        # The input's fault is the sender's to fix (its size, where it ran out of GPU memory);
        # a fault that outlasted its retries (the deployment's access, a model failing on every
        # instance) is the operator's: ERROR.
        log.log(logging.WARNING if isinstance(error, (InputError, OutOfDeviceMemory)) else logging.ERROR,
                "job failed: %s", details["message"],
                extra={"fields": {**fields, "error": details, "report": report_uri}})
        outcome = Outcome(
            "failed",
            job.source_uri,
            job.generation,
            report["operation"],
            error=details,
            reason=str(error),
            report=report_uri,
        )
        self._publish(outcome)
        return outcome

    def _write_report(self, job: Job, bucket: str, name: str, report: dict, metadata: dict) -> str | None:
        """Write the report unless the one there is about a newer generation of the same source
        (an older generation's job, a job message or a late event, never replaces it); that
        generation then, None once written. Looked at first and written only over what was seen
        (where it cannot be looked at, or the job names no generation, as is). Another source's
        report at the same place (two folders routed to one output path) is replaced, as is one
        naming a generation the source never reached (a job message's typo)."""
        for _ in range(REPORT_TRIES):
            expected = None  # no precondition
            if job.generation is not None:
                try:
                    seen = self._store.stat(bucket, name)
                except (TransientError, InputError):  # cannot be looked at: written as is
                    seen = None
                else:
                    expected = seen.generation if seen else 0
                same_source = seen is not None and seen.metadata.get(routing.SOURCE_KEY) == job.source_uri
                theirs = seen.metadata.get(routing.SOURCE_GENERATION_KEY, "") if same_source else ""
                if theirs.isdigit() and int(theirs) > int(job.generation) and self._reached(job, int(theirs)):
                    return theirs
            try:
                self._store.write_report(bucket, name, report, metadata=metadata, if_generation_match=expected)
                return None
            except PreconditionLost:
                continue  # another job's report landed: look again
        raise TransientError(f"gs://{bucket}/{name} kept changing as the failure report was written")

    def _write_refusal(self, bucket: str, name: str, report: dict, metadata: dict) -> None:
        """Write the report of a job message refused unread (job messages are not enabled) where
        no report is, or over an earlier such refusal (this message again, its write retried
        after an answer lost, another message for the source: answered as before); ReportRefused
        where a job's own report is (the upload's own reason stays)."""
        expected = 0
        for _ in range(REPORT_TRIES):
            try:
                self._store.write_report(bucket, name, report, metadata=metadata, if_generation_match=expected)
                return
            except PreconditionLost:
                try:
                    seen = self._store.stat(bucket, name)
                except InputError as error:
                    raise ReportRefused(f"gs://{bucket}/{name} could not be looked at: {error}") from None
            if seen is not None and not seen.metadata.get(routing.REFUSAL_KEY):
                raise ReportRefused(f"gs://{bucket}/{name} already holds a failure report: left as it is")
            expected = seen.generation if seen is not None else 0
        raise TransientError(f"gs://{bucket}/{name} kept changing as the failure report was written")

    def _clear_report(self, job: Job, fields: dict) -> None:
        """Remove this source's failure report once its derived output is written (the report
        and the output are the same job's places: processed/ and failed/<operation>/<path>),
        where the report is about this generation or an older one (a last try's, then a
        backfill's): beside the output it read as the job having failed. Not after a job
        message's own `output` (another job's result: the upload's report stays). Only the
        very report looked at (its generation) is removed; one that cannot be is left."""
        if job.output is not None:
            return
        bucket, name = routing.failure_location(job, self._layout)
        try:
            seen = self._store.stat(bucket, name, timeout=MARKER_SECONDS)
        except (TransientError, InputError):  # none can be told there: left as it may be
            return
        theirs = seen.metadata.get(routing.SOURCE_GENERATION_KEY, "") if seen else ""
        if seen is None or seen.metadata.get(routing.SOURCE_KEY) != job.source_uri or not theirs.isdigit() \
                or int(theirs) > int(job.generation):
            return
        try:
            self._store.delete(bucket, name, if_generation_match=seen.generation, timeout=MARKER_SECONDS)
        except PreconditionLost:
            return  # another report landed meanwhile: its own job's
        except (TransientError, InputError) as error:
            log.warning("the job succeeded, but its earlier failure report gs://%s/%s could not be removed: %s",
                        bucket, name, error, extra={"fields": fields})
            return
        log.info("removed the earlier failure report gs://%s/%s (generation %s)", bucket, name, theirs,
                 extra={"fields": fields})

    def _reached(self, job: Job, generation: int) -> bool:
        """Whether the source has reached `generation` (its live one is as new); True where
        that cannot be told."""
        try:
            live = self._store.stat(job.bucket, job.name)
        except (TransientError, InputError):
            return True
        return live is not None and live.generation >= generation

    def _publish(self, outcome: Outcome) -> None:
        if self._results is not None:
            self._results.publish(outcome)


def taken_by(existing: ObjectState | None, job: Job,
             stat: Callable[[str, str], ObjectState | None]) -> str | None:
    """The other source whose result holds the job's derived output, while that source lives.

    A derived output (processed/<op>/<path without extension>.<format>) can be claimed by two
    sources, photo.jpg and photo.png: the one written first keeps it while its source lives,
    whichever order they arrive in, so a redelivery never swaps one result for the other. A
    job message's explicit `output` is its sender's choice and may replace it.
    """
    other = existing.metadata.get(routing.SOURCE_KEY) if existing else None
    if job.output is not None or other is None or other == job.source_uri:
        return None
    try:
        bucket, name = parse_gs_uri(other)
        return other if stat(bucket, name) is not None else None
    except EventError:  # metadata someone edited by hand: not a source we can look at
        return None
    except StoragePermanentError:  # cannot look (no access): assume it lives
        return other


def last_try(attempt: int | None, sent: datetime.datetime | None, attempts: float = MAX_ATTEMPTS,
             seconds: float = MAX_RETRY_SECONDS, now: datetime.datetime | None = None, *,
             by_age_too: bool = True) -> str | None:
    """None while a transient fault should be retried; on the last try, a note for the
    report. With an attempt number: the delivery attempt reached `attempts` (MAX_ATTEMPTS) and,
    `by_age_too`, the event was `seconds` (MAX_RETRY_SECONDS) old at `now`, when the delivery
    started (when it is known). Without one: the event's age alone. With neither, retries are
    the transport's to bound."""
    age = None if sent is None else ((now or datetime.datetime.now(datetime.UTC)) - sent).total_seconds()
    if attempt is not None:
        if attempt < attempts or (by_age_too and age is not None and age < seconds):
            return None
        return ""
    if age is None or age < seconds:
        return None
    return f" (still failing {age / 60:.0f} min after the event: retries end here)"


def _retries_for(error: Exception) -> dict:
    """How many deliveries a fault of the instance gets, and for how long after the event
    (`last_try`'s arguments). Out of GPU memory twice with no background compile holding
    memory, the job needs more than the GPU has: each further try would spend its GPU time to
    run out again, so the second attempt ends it whatever its age. A GPU that failed for good
    is this process's, not the job's: retried elsewhere (the process is restarting), with
    attempt numbers not reported for it (a job that breaks every GPU it meets is reported as
    one that stopped its worker: STOPPED_WORKER_LIMIT); without them (Eventarc: no dead-letter
    topic) the age bounds it too, or it would restart instances for Eventarc's 24 h and then
    be dropped. A job refused because the GPU had failed in an earlier one never ran: no age
    ends it (a backlog's jobs waiting behind the one that broke it were reported)."""
    if isinstance(error, DeviceFailed):
        return {"attempts": math.inf} if error.ran else {"attempts": math.inf, "seconds": math.inf}
    if isinstance(error, OutOfDeviceMemory) and not error.compiling:
        return {"attempts": OUT_OF_MEMORY_ATTEMPTS, "seconds": OUT_OF_MEMORY_RETRY_SECONDS, "by_age_too": False}
    return {}


def job_chain(job: Job, layout: Layout) -> tuple[str, ...]:
    """The job's operations in order; InvalidParameter or UnknownOperation when it names none
    or a bad one."""
    chain = parse_chain(job.operation) if job.operation else None
    if not chain and job.origin == "job-message":
        raise BadJobMessage(job.problem)  # a job message without an operation has it said there
    if not chain:
        raise InvalidParameter(
            f"no operation for {job.name!r}: upload it under "
            f"{layout.input_prefix}<operation>/ or set metadata {routing.OPERATION_KEY}"
        )
    return chain


def plan_job(job: Job, layout: Layout, served: frozenset[str]) -> Plan | None:
    """Validate a job and decide its output; None when `served` lacks one of its operations."""
    chain = job_chain(job, layout)
    if not set(chain) <= served:
        return None
    params = validate_params(chain, _params_dict(job.params))
    given = params.get("format")  # an output's name says it too (.gif refused, a .png holding webp too)
    fmt = (output_format(job.output[1], given) if job.output is not None else given) or "png"
    output = routing.output_location(job, layout, ",".join(chain), fmt)
    return Plan(chain, params, canonical_json(params), fmt, output)


def _not_deployed(job: Job, deployed: tuple[str, ...], layout: Layout) -> str:
    """Why no pool of an unfiltered deployment runs `job`, and what would."""
    return (f"{job.source_uri} asks for {job.operation!r}, which no worker pool of this deployment serves "
            f"(its pools serve {', '.join(deployed)}, one operation each): upload it under "
            f"{layout.input_prefix}<operation>/ for one of those, deploy the operation, or run a worker "
            f"that serves all of a chain's operations")


def _not_served(job: Job, chain: tuple[str, ...], served: frozenset[str], layout: Layout) -> str:
    """Why a filtered subscription's job cannot run here, and where it should have gone."""
    named = ",".join(chain)
    where = (f"upload it under {layout.input_prefix}{named}/ instead, or publish a job message with the attribute "
             f"operation={named}" + ("" if len(chain) == 1 else
                                     ", where a worker pool serves the whole chain (Terraform: list it in chains)"))
    return (f"{job.source_uri} asks for {job.operation!r}, which this worker pool ({', '.join(sorted(served))}) "
            f"does not serve; its subscription takes only its own operations' folders and job messages, so "
            f"no other pool received it ({routing.OPERATION_KEY} metadata cannot send an upload to another "
            f"pool on this deployment): {where}")


# Cloud Storage's limit on one custom metadata value (the Storage API's ServiceConstants; all
# keys and values together may take 8 KiB). `imagen-params` is the one value a job can make
# long: the others (a source's URI is at most ~1.3 kB) leave it the whole 4 KiB.
METADATA_VALUE_BYTES = 4 * 1024


def output_metadata(job: Job, plan: Plan, model: str, seconds: float) -> dict[str, str]:
    """The custom metadata of `job`'s output (DESIGN.md, bucket layout)."""
    return {
        routing.SOURCE_KEY: job.source_uri,
        routing.SOURCE_GENERATION_KEY: job.generation,
        routing.OPERATION_KEY: plan.operation,
        routing.PARAMS_KEY: plan.canonical,
        routing.MODEL_KEY: model,
        routing.VERSION_KEY: IMAGEN_VERSION,
        routing.SECONDS_KEY: f"{seconds:.3f}",
    }


def check_params_fit(plan: Plan) -> None:
    """InvalidParameter when Cloud Storage would refuse the output's `imagen-params`
    (METADATA_VALUE_BYTES): long prompts in other scripts than Latin, whose characters it
    escapes (6 bytes each, 12 for an emoji)."""
    size = len(plan.canonical.encode())
    if size > METADATA_VALUE_BYTES:
        raise InvalidParameter(
            f"the output's {routing.PARAMS_KEY} metadata would take {size} bytes, more than the "
            f"{METADATA_VALUE_BYTES} Cloud Storage keeps for one value (the parameters as JSON, characters "
            f"outside ASCII written as \\uXXXX, 6 bytes each): shorten the prompts"
        )


def _written_with(existing: ObjectState | None, metadata: Mapping[str, str]) -> bool:
    """Whether `existing` carries exactly this write's metadata: the write itself, whose
    answer was lost and whose retry then found it there (its seconds, to the millisecond,
    tell it apart from another delivery's)."""
    return existing is not None and all(existing.metadata.get(key) == value for key, value in metadata.items())


def check_replaceable(existing: ObjectState | None, job: Job, plan: Plan) -> None:
    """An explicitly named output may replace only an earlier imagen output.

    Outputs under processed/ are imagen's own; a job message's `output` can name any object
    outside incoming/ and failed/, and must not overwrite one that imagen did not write.
    """
    if job.output is None or existing is None or routing.SOURCE_KEY in existing.metadata:
        return
    bucket, name = plan.output
    raise SourceNotAllowed(
        f"output gs://{bucket}/{name} exists and was not written by imagen (no "
        f"{routing.SOURCE_KEY} metadata): refusing to replace it; name another output"
    )


def skip_reason(existing: ObjectState | None, job: Job, plan: Plan) -> str | None:
    """Why the job needs no GPU work, judged from the output that already exists."""
    if existing is None:
        return None
    meta = existing.metadata
    if meta.get(routing.SOURCE_KEY) != job.source_uri:
        return None
    try:
        done_generation = int(meta.get(routing.SOURCE_GENERATION_KEY, ""))
    except ValueError:
        return None
    generation = int(job.generation)
    if done_generation > generation:
        return f"superseded: the output already comes from newer generation {done_generation}"
    if (
        done_generation == generation
        and meta.get(routing.PARAMS_KEY) == plan.canonical
        and meta.get(routing.OPERATION_KEY) == plan.operation
    ):
        return "duplicate: the output already exists for this generation and these parameters"
    return None


def _params_dict(raw: Mapping[str, Any] | str | None) -> Mapping[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw, object_pairs_hook=no_duplicate_keys)  # {"steps": 3, "steps": 4}: which?
        except EventError as error:
            raise InvalidParameter(f"{routing.PARAMS_KEY} {error}") from None
        except (ValueError, RecursionError):
            raise InvalidParameter(f"{routing.PARAMS_KEY} is not valid JSON") from None
    if not isinstance(raw, Mapping):
        raise InvalidParameter(f"{routing.PARAMS_KEY} must be a JSON object")
    return raw


def _report_params(raw: Any) -> Any:
    """The parameters as given (an upload's imagen-params JSON read as the object it holds),
    or a bounded excerpt when they cannot be echoed back safely."""
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw, parse_constant=_no_constant)  # a report must stay strict JSON
        except (ValueError, RecursionError):
            return raw[:2000]
        if not isinstance(parsed, dict):
            return raw[:2000]
        raw = parsed
    try:
        text = json.dumps(raw, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        try:  # NaN or Infinity, which a job message's JSON may hold: as text
            return json.dumps(raw)[:2000]
        except (TypeError, ValueError, RecursionError):
            return "<unserialisable parameters>"
    return text[:2000] if len(text) > 2000 else raw


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _job_id(job: Job) -> str:
    key = f"{job.source_uri}#{job.generation}:{job.operation}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    """Adds the block's wall time in seconds to timings[name]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 4)
