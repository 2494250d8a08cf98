"""`imagen submit FILE... --operation OP`: upload jobs, wait for results, download them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from handlers.cli.options import bucket_name, check_bucket_exists, param_options


@click.command("submit")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--operation", required=True, help="Operation or chain, e.g. upscale or remove-background,upscale.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--bucket", callback=bucket_name, help="Input bucket [default: IMAGEN_BUCKET].")
@click.option("--wait/--no-wait", default=False, help="Wait for each output or failure report.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Download outputs here (implies --wait).")
@click.option("--timeout", default=900, show_default=True, type=click.IntRange(min=1),
              help="Seconds to wait, in all.")
@click.pass_obj
def command(settings, files, operation, params, bucket, wait, out_dir, timeout):
    """Upload FILES under incoming/<operation>/ and, with --wait, report each result."""
    from google.api_core.exceptions import GoogleAPICallError

    from handlers.clients import check_emulators, storage_client
    from handlers.routing import Layout
    from handlers import submit

    if bucket is None:  # only submit reads it: a bad value stops no other command
        from handlers.errors import ConfigError
        from handlers.settings import check_bucket_name

        if not settings.bucket:
            raise click.UsageError("give the input bucket: --bucket or IMAGEN_BUCKET")
        try:
            check_bucket_name("IMAGEN_BUCKET", settings.bucket)
        except ConfigError as error:
            raise click.UsageError(str(error)) from None
        bucket = settings.bucket
    if out_dir is not None:  # before any upload: its GPU work would be spent for nothing
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise click.BadParameter(f"{out_dir} cannot be written", param_hint="--out")
    layout = Layout.from_settings(settings)
    prepared = submit.prepare(list(files), bucket, operation, param_options(params), layout)  # the typos first
    check_emulators(settings, "storage")
    client = storage_client(settings)
    check_bucket_exists(client, bucket, "--bucket")  # before any upload: its 404 was a raw HTTP dump
    if settings.output_bucket and settings.output_bucket != bucket:  # a mistyped one was waited on to the timeout
        check_bucket_exists(client, settings.output_bucket, "IMAGEN_OUTPUT_BUCKET")
    submissions = []
    for path, job, plan in prepared:
        submission = submit.upload(client, path, job, plan, layout)
        click.echo(f"uploaded {path} -> gs://{bucket}/{submission.job.name} (generation {submission.job.generation})")
        submissions.append(submission)
    if not (wait or out_dir):
        return

    def report(submission):
        if submission.status == "succeeded":
            line = f"done     {submission.path.name} -> {submission.output_uri} ({submission.seconds} s)"
            if out_dir:
                try:
                    line += f" -> {submit.download(client, submission, out_dir)}"
                except (GoogleAPICallError, OSError) as error:  # one file's, not the others' results
                    submission.status = "not downloaded"
                    line += f"; not downloaded: {getattr(error, 'message', None) or error}"
        else:
            line = f"{submission.status:<8} {submission.path.name}: {submission.reason}"
        click.echo(line)

    with click.progressbar(length=len(submissions), label="waiting", file=sys.stderr) as bar:
        submit.wait(client, submissions, timeout, on_result=lambda s: (bar.update(1), report(s)))
    for submission in submissions:
        if submission.status == "timed out":
            click.echo(f"timeout  {submission.path.name}: {submission.reason}", err=True)
    if any(s.status != "succeeded" for s in submissions):
        sys.exit(1)
