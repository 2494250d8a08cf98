"""Structured logging that Cloud Logging understands: one JSON object per line on stdout.

`severity` and `message` become the entry's severity and summary; `logging.googleapis.com/operation`
groups every line of one job; any other field lands in jsonPayload. Pass fields with
`log.info("...", extra={"fields": {...}})`; inside `job_context(fields)` every line of the
thread carries them (the engine's and the libraries' lines of a job too).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import faulthandler
import json
import logging
import re
import sys
import threading
from collections.abc import Mapping

_OPERATION_KEY = "logging.googleapis.com/operation"
TEXT_LIMIT = 4000
"""Characters of one text field a line or report keeps: Cloud Logging refuses an entry over
256 KB, and a name, operation or key list a message makes up can be any length."""
TRACE_LIMIT = 32000
REPORTED_ERROR_EVENT = "type.googleapis.com/google.devtools.clouderrorreporting.v1beta1.ReportedErrorEvent"
"""The @type that makes Error Reporting take a line without a stack trace as an error event."""
_TRACE_HEADER = "Traceback (most recent call last):\n"
_job: contextvars.ContextVar[dict | None] = contextvars.ContextVar("imagen_job", default=None)


@contextlib.contextmanager
def job_context(fields: dict):
    """Lines logged inside, in this thread, carry `fields` (a job's id, message and source)
    unless they give their own: one operation id groups all of a job's lines in Cloud
    Logging, the GPU's traceback from the engine included."""
    token = _job.set({**(_job.get() or {}), **fields})  # inside a request's: both
    try:
        yield
    finally:
        _job.reset(token)


def job_context_learns(fields: dict) -> None:
    """What the job in this context learnt since it began (the generation a job message did
    not name, the operation its plan settled on), on its later lines: the engine's too."""
    current = _job.get()
    if current is not None:
        current.update(fields)


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _clipped(value):
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, dict):
        return {key: _clipped(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clipped(item) for item in value]
    return value


_SOURCE_KEY = "logging.googleapis.com/sourceLocation"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname,
            "message": clip(record.getMessage()),
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "logger": record.name,
            # The Logs Explorer shows where a line was written (a library's lines too).
            _SOURCE_KEY: {"file": record.pathname.rpartition("site-packages/")[2], "line": str(record.lineno),
                          "function": record.funcName},
        }
        fields = {**(_job.get() or {}), **(getattr(record, "fields", None) or {})}
        job_id = fields.get("job_id")
        if job_id:
            entry[_OPERATION_KEY] = {"id": job_id, "producer": "imagen"}
        entry.update(_clipped(fields))
        if record.exc_info:  # its end is where the error is; Error Reporting needs its header
            trace = self.formatException(record.exc_info)
            if len(trace) > TRACE_LIMIT:
                header = _TRACE_HEADER if trace.startswith(_TRACE_HEADER) else ""
                tail = trace[-TRACE_LIMIT:]
                tail = tail[tail.find("\n") + 1:]  # from a line's start (a line longer than it all: as it is)
                trace = f"{header}...\n{tail}"
            entry["stack_trace"] = trace
        elif record.levelno >= logging.CRITICAL:
            # Why a process stops ("imagen stopped: ConfigError ...", a job stuck on the GPU):
            # Error Reporting takes lines with a trace by it, these by this type. Not ERROR:
            # some of those quote what a sender or an input brought (an unparseable message,
            # a job out of GPU memory on its input's size), a new group each.
            entry["@type"] = REPORTED_ERROR_EVENT
        # ASCII with \u escapes: Cloud Logging decodes them, and a lone surrogate (an object
        # name that was not valid UTF-8) cannot make the line unwritable.
        return json.dumps(entry, default=str, ensure_ascii=True)


