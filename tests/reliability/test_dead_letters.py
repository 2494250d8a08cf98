"""Dead letters. The Pub/Sub emulator dead-letters a push subscription's message after its
policy's deliveries but numbers none of them, so a topic and subscription play the
dead-letter pair, filled with messages shaped as Pub/Sub dead-letters them; `imagen dlq
list | replay` run against the emulator. The deliveryAttempt-aware path of the push endpoint
is tested through the Flask app."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import threading
import time
import uuid

import pytest
from click.testing import CliRunner

from handlers.cli import main as imagen
from handlers.dlq import (
    SOURCE_DELIVERY_COUNT,
    SOURCE_PROJECT,
    SOURCE_SUBSCRIPTION,
    _excerpt,
    list_dead_letters,
    replay,
)
from handlers.processor import MAX_ATTEMPTS, MAX_RETRY_SECONDS
from image.errors import ModelError
from tests.integration.conftest import PROJECT, png_bytes, wait_for
from tests.integration.test_processor import FakeEngine
from tests.reliability.conftest import app_for, notification_envelope, processor_for

pytestmark = pytest.mark.integration
WAIT = 1.0  # seconds a pull waits: the emulator answers at once when it holds messages


@pytest.fixture
def topology(publisher, subscriber):
    """A main topic with a worker subscription, and a dead-letter topic with its subscription."""
    suffix = uuid.uuid4().hex[:8]
    main_topic = publisher.topic_path(PROJECT, f"main-{suffix}")
    dead_topic = publisher.topic_path(PROJECT, f"dead-{suffix}")
    main_sub = subscriber.subscription_path(PROJECT, f"main-sub-{suffix}")
    dead_sub = subscriber.subscription_path(PROJECT, f"dead-sub-{suffix}")
    for topic in (main_topic, dead_topic):
        publisher.create_topic(name=topic)
    subscriber.create_subscription(name=main_sub, topic=main_topic, ack_deadline_seconds=10)
    subscriber.create_subscription(name=dead_sub, topic=dead_topic, ack_deadline_seconds=10)
    yield {
        "main_topic": main_topic,
        "main_sub": main_sub,
        "dead_topic": dead_topic,
        "dead_sub": dead_sub,
        "suffix": suffix,
    }
    for sub in (main_sub, dead_sub):
        subscriber.delete_subscription(subscription=sub)
    for topic in (main_topic, dead_topic):
        publisher.delete_topic(topic=topic)


def _dead_letter(publisher, topology, data: bytes, **attributes) -> str:
    """Publish to the dead-letter topic as Pub/Sub does when it gives up on a message."""
    added = {
        SOURCE_SUBSCRIPTION: topology["main_sub"].rsplit("/", 1)[1],
        SOURCE_PROJECT: PROJECT,
        SOURCE_DELIVERY_COUNT: str(MAX_ATTEMPTS),
        "CloudPubSubDeadLetterSourceTopicPublishTime": "2026-11-26T08:00:00Z",
    }
    return publisher.publish(topology["dead_topic"], data, **attributes, **added).result(timeout=30)


@pytest.fixture
def dead_letters(publisher, topology):
    notification = json.dumps(
        {"bucket": "b", "name": "incoming/upscale/cat.png", "generation": "7"}
    )
    ids = {
        "notification": _dead_letter(
            publisher,
            topology,
            notification.encode(),
            eventType="OBJECT_FINALIZE",
            payloadFormat="JSON_API_V1",
            bucketId="b",
            objectId="incoming/upscale/cat.png",
            objectGeneration="7",
        ),
        "job": _dead_letter(
            publisher,
            topology,
            json.dumps({"source": "gs://b/uploads/a.png", "operation": "comic"}).encode(),
            origin="catalog",
        ),
        "garbage": _dead_letter(publisher, topology, b"\x00not json"),
    }
    return ids


def _pull_all(subscriber, subscription, expected: int, timeout=30):
    received = []

    def enough():
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=5)
        received.extend(response.received_messages)
        if response.received_messages:
            subscriber.acknowledge(
                subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages]
            )
        return len(received) >= expected

    wait_for(enough, timeout=timeout, what=f"{expected} message(s) on {subscription}")
    return received


def test_list_shows_each_dead_letter_and_leaves_it_there(subscriber, topology, dead_letters):
    first = list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    assert {letter.message_id for letter in first} == set(dead_letters.values())
    by_id = {letter.message_id: letter for letter in first}
    notification = by_id[dead_letters["notification"]]
    assert notification.source_attempts == MAX_ATTEMPTS
    assert notification.source_subscription == topology["main_sub"]
    assert notification.describe() == "notification finalize gs://b/incoming/upscale/cat.png#7"
    assert by_id[dead_letters["job"]].describe() == "job message comic gs://b/uploads/a.png"
    assert (
        by_id[dead_letters["garbage"]]
        .describe()
        .startswith("unparseable: job message is not valid JSON")
    )
    # Listing is read-only: every message is still there, at once (they were nacked).
    again = list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    assert {letter.message_id for letter in again} == set(dead_letters.values())


def test_a_listing_longer_than_the_lease_shows_each_message_once(subscriber, publisher, topology, monkeypatch):
    # Each pull leased its batch once: a listing that ran past the lease (a --limit of tens of
    # thousands) got its first messages again, twice in the listing and in a --json backup.
    import handlers.dlq as dlq

    ids = {_dead_letter(publisher, topology, f"garbage {i}".encode()) for i in range(4)}
    monkeypatch.setattr(dlq, "LEASE_SECONDS", 2)
    monkeypatch.setattr(dlq, "BATCH", 1)

    class SlowPulls:  # each pull takes a while, as tens of thousands of messages do together
        def __getattr__(self, name):
            return getattr(subscriber, name)

        def pull(self, *args, **kwargs):
            time.sleep(1.2)
            return subscriber.pull(*args, **kwargs)

    letters = list_dead_letters(SlowPulls(), topology["dead_sub"], wait_seconds=WAIT, limit=12)
    assert sorted(letter.message_id for letter in letters) == sorted(ids)


def test_replay_republishes_with_the_original_attributes_then_acks(
    subscriber, publisher, topology, dead_letters
):
    report = replay(
        subscriber, publisher, topology["dead_sub"], wait_seconds=WAIT
    )  # topic: from the source sub
    assert sorted(report.replayed) == sorted([dead_letters["notification"], dead_letters["job"]])
    assert not report.failed and report.unparseable == [dead_letters["garbage"]]
    received = _pull_all(subscriber, topology["main_sub"], 2)
    by_data = {bytes(m.message.data): dict(m.message.attributes) for m in received}
    assert b"\x00not json" not in by_data  # every reader would dead-letter it again
    assert by_data[
        json.dumps({"source": "gs://b/uploads/a.png", "operation": "comic"}).encode()
    ] == {"origin": "catalog"}
    notification = next(attrs for attrs in by_data.values() if "eventType" in attrs)
    assert notification == {
        "eventType": "OBJECT_FINALIZE",
        "payloadFormat": "JSON_API_V1",
        "bucketId": "b",
        "objectId": "incoming/upscale/cat.png",
        "objectGeneration": "7",
    }
    left = list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    assert [letter.message_id for letter in left] == [dead_letters["garbage"]]  # the replayed acked: gone


def test_attributes_named_like_publishs_parameters_are_moved_and_replayed_as_they_are(
        subscriber, publisher, topology):
    """publish(topic, data, ordering_key=, retry=, timeout=, **attributes): an attribute called
    data or topic raised, retry and timeout went to the parameters, ordering_key became one:
    such a message could not be moved (20 deliveries instead) nor replayed."""
    from handlers.dlq import DeadLetterer
    from handlers.events import Message

    odd = {"data": "d", "topic": "t", "retry": "r", "timeout": "5", "ordering_key": "k", "origin": "catalog"}
    message = Message(b'{"source": "gs://b/a.png", "operation": "upscale"}', odd, "m-odd")
    assert DeadLetterer(publisher, topology["dead_topic"]).send(message, topology["main_sub"], "refused: a test")
    report = replay(subscriber, publisher, topology["dead_sub"], topic=topology["main_topic"], wait_seconds=WAIT)
    assert len(report.replayed) == 1 and not report.failed
    [received] = _pull_all(subscriber, topology["main_sub"], 1)
    assert dict(received.message.attributes) == odd


def test_replay_of_selected_messages_leaves_the_rest(subscriber, publisher, topology, dead_letters):
    report = replay(
        subscriber,
        publisher,
        topology["dead_sub"],
        topic=topology["main_topic"],
        message_ids={dead_letters["job"]},
        wait_seconds=WAIT,
    )
    assert report.replayed == [dead_letters["job"]] and report.left == 2
    assert len(_pull_all(subscriber, topology["main_sub"], 1)) == 1
    left = {
        letter.message_id
        for letter in list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    }
    assert left == {dead_letters["notification"], dead_letters["garbage"]}


def test_replay_without_a_known_topic_leaves_the_message(subscriber, publisher, topology):
    job = json.dumps({"source": "gs://b/a.png", "operation": "upscale"}).encode()
    publisher.publish(topology["dead_topic"], job).result(timeout=30)  # no source attributes
    report = replay(subscriber, publisher, topology["dead_sub"], wait_seconds=WAIT)
    assert not report.replayed and len(report.failed) == 1
    assert "--topic" in next(iter(report.failed.values()))
    assert len(list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)) == 1


def test_replay_into_the_topic_that_feeds_the_subscription_replays_each_once(subscriber, publisher, topology):
    """The unrouted subscriptions' filters take a replayed copy again (nothing serves it yet):
    each message is published once, its copy left where it came back, not replayed until
    `limit` (the copies would multiply, each a job for whatever does serve them)."""
    jobs = [json.dumps({"source": f"gs://b/{n}.png", "operation": "upscale"}).encode() for n in range(3)]
    ids = {publisher.publish(topology["dead_topic"], job).result(timeout=30) for job in jobs}
    report = replay(subscriber, publisher, topology["dead_sub"], topic=topology["dead_topic"], limit=50,
                    wait_seconds=WAIT)
    assert sorted(report.replayed) == sorted(ids) and not report.failed
    assert report.returned == 3
    left = list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    assert sorted(bytes(letter.data) for letter in left) == jobs


def test_cli_names_a_missing_message_or_subscription_in_one_line(subscriber, topology, dead_letters):
    runner = CliRunner()
    typo = runner.invoke(imagen, ["dlq", "replay", "--subscription", topology["dead_sub"], "--wait", "1",
                                  "--topic", topology["main_topic"], "--message-id", "no-such-id"])
    assert typo.exit_code == 1 and "not found in" in typo.output and "no-such-id" in typo.output
    assert "replayed 0 message(s)" in typo.output
    missing = runner.invoke(imagen, ["dlq", "list", "--subscription", "no-such-subscription", "--wait", "1"])
    assert missing.exit_code == 1, missing.output
    assert missing.output.startswith("imagen: NotFound: ") and "Traceback" not in missing.output


def test_cli_list_and_replay(subscriber, topology, dead_letters):
    runner = CliRunner()
    listed = runner.invoke(
        imagen, ["dlq", "list", "--subscription", topology["dead_sub"], "--wait", "1"]
    )
    assert listed.exit_code == 0, listed.output
    assert f"3 message(s) in {topology['dead_sub']} (left there)" in listed.output
    for message_id in dead_letters.values():
        assert message_id in listed.output
    assert "attempts 5" in listed.output and "unparseable" in listed.output
    as_json = runner.invoke(
        imagen, ["dlq", "list", "--subscription", topology["dead_sub"], "--json", "--wait", "1"]
    )
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert {row["message_id"] for row in rows} == set(dead_letters.values())
    for row in rows:  # each message whole, whatever its data: a copy that can be published again
        assert row["data"] == _excerpt(base64.b64decode(row["data_base64"]), 2000)

    short_name = topology["dead_sub"].rsplit("/", 1)[1]  # a name, resolved in the project
    # A mistyped --topic, said before any message is leased (each publish failed, one by one).
    typo = runner.invoke(imagen, ["dlq", "replay", "--subscription", short_name, "--wait", "1",
                                  "--topic", "imagen-jbos"])
    assert typo.exit_code == 2 and "topics/imagen-jbos does not exist" in typo.output, typo.output
    replayed = runner.invoke(
        imagen,
        [
            "dlq",
            "replay",
            "--subscription",
            short_name,
            "--wait",
            "1",
            "--topic",
            topology["main_topic"].rsplit("/", 1)[1],
        ],
    )
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 2 message(s)" in replayed.output
    assert "left 1 message(s) this imagen cannot parse in place" in replayed.output
    assert len(_pull_all(subscriber, topology["main_sub"], 2)) == 2
    named = ["dlq", "replay", "--subscription", short_name, "--wait", "1", "--message-id", dead_letters["garbage"]]
    garbage = runner.invoke(imagen, named)  # asked for by its id and not replayed: exit 1
    assert garbage.exit_code == 1 and "cannot parse" in garbage.output and "not found" not in garbage.output
    forced = runner.invoke(imagen, named + ["--include-unparseable"])  # for workers of a newer imagen
    assert forced.exit_code == 0 and "replayed 1 message(s)" in forced.output, forced.output
    assert [bytes(m.message.data) for m in _pull_all(subscriber, topology["main_sub"], 1)] == [b"\x00not json"]


# -- the deliveryAttempt-aware push path -----------------------------------------------------


@pytest.mark.parametrize(
    "attempt, status, outcome",
    [
        (MAX_ATTEMPTS - 1, 503, None),  # more attempts to come: Pub/Sub retries
        (MAX_ATTEMPTS, 200, "failed"),  # the last one: a report, so the user learns why
    ],
)
def test_push_on_the_last_delivery_attempt_writes_a_report(
    bucket, settings, attempt, status, outcome
):
    blob = bucket.blob("incoming/upscale/t.png")
    blob.upload_from_string(png_bytes(), content_type="image/png")
    processor = processor_for(settings, FakeEngine(fail_with=ModelError("CUDA out of memory")))
    response = app_for(processor).post("/", json=notification_envelope(blob, attempt=attempt))
    assert response.status_code == status, response.get_json()
    report = bucket.get_blob("failed/upscale/t.png.json")
    if outcome is None:
        assert response.headers.get("Retry-After") and report is None
    else:
        assert response.get_json()["status"] == outcome
        body = json.loads(report.download_as_bytes())
        assert body["attempt"] == MAX_ATTEMPTS and "CUDA out of memory" in body["error"]["message"]


def _cloudevent(blob, sent: datetime.datetime) -> tuple[dict, bytes]:
    """Eventarc's binary-mode CloudEvent for `blob`'s upload, sent at `sent`."""
    blob.reload()
    headers = {
        "ce-specversion": "1.0", "ce-id": uuid.uuid4().hex[:12],
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{blob.bucket.name}",
        "ce-subject": f"objects/{blob.name}", "ce-time": sent.isoformat().replace("+00:00", "Z"),
        "content-type": "application/json",
    }
    return headers, json.dumps(blob._properties).encode()


@pytest.mark.parametrize("age_seconds, status", [(60, 503), (MAX_RETRY_SECONDS + 60, 200)])
def test_eventarc_retries_end_in_a_report_once_the_event_is_old(bucket, settings, age_seconds, status):
    """CloudEvents carry no delivery attempt, and Eventarc has no dead-letter topic: a young
    event is retried (503), an old one gets its failure report (200) instead of a day of GPU
    retries and a silent drop."""
    blob = bucket.blob("incoming/upscale/e.png")
    blob.upload_from_string(png_bytes(), content_type="image/png")
    processor = processor_for(settings, FakeEngine(fail_with=ModelError("CUDA out of memory")))
    sent = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=age_seconds)
    headers, body = _cloudevent(blob, sent)
    response = app_for(processor).post("/", data=body, headers=headers)
    assert response.status_code == status, response.get_json()
    report = bucket.get_blob("failed/upscale/e.png.json")
    if status == 503:
        assert report is None
    else:
        error = json.loads(report.download_as_bytes())["error"]
        assert error["type"] == "ModelError" and "retries end here" in error["message"]


# -- what no delivery can settle goes to the dead-letter topic at once -------------------------


def test_the_worker_moves_an_unsettleable_message_to_the_dead_letters_at_once(
        settings, bucket, publisher, subscriber, topology, caplog):
    """Unparseable, or a job message for a bucket not allowed: nacked, it would go round 20
    deliveries (~2.3 h of backoff) keeping a GPU pod up; moved, it is acked and waits in the
    dead-letter subscription with Pub/Sub's attributes and why, where `replay` takes it back."""
    from handlers.dlq import DeadLetterer
    from handlers.worker import PullWorker

    caplog.set_level(logging.INFO, logger="imagen")
    processor = processor_for(settings.replace(allowed_buckets=frozenset({bucket.name})), FakeEngine())
    worker = PullWorker(subscriber, topology["main_sub"], processor,
                        dead_letters=DeadLetterer(publisher, topology["dead_topic"]))
    refused_before = {label: _refused(label) for label in ("invalid", "upscale")}
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    try:
        garbage = publisher.publish(topology["main_topic"], b"\x00not json", origin="catalog").result(timeout=30)
        refused = publisher.publish(topology["main_topic"], json.dumps(
            {"source": "gs://someone-elses-bucket/a.png", "operation": "upscale"}).encode()).result(timeout=30)
        # A field named by a lone surrogate (valid JSON, no UTF-8): quoted in the reason, it
        # made the move raise out of the callback, which ended the pull at every delivery.
        # (No source: a job message naming one gets a report instead, in an allowed bucket.)
        publisher.publish(topology["main_topic"], b'{"src": "gs://b/x.png", "operation": "upscale", '
                          b'"\\ud800": 1}', origin="odd").result(timeout=30)
        wait_for(lambda: len(list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)) == 3,
                 timeout=60, what="three dead letters")
        assert thread.is_alive()
    finally:
        worker.stop()
        thread.join(timeout=30)
    letters = {letter.message_id: letter for letter in list_dead_letters(subscriber, topology["dead_sub"],
                                                                        wait_seconds=WAIT)}
    moved = {letter.replay_attributes.get("origin"): letter for letter in letters.values()}
    assert moved["catalog"].reason.startswith("unparseable: job message is not valid JSON")
    assert "someone-elses-bucket" in moved[None].reason
    assert moved["odd"].reason == "unparseable: job message has unknown field(s): src, ?"
    for letter in letters.values():
        assert letter.source_subscription == topology["main_sub"] and letter.source_attempts == 1
    assert moved["catalog"].replay_attributes == {"origin": "catalog"}  # as first published
    # Acked on the worker's subscription: nothing comes back there.
    assert not subscriber.pull(subscription=topology["main_sub"], max_messages=10, timeout=3).received_messages
    # Counted, so a dashboard of imagen_jobs_total sees them: the two unreadable under "invalid"
    assert _refused("invalid") - refused_before["invalid"] == 2
    assert _refused("upscale") - refused_before["upscale"] == 1
    assert garbage and refused
    # Each move's line joins its job's others (its job id is its message id): one operation.
    lines = [r.fields for r in caplog.records if r.getMessage().startswith("message moved to the dead-letter topic")]
    assert len(lines) == 3 and all(line["job_id"] == line["message_id"] is not None for line in lines)
    report = replay(subscriber, publisher, topology["dead_sub"], wait_seconds=WAIT)
    assert report.replayed == [refused_copy.message_id for refused_copy in moved.values()
                               if refused_copy.unparseable is None]  # back to the topic it came from
    assert len(report.replayed) == 1 and len(report.unparseable) == 2  # those two would only come back


