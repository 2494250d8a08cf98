"""`imagen serve`'s probes: what Cloud Run's startup and liveness probes are told."""

from __future__ import annotations

import base64
import json

from handlers.http import create_app
from image import engine


def _client(state: str):
    return create_app(processor=None, state=lambda: state).test_client()


def test_health_and_readiness_follow_the_engine():
    assert _client(engine.STARTING).get("/healthz").status_code == 200  # alive while it loads
    assert _client(engine.STARTING).get("/readyz").status_code == 503
    assert _client(engine.READY).get("/readyz").status_code == 200


def test_a_failed_gpu_fails_the_liveness_probe():
    # Cloud Run restarts the instance, instead of it failing every job fast (and so taking
    # most of them) with a GPU its process can no longer use.
    client = _client(engine.DEVICE_FAILED)
    answer = client.get("/healthz")
    assert answer.status_code == 503 and answer.get_json() == {"status": "device failed", "state": "DEVICE_FAILED"}
    assert client.get("/readyz").status_code == 503


def test_the_answer_to_the_job_that_failed_the_gpu_is_sent_then_the_service_stops():
    # Cloud Run's liveness probe would take a minute or more; meanwhile every push would get
    # a fast 503 and spend a delivery attempt. imagen serve exits once the answer is out.
    from handlers.errors import TransientError

    current, stopped = [engine.READY], []

    class BreaksTheGpu:
        def handle(self, event, **kwargs):
            current[0] = engine.DEVICE_FAILED
            raise TransientError("the GPU failed while running upscale (illegal memory access)")

    app = create_app(BreaksTheGpu(), state=lambda: current[0], on_device_failed=lambda: stopped.append(1))
    client = app.test_client()
    resource = {"bucket": "b", "name": "incoming/upscale/a.png", "generation": "1"}
    envelope = {"message": {"data": base64.b64encode(json.dumps(resource).encode()).decode(),
                            "attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"},
                            "messageId": "1"}, "subscription": "projects/p/subscriptions/s"}
    with client.post("/", json=envelope) as answer:
        assert answer.status_code == 503 and not stopped  # the answer first
    assert stopped == [1]
    assert client.get("/healthz").status_code == 503 and stopped == [1]  # probes do not stop it


def _push(client, resource=None, headers=None):
    resource = resource or {"bucket": "b", "name": "incoming/upscale/a.png", "generation": "1"}
    envelope = {"message": {"data": base64.b64encode(json.dumps(resource).encode()).decode(),
                            "attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"},
                            "messageId": "1"}, "subscription": "projects/p/subscriptions/s"}
    return client.post("/", json=envelope, headers=headers)


class _Recording:
    def __init__(self, error: Exception | None = None):
        self.calls, self.error = [], error

    def handle(self, event, **kwargs):
        self.calls.append(event)
        raise self.error


def test_a_push_before_the_models_are_ready_is_sent_back_untouched():
    # Cloud Run may deliver while an instance still loads: 503 with Retry-After, so Pub/Sub
    # retries (another instance, or this one once ready), and the processor never sees it.
    for state in (engine.STARTING, engine.SETUP_FAILED, engine.DEVICE_FAILED):
        processor = _Recording()
        answer = _push(create_app(processor, state=lambda state=state: state).test_client())
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "10", state
        assert answer.get_json()["error"] == f"not ready: models are {state.lower()}"
        assert processor.calls == []


def test_a_bug_in_the_processor_answers_500_so_the_message_is_retried(caplog):
    processor = _Recording(KeyError("output_prefix"))
    answer = _push(create_app(processor, state=lambda: engine.READY).test_client())
    assert answer.status_code == 500 and answer.get_json() == {"error": "KeyError: 'output_prefix'"}
    assert len(processor.calls) == 1 and "Retry-After" not in answer.headers
    [record] = [r for r in caplog.records if r.getMessage() == "unexpected error: KeyError: 'output_prefix'"]
    assert record.exc_info and record.exc_info[0] is KeyError  # the stack trace is in the log


