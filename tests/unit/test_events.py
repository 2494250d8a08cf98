"""Event parsing against golden files: one real shape per file under tests/golden/."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from pathlib import Path

import pytest

from handlers.errors import EventError
from handlers.events import (
    JobRequest,
    Message,
    ObjectEvent,
    is_cloudevent,
    parse_cloudevent,
    parse_message,
    parse_push_envelope,
    parse_timestamp,
)

GOLDEN = Path(__file__).parent.parent / "golden"


def _golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def _plain(value) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(value)))


@pytest.mark.parametrize(
    "name",
    [
        "cloudevent_binary_finalized.json",
        "cloudevent_structured_finalized.json",
        "cloudevent_binary_deleted.json",
    ],
)
def test_cloudevents(name):
    case = _golden(name)
    headers, body = case["input"]["headers"], json.dumps(case["input"]["body"]).encode()
    assert is_cloudevent(headers)
    event, sent, event_id = parse_cloudevent(headers, body)
    assert isinstance(event, ObjectEvent)
    assert _plain(event) == case["expected"]
    assert sent == datetime.datetime(2026, 11, 26, 8, 0, 0, 123456, tzinfo=datetime.UTC)
    # The id, in a header or in the body: what a redelivery's logs and duplicate check match on.
    assert event_id == "9876543210123456"


@pytest.mark.parametrize("name", ["cloudevent_binary_finalized.json", "cloudevent_structured_finalized.json"])
def test_a_cloudevent_without_time_is_as_old_as_its_object_not_new_at_every_delivery(name):
    # The SDK sets a missing `time` to now: a lasting fault would never reach its last try.
    case = _golden(name)
    headers = {key: value for key, value in case["input"]["headers"].items() if key != "ce-time"}
    body = {key: value for key, value in case["input"]["body"].items() if key != "time"}
    _, sent, _ = parse_cloudevent(headers, json.dumps(body).encode())
    assert sent == datetime.datetime(2026, 11, 26, 8, 0, 0, 123000, tzinfo=datetime.UTC)  # the object's `updated`
    # A `time` given but null or unreadable is no time either (the SDK made a null one now).
    for odd in (None, "yesterday"):
        if "ce-specversion" in headers:
            given, given_body = ({**headers, "ce-time": odd} if odd else headers), body
        else:
            given, given_body = headers, {**body, "time": odd}
        _, sent, _ = parse_cloudevent(given, json.dumps(given_body).encode())
        assert sent == datetime.datetime(2026, 11, 26, 8, 0, 0, 123000, tzinfo=datetime.UTC), odd


def test_a_structured_cloudevent_is_known_whatever_the_case_of_its_media_type():
    case = _golden("cloudevent_structured_finalized.json")
    headers = {"Content-Type": "Application/CloudEvents+JSON; charset=UTF-8"}
    assert is_cloudevent(headers)
    event, _, _ = parse_cloudevent(headers, json.dumps(case["input"]["body"]).encode())
    assert _plain(event) == case["expected"]


@pytest.mark.parametrize("name", ["cloudevent_binary_finalized.json", "cloudevent_structured_finalized.json"])
def test_a_cloudevent_with_a_key_given_twice_is_refused_as_a_push_message_is(name):
    # Processed as the last key's object; the same body in a push message is dead-lettered.
    case = _golden(name)
    body = json.dumps(case["input"]["body"])
    twice = body.replace('"name": ', '"name": "incoming/upscale/other.png", "name": ', 1)
    assert twice != body
    with pytest.raises(EventError, match="duplicate key"):
        parse_cloudevent(case["input"]["headers"], twice.encode())


@pytest.mark.parametrize("missing", ["ce-id", "ce-type", "ce-source"])
def test_a_binary_cloudevent_missing_a_header_is_named(missing):
    # The SDK said "Failed to find specversion" for each, ce-specversion being there.
    case = _golden("cloudevent_binary_finalized.json")
    headers = {key: value for key, value in case["input"]["headers"].items() if key != missing}
    with pytest.raises(EventError, match=f"no {missing} header"):
        parse_cloudevent(headers, json.dumps(case["input"]["body"]).encode())


@pytest.mark.parametrize(
    "name",
    ["push_notification_json_api_v1.json", "push_notification_none.json", "push_job_message.json"],
)
def test_push_envelopes(name):
    case = _golden(name)
    body = json.dumps(case["input"]).encode()
    assert not is_cloudevent({"content-type": "application/json"})
    message = parse_push_envelope(body)
    assert message.message_id == case["expected_message"]["message_id"]
    assert message.delivery_attempt == case["expected_message"]["delivery_attempt"]
    assert message.published == parse_timestamp(case["input"]["message"]["publishTime"])
    assert message.published.tzinfo is datetime.UTC
    assert _plain(parse_message(message)) == case["expected"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-26T08:00:01Z", datetime.datetime(2026, 11, 26, 8, 0, 1, tzinfo=datetime.UTC)),
        # Pub/Sub writes nanoseconds; Python keeps microseconds.
        ("2026-11-26T08:00:01.123456789Z", datetime.datetime(2026, 11, 26, 8, 0, 1, 123456, tzinfo=datetime.UTC)),
        ("2026-11-26T09:00:01+01:00", datetime.datetime(2026, 11, 26, 8, 0, 1, tzinfo=datetime.UTC)),
        ("2026-11-26T08:00:01", None),  # no zone: not a time we can compare
        ("0001-01-01T00:00:00+01:00", None),  # before year 1 in UTC: no time at all
        ("yesterday", None),
        (12345, None),
        (None, None),
    ],
)
def test_timestamps(text, expected):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize("name", ["pull_notification_emulator.json", "pull_job_message.json"])
def test_pulled_messages(name):
    case = _golden(name)
    message = Message(case["input"]["data"].encode(), case["input"]["attributes"])
    assert _plain(parse_message(message)) == case["expected"]


@pytest.mark.parametrize("attributes", [{"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"},
                                        {"eventType": "OBJECT_FINALIZE"}, {"payloadFormat": "JSON_API_V1"}])
def test_job_message_is_told_apart_from_notification_by_attributes(attributes):
    """DESIGN.md: by the absence of eventType/payloadFormat; either one makes a notification."""
    data = json.dumps({"source": "gs://b/x.png", "operation": "comic"}).encode()
    assert isinstance(parse_message(Message(data, {"origin": "catalog"})), JobRequest)
    # The same data under either attribute is read as a notification: it names no object.
    with pytest.raises(EventError, match="event does not name a bucket"):
        parse_message(Message(data, attributes))


def _envelope(data: bytes, **extra) -> bytes:
    message = {"data": base64.b64encode(data).decode(), "messageId": "1", **extra}
    return json.dumps({"message": message, "subscription": "projects/p/subscriptions/s"}).encode()


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"subscription": "s"}', "no 'message'"),
        (b'{"message": {"data": "***"}}', "base64"),
        (b'{"message": {"data": 5}}', "base64"),
        (b'{"message": {"data": "", "attributes": {"a": 1}}}', "map of strings"),
        (b'{"message": {"data": ""}, "deliveryAttempt": "two"}', "deliveryAttempt"),
    ],
)
def test_malformed_push_envelopes(body, reason):
    with pytest.raises(EventError, match=reason):
        parse_push_envelope(body)


@pytest.mark.parametrize(
    "job, reason",
    [
        ({"operation": "upscale"}, "gs://"),
        ({"source": "s3://b/o", "operation": "upscale"}, "gs://"),
        ({"source": "gs://bucket-only", "operation": "upscale"}, "gs://"),
        ({"src": "gs://b/o", "operation": "upscale"}, r"unknown field\(s\): src"),  # no source: says what it holds
    ],
)
def test_job_messages_with_no_source_are_unparseable(job, reason):
    """Nowhere to write their report: the dead-letter topic keeps them."""
    with pytest.raises(EventError, match=reason):
        parse_message(Message(json.dumps(job).encode(), {}))


@pytest.mark.parametrize(
    "job, reason",
    [
        ({"source": "gs://b/o"}, "operation"),
        ({"source": "gs://b/o", "operation": "upscale", "params": [1]}, "params"),
        ({"source": "gs://b/o", "operation": "upscale", "output": "/tmp/x"}, "gs://"),
        ({"source": "gs://b/o", "operation": "upscale", "generation": "12a"}, "generation"),
        ({"source": "gs://b/o", "operation": "upscale", "generation": "1" * 5000}, "generation"),  # int() refuses it
        ({"source": "gs://b/o", "operation": "upscale", "surprise": 1}, "unknown field"),
        # params that are not an object, falsy or not, are the publisher's mistake
        ({"source": "gs://b/o", "operation": "upscale", "params": []}, "params"),
        ({"source": "gs://b/o", "operation": "upscale", "params": ""}, "params"),
        ({"source": "gs://b/o", "operation": "upscale", "params": 0}, "params"),
    ],
)
def test_a_job_message_with_a_bad_field_is_a_request_whose_problem_is_reported(job, reason):
    """DESIGN.md: 400 (a dead letter) only for a body that cannot be parsed at all; one that
    names its source gets a failure report there saying what is wrong, as an upload's bad
    imagen-params does."""
    request = parse_message(Message(json.dumps(job).encode(), {}))
    assert isinstance(request, JobRequest) and (request.bucket, request.name) == ("b", "o")
    assert reason in request.problem


def test_a_job_message_with_a_key_twice_is_refused_and_made_up_text_is_clipped():
    # A gateway reading the first "operation" would disagree with imagen reading the last.
    twice = b'{"source": "gs://b/o", "operation": "upscale", "operation": "comic"}'
    with pytest.raises(EventError, match=r"job message has duplicate key\(s\) 'operation'"):
        parse_message(Message(twice, {}))
    many = {"source": "gs://b/o", "operation": "upscale", **{f"k{i}": 1 for i in range(20_000)}}
    problem = parse_message(Message(json.dumps(many).encode(), {})).problem
    assert len(problem) < 400 and "more characters" in problem
    sourceless = {key: value for key, value in many.items() if key != "source"}
    for job in (sourceless, {"source": "gs://" + "b" * 100_000, "operation": "upscale"}):
        with pytest.raises(EventError) as caught:
            parse_message(Message(json.dumps(job).encode(), {}))
        assert len(caught.value.reason) < 400 and "more characters" in caught.value.reason
    assert parse_message(Message(b'{"source": "gs://b/o", "operation": "upscale", "params": null}', {})).params == {}


def test_a_generation_is_read_as_the_number_it_is():
    # Written to metadata, reports and results as Cloud Storage writes it: "0017" would not
    # equal "17" where they are compared as text (imagen backfill, a results consumer).
    job = parse_message(Message(json.dumps({"source": "gs://b/o", "operation": "upscale",
                                            "generation": "0017"}).encode(), {}))
    assert job.generation == "17"


@pytest.mark.parametrize(
    "headers, body",
    [
        ({"ce-specversion": "1.0"}, b"{}"),  # no id/type/source
        (
            {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "com.example.other"},
            b"{}",
        ),
        (
            {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s",
             "ce-type": "google.cloud.storage.object.v1.finalized", "content-type": "application/json"},
            b'{"bucket": "b"}',
        ),
        ({"content-type": "application/cloudevents+json"}, b"{not json"),
    ],
)
def test_malformed_cloudevents(headers, body):
    with pytest.raises(EventError):
        parse_cloudevent(headers, body)


def test_notification_for_other_event_types_keeps_the_kind():
    message = Message(b"", {"eventType": "OBJECT_DELETE", "payloadFormat": "NONE",
                            "bucketId": "b", "objectId": "incoming/upscale/x.png",
                            "objectGeneration": "7"})
    assert parse_message(message).kind == "delete"


def test_a_notification_without_its_payload_says_its_object_is_not_described():
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "incoming/upscale/x.png",
                  "objectGeneration": "7"}
    bare = parse_message(Message(b"", {**attributes, "payloadFormat": "NONE"}))
    assert (bare.kind, bare.generation, bare.metadata, bare.described) == ("finalize", "7", {}, False)
    payload = json.dumps({"bucket": "b", "name": "incoming/upscale/x.png", "generation": "7",
                          "metadata": {"imagen-params": "{}"}}).encode()
    full = parse_message(Message(payload, {**attributes, "payloadFormat": "JSON_API_V1"}))
    assert full.described and full.metadata == {"imagen-params": "{}"}
