"""`imagen worker --subscription S`: the Pub/Sub pull worker (GKE, Cloud Run worker pools)."""

from __future__ import annotations

import click

from handlers.logs import configure_logging


@click.command("worker")
@click.option("--subscription", help="Subscription name or full path [env IMAGEN_SUBSCRIPTION].")
@click.option("--operations", help="Comma-separated operations to serve [env IMAGEN_OPERATIONS].")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), help="[env IMAGEN_DEVICE]")
@click.option("--concurrency", default=1, show_default=True, help="Jobs in flight (1 per GPU).")
@click.option(
    "--max-job-seconds", default=3600, show_default=True,
    help="Longest a job may hold its message; the lease is extended up to this.",
)
@click.pass_obj
def command(settings, subscription, operations, device, concurrency, max_job_seconds):
    """Pull jobs from a subscription until SIGTERM; finish the job in hand, then exit 0."""
    from handlers.clients import subscriber_client, subscription_path
    from handlers.errors import ConfigError
    from handlers.service import build_engine, build_processor
    from handlers.settings import split_list
    from handlers.worker import PullWorker

    settings = settings.replace(
        subscription=subscription,
        device=device,
        operations=split_list(operations) if operations else None,
    )
    if not settings.subscription:
        raise ConfigError("IMAGEN_SUBSCRIPTION: set it or pass --subscription")
    configure_logging()
    engine = build_engine(settings)
    engine.setup()  # load and warm up before taking the first message
    worker = PullWorker(
        subscriber_client(),
        subscription_path(settings, settings.subscription),
        build_processor(settings, engine),
        concurrency=concurrency,
        max_lease_seconds=max_job_seconds,
    )
    worker.run()
