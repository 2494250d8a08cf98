"""`imagen worker --subscription S`: the Pub/Sub pull worker (GKE, Cloud Run worker pools)."""

from __future__ import annotations

import os

import click

from handlers.logs import configure_logging
from handlers.settings import DEVICES


def _lease_extension(ctx, param, value: int) -> int:
    if value != 0 and not 10 <= value <= 600:
        raise click.BadParameter("0 (the client library's own) or 10 to 600 seconds (Pub/Sub's range)")
    return value


TRANSFER_SECONDS = 120
"""Lease time per job beyond its GPU budget: download, decode, encode, upload, report."""
LEASE_MARGIN_SECONDS = 300
"""Lease time beyond the jobs': what no job's budget counts (a notification's metadata
look-up, a compiled graph swapped in between jobs, an encode slower than estimated, the
running marker's clean-up)."""


def lease_budget(max_job_seconds: int, concurrency: int, prefetch: int) -> int:
    """The longest a message is leased: the engine runs one job at a time, in the order they
    asked for the device (image/fair_lock.py), so the last of the `concurrency + prefetch`
    messages in hand may wait for all the others before it runs its own budget; the lease
    must outlast that, or Pub/Sub redelivers a running job (with `--prefetch 0` a lone job's
    lease was its budget exactly: LEASE_MARGIN_SECONDS more)."""
    return (concurrency + prefetch) * (max_job_seconds + TRANSFER_SECONDS) + LEASE_MARGIN_SECONDS


@click.command("worker")
@click.option("--subscription", help="Subscription name or full path [env IMAGEN_SUBSCRIPTION].")
@click.option("--operations", help="Comma-separated operations to serve [env IMAGEN_OPERATIONS].")
@click.option("--device", type=click.Choice(DEVICES), help="[env IMAGEN_DEVICE]")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1),
              help="Jobs handled at once; the GPU still runs one at a time (one device per process), "
              "so more only overlaps their transfers.")
@click.option("--prefetch", default=1, show_default=True, type=click.IntRange(0),
              help="Further jobs downloaded and decoded while the GPU works (0: off).")
@click.option(
    "--max-job-seconds", default=3600, show_default=True, type=click.IntRange(1),
    help="A job's budget on the GPU: past it the job stops and fails with a report. Leases "
    "are extended long enough for the jobs ahead of it and its own budget.",
)
@click.option(
    "--lease-extension-seconds", default=60, show_default=True, type=int, callback=_lease_extension,
    help="Each lease renewal's extension: a crashed worker's jobs are redelivered after about "
    "this long (0: the client library's own, up to 600; else 10 to 600).",
)
@click.option("--metrics-port", default=9090, show_default=True,
              help="Port for Prometheus /metrics (0: off).")
@click.pass_obj
def command(settings, subscription, operations, device, concurrency, prefetch, max_job_seconds,
            lease_extension_seconds, metrics_port):
    """Pull jobs from a subscription until SIGTERM; finish the job on the GPU, hand back the
    ones waiting for it, then exit 0."""
    from handlers.clients import subscriber_client, subscription_path
    from handlers.errors import ConfigError
    from handlers.metrics import record_model_loads
    from handlers.service import (build_dead_letters, build_engine, build_processor, check_output_bucket,
                                  restore_models)
    from handlers.watchdog import watch
    from handlers.worker import PullWorker, exit_on_signal_while_starting
    from image.engine import DEVICE_FAILED

    settings = settings.replace(subscription=subscription)  # --device, --operations: in it already
    if not settings.subscription:
        raise ConfigError("IMAGEN_SUBSCRIPTION: set it or pass --subscription")
    configure_logging(settings.log_level, service=True)
    exit_on_signal_while_starting()  # PID 1 in its container: unhandled, a SIGTERM is dropped
    subscriber = subscriber_client(settings)
    path = subscription_path(settings, settings.subscription)
    _check_subscription(subscriber, path)
    check_output_bucket(settings)
    restore_models(settings)  # an image built without models, with IMAGEN_MODEL_MIRROR
    engine = build_engine(settings)
    engine.setup()  # load and warm up before taking the first message
    record_model_loads(engine.setup_seconds)
    if metrics_port:
        # Opened only now, so a readiness probe on it passes once the models are warm.
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port)
        except OSError as error:
            raise ConfigError(f"--metrics-port {metrics_port}: {error}; pass another port or 0") from None
    worker = PullWorker(
        subscriber,
        path,
        build_processor(settings, engine, max_job_seconds=max_job_seconds,
                        job_seconds=max_job_seconds + TRANSFER_SECONDS),
        concurrency=concurrency,
        prefetch=prefetch,
        max_lease_seconds=lease_budget(max_job_seconds, concurrency, prefetch),
        lease_extension_seconds=lease_extension_seconds,
        device_failed=lambda: engine.state == DEVICE_FAILED,
        dead_letters=build_dead_letters(settings),
    )
    watch(engine, on_hung=lambda: os._exit(1))  # a stuck job: its messages go back to Pub/Sub
    worker.run()


def _check_subscription(subscriber, path: str) -> None:
    """A subscription that does not exist, said before the models load (a mistyped name cost
    a whole cold start, then a restart loop doing it again). The runtime account of a
    deployment may consume but not read a subscription's settings (roles/pubsub.subscriber):
    that, and any other failure to look (credentials too), leaves it to the streaming pull."""
    from google.api_core.exceptions import GoogleAPIError, NotFound
    from google.auth.exceptions import GoogleAuthError

    from handlers.errors import ConfigError

    try:
        subscriber.get_subscription(request={"subscription": path}, timeout=30)
    except NotFound:
        raise ConfigError(f"subscription {path} does not exist: check --subscription (IMAGEN_SUBSCRIPTION) "
                          f"and GOOGLE_CLOUD_PROJECT") from None
    except (GoogleAPIError, GoogleAuthError):  # no credentials here: the pull says so, as before
        pass
