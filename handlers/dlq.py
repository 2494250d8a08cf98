"""Dead letters: inspect and replay the messages Pub/Sub moved to a dead-letter topic.

A message lands there after the main subscription's `max_delivery_attempts` (20 with the
Terraform; more than the processor's MAX_ATTEMPTS, after which a job's transient fault ends in
a failure report): a job turned away every time (Cloud Run's 429, every instance busy), or a
job whose failure report could not be written; or at once, moved there by the worker (below):
a message that cannot be parsed, a refused job message.

    letters = list_dead_letters(subscriber, dlq_subscription)   # pulled, then nacked: they stay
    report = replay(subscriber, publisher, dlq_subscription)   # republished, then acked

A message that no delivery can ever settle (not a job: unparseable; a job message for a
bucket not allowed) is moved there by the worker itself when it knows the dead-letter topic
(`DeadLetterer`, IMAGEN_DEAD_LETTER_TOPIC), with the attributes Pub/Sub would add and the
reason: otherwise it would go round 20 deliveries, about 2.3 h of backoff, each waking or
keeping a GPU instance.

Replay is at least once: each message is published (with its attributes, minus the ones
Pub/Sub added when dead-lettering it) and only acked from the dead-letter subscription once
the publish is confirmed. A crash in between replays it twice, which the processor's
idempotence absorbs (a duplicate is skipped without GPU work).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import inspect
import json
import logging
import time
from collections.abc import Collection, Iterator, Mapping

from google.api_core import exceptions as api_exceptions
from google.cloud import pubsub_v1

from handlers.errors import EventError
from handlers.events import JobRequest, Message, ObjectEvent, parse_message

log = logging.getLogger("imagen.dlq")

# Attributes Pub/Sub adds when it dead-letters a message (and names reserved to Google).
_DEAD_LETTER_PREFIX = "CloudPubSubDeadLetter"
SOURCE_SUBSCRIPTION = "CloudPubSubDeadLetterSourceSubscription"
SOURCE_PROJECT = "CloudPubSubDeadLetterSourceSubscriptionProject"
SOURCE_DELIVERY_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
SOURCE_PUBLISH_TIME = "CloudPubSubDeadLetterSourceTopicPublishTime"
REASON = "imagen-dead-letter-reason"  # why the worker moved it there itself
MOVED_FROM = "imagen-dead-letter-message-id"  # the id of the message the worker moved
MAX_ATTRIBUTE_VALUE = 1024  # bytes, Pub/Sub's limit
BATCH = 100  # messages per pull
PULL_SECONDS = 5.0  # how long a pull waits for messages before the subscription looks empty
LEASE_SECONDS = 120  # how long pulled messages are held while they are listed or replayed
PUBLISH_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One message in the dead-letter subscription."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: datetime.datetime | None
    delivery_attempt: int | None  # on the dead-letter subscription itself, when it has a policy

    @property
    def source_attempts(self) -> int | None:
        """Deliveries on the original subscription before it was dead-lettered."""
        value = self.attributes.get(SOURCE_DELIVERY_COUNT, "")
        return int(value) if value.isdigit() else None

    @property
    def source_subscription(self) -> str | None:
        """The full path of the subscription that dead-lettered it, when Pub/Sub says."""
        name = self.attributes.get(SOURCE_SUBSCRIPTION)
        if not name:
            return None
        if name.startswith("projects/"):
            return name
        project = self.attributes.get(SOURCE_PROJECT)
        return f"projects/{project}/subscriptions/{name}" if project else None

    @property
    def replay_attributes(self) -> dict[str, str]:
        """The attributes it was first published with."""
        return {
            key: value
            for key, value in self.attributes.items()
            if not _added_on_the_way(key)
        }

    @property
    def reason(self) -> str | None:
        """Why a worker dead-lettered it at once (None: Pub/Sub did, after its attempts)."""
        return self.attributes.get(REASON)

    @property
    def unparseable(self) -> str | None:
        """Why no worker can parse it (this imagen's parser), or None."""
        try:
            self._parsed()
        except EventError as error:
            return error.reason
        return None

    def _parsed(self):
        return parse_message(Message(self.data, self.replay_attributes, self.message_id))

    def describe(self) -> str:
        """What the message asks for, in one line, or why it cannot be parsed."""
        try:
            event = self._parsed()
        except EventError as error:
            return f"unparseable: {error.reason}; data {_excerpt(self.data)}"
        if isinstance(event, ObjectEvent):
            generation = f"#{event.generation}" if event.generation else ""
            return f"notification {event.kind} gs://{event.bucket}/{event.name}{generation}"
        assert isinstance(event, JobRequest)
        output = f" -> {event.output}" if event.output else ""
        return f"job message {event.operation} gs://{event.bucket}/{event.name}{output}"

    def to_json(self) -> dict:
        return {
            "message_id": self.message_id,
            "publish_time": self.publish_time.isoformat() if self.publish_time else None,
            "source_subscription": self.source_subscription,
            "source_attempts": self.source_attempts,
            "reason": self.reason,
            "delivery_attempt": self.delivery_attempt,
            "attributes": dict(self.attributes),
            "data": _excerpt(self.data, 2000),
            "data_base64": base64.b64encode(bytes(self.data)).decode(),  # whole: a copy to publish again
            "summary": self.describe(),
        }


def _added_on_the_way(key: str) -> bool:
    """An attribute Pub/Sub or a worker added when dead-lettering (names starting with "goog"
    are Google's)."""
    return key.startswith((_DEAD_LETTER_PREFIX, "goog")) or key in (REASON, MOVED_FROM)


class DeadLetterer:
    """Moves a message that no delivery can settle to the dead-letter `topic` at once, as
    Pub/Sub would after its attempts: its data and attributes, plus Pub/Sub's source
    attributes (so `imagen dlq list` and `replay` treat it alike) and REASON."""

    def __init__(self, publisher: pubsub_v1.PublisherClient, topic: str):
        self._publisher = publisher
        self.topic = topic

    def send(self, message: Message, subscription: str | None, reason: str) -> bool:
        """True once the dead-letter topic has it (then ack the original); False when it could
        not be published (then nack it: Pub/Sub's own policy still moves it, later)."""
        # A reason may quote what the message brought, lone surrogates of a JSON escape included
        # (not UTF-8: Pub/Sub would refuse the attribute): replaced, so the move cannot fail on it.
        added = {SOURCE_DELIVERY_COUNT: str(message.delivery_attempt or 1),
                 REASON: reason.encode(errors="replace")[:MAX_ATTRIBUTE_VALUE].decode(errors="ignore")}
        if message.message_id:  # a replay knows its own copies coming back by it
            added[MOVED_FROM] = message.message_id
        parts = (subscription or "").split("/")
        if len(parts) == 4 and parts[0] == "projects" and parts[2] == "subscriptions":  # a push envelope's, as sent
            added |= {SOURCE_SUBSCRIPTION: parts[3], SOURCE_PROJECT: parts[1]}
        if message.published is not None:
            added[SOURCE_PUBLISH_TIME] = message.published.isoformat()
        # Its job's id is its message id (Processor.handle): the line joins the job's others
        # ("job refused: ...") under one operation in the Logs Explorer.
        fields = {"job_id": message.message_id, "message_id": message.message_id, "topic": self.topic,
                  "reason": reason}
        try:
            kept = {key: value for key, value in message.attributes.items() if not _added_on_the_way(key)}
            publish(self._publisher, self.topic, message.data, {**kept, **added}).result(timeout=PUBLISH_SECONDS)
        except Exception as error:  # the message goes back to Pub/Sub instead
            log.error("could not move the message to the dead-letter topic: %s", error, extra={"fields": fields})
            return False
        log.warning("message moved to the dead-letter topic: %s", reason, extra={"fields": fields})
        return True


@dataclasses.dataclass
class ReplayReport:
    replayed: list[str] = dataclasses.field(default_factory=list)  # message ids
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # message id -> why
    left: int = 0  # pulled but not selected: left in the dead-letter subscription
    unparseable: list[str] = dataclasses.field(default_factory=list)  # message ids left: they would come back
    returned: int = 0  # this run's own copies pulled back: the topic feeds the subscription
    pulled: int = 0  # messages pulled from the dead-letter subscription in all
    unacked: list[str] = dataclasses.field(default_factory=list)  # replayed, but their ack failed: still here
    ack_error: str | None = None  # why; the run stopped there


def list_dead_letters(
    subscriber: pubsub_v1.SubscriberClient,
    subscription: str,
    *,
    limit: int = 1000,
    wait_seconds: float = PULL_SECONDS,
) -> list[DeadLetter]:
    """Up to `limit` messages in the dead-letter `subscription`; they are all left there.

    `wait_seconds`: how long a pull waits for more messages before the listing ends."""
    letters: list[DeadLetter] = []
    held: list[str] = []  # their ack ids
    lease = _Lease(subscriber, subscription)
    try:
        for batch in _batches(subscriber, subscription, limit, wait_seconds):
            letters.extend(batch)
            held.extend(letter.ack_id for letter in batch)
            lease.keep(held)
    finally:
        # Nack everything pulled: the messages are available again at once.
        _nack(subscriber, subscription, held)
    return letters


def replay(
    subscriber: pubsub_v1.SubscriberClient,
    publisher: pubsub_v1.PublisherClient,
    subscription: str,
    *,
    topic: str | None = None,
    limit: int = 1000,
    message_ids: Collection[str] = (),
    wait_seconds: float = PULL_SECONDS,
    unparseable: bool = False,
) -> ReplayReport:
    """Republish dead letters, then ack them from the dead-letter `subscription`.

    Each goes to `topic` (a full path) or, when None, back to the topic of the subscription
    that dead-lettered it. `message_ids`, when given, selects which; the rest are left, and so
    is any message whose publish fails, and, unless `unparseable`, any this imagen cannot
    parse: every reader of the topic would only dead-letter it again (each its own copy, so
    the copies multiplied). Where `topic` feeds `subscription` itself (the unrouted
    subscriptions' filters take the copies again), a copy this run published and pulls back is
    left too (`returned`): each message is replayed once, not until `limit`.
    """
    report = ReplayReport()
    topics: dict[str, str | None] = {}
    why_no_topic: dict[str, str] = {}
    held: list[str] = []  # ack ids to leave in place, nacked once the whole run is over
    published: set[str] = set()  # message ids of this run's copies
    replayed: set[str] = set()  # message ids replayed this run: one pulled again (its ack lost) is not
    lease = _Lease(subscriber, subscription)
    try:
        for batch in _batches(subscriber, subscription, limit, wait_seconds):
            lease.keep(held)
            futures = []
            again = []
            for letter in batch:
                report.pulled += 1
                # This run's own copy, back again (the topic feeds this subscription, or a worker
                # moved it here once more: what cannot be parsed always comes back).
                if letter.message_id in published or letter.attributes.get(MOVED_FROM) in published:
                    report.returned += 1
                    held.append(letter.ack_id)
                    continue
                if letter.message_id in replayed:  # published already: only its ack went missing
                    again.append(letter.ack_id)
                    continue
                if message_ids and letter.message_id not in message_ids:
                    report.left += 1
                    held.append(letter.ack_id)
                    continue
                if not unparseable and letter.unparseable is not None:
                    report.unparseable.append(letter.message_id)
                    held.append(letter.ack_id)
                    continue
                # Nothing one letter raises may leave the batch's published copies unacked (a
                # later run would publish them again): it is failed and left, and the run goes on.
                try:
                    target = topic or _source_topic(subscriber, letter, topics, why_no_topic)
                except Exception as error:  # the look-up's retries running out, a refusal
                    target, why_no_topic[letter.source_subscription or ""] = None, f"no topic: {error}"
                if target is None:
                    report.failed[letter.message_id] = why_no_topic.get(
                        letter.source_subscription or "",
                        "no topic: it does not name the subscription it came from; pass --topic")
                    held.append(letter.ack_id)
                    continue
                futures.append((letter, publish(publisher, target, letter.data, letter.replay_attributes)))
            done = []
            for letter, future in futures:  # publish first, ack after: at least once
                try:
                    published.add(future.result(timeout=PUBLISH_SECONDS))
                except Exception as error:
                    report.failed[letter.message_id] = f"publish failed: {error}"
                    held.append(letter.ack_id)
                    continue
                done.append(letter.ack_id)
                replayed.add(letter.message_id)
                report.replayed.append(letter.message_id)
            if done or again:
                try:
                    subscriber.acknowledge(request={"subscription": subscription, "ack_ids": done + again})
                except api_exceptions.GoogleAPIError as error:  # a refusal, or the client's retries running out
                    # Published, yet still in the subscription: another run would publish them
                    # again, and so would each later batch's failing ack. Stop here and say so.
                    report.unacked = [letter.message_id for letter, _ in futures if letter.ack_id in done]
                    report.ack_error = f"{type(error).__name__}: {error}"
                    break  # they come back once their lease runs out
            log.info(
                "dead letters replayed",
                extra={
                    "fields": {
                        "subscription": subscription,
                        "replayed": len(done),
                        "failed": len(futures) - len(done),
                    }
                },
            )
    finally:
        try:
            _nack(subscriber, subscription, held)
        except api_exceptions.GoogleAPIError as error:  # not the report's (or a failure's) end
            log.warning("could not hand %d dead letters back at once (%s): they come back within %d s",
                        len(held), error, LEASE_SECONDS)
    return report


class _Lease:
    """Keeps the messages a run holds leased: each pull leases its batch for LEASE_SECONDS,
    and a run that pulls for longer (a --limit of tens of thousands) renews what it still
    holds, or the first ones would come round again within the same run (twice in a listing,
    or counted twice as left)."""

    def __init__(self, subscriber, subscription: str):
        self._subscriber, self._subscription = subscriber, subscription
        self._renewed = time.monotonic()

    def keep(self, ack_ids: list[str]) -> None:
        """Renew `ack_ids` once a third of the lease has passed since the last renewal began
        (renewing tens of thousands takes a while itself). A renewal that fails is logged:
        at worst some come round again, as before."""
        now = time.monotonic()
        if now - self._renewed < LEASE_SECONDS / 3:
            return
        self._renewed = now
        try:
            _set_deadline(self._subscriber, self._subscription, ack_ids, LEASE_SECONDS)
        except api_exceptions.GoogleAPICallError as error:
            log.warning("could not renew the lease of %d dead letters: %s", len(ack_ids), error)


def _batches(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, limit: int, wait_seconds: float
) -> Iterator[list[DeadLetter]]:
    """Pulled batches until the subscription looks empty or `limit` messages were pulled.

    Messages pulled stay leased (LEASE_SECONDS, renewed by the caller's `_Lease`) until the
    caller acks or nacks them, so no message comes twice within one listing."""
    seen = 0
    while seen < limit:
        try:
            response = subscriber.pull(
                request={"subscription": subscription, "max_messages": min(BATCH, limit - seen)},
                timeout=wait_seconds,
            )
        except api_exceptions.DeadlineExceeded:
            return
        received = list(response.received_messages)
        if not received:
            return
        _set_deadline(subscriber, subscription, [r.ack_id for r in received], LEASE_SECONDS)
        seen += len(received)
        yield [_dead_letter(r) for r in received]


def _dead_letter(received) -> DeadLetter:
    message = received.message
    publish_time = message.publish_time if message.publish_time else None
    return DeadLetter(
        ack_id=received.ack_id,
        message_id=message.message_id,
        data=bytes(message.data),
        attributes=dict(message.attributes),
        publish_time=publish_time,
        delivery_attempt=received.delivery_attempt or None,
    )


# publish()'s own parameters: an attribute of one of these names passed as a keyword went to
# the parameter (retry, timeout, ordering_key) or raised (topic, data).
_PUBLISH_PARAMETERS = frozenset(inspect.signature(pubsub_v1.PublisherClient.publish).parameters) - {"attrs"}


def publish(publisher: pubsub_v1.PublisherClient, topic: str, data: bytes,
            attributes: Mapping[str, str]) -> concurrent.futures.Future:
    """`publisher.publish(topic, data, **attributes)`, whatever the attributes are named (one
    named like a parameter of publish() goes through the API itself: one request, at once),
    and what it raises at once in the future too, as what the publish raises later."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        if not _PUBLISH_PARAMETERS & set(attributes):
            return publisher.publish(topic, data, **attributes)
        response = publisher.api.publish(request={"topic": topic, "messages": [
            {"data": data, "attributes": dict(attributes)}]}, timeout=PUBLISH_SECONDS)
        future.set_result(response.message_ids[0])
    except Exception as error:
        future.set_exception(error)
    return future


def _source_topic(subscriber, letter: DeadLetter, cache: dict[str, str | None],
                  why_not: dict[str, str]) -> str | None:
    """The topic of the subscription that dead-lettered `letter`; None, with the reason in
    `why_not`, when it cannot be read (gone; no pubsub.subscriptions.get, which
    roles/pubsub.subscriber lacks)."""
    path = letter.source_subscription
    if path is None:
        return None
    if path not in cache:
        try:
            cache[path] = subscriber.get_subscription(request={"subscription": path}).topic
        except (api_exceptions.NotFound, api_exceptions.PermissionDenied) as error:
            cache[path] = None
            why_not[path] = f"no topic: cannot read {path} ({error.code} {error.message}); pass --topic"
    return cache[path]


def _nack(subscriber, subscription: str, ack_ids: list[str]) -> None:
    _set_deadline(subscriber, subscription, ack_ids, 0)


def _set_deadline(subscriber, subscription: str, ack_ids: list[str], seconds: int) -> None:
    """Lease `ack_ids` for `seconds` more (0: nack), BATCH at a time."""
    for start in range(0, len(ack_ids), BATCH):
        subscriber.modify_ack_deadline(request={"subscription": subscription, "ack_ids": ack_ids[start:start + BATCH],
                                                "ack_deadline_seconds": seconds})


def _excerpt(data: bytes, limit: int = 160) -> str:
    """The data as text (JSON compacted) when it is, else its bytes; cut to `limit` chars."""
    try:
        text = json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):
        text = repr(data)
    return text if len(text) <= limit else text[: limit - 1] + "…"
