"""`imagen process gs://bucket/object`: one job, run now (Cloud Run Jobs, debugging)."""

from __future__ import annotations

import sys

import click

from handlers.cli.options import param_options
from handlers.logs import configure_logging


@click.command("process")
@click.argument("source")
@click.option("--operation", help="Operation or chain; default: from the object's folder or metadata.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--output", help="Explicit output gs:// URI (in the output bucket).")
@click.pass_obj
def command(settings, source, operation, params, output):
    """Run one job on SOURCE now; exit non-zero if it fails."""
    import dataclasses

    from handlers import routing
    from handlers.clients import check_emulators, storage_client
    from handlers.errors import ConfigError, StoragePermanentError
    from handlers.events import FINALIZE, ObjectEvent, parse_gs_uri
    from handlers.processor import plan_job
    from handlers.service import build_engine, build_processor
    from handlers.storage import Store
    from image.errors import InvalidParameter, UnknownOperation
    from image.params import parse_chain

    configure_logging(stream=sys.stderr)  # stdout is the result: a script reads it alone
    bucket, name = parse_gs_uri(source)
    layout = routing.Layout.from_settings(settings)
    if operation:
        job = routing.Job(
            bucket=bucket,
            name=name,
            generation=None,
            operation=routing.spelled(operation),  # "a, b" as the service writes it: "a,b"
            params=param_options(params),
            rel_path=routing.route_request_rel_path(name, layout, operation),
            output=parse_gs_uri(output) if output else None,
            origin="cli",
        )
        # The command line's own mistakes (an operation or parameter typo, an --output it may
        # not write) are said here, before any model loads, and leave no failure report
        # behind: the object is not at fault. (What is wrong with the object itself, its name,
        # is the job's to report, as the service would.)
        try:
            plan_job(job, layout, frozenset(parse_chain(operation)))
        except (InvalidParameter, UnknownOperation) as error:
            raise click.UsageError(str(error)) from None
        check_emulators(settings, "storage")
    else:
        if params or output:
            raise click.UsageError("--param and --output need --operation")
        check_emulators(settings, "storage")
        state = Store(storage_client(settings)).stat(bucket, name)
        if state is None:  # as a job message naming it would fail (exit 1)
            raise StoragePermanentError(f"{source} does not exist")
        event = ObjectEvent(FINALIZE, bucket, name, str(state.generation), state.metadata, state.size)
        job = routing.route_event(event, layout)
        if isinstance(job, routing.Ignored):
            raise ConfigError(f"{source}: {job.reason}; pass --operation to process it anyway")
        job = dataclasses.replace(job, origin="cli")  # routed as an upload's, but the user's own job
    try:
        chain = parse_chain(job.operation) if job.operation else None
    except UnknownOperation:  # the object's folder or metadata names none: reported, as the service does
        chain = None
    engine = build_engine(settings, operations=chain or settings.operations, one_shot=True)
    settings = settings.replace(operations=tuple(chain) if chain else None)
    processor = build_processor(settings, engine)
    if chain and (done := processor.skip_if_done(job)):  # no model loaded to say so
        click.echo(f"skipped: {done.reason}")
        return
    if chain:  # without one the job fails at planning (its report), before any model would load
        engine.setup()
    outcome = processor.handle(job)
    if outcome.status == "succeeded":
        click.echo(outcome.output)
    elif outcome.status == "failed":
        click.echo(f"failed: {outcome.reason}\nreport: {outcome.report}", err=True)
        sys.exit(1)
    else:
        click.echo(f"{outcome.status}: {outcome.reason}")
