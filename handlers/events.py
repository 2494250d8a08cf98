"""Event parsing: pure functions from a raw request or message to what it asks for.

Every transport (Eventarc CloudEvent, Pub/Sub push, Pub/Sub pull, a job message from another
service) is reduced to one of two plain values:

- `ObjectEvent`: Cloud Storage says something happened to an object;
- `JobRequest`: another service asks for an operation on an object.

Anything that cannot be parsed raises `EventError` with the reason; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime
import json
import re
from collections.abc import Mapping
from typing import Any

from cloudevents.http import from_http

from handlers.errors import EventError
from handlers.logs import clip

FINALIZE = "finalize"
# Cloud Storage notification eventType / CloudEvent type -> our event kind.
_NOTIFICATION_KINDS = {
    "OBJECT_FINALIZE": FINALIZE,
    "OBJECT_DELETE": "delete",
    "OBJECT_ARCHIVE": "archive",
    "OBJECT_METADATA_UPDATE": "metadata-update",
}
_CLOUDEVENT_PREFIX = "google.cloud.storage.object.v1."
_CLOUDEVENT_KINDS = {
    "finalized": FINALIZE,
    "deleted": "delete",
    "archived": "archive",
    "metadataUpdated": "metadata-update",
}
_JOB_FIELDS = {"source", "operation", "params", "output", "generation"}


@dataclasses.dataclass(frozen=True)
class ObjectEvent:
    """A Cloud Storage event about one object generation."""

    kind: str  # "finalize", "delete", "archive", "metadata-update", or the raw type
    bucket: str
    name: str
    generation: str | None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    size: int | None = None  # bytes, when the payload says
    content_type: str | None = None
    # False for a notification without its object (payloadFormat NONE): its metadata, which
    # routes the object and holds its parameters, is not known from the event.
    described: bool = True


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """A job message published by another service."""

    bucket: str
    name: str
    operation: str
    params: Mapping[str, Any]
    output: str | None = None  # "gs://bucket/path.png"
    generation: str | None = None
    # What is wrong with the message beyond its source (an unknown field, params that are no
    # object, a bad output or generation): its failure report says so, beside the source,
    # as an upload's bad `imagen-params` would be reported.
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Message:
    """A Pub/Sub message, whichever way it arrived."""

    data: bytes
    attributes: Mapping[str, str]
    message_id: str | None = None
    delivery_attempt: int | None = None  # only set when a dead-letter policy exists
    published: datetime.datetime | None = None  # when Pub/Sub accepted it (UTC)
    subscription: str | None = None  # the push subscription that delivered it, when it says


def parse_gs_uri(uri: Any) -> tuple[str, str]:
    """`gs://bucket/object` -> (bucket, object)."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise EventError(f"expected a gs://bucket/object URI, got {uri!r}")
    bucket, _, name = uri[len("gs://") :].partition("/")
    if not bucket or not name:
        raise EventError(f"expected a gs://bucket/object URI, got {uri!r}")
    return bucket, name


def is_cloudevent(headers: Mapping[str, str]) -> bool:
    """True for a CloudEvent in binary (ce-* headers) or structured mode."""
    lowered = {key.lower(): value for key, value in headers.items()}
    content_type = lowered.get("content-type", "").lower()  # media types are case-insensitive
    return "ce-specversion" in lowered or content_type.startswith("application/cloudevents")