def _refused(operation: str, status: str = "refused") -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("imagen_jobs_total", {"operation": operation, "status": status}) or 0.0


def test_push_answers_200_once_an_unsettleable_message_is_dead_lettered(settings, bucket, publisher, subscriber,
                                                                         topology):
    from handlers.dlq import DeadLetterer
    from handlers.http import create_app

    processor = processor_for(settings.replace(allowed_buckets=frozenset({bucket.name})), FakeEngine())
    app = create_app(processor, lambda: "READY", dead_letters=DeadLetterer(publisher, topology["dead_topic"]))
    before = {(label, status): _refused(label, status) for label in ("invalid", "upscale")
              for status in ("refused", "retried")}
    envelope = {"message": {"data": base64.b64encode(b"{not json").decode(), "messageId": "p-1",
                            "attributes": {"origin": "catalog"}},
                "subscription": topology["main_sub"], "deliveryAttempt": 1}
    answer = app.test_client().post("/", json=envelope)
    assert answer.status_code == 200 and answer.get_json()["status"] == "dead-lettered"
    [letter] = list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    assert letter.reason.startswith("unparseable: ") and letter.source_subscription == topology["main_sub"]
    # A job message for a bucket outside the allowlist: parsed, refused by the processor, moved.
    job = json.dumps({"source": "gs://someone-elses-bucket/a.png", "operation": "upscale"}).encode()
    refused = {"message": {"data": base64.b64encode(job).decode(), "messageId": "p-2"},
               "subscription": topology["main_sub"], "deliveryAttempt": 1}
    answer = app.test_client().post("/", json=refused)
    assert answer.status_code == 200 and answer.get_json()["status"] == "dead-lettered"
    assert "someone-elses-bucket" in answer.get_json()["reason"]
    wait_for(lambda: len(list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)) == 2,
             timeout=60, what="the refused job message among the dead letters")
    reasons = sorted(letter.reason for letter in list_dead_letters(subscriber, topology["dead_sub"],
                                                                     wait_seconds=WAIT))
    assert "someone-elses-bucket" in reasons[0] and reasons[1].startswith("unparseable: ")
    # A body that is no push envelope at all has no message to move: 400, as before.
    assert app.test_client().post("/", data=b"{garbage", content_type="application/json").status_code == 400
    # And where the topic cannot take it, Pub/Sub keeps it: 400, retried until its policy moves it.
    broken = create_app(processor, lambda: "READY",
                        dead_letters=DeadLetterer(publisher, topology["dead_topic"] + "-missing"))
    assert broken.test_client().post("/", json=envelope).status_code == 400
    # Counted as they ended: two moved (refused); answered 400, so sent again, retried: the one
    # the topic could not take and the body that is no push envelope at all.
    after = {key: _refused(*key) - value for key, value in before.items()}
    assert after == {("invalid", "refused"): 1, ("upscale", "refused"): 1, ("invalid", "retried"): 2,
                     ("upscale", "retried"): 0}


