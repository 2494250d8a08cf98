"""`imagen backfill gs://BUCKET/PREFIX`: queue jobs for objects without an up-to-date output."""

from __future__ import annotations

import shlex

import click

from handlers.cli.options import check_bucket_exists, check_topic_exists


@click.command("backfill")
@click.argument("location")
@click.option("--topic", required=True, help="Topic the workers listen on (name or full path).")
@click.option("--operation", help="Operation or chain for every object (default: from its folder).")
@click.option("--dry-run", is_flag=True, help="Decide and report; publish nothing.")
@click.option("--rate", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Messages per second, at most (0: no limit).")
@click.option("--retry-failed", is_flag=True,
              help="Queue objects whose failure report is for this generation and these parameters too.")
@click.option("--only", "only", multiple=True, metavar="OP",
              help="Queue only jobs for this operation or chain (one a deployed worker serves); "
              "repeatable. Default: every operation and chain.")
@click.option("--workers", default=16, show_default=True, type=click.IntRange(1, 64),
              help="Objects looked at (output and report read) at once; decided in listing order.")
@click.option("--start-at", metavar="NAME",
              help="Begin the listing at this object name (inclusive): where a stopped run said to go on.")
@click.option("--verbose", "-v", is_flag=True, help="Print every object's decision.")
@click.pass_obj
def command(settings, location, topic, operation, dry_run, rate, retry_failed, only, workers, start_at, verbose):
    """List LOCATION and publish job messages only for objects with no output for their current
    generation. Safe to stop and run again. Workers must list the bucket in IMAGEN_ALLOWED_BUCKETS."""
    from google.api_core.exceptions import GoogleAPIError, RetryError

    from handlers.backfill import Summary, backfill
    from handlers.cli import _unreachable_hint
    from handlers.clients import check_emulators, publisher_client, storage_client, topic_path
    from handlers.routing import Layout
    from image.errors import ImagenError
    from image.params import parse_chain

    if not location.startswith("gs://"):
        raise click.BadParameter("expected gs://BUCKET/PREFIX", param_hint="LOCATION")
    try:
        served = frozenset(",".join(parse_chain(item)) for item in only)
    except ImagenError as error:
        raise click.BadParameter(str(error), param_hint="--only") from None
    try:
        operation and parse_chain(operation)  # a typo found now, not after hours of listing
    except ImagenError as error:
        raise click.BadParameter(str(error), param_hint="--operation") from None
    bucket, _, prefix = location[len("gs://"):].partition("/")
    if not bucket:
        raise click.BadParameter("expected gs://BUCKET/PREFIX", param_hint="LOCATION")
    if start_at is not None and not start_at.startswith(prefix):
        raise click.BadParameter(f"{start_at!r} is not under {prefix!r}: give the whole object name, as a stopped run "
                                 "printed it", param_hint="--start-at")
    check_emulators(settings, "storage", "pubsub")
    # The workers, and the listing's own thread beside them
    storage = storage_client(settings, connections=workers + 1)
    publisher, path = publisher_client(settings), topic_path(settings, topic)
    _check_exist(storage, bucket, publisher, path, settings.output_bucket)
    publish = None
    if not dry_run:

        def publish(data: bytes, attributes: dict[str, str]):
            return publisher.publish(path, data, **attributes)

    summary = Summary()

    def show(decision):
        if verbose or (dry_run and decision.action == "queue"):
            detail = f" ({decision.detail})" if decision.detail else ""
            click.echo(f"{decision.action:>5}  {decision.uri}  {decision.reason}{detail}".rstrip())
        elif summary.looked_at % PROGRESS_EVERY == 0:  # a large bucket takes hours: say it moves
            click.echo(f"... {summary.looked_at} object(s) looked at, {summary.queued} queued", err=True)

    try:
        backfill(
            storage, bucket, prefix, Layout.from_settings(settings),
            operation=operation, publish=publish, rate=rate, retry_failed=retry_failed, only=served,
            on_decision=show, summary=summary, workers=workers, start_at=start_at,
        )
    except (ImagenError, GoogleAPIError, OSError, KeyboardInterrupt) as error:  # a RetryError, Ctrl-C
        # What it did, and where it stopped: every object listed before that one is settled, so
        # a run that starts there goes on (a run from the start would queue again what the
        # workers have not reached yet).
        for line in summary.lines():
            click.echo(line)
        why = "interrupted" if isinstance(error, KeyboardInterrupt) else \
            f"{type(error).__name__}: {getattr(error, 'message', None) or error}"
        if isinstance(error, RetryError):  # a service that never answered
            why += _unreachable_hint(settings)
        if summary.current:
            name = summary.current.split("/", 3)[3]
            click.echo(f"imagen: stopped at {summary.current}, {summary.looked_at} object(s) settled before it: "
                       f"{why}; go on with --start-at {shlex.quote(name)}", err=True)
        else:
            click.echo(f"imagen: stopped while listing, {summary.looked_at} object(s) settled before it: {why}; "
                       "run it again to go on", err=True)
        raise SystemExit(130 if isinstance(error, KeyboardInterrupt) else 1) from None
    if dry_run:
        click.echo("dry run: nothing published")
    for line in summary.lines():
        click.echo(line)


PROGRESS_EVERY = 10_000


def _check_exist(storage, bucket: str, publisher, topic: str, output_bucket: str | None) -> None:
    """Both ends exist, or say which does not before any listing (a dry run too): a missing
    topic was found at the first publish, maybe hours into a large bucket. An account that may
    publish or list but not read the bucket's or topic's own metadata goes on unchecked. The
    output bucket too, where one is set: a mistyped one held no outputs, so every object was
    queued again."""
    check_bucket_exists(storage, bucket, "LOCATION")
    if output_bucket and output_bucket != bucket:
        check_bucket_exists(storage, output_bucket, "IMAGEN_OUTPUT_BUCKET")
    check_topic_exists(publisher, topic, "--topic")