def configure_logging(level: str = "INFO", *, service: bool = False, stream=None) -> None:
    """Send every `imagen.*` (and library warning) record to `stream` (stdout) as JSON lines;
    for a `service` (serve, worker), exceptions nothing caught too. A command whose stdout is
    its result (`imagen process`) logs to stderr, which Cloud Logging parses alike."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("imagen").setLevel(level)
    # The Google client libraries' own set-up (at a Pub/Sub client's creation) stops the
    # "google" logger propagating unless it was configured: streaming-pull and credential
    # errors were plain text on stderr, or nothing. A level marks it configured; propagate
    # undoes a set-up that came first.
    google = logging.getLogger("google")
    google.setLevel(logging.WARNING)
    google.propagate = True
    logging.captureWarnings(True)  # warnings.warn (torch, diffusers, Pillow) as JSON lines too
    if service:  # an exception nothing caught, in a thread or the main one, or in a finaliser, as a JSON line
        # A native crash (a segfault in a CUDA library or driver: what JobStoppedWorker's
        # reports send operators to) leaves every thread's Python stack on stderr, as text.
        with contextlib.suppress(ValueError, OSError, AttributeError):  # a stderr with no file (a test's capture)
            faulthandler.enable(sys.stderr, all_threads=True)
        threading.excepthook = _uncaught_in_thread
        sys.excepthook = _uncaught
        sys.unraisablehook = _unraisable


_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?=/|;|$)(?:/(\d{1,20}))?(?:;o=([01]))?")  # TRACE/SPAN;o=1


def trace_fields(headers: Mapping[str, str], project: str | None) -> dict[str, str]:
    """The request's trace as Cloud Logging links it: Cloud Run's request log entry and the
    lines logged while serving it, one trace (W3C `traceparent`, else `X-Cloud-Trace-Context`);
    {} without a project or a trace."""
    trace = span = sampled = None
    if match := re.fullmatch(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})",
                             headers.get("traceparent", "")):
        trace, span, sampled = match[1], match[2], bool(int(match[3], 16) & 1)
    elif match := _CLOUD_TRACE.match(headers.get("X-Cloud-Trace-Context", "")):
        trace = match[1].lower()
        if match[2] and int(match[2]) < 2**64:  # the span id in decimal: Cloud Logging takes 16 hex digits
            span = f"{int(match[2]):016x}"
        sampled = None if match[3] is None else match[3] == "1"
    if not project or trace is None:
        return {}
    fields: dict = {"logging.googleapis.com/trace": f"projects/{project}/traces/{trace}"}
    if span:  # the span the request's entry belongs to, so the lines sit under it in Trace
        fields["logging.googleapis.com/spanId"] = span
    if sampled is not None:
        fields["logging.googleapis.com/trace_sampled"] = sampled
    return fields


def error_fields(error: BaseException, note: str = "") -> dict[str, str]:
    """An error as log lines and failure reports give it: {"type", "message"}."""
    return {"type": type(error).__name__, "message": clip(f"{error}{note}")}


def is_configured() -> bool:
    return any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers)


def fatal(error: BaseException, *, trace: bool) -> None:
    """Log why a service stops, as the last JSON line Cloud Logging gets from it."""
    if not is_configured():
        configure_logging()
    logging.getLogger("imagen").critical(
        "imagen stopped: %s: %s", type(error).__name__, error,
        exc_info=error if trace else None,
        extra={"fields": {"error": error_fields(error)}},
    )


def _uncaught(exc_type, exc_value, exc_traceback) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc_value, exc_traceback)
        return
    logging.getLogger("imagen").critical(
        "uncaught %s: %s", exc_type.__name__, exc_value, exc_info=(exc_type, exc_value, exc_traceback))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return  # as threading's own hook: a thread's sys.exit() is not an error
    thread = args.thread.name if args.thread is not None else "a thread"
    logging.getLogger("imagen").critical(
        "uncaught %s in %s: %s", args.exc_type.__name__, thread, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisable(args) -> None:
    # An exception Python can only report (in __del__, a finaliser, a library's shutdown):
    # "Exception ignored in ..." would otherwise be plain text on stderr. A WARNING: mostly a
    # channel closing at shutdown, not the instance fault the errors alert is for.
    where = args.err_msg or "Exception ignored in"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_type is not None else None
    logging.getLogger("imagen").warning("%s: %r", where, args.object, exc_info=exc_info)
