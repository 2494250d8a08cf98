"""Prometheus metrics for `imagen serve` (at /metrics) and `imagen worker` (on --metrics-port).

    imagen_jobs_total{operation,status}     jobs by outcome: succeeded, failed, skipped, ignored,
                                            retried (a transient fault sent it back)
    imagen_job_seconds{operation}           wall time of jobs that ran (histogram, seconds)
    imagen_jobs_in_flight                   jobs being processed now
    imagen_model_load_seconds{operation}    load + warm-up time of each model at start-up
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("imagen_jobs", "Jobs finished, by operation and status.", ["operation", "status"])
JOB_SECONDS = Histogram(
    "imagen_job_seconds",
    "Wall time of jobs that ran, in seconds.",
    ["operation"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
IN_FLIGHT = Gauge("imagen_jobs_in_flight", "Jobs being processed now.")
MODEL_LOAD_SECONDS = Gauge(
    "imagen_model_load_seconds", "Model load and warm-up time at start-up, in seconds.", ["operation"]
)


def record_outcome(outcome) -> None:
    operation = outcome.operation or "none"
    JOBS.labels(operation, outcome.status).inc()
    if outcome.status == "succeeded" and outcome.seconds is not None:
        JOB_SECONDS.labels(operation).observe(outcome.seconds)


def record_model_loads(setup_seconds: dict[str, float]) -> None:
    for operation, seconds in setup_seconds.items():
        MODEL_LOAD_SECONDS.labels(operation).set(seconds)