def test_push_dead_letters_what_it_cannot_quote_or_place_instead_of_failing(settings, publisher, subscriber,
                                                                           topology):
    """A reason quoting a lone surrogate, and a `subscription` that is no subscription path:
    the move raised (500, retried to Pub/Sub's policy); now moved, without the source names."""
    from handlers.dlq import DeadLetterer
    from handlers.http import create_app

    app = create_app(processor_for(settings, FakeEngine()), lambda: "READY",
                     dead_letters=DeadLetterer(publisher, topology["dead_topic"]))
    data = b'{"src": "gs://b/x.png", "operation": "upscale", "\\ud800": 1}'
    envelope = {"message": {"data": base64.b64encode(data).decode(), "messageId": "p-odd"},
                "subscription": "projects/p", "deliveryAttempt": 1}
    answer = app.test_client().post("/", json=envelope)
    assert answer.status_code == 200 and answer.get_json()["status"] == "dead-lettered", answer.get_json()
    [letter] = list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)
    assert letter.reason == "unparseable: job message has unknown field(s): src, ?"
    assert letter.source_subscription is None
    # `dlq list` shows it (the surrogate escaped) instead of failing at that message.
    for extra in ([], ["--json"]):
        listed = CliRunner().invoke(imagen, ["dlq", "list", "--subscription", topology["dead_sub"], "--wait", "1",
                                             *extra])
        assert listed.exit_code == 0 and "\\ud800" in listed.output, listed.output


def test_replaying_what_a_worker_moves_back_at_once_replays_it_once(settings, bucket, publisher, subscriber,
                                                                    topology):
    """A refused job message replayed before its bucket is allowed comes straight back (moved
    again, under a new id): the replay knows its own copy by the id the worker notes, instead of
    publishing it again and again up to --limit. (An unparseable one is not replayed at all.)"""
    from handlers.dlq import DeadLetterer
    from handlers.worker import PullWorker

    mover = DeadLetterer(publisher, topology["dead_topic"])
    processor = processor_for(settings.replace(allowed_buckets=frozenset({bucket.name})), FakeEngine())
    worker = PullWorker(subscriber, topology["main_sub"], processor, dead_letters=mover)
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    try:
        job = json.dumps({"source": "gs://someone-elses-bucket/a.png", "operation": "upscale"}).encode()
        publisher.publish(topology["main_topic"], job).result(timeout=30)
        wait_for(lambda: len(list_dead_letters(subscriber, topology["dead_sub"], wait_seconds=WAIT)) == 1,
                 timeout=60, what="the first move")
        report = replay(subscriber, publisher, topology["dead_sub"], wait_seconds=3.0)
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert len(report.replayed) == 1 and report.returned <= 1, report
