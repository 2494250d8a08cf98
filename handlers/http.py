"""HTTP entry point for `imagen serve`: CloudEvents and Pub/Sub push envelopes at `/`.

Answers (DESIGN.md): 2xx when the job is done, skipped, ignored or failed permanently with its
report written; 503 for a transient fault or while models load (Pub/Sub and Eventarc retry);
400 for a body that cannot be parsed at all, or a job message refused with no bucket of ours to
report in (either way it ends in the dead-letter topic: at once, answered 200, where
IMAGEN_DEAD_LETTER_TOPIC names it and the push envelope was read);
401/403 for a push without a valid OIDC token when push authentication is configured.
`GET /healthz` answers while the process lives and its GPU works; `GET /readyz` only once models are warm;
`GET /metrics` is for Prometheus (handlers.metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import flask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from handlers.auth import AuthError
from handlers.errors import EventError, TransientError, Undeliverable
from handlers.events import is_cloudevent, parse_cloudevent, parse_message, parse_push_envelope, pubsub_cloudevent
from handlers.logs import error_fields, job_context, trace_fields
from handlers.metrics import record_undeliverable

log = logging.getLogger("imagen.http")
READY = "READY"
DEVICE_FAILED = "DEVICE_FAILED"  # image.engine's, named here so this module needs no torch
# A push request carries the message base64-encoded in a JSON envelope: Pub/Sub's 10 MB
# message limit arrives as up to ~13.4 MB, plus attributes.
MAX_BODY_BYTES = 14 * 1024 * 1024


def create_app(processor, state: Callable[[], str], authenticator=None,
               on_device_failed: Callable[[], None] | None = None, dead_letters=None,
               project: str | None = None, max_jobs: int | None = None) -> flask.Flask:
    """A Flask app over `processor`; `state()` returns the engine state (READY when warm);
    `authenticator` (handlers.auth.PushAuthenticator), when given, guards `POST /`;
    `on_device_failed()` runs once the answer to a job that left the GPU unusable is sent
    (imagen serve stops: a new instance takes over); `dead_letters` (handlers.dlq.DeadLetterer),
    when given, takes a pushed message that no delivery can settle at once (then 200), where
    a 400 would have Pub/Sub push it 20 times first. With `project`, the lines of a request
    carry its trace, so Cloud Logging shows them under Cloud Run's request log entry.
    `max_jobs`: the most jobs in hand at once (the server's threads less one); one more is
    answered 503 at once, so that a thread is always left for the health checks (a platform
    concurrency of all the threads left /healthz waiting behind jobs, and the liveness probe
    restarted the instance mid-job)."""
    app = flask.Flask("imagen")
    slots = threading.BoundedSemaphore(max_jobs) if max_jobs else None
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/healthz")
    def healthz():
        # A GPU this process can no longer use (a CUDA error other than out of memory) fails
        # the liveness probe: the platform restarts the instance instead of letting it fail
        # every job it gets, fast, and so get most of them.
        current = state()
        if current == DEVICE_FAILED:
            return {"status": "device failed", "state": current}, 503
        return {"status": "alive", "state": current}

    @app.get("/readyz")
    def readyz():
        current = state()
        return {"state": current}, (200 if current == READY else 503)

    @app.get("/metrics")
    def metrics():
        return flask.Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

    @app.errorhandler(HTTPException)
    def refused(error: HTTPException):
        """Flask's own refusals (an unknown path or method, a body past MAX_BODY_BYTES) as
        JSON like every other answer, not HTML pages; its headers (a 405's Allow) kept."""
        if flask.request.method == "POST":  # a push or event that never reached _receive
            log.warning("request refused: %s %s", error.code, error.description,
                        extra={"fields": {"status": error.code, "path": flask.request.path}})
        response = error.get_response()
        response.set_data(flask.json.dumps({"error": f"{error.code} {error.name}: {error.description}"}))
        response.mimetype = "application/json"
        return response

    @app.after_request
    def stop_after_a_failed_gpu(response):
        if on_device_failed is not None and flask.request.method == "POST" and state() == DEVICE_FAILED:
            response.call_on_close(on_device_failed)
        return response

    @app.post("/")
    def receive():
        with job_context(trace_fields(flask.request.headers, project)):
            return _receive()

    def _receive():
        if authenticator is not None:
            try:
                authenticator.check(flask.request.headers.get("Authorization"))
            except AuthError as error:
                log.warning("push refused: %s", error, extra={"fields": {"status": error.status}})
                return _answer(error.status, error=str(error))
        current = state()
        if current != READY:
            return _answer(503, error=f"not ready: models are {current.lower()}", retry=True)
        headers, body = dict(flask.request.headers), flask.request.get_data()
        message = None  # a Pub/Sub message, once the push envelope is read
        try:
            if not is_cloudevent(headers):
                message = parse_push_envelope(body)
            elif (message := pubsub_cloudevent(headers, body)) is None:  # else an Eventarc trigger on the topic
                event, sent, message_id = parse_cloudevent(headers, body)  # binary or structured mode
                attempt = None  # Eventarc does not count: `sent` bounds the retries
            if message is not None:
                event = parse_message(message)
                message_id, attempt, sent = message.message_id, message.delivery_attempt, message.published
        except EventError as error:
            log.warning("unparseable request: %s", error.reason,
                      extra={"fields": {"reason": error.reason, "message_id": message and message.message_id}})
            return _undeliverable(message, f"unparseable: {error.reason}", None, unparseable=True)
        if slots is not None and not slots.acquire(blocking=False):
            log.warning("request sent back: %d jobs are in hand, the most this server takes at once", max_jobs,
                        extra={"fields": {"message_id": message_id}})
            return _answer(503, error=f"busy: {max_jobs} jobs in hand, the most this instance takes at once "
                                      f"(a thread stays free for the health checks)", retry=True)
        try:
            outcome = processor.handle(event, message_id=message_id, attempt=attempt, sent=sent)
        except TransientError as error:
            return _answer(503, error=str(error), retry=True)
        except Undeliverable as error:
            return _undeliverable(message, str(error), error.operation)
        except Exception as error:  # a bug: answer 500 so the message is retried, not lost
            log.exception("unexpected error: %s: %s", type(error).__name__, error,
                          extra={"fields": {"message_id": message_id, "error": error_fields(error)}})
            return _answer(500, error=f"{type(error).__name__}: {error}")
        finally:
            if slots is not None:
                slots.release()
        return {k: v for k, v in dataclasses.asdict(outcome).items() if v is not None}, 200

    def _undeliverable(message, reason: str, operation: str | None, *, unparseable: bool = False):
        """What no delivery can settle: to the dead-letter topic now where one is known (200),
        else 400, which Pub/Sub retries until its policy dead-letters it."""
        moved = message is not None and dead_letters is not None and \
            dead_letters.send(message, message.subscription, reason)
        record_undeliverable(operation, moved, unparseable=unparseable)
        if moved:
            return {"status": "dead-lettered", "reason": reason}, 200
        return _answer(400, error=reason)

    return app


def _answer(status: int, *, error: str, retry: bool = False):
    headers = {"Retry-After": "10"} if retry else {}
    return {"error": error}, status, headers