def test_an_unparseable_message_is_the_senders_fault_a_warning_not_an_error(caplog):
    # It is dead-lettered (its backlog alerts); at ERROR it also paged as an instance fault.
    processor = _Recording()
    envelope = {"message": {"data": base64.b64encode(b"{not json").decode(), "messageId": "9"},
                "subscription": "projects/p/subscriptions/s"}
    from prometheus_client import REGISTRY

    def counted(status):
        return REGISTRY.get_sample_value("imagen_jobs_total", {"operation": "invalid", "status": status}) or 0

    before = counted("refused"), counted("retried")
    answer = create_app(processor, state=lambda: engine.READY).test_client().post("/", json=envelope)
    assert answer.status_code == 400 and processor.calls == []
    # No dead-letter topic here: Pub/Sub delivers it again, so retried, not refused (yet)
    assert (counted("refused"), counted("retried")) == (before[0], before[1] + 1)
    [record] = [r for r in caplog.records if r.getMessage().startswith("unparseable request: ")]
    assert record.levelname == "WARNING"


def test_a_push_requests_lines_carry_its_trace():
    # Cloud Logging nests the lines of a request under Cloud Run's request log entry (its
    # status and latency) when they carry the request's trace.
    import logging

    from handlers.errors import TransientError
    from handlers.logs import JsonFormatter

    lines = []

    class Formatting(logging.Handler):  # formats as the service's stdout handler does: at once
        def emit(self, record):
            lines.append(json.loads(JsonFormatter().format(record)))

    class Logs:
        def handle(self, event, **kwargs):
            logging.getLogger("imagen.processor").warning("job will be retried")
            raise TransientError("busy")

    handler = Formatting()
    logging.getLogger("imagen").addHandler(handler)
    try:
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        for headers, project, expected in [
            ({"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}, "proj", f"projects/proj/traces/{trace}"),
            ({"X-Cloud-Trace-Context": f"{trace.upper()}/1;o=1"}, "proj", f"projects/proj/traces/{trace}"),
            ({"X-Cloud-Trace-Context": f"{trace}/1;o=1"}, None, None),  # no project: no link
            ({"traceparent": "junk"}, "proj", None),
        ]:
            lines.clear()
            client = create_app(Logs(), state=lambda: engine.READY, project=project).test_client()
            _push(client, headers=headers)
            assert [line.get("logging.googleapis.com/trace") for line in lines] == [expected], headers
    finally:
        logging.getLogger("imagen").removeHandler(handler)
    # The span and whether it was sampled too, so Trace shows the lines under the request's span.
    from handlers.logs import trace_fields

    assert trace_fields({"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}, "p") == {
        "logging.googleapis.com/trace": f"projects/p/traces/{trace}",
        "logging.googleapis.com/spanId": "00f067aa0ba902b7", "logging.googleapis.com/trace_sampled": True}
    assert trace_fields({"X-Cloud-Trace-Context": f"{trace}/255;o=0"}, "p") == {
        "logging.googleapis.com/trace": f"projects/p/traces/{trace}",
        "logging.googleapis.com/spanId": "00000000000000ff", "logging.googleapis.com/trace_sampled": False}
    assert trace_fields({"X-Cloud-Trace-Context": trace}, "p") == {
        "logging.googleapis.com/trace": f"projects/p/traces/{trace}"}


def test_the_trace_names_the_settings_project_else_the_credentials(monkeypatch):
    import google.auth
    import google.auth.exceptions

    from handlers.clients import log_project
    from handlers.settings import Settings

    assert log_project(Settings(project="proj")) == "proj"
    monkeypatch.setattr(google.auth, "default", lambda: (None, "from-credentials"))
    assert log_project(Settings()) == "from-credentials"

    def no_credentials():
        raise google.auth.exceptions.DefaultCredentialsError("none here")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    assert log_project(Settings()) is None  # no link, and serve still starts


def test_the_frameworks_own_refusals_answer_json_and_a_refused_post_is_logged(caplog):
    processor = _Recording()
    client = create_app(processor, state=lambda: engine.READY).test_client()
    answer = client.get("/")  # a browser, or a probe pointed at the wrong path
    assert answer.status_code == 405 and answer.is_json and "POST" in answer.headers["Allow"]
    assert answer.get_json()["error"].startswith("405 Method Not Allowed: ")
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and missing.get_json()["error"].startswith("404 Not Found: ")
    big = client.post("/", data=b"x" * (15 * 1024 * 1024), content_type="application/json")
    assert big.status_code == 413 and big.get_json()["error"].startswith("413 Request Entity Too Large: ")
    assert processor.calls == []
    [record] = [r for r in caplog.records if r.getMessage().startswith("request refused: 413 ")]
    assert record.levelname == "WARNING"


def test_an_eventarc_trigger_on_the_topic_delivers_its_messages():
    """An Eventarc trigger on the Pub/Sub topic sends `messagePublished` CloudEvents, whose data
    is a push envelope: they were refused as no Cloud Storage CloudEvent (400, retried by
    Eventarc for a day, each try waking a GPU instance, then dropped)."""
    from handlers.events import JobRequest, ObjectEvent
    from handlers.processor import Outcome

    class Recording:
        def __init__(self):
            self.calls = []

        def handle(self, event, **kwargs):
            self.calls.append((event, kwargs))
            return Outcome("succeeded", "gs://b/a.png", "1", "upscale")

    job = {"source": "gs://b/uploads/a.png", "operation": "upscale"}
    envelope = {"subscription": "projects/p/subscriptions/eventarc-trigger",
                "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(),
                            "attributes": {"operation": "upscale"}, "messageId": "42",
                            "publishTime": "2026-11-28T10:00:00.123456789Z"}}
    binary = {"ce-specversion": "1.0", "ce-id": "42", "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
              "ce-type": "google.cloud.pubsub.topic.v1.messagePublished", "Content-Type": "application/json"}
    structured = {"specversion": "1.0", "id": "42", "source": "//pubsub.googleapis.com/projects/p/topics/t",
                  "type": "google.cloud.pubsub.topic.v1.messagePublished", "data": envelope}
    processor = Recording()
    client = create_app(processor, state=lambda: engine.READY).test_client()
    assert client.post("/", data=json.dumps(envelope), headers=binary).status_code == 200
    assert client.post("/", data=json.dumps(structured),
                       headers={"Content-Type": "application/cloudevents+json"}).status_code == 200
    for event, kwargs in processor.calls:
        assert isinstance(event, JobRequest) and (event.bucket, event.name) == ("b", "uploads/a.png")
        assert kwargs["message_id"] == "42" and kwargs["attempt"] is None and kwargs["sent"].year == 2026
    # A Storage notification on the topic, and a Storage CloudEvent, as before.
    resource = {"bucket": "b", "name": "incoming/upscale/a.png", "generation": "1"}
    notification = {**envelope, "message": {"data": base64.b64encode(json.dumps(resource).encode()).decode(),
                                            "attributes": {"eventType": "OBJECT_FINALIZE",
                                                           "payloadFormat": "JSON_API_V1"}, "messageId": "43"}}
    assert client.post("/", data=json.dumps(notification), headers=binary).status_code == 200
    storage = {**binary, "ce-type": "google.cloud.storage.object.v1.finalized", "ce-id": "44"}
    assert client.post("/", data=json.dumps(resource), headers=storage).status_code == 200
    assert [type(event) for event, _ in processor.calls[2:]] == [ObjectEvent, ObjectEvent]


def test_a_thread_is_always_left_for_the_health_checks():
    """With the platform's concurrency at the server's threads, every thread held a job waiting
    for the GPU, and /healthz waited behind them: the liveness probe restarted the instance
    mid-job. One job more than `max_jobs` is sent back at once (503) instead."""
    import threading

    from handlers.processor import Outcome

    entered, release = threading.Event(), threading.Event()

    class Slow:
        def handle(self, event, **kwargs):
            entered.set()
            release.wait(30)
            return Outcome("succeeded", "gs://b/a.png", "1", "upscale")

    app = create_app(Slow(), state=lambda: engine.READY, max_jobs=1)
    first = threading.Thread(target=lambda: _push(app.test_client()))
    first.start()
    assert entered.wait(30)
    busy = _push(app.test_client())
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "10"
    assert busy.get_json()["error"].startswith("busy: 1 jobs in hand")
    assert app.test_client().get("/healthz").status_code == 200
    release.set()
    first.join(30)
    assert _push(app.test_client()).status_code == 200  # its slot given back
