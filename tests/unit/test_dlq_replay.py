"""`imagen dlq replay` against what the emulator cannot stage: an ack that Pub/Sub lost, and a
subscription the operator may not read."""

from __future__ import annotations

import itertools
import types
from concurrent.futures import Future

from google.api_core import exceptions as api_exceptions

from handlers import dlq


def _received(ack_id: str, message_id: str, **attributes):
    return types.SimpleNamespace(ack_id=ack_id, delivery_attempt=0, message=types.SimpleNamespace(
        message_id=message_id, data=b'{"source": "gs://b/o", "operation": "upscale"}', publish_time=None,
        attributes={"operation": "upscale", **attributes}))


class _Subscriber:
    def __init__(self, *batches):
        self.batches, self.acked, self.nacked = list(batches) + [[]], [], []

    def pull(self, request, timeout):
        return types.SimpleNamespace(received_messages=self.batches.pop(0))

    def modify_ack_deadline(self, request):
        if request["ack_deadline_seconds"] == 0:
            self.nacked += request["ack_ids"]

    def acknowledge(self, request):
        self.acked += request["ack_ids"]

    def get_subscription(self, request):
        raise api_exceptions.PermissionDenied("User not authorized to perform this action.")


class _Publisher:
    def __init__(self):
        self.published, self._ids = [], itertools.count(100)

    def publish(self, topic, data, **attributes):
        self.published.append((topic, data))
        future = Future()
        future.set_result(str(next(self._ids)))
        return future


def test_a_message_whose_ack_was_lost_is_not_published_twice():
    # Its lease ran out during a slow batch, or the ack went missing: Pub/Sub delivers the
    # same message again within the run.
    subscriber, publisher = _Subscriber([_received("a1", "m1")], [_received("a2", "m1")]), _Publisher()
    report = dlq.replay(subscriber, publisher, "projects/p/subscriptions/dl", topic="projects/p/topics/t")
    assert report.replayed == ["m1"] and len(publisher.published) == 1
    assert subscriber.acked == ["a1", "a2"] and not subscriber.nacked


def test_a_source_subscription_the_operator_may_not_read_says_to_pass_the_topic():
    # roles/pubsub.subscriber has no pubsub.subscriptions.get: the run goes on, says why.
    letter = _received("a1", "m1", **{dlq.SOURCE_SUBSCRIPTION: "imagen-upscale", dlq.SOURCE_PROJECT: "p"})
    subscriber, publisher = _Subscriber([letter]), _Publisher()
    report = dlq.replay(subscriber, publisher, "projects/p/subscriptions/dl")
    assert not report.replayed and not publisher.published and subscriber.nacked == ["a1"]
    assert report.failed == {"m1": "no topic: cannot read projects/p/subscriptions/imagen-upscale (403 User not "
                                   "authorized to perform this action.); pass --topic"}


def test_an_ack_that_fails_stops_the_run_and_names_what_was_published():
    # Pub/Sub failing after the publish: the copies are out, the originals still there.
    class _Refusing(_Subscriber):
        def acknowledge(self, request):
            raise api_exceptions.ServiceUnavailable("The service is currently unavailable.")

        def modify_ack_deadline(self, request):  # leases taken; handing back fails too
            if request["ack_deadline_seconds"] == 0:
                raise api_exceptions.ServiceUnavailable("The service is currently unavailable.")

    later = [_received("b1", "m3")]
    first = [_received("a1", "m1"), _received("a9", "m9"), _received("a2", "m2")]  # m9 not asked for
    subscriber, publisher = _Refusing(first, later), _Publisher()
    report = dlq.replay(subscriber, publisher, "projects/p/subscriptions/dl", topic="projects/p/topics/t",
                        message_ids={"m1", "m2", "m3"})  # handing m9 back fails too: the report still comes
    assert report.replayed == ["m1", "m2"] and report.unacked == ["m1", "m2"] and report.left == 1
    assert report.ack_error == "ServiceUnavailable: 503 The service is currently unavailable."
    assert len(publisher.published) == 2 and subscriber.batches[0] == later  # the next batch not pulled


def test_an_ack_whose_retries_run_out_stops_the_run_too():
    # What the client library raises in an outage: its own retries of acknowledge (and of the
    # hand-back) exhausted, a RetryError, which is no GoogleAPICallError.
    class _Outage(_Subscriber):
        def acknowledge(self, request):
            raise api_exceptions.RetryError("Timeout of 60.0s exceeded", api_exceptions.ServiceUnavailable("503"))

        def modify_ack_deadline(self, request):
            if request["ack_deadline_seconds"] == 0:
                raise api_exceptions.RetryError("Timeout of 60.0s exceeded", api_exceptions.ServiceUnavailable("503"))

    subscriber, publisher = _Outage([_received("a1", "m1"), _received("a9", "m9")]), _Publisher()
    report = dlq.replay(subscriber, publisher, "projects/p/subscriptions/dl", topic="projects/p/topics/t",
                        message_ids={"m1"})
    assert report.unacked == ["m1"] and report.ack_error.startswith("RetryError: Timeout of 60.0s exceeded")