def parse_cloudevent(headers: Mapping[str, str],
                     body: bytes) -> tuple[ObjectEvent, datetime.datetime | None, str | None]:
    """An Eventarc Cloud Storage CloudEvent (binary or structured mode) -> (ObjectEvent, its
    `time`: when the object changed (where a sender leaves it out, the object's own `updated`
    or `timeCreated`), or None when unreadable, its `id`: the same on every redelivery)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    if "ce-specversion" in lowered and (missing := [h for h in _CE_REQUIRED if not lowered.get(h)]):
        raise EventError(f"not a valid CloudEvent: no {', '.join(missing)} header")  # the SDK blames specversion
    try:
        # A key given twice is refused here as in a push message (the SDK keeps the last).
        parsed = json.loads(body, object_pairs_hook=no_duplicate_keys)
    except EventError as error:
        raise EventError(f"CloudEvent {error}") from None
    except (ValueError, TypeError, RecursionError):
        parsed = None  # not JSON: the SDK's to judge
    try:
        event = from_http({**lowered, "content-type": lowered.get("content-type", "").lower()}, body)
    except Exception as error:  # the SDK raises several unrelated types
        raise EventError(f"not a valid CloudEvent: {error}") from None
    event_type = event["type"]
    if not isinstance(event_type, str) or not event_type.startswith(_CLOUDEVENT_PREFIX):
        raise EventError(f"not a Cloud Storage CloudEvent: type {event_type!r}")
    short = event_type[len(_CLOUDEVENT_PREFIX) :]
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        data = _json_object(data, "CloudEvent data")
    if not isinstance(data, dict):
        raise EventError("CloudEvent data is not a Cloud Storage object resource")
    event_id = event.get("id")
    # The SDK sets a missing or null `time` to now: at every redelivery the event would look
    # new, and a lasting fault would be retried for as long as the sender retries, never
    # reported. So the sender's own, else the object's `updated` or `timeCreated`.
    given = lowered.get("ce-time") if "ce-specversion" in lowered else \
        parsed.get("time") if isinstance(parsed, dict) else None  # binary mode's header, structured's member
    sent = next(filter(None, map(parse_timestamp, (given, data.get("updated"), data.get("timeCreated")))), None)
    return (_object_event(_CLOUDEVENT_KINDS.get(short, short), data), sent,
            event_id if isinstance(event_id, str) and event_id else None)


_CE_REQUIRED = ("ce-id", "ce-source", "ce-type")  # binary mode's required attributes, with ce-specversion
PUBSUB_CLOUDEVENT = "google.cloud.pubsub.topic.v1.messagePublished"


def pubsub_cloudevent(headers: Mapping[str, str], body: bytes) -> Message | None:
    """The Pub/Sub message an Eventarc trigger on the topic delivers (`messagePublished`: its
    data is a push envelope, `{"subscription": ..., "message": {...}}`); None for any other
    CloudEvent. Such a trigger is the Eventarc way to take job messages from the topic."""
    lowered = {key.lower(): value for key, value in headers.items()}
    if "ce-specversion" in lowered:  # binary mode: the body is the data
        return parse_push_envelope(body) if lowered.get("ce-type") == PUBSUB_CLOUDEVENT else None
    try:
        event = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None  # parse_cloudevent says what is wrong with it
    if not isinstance(event, dict) or event.get("type") != PUBSUB_CLOUDEVENT:
        return None
    data = event.get("data")
    if not isinstance(data, dict):
        raise EventError("Pub/Sub CloudEvent data is not a push envelope")
    return _envelope_message(data)


def parse_push_envelope(body: bytes) -> Message:
    """A Pub/Sub push request body -> Message."""
    return _envelope_message(_json_object(body, "push request body"))


def _envelope_message(envelope: Mapping[str, Any]) -> Message:
    """A push envelope's JSON object -> Message."""
    message = envelope.get("message")
    if not isinstance(message, dict):
        raise EventError("push request has no 'message' object")
    data = message.get("data", "")
    if not isinstance(data, str):
        raise EventError("push message 'data' is not a base64 string")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise EventError("push message 'data' is not valid base64") from None
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise EventError("push message 'attributes' is not a map of strings")
    attempt = envelope.get("deliveryAttempt")
    if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool)):
        raise EventError("push 'deliveryAttempt' is not a number")
    message_id = message.get("messageId") or message.get("message_id")
    published = parse_timestamp(message.get("publishTime") or message.get("publish_time"))
    subscription = envelope.get("subscription")
    return Message(decoded, attributes, str(message_id) if message_id else None, attempt, published,
                   subscription if isinstance(subscription, str) and subscription else None)


def parse_message(message: Message) -> ObjectEvent | JobRequest:
    """A Pub/Sub message (pushed or pulled) -> a Storage notification or a job message.

    A Storage notification carries `eventType`/`payloadFormat` attributes; a job message does not.
    """
    attributes = message.attributes
    if "eventType" in attributes or "payloadFormat" in attributes:
        return _parse_notification(message)
    return _parse_job_message(message.data)


def _parse_notification(message: Message) -> ObjectEvent:
    attributes = message.attributes
    event_type = attributes.get("eventType", "")
    kind = _NOTIFICATION_KINDS.get(event_type, event_type or "unknown")
    described = attributes.get("payloadFormat") == "JSON_API_V1" and bool(message.data)
    if described:
        resource = _json_object(message.data, "notification payload")
    else:  # payload NONE: the attributes are all there is
        resource = {}
    resource.setdefault("bucket", attributes.get("bucketId"))
    resource.setdefault("name", attributes.get("objectId"))
    resource.setdefault("generation", attributes.get("objectGeneration"))
    return dataclasses.replace(_object_event(kind, resource), described=described)


