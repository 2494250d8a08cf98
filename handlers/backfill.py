"""Backfill: queue job messages for existing objects that have no up-to-date output.

Objects are judged exactly as the processor judges a job (routing, then `plan_job`, then the
output's `imagen-source-generation` and parameters, and whether another source's result holds
the output), so a backfill queues only what a worker would really do, and running it again
after a stop queues nothing already done. What failed before for the same generation and
parameters because of what it is (its failure report says so: not an image, too large, bad
parameters, too long or too big for the GPU, an operation no pool runs) is not queued again
unless asked (`retry_failed`): it would fail again. A failure of the situation (no access, an
output name another source held, a fault that outlasted its retries) is queued again: the
usual moment for a backfill is just after fixing such a thing. Each
message names the object generation it was listed at, and carries the `operation` attribute
that each operation's subscription filters on (without it, filtered subscriptions drop it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator

from google.cloud import storage

from handlers import routing
from handlers.errors import JobStoppedWorker, OperationNotDeployed, UnsafeObjectName
from handlers.events import FINALIZE, ObjectEvent
from handlers.processor import plan_job, skip_reason, taken_by
from handlers.routing import Ignored, Layout
from handlers.storage import ObjectState, Store
from image.errors import (
    DecompressionBomb,
    ImagenError,
    ImageDecodeError,
    ImageTooLarge,
    InputError,
    InvalidParameter,
    JobTooLong,
    OutOfDeviceMemory,
    UnknownOperation,
)
from image.operations import OPERATION_NAMES
from image.params import canonical_json, validate_params

OUTPUT_TAKEN = "would fail: OutputTaken (another source's result holds its output name)"
PUBLISH_WINDOW = 100
"""Publishes awaiting Pub/Sub's answer at once: one at a time, a publish's round trip (20-50
ms from a laptop) capped the rate far below --rate."""
PUBLISH_TIMEOUT_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Decision:
    uri: str
    action: str  # "queue", "done" or "skip"
    reason: str = ""  # what the summary counts by
    detail: str = ""  # what --verbose adds: the failure's own message
    message: dict | None = None  # the job message to publish, for "queue"
    output: tuple[str, str] | None = None  # (bucket, name) its job would write, for "queue"


@dataclasses.dataclass
class Summary:
    queued: int = 0
    done: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    looked_at: int = 0  # objects settled so far
    current: str = ""  # where a stopped run goes on: the first object it did not settle

    def add(self, decision: Decision) -> None:
        self.looked_at += 1
        if decision.action == "queue":
            self.queued += 1
        elif decision.action == "done":
            self.done += 1
        else:
            self.skipped[decision.reason] += 1

    def lines(self) -> list[str]:
        lines = [f"queued: {self.queued}", f"already done: {self.done}",
                 f"skipped: {sum(self.skipped.values())}"]
        lines += [f"  {count} x {reason}" for reason, count in self.skipped.most_common()]
        return lines


def decide(blob: storage.Blob, layout: Layout, store: Store, operation: str | None,
           retry_failed: bool = False, only: frozenset[str] = frozenset()) -> Decision:
    """What to do about one listed object. `only`: the operations and chains some worker
    serves (each as `parse_chain` writes it); a job for anything else is not queued."""
    uri = f"gs://{blob.bucket.name}/{blob.name}"
    generation = str(blob.generation)
    metadata = dict(blob.metadata or {})
    if operation:  # as if the object carried imagen-operation metadata
        metadata[routing.OPERATION_KEY] = operation
    job = routing.route_event(
        ObjectEvent(FINALIZE, blob.bucket.name, blob.name, generation, metadata, blob.size), layout
    )
    if isinstance(job, Ignored):
        return Decision(uri, "skip", job.reason)
    try:
        plan = plan_job(job, layout, frozenset(OPERATION_NAMES))
    except InputError as error:
        return Decision(uri, "skip", f"would fail: {type(error).__name__}", detail=str(error))
    if only and plan.operation not in only:
        return Decision(uri, "skip", f"not served: {plan.operation} (not among --only: {'; '.join(sorted(only))})")
    state: ObjectState | None = store.stat(*plan.output)
    if skip_reason(state, job, plan):
        return Decision(uri, "done")
    if taken_by(state, job, store.stat):
        return Decision(uri, "skip", OUTPUT_TAKEN)
    if not retry_failed:
        report = store.read_report(*routing.failure_location(job, layout))
        if _same_job(report, generation, plan):
            return Decision(uri, "skip", "failed before with these parameters (see its failure report; "
                                         "--retry-failed queues it again)")
    message = {"source": uri, "operation": plan.operation, "params": plan.params, "generation": generation}
    return Decision(uri, "queue", message=message, output=plan.output)


# Failures of the job itself, which the same generation and parameters meet again: a report
# of one of these keeps backfill from queueing it. Any other (no access, OutputTaken, a pool
# that did not serve where it was delivered, a fault that outlasted its retries) depended on
# the situation, which a backfill usually follows the fixing of.
_FAILURES_OF_THE_JOB = frozenset({
    InputError.__name__, ImageDecodeError.__name__, ImageTooLarge.__name__, DecompressionBomb.__name__,
    InvalidParameter.__name__, UnknownOperation.__name__, UnsafeObjectName.__name__,
    JobTooLong.__name__, OutOfDeviceMemory.__name__, OperationNotDeployed.__name__, JobStoppedWorker.__name__,
})


def _same_job(report: dict | None, generation: str, plan) -> bool:
    """Whether a failure report is about this generation with `plan`'s parameters, and says
    the job itself failed (`_FAILURES_OF_THE_JOB`). The report's parameters are normalised as
    the plan's were: one written before any pool planned the job (an operation no pool
    runs) holds them as given, "20" where the plan has 20."""
    if not report or str(report.get("generation")) != generation:
        return False
    if (report.get("error") or {}).get("type") not in _FAILURES_OF_THE_JOB:
        return False
    try:
        return canonical_json(validate_params(plan.chain, report.get("params") or {})) == plan.canonical
    except (ImagenError, TypeError, ValueError):
        return False


def backfill(
    client: storage.Client,
    bucket: str,
    prefix: str,
    layout: Layout,
    *,
    operation: str | None,
    publish: Callable[[bytes, dict[str, str]], None] | None,
    rate: float,
    retry_failed: bool = False,
    only: frozenset[str] = frozenset(),
    on_decision: Callable[[Decision], None] = lambda decision: None,
    summary: Summary | None = None,
    workers: int = 16,
    start_at: str | None = None,
) -> Summary:
    """List gs://bucket/prefix and publish a job message for each object needing work.

    `publish(data, attributes)` returns the publish's future (up to PUBLISH_WINDOW await
    their answer at once; an object counts as queued, and `on_decision` hears of it, once
    its publish is answered, in listing order); None is a dry run. `rate` bounds publishing
    in messages per second. Of two listed objects that would write one output (photo.jpg, photo.png), only
    the first is queued: the other would fail with OutputTaken. `summary`, when given, is
    filled as it goes: what a run that stopped on an error had done, and (`current`) the
    first object not settled, where a run can go on. `workers` objects are
    looked at (their outputs and reports read) at once, decided and published in listing
    order: a bucket of millions is hours of lookups one at a time. `start_at`: the first
    object name to list (where a stopped run stopped).
    """
    store = Store(client)
    summary = Summary() if summary is None else summary
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    claimed: set[int] = set()  # `_output_key` of each output a queued object will write
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backfill") as pool:
        ahead: collections.deque = collections.deque()  # (uri, its decision to come), in listing order

        def decided() -> Iterator[tuple[str, Decision]]:
            for blob in _objects(client, bucket, prefix, start_at):
                ahead.append((f"gs://{blob.bucket.name}/{blob.name}",
                              pool.submit(decide, blob, layout, store, operation, retry_failed, only)))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft()
            while ahead:
                yield ahead.popleft()

        # (decision, its publish's future or None), in listing order, not yet counted
        unsettled: collections.deque = collections.deque()

        def settle(keep: int) -> None:
            """Count the decisions whose publish was answered, in order, leaving at most `keep`."""
            while unsettled and (len(unsettled) > keep or unsettled[0][1] is None or unsettled[0][1].done()):
                decision, published = unsettled[0]
                if published is not None:
                    published.result(timeout=PUBLISH_TIMEOUT_SECONDS)
                unsettled.popleft()
                summary.add(decision)
                on_decision(decision)

        deciding = None  # the object whose decision is awaited
        try:
            for deciding, future in decided():
                decision, next_at = _claim(future.result(), claimed, publish, interval, next_at)
                deciding = None
                unsettled.append(decision)
                settle(PUBLISH_WINDOW)
            settle(0)
        except BaseException:  # an error, Ctrl-C: the first object not counted is where to go on
            summary.current = unsettled[0][0].uri if unsettled else deciding or (ahead[0][0] if ahead else "")
            # The lookups not started are dropped: leaving the pool would wait for each (up
            # to 2 x workers, each retried for minutes where the network is what failed).
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return summary


def _claim(decision: Decision, claimed: set, publish, interval: float, next_at: float):
    """((the decision, its publish's future or None), the next publish's earliest time):
    publishes (at the rate) what is to be queued, unless an earlier object claimed its output."""
    if decision.action == "queue":
        key = _output_key(decision.output)
        if key in claimed:
            decision = Decision(decision.uri, "skip", OUTPUT_TAKEN)
        else:
            claimed.add(key)
    if decision.action != "queue" or publish is None:
        return (decision, None), next_at
    delay = next_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    published = publish(json.dumps(decision.message).encode(), {"operation": decision.message["operation"]})
    return (decision, published), max(next_at, time.monotonic()) + interval


def _output_key(output: tuple[str, str]) -> int:
    """An output's (bucket, name) as 64 bits: a run over millions of objects remembers each
    queued one's output, and the pair of strings took ~195 bytes a piece (~80 as a number).
    Two outputs sharing a key (odds ~3e-6 in a run of ten million) would only leave the second
    unqueued, counted as OutputTaken."""
    bucket, name = output
    digest = hashlib.blake2b(f"{bucket}/{name}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _objects(client: storage.Client, bucket: str, prefix: str, start_at: str | None = None) -> Iterator[storage.Blob]:
    for blob in client.list_blobs(bucket, prefix=prefix, start_offset=start_at):
        if not blob.name.endswith("/"):
            yield blob
