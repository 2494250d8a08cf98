"""The pull worker behind `imagen worker --subscription S` (GKE, Cloud Run worker pools).

Streaming pull with flow control sized to the concurrency (default one job per GPU) plus
`prefetch` jobs that download and decode while the GPU runs (the engine runs one job at a time,
so a prefetched job waits for the GPU, not the network); the client library extends each lease
up to `max_lease_seconds`. On SIGTERM or SIGINT it stops pulling, lets the job on the GPU
finish, hands back (nacks) prefetched jobs still waiting for the GPU, so a drain takes one
job's time, and returns; messages received but not started are nacked by the library, so
nothing is lost. A stream that dies (the subscription deleted, permissions lost) stops it the
same way, and run() raises the stream's error. A message no delivery can settle goes to the
dead-letter topic at once where one is given (`dead_letters`), else is nacked for the
dead-letter policy. When the GPU fails for good (`device_failed()`: a CUDA error other than
out of memory) it stops the same way and raises DeviceFailed, so the process exits non-zero
and its platform restarts it, instead of failing every job fast (and so taking most of them).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
from collections.abc import Callable

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from handlers import metrics
from handlers.dlq import DeadLetterer
from handlers.errors import EventError, TransientError, Undeliverable
from handlers.events import Message, parse_message
from handlers.logs import JsonFormatter, error_fields
from image.errors import DeviceFailed

log = logging.getLogger("imagen.worker")


class _Scheduler(ThreadScheduler):
    """The client library's scheduler, telling the worker when the stream stops, before the
    library waits for the jobs in hand: on SIGTERM (the worker's cancel) and when the stream
    dies (the subscription deleted, permissions lost), so the jobs waiting for the GPU are
    handed back in both cases. (The stream's future resolves only after every job in hand
    ended: a prefetched job ran its whole budget on a worker whose stream was gone.)"""

    def __init__(self, executor, stopping: Callable[[], None]):
        super().__init__(executor)
        self._stopping = stopping

    def shutdown(self, await_msg_callbacks: bool = False):
        self._stopping()
        return super().shutdown(await_msg_callbacks=await_msg_callbacks)


class PullWorker:
    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        subscription: str,
        processor,
        *,
        concurrency: int = 1,
        prefetch: int = 1,
        max_lease_seconds: int = 3600,
        lease_extension_seconds: int = 60,
        device_failed: Callable[[], bool] = lambda: False,
        dead_letters: DeadLetterer | None = None,
    ):
        self._subscriber = subscriber
        self._subscription = subscription
        self._processor = processor
        self._in_hand = concurrency + prefetch
        self._max_lease_seconds = max_lease_seconds
        self._lease_extension_seconds = lease_extension_seconds
        self._device_failed = device_failed
        self._dead_letters = dead_letters
        self._stop = threading.Event()
        self._signalled = False  # a SIGTERM or SIGINT came (`stop` is also called without one)
        self._future = None

    def handle(self, message) -> None:
        """Process one pulled message, then ack it, or nack it for a retry. Nothing escapes: an
        error out of this callback would end the streaming pull, and the process with it, at
        every delivery of the message that raised it."""
        try:
            self._handle(message)
        except Exception as error:
            try:  # even an error whose text cannot be made (a __str__ that raises) is nacked
                log.exception("unexpected error; the message goes back to Pub/Sub: %s: %s", type(error).__name__,
                              error, extra={"fields": {"message_id": message.message_id, "error": error_fields(error)}})
            finally:
                message.nack()

    def _handle(self, message) -> None:
        parsed_message = Message(
            bytes(message.data),
            dict(message.attributes),
            message.message_id,
            message.delivery_attempt,
            message.publish_time,
        )
        fields = {"message_id": message.message_id, "attempt": message.delivery_attempt}
        try:
            event = parse_message(parsed_message)
        except EventError as error:
            log.warning("unparseable message: %s", error.reason, extra={"fields": fields})
            moved = self._dead_letter(message, parsed_message, f"unparseable: {error.reason}")
            metrics.record_undeliverable(None, moved, unparseable=True)
            return
        try:
            self._processor.handle(
                event, message_id=message.message_id, attempt=message.delivery_attempt,
                sent=parsed_message.published, withdrawn=self._stop.is_set,
            )
        except Undeliverable as error:
            metrics.record_undeliverable(error.operation, self._dead_letter(message, parsed_message, str(error)))
        except TransientError:
            message.nack()  # back to Pub/Sub: retried, or dead-lettered after its attempts
        except Exception as error:
            log.exception("unexpected error; the message goes back to Pub/Sub: %s: %s", type(error).__name__, error,
                          extra={"fields": {**fields, "error": error_fields(error)}})
            message.nack()
        else:
            message.ack()
        if self._device_failed() and not self._stop.is_set():
            # The engine's CRITICAL line said why; this one, what is done about it.
            log.warning("the GPU failed: stopping, so that a new process takes over",
                        extra={"fields": {"subscription": self._subscription}})
            self.stop()

    def _dead_letter(self, message, parsed: Message, reason: str) -> bool:
        """A message no delivery can settle: to the dead-letter topic now, where one is known
        (True); else (or if that fails) nacked, for the dead-letter policy to move after its
        attempts."""
        if self._dead_letters is not None and self._dead_letters.send(parsed, self._subscription, reason):
            message.ack()
            return True
        message.nack()
        return False

    def run(self, install_signal_handlers: bool = True) -> None:
        """Pull until `stop()` (or SIGTERM/SIGINT); returns once the job on the GPU finishes
        and the ones waiting for it are handed back. A second signal ends the process at once."""
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._in_hand, thread_name_prefix="imagen-job"
        )
        flow_control = pubsub_v1.types.FlowControl(
            max_messages=self._in_hand,
            max_lease_duration=self._max_lease_seconds,
            # Each renewal extends the deadline by this much: if the process dies, its
            # messages are redelivered after about this long (0: the library's own, the 99th
            # percentile of ack latency, 10 s to 10 minutes). The minimum too: the library
            # starts at 10 s (no ack timed yet), and after quick acks (skips, duplicates)
            # goes back there, so a stall of 10 s would redeliver a running job.
            min_duration_per_lease_extension=self._lease_extension_seconds,
            max_duration_per_lease_extension=self._lease_extension_seconds,
        )
        self._future = self._subscriber.subscribe(
            self._subscription,
            self.handle,
            flow_control=flow_control,
            scheduler=_Scheduler(executor, stopping=self.stop),
            await_callbacks_on_shutdown=True,
        )
        # A stream that dies (no such subscription, lost permissions) ends the process too:
        # the scheduler's shutdown says so (_Scheduler), and this for a stream that never started.
        self._future.add_done_callback(lambda _: self._stop.set())
        log.info(
            "pulling",
            extra={"fields": {"subscription": self._subscription, "messages_in_hand": self._in_hand}},
        )
        self._stop.wait()
        log.info("stopping: finishing the job on the GPU, handing back the ones waiting",
                 extra={"fields": {"subscription": self._subscription}})
        self._future.cancel()
        try:
            self._future.result(timeout=self._max_lease_seconds)
        except concurrent.futures.CancelledError:
            pass
        log.info("stopped", extra={"fields": {"subscription": self._subscription}})
        if self._device_failed():
            raise DeviceFailed("the GPU failed in a job; the jobs in hand went back to Pub/Sub")

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, frame) -> None:
        """The first SIGTERM or SIGINT stops pulling and lets the job on the GPU finish; a
        second (a second Ctrl-C while a CPU job takes minutes) ends the process there."""
        if not self._signalled:
            self._signalled = True
            self.stop()
            return
        _write_now(logging.WARNING, "%s again: stopping now; the jobs in hand go back to Pub/Sub when their leases "
                   "run out", signal.Signals(signum).name, fields={"subscription": self._subscription})
        os._exit(128 + signum)


def exit_on_signal_while_starting() -> None:
    """Until `PullWorker.run` installs its own handlers: SIGTERM or SIGINT while the models
    load ends the process at once (no message is held yet). A process with no handler for
    SIGTERM that is PID 1 in its container (GKE runs `imagen worker` itself) never receives
    it: a scale-down or a drain during set-up went unheard, and the pod then took jobs until
    the grace period's SIGKILL cut one off, an hour later."""

    def stop(signum: int, frame) -> None:
        _write_now(logging.INFO, "%s while starting: stopped before taking any job", signal.Signals(signum).name)
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def _write_now(level: int, message: str, *args, fields: dict | None = None) -> None:
    """One log line from a signal handler: formatted as every line is, but written directly,
    not through logging's handler, whose lock may be held by the thread the signal
    interrupted, or by one blocked writing."""
    record = log.makeRecord(log.name, level, __file__, 0, message, args, None, extra={"fields": fields or {}})
    os.write(1, (JsonFormatter().format(record) + "\n").encode())
