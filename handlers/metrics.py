"""Prometheus metrics for `imagen serve` (at /metrics) and `imagen worker` (on --metrics-port).

    imagen_jobs_total{operation,status}     jobs by outcome: succeeded, failed, skipped, ignored,
                                            elsewhere (another pool's job, where every pool
                                            receives every job: not this pool's to count),
                                            retried (sent back to Pub/Sub: a transient fault, a
                                            stopping worker's hand-back), refused (moved to the
                                            dead-letter topic unread: a job message for a bucket
                                            not allowed, or a message no reader can parse, whose
                                            operation is "invalid"; a move that fails: retried)
    imagen_job_seconds{operation}           time of jobs that ran, from their start to their
                                            output's upload, a wait for the GPU behind another job
                                            left out (histogram, seconds)
    imagen_jobs_in_flight                   jobs being processed now
    imagen_model_load_seconds{operation}    load + warm-up time of each model at start-up

`operation` is an operation or chain as jobs name it, "none" where a job names none, and
"invalid" for any other text (a job message's free text must not add a series per typo).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from image.errors import ImagenError
from image.params import parse_chain

JOBS = Counter("imagen_jobs", "Jobs finished, by operation and status.", ["operation", "status"])
JOB_SECONDS = Histogram(
    "imagen_job_seconds",
    "Time of jobs that ran, from their start to their output's upload (a wait for the GPU behind another job "
    "left out), in seconds.",
    ["operation"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
IN_FLIGHT = Gauge("imagen_jobs_in_flight", "Jobs being processed now.")
MODEL_LOAD_SECONDS = Gauge(
    "imagen_model_load_seconds", "Model load and warm-up time at start-up, in seconds.", ["operation"]
)


def operation_label(operation: str | None) -> str:
    """The `operation` label for a job's operation text (see the module docstring)."""
    if not operation:
        return "none"
    try:
        return ",".join(parse_chain(operation))
    except ImagenError:
        return "invalid"


def record_outcome(outcome) -> None:
    operation = operation_label(outcome.operation)
    JOBS.labels(operation, "elsewhere" if outcome.elsewhere else outcome.status).inc()
    if outcome.status == "succeeded" and outcome.seconds is not None:
        JOB_SECONDS.labels(operation).observe(outcome.seconds)


def record_undeliverable(operation: str | None, moved: bool, *, unparseable: bool = False) -> None:
    """A message no delivery can settle (a job refused unread; `unparseable`: one no reader can
    parse, its operation "invalid"): refused once in the dead-letter topic (`moved`), else
    retried (nacked or answered 400: Pub/Sub delivers it again, until its policy moves it)."""
    label = "invalid" if unparseable else operation_label(operation)
    JOBS.labels(label, "refused" if moved else "retried").inc()


def record_model_loads(setup_seconds: dict[str, float]) -> None:
    for operation, seconds in setup_seconds.items():
        MODEL_LOAD_SECONDS.labels(operation).set(seconds)