def _parse_job_message(data: bytes) -> JobRequest:
    """A job message -> a JobRequest. Only a body that is no JSON object, or names no source,
    is unparseable (nowhere to report it: the dead-letter topic); anything else wrong is the
    request's `problem`, for a failure report beside the source (DESIGN.md: 400 only for a
    body that cannot be parsed at all)."""
    body = _json_object(data, "job message")
    unknown = set(body) - _JOB_FIELDS
    problems = [f"job message has unknown field(s): {', '.join(sorted(unknown))}"] if unknown else []
    try:
        bucket, name = parse_gs_uri(body.get("source"))
    except EventError as error:  # {"src": ...}: say what it holds rather than what it lacks
        raise EventError(problems[0] if problems else f"job message 'source': {error}") from None
    operation = body.get("operation")
    if not isinstance(operation, str) or not operation:
        problems.append("job message needs 'operation' (a string such as 'upscale')")
        operation = ""
    params = body.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):  # [], 0, "": a publisher's mistake, not "no parameters"
        problems.append("job message 'params' must be an object")
        params = {}
    output = body.get("output")
    if output is not None:
        try:
            parse_gs_uri(output)
        except EventError as error:
            problems.append(f"job message 'output': {error}")
            output = None
    try:
        generation = _generation(body.get("generation"))
    except EventError as error:
        problems.append(f"job message 'generation': {error}")
        generation = None
    # Each clipped as an unparseable message's reason is: a message may list 20,000 keys.
    problem = "; ".join(clip(text, EventError.REASON_LIMIT) for text in problems) or None
    return JobRequest(bucket, name, operation, params, output, generation, problem=problem)


def _object_event(kind: str, resource: Mapping[str, Any]) -> ObjectEvent:
    bucket, name = resource.get("bucket"), resource.get("name")
    if not isinstance(bucket, str) or not bucket:
        raise EventError("event does not name a bucket")
    if not isinstance(name, str) or not name:
        raise EventError("event does not name an object")
    metadata = resource.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise EventError("object 'metadata' is not a map")
    size = resource.get("size")
    try:
        size = int(size) if size is not None else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        raise EventError(f"object 'size' is not a number: {size!r}") from None
    content_type = resource.get("contentType")
    return ObjectEvent(
        kind=kind,
        bucket=bucket,
        name=name,
        generation=_generation(resource.get("generation")),
        metadata={str(k): str(v) for k, v in metadata.items()},
        size=size,
        content_type=content_type if isinstance(content_type, str) else None,
    )


def parse_timestamp(value: Any) -> datetime.datetime | None:
    """An RFC 3339 time as Pub/Sub and CloudEvents write it ("2026-11-26T23:13:28.123456789Z")
    -> an aware UTC datetime; None for anything else. Only used to judge a delivery's age, so a
    missing or odd value costs nothing but that."""
    if not isinstance(value, str):
        return None
    # Python reads at most microseconds: cut nanoseconds to six digits.
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        parsed = datetime.datetime.fromisoformat(text)
        return parsed.astimezone(datetime.UTC) if parsed.tzinfo else None
    except (ValueError, OverflowError):  # OverflowError: "0001-01-01T00:00:00+01:00"
        return None


def _generation(value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = str(value)
    if isinstance(value, bool) or not text.isdigit() or not text.isascii() or len(text.lstrip("0")) > 19:
        raise EventError(f"generation must be a number (at most 19 digits), got {value!r}"[:200])
    return text.lstrip("0") or "0"  # "0017" names generation 17: written as Cloud Storage writes it


def no_duplicate_keys(pairs: list) -> dict:
    """A JSON object's pairs as a dict (json's `object_pairs_hook`); EventError for a key given
    twice: {"operation": "upscale", "operation": "comic"}: a gateway that reads the first would
    disagree with imagen, which would read the last."""
    value = dict(pairs)
    if len(value) != len(pairs):
        twice = sorted(key for key, count in collections.Counter(key for key, _ in pairs).items() if count > 1)
        raise EventError(f"has duplicate key(s) {', '.join(map(repr, twice))}")
    return value


def _json_object(raw: bytes | str, what: str) -> dict:
    try:
        value = json.loads(raw, object_pairs_hook=no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise EventError(f"{what} is not valid JSON") from None
    except EventError as error:
        raise EventError(f"{what} {error}") from None
    if not isinstance(value, dict):
        raise EventError(f"{what} is not a JSON object")
    return value
