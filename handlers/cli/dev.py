"""`imagen dev`: the local stack (emulators, a worker, `imagen serve`), left running."""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from pathlib import Path

import click

from handlers.cli.options import bucket_name


@click.command("dev")
@click.option("--bucket", default="imagen-dev", show_default=True, help="Bucket to create.",
              callback=bucket_name)
@click.option("--work-dir", default=".dev", show_default=True, type=click.Path(path_type=Path),
              help="Where logs go.")
@click.pass_obj
def command(settings, bucket, work_dir):
    """Start the local stack and print the exports that point tools at it; Ctrl-C stops it."""
    from handlers.localstack import DEAD_LETTER, EVENTS_TOPIC, MAX_DELIVERIES, LocalStack, choose_models

    work_dir = work_dir.resolve()  # the exports below are pasted into shells in other folders
    cache_dir, tiny = choose_models(settings.model_cache_dir, work_dir / "models")
    cache_dir = Path(cache_dir).resolve()
    if tiny:
        click.echo(f"using tiny random-weight models ({cache_dir}): the plumbing is real, the pictures "
                   f"are noise; `imagen models pull` into MODEL_CACHE_DIR for the real ones")
    stack = LocalStack(work_dir, cache_dir, bucket=bucket, device=settings.device)
    click.echo("starting the emulators, a worker and imagen serve (models load first)...")
    stopped, started = threading.Event(), threading.Event()

    def stop(*_):
        # Still starting (models load for minutes): stop now, not after; once only, so a
        # second Ctrl-C cannot cut the stopping short.
        first = not stopped.is_set()
        stopped.set()
        if first and not started.is_set():
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        stack.start()
        started.set()
        click.echo("\nready. In another terminal:\n")
        for key, value in stack.env().items():
            click.echo(f"export {key}={shlex.quote(value)}")
        click.echo(f"# once the stack is stopped (its ports change at each start): unset {' '.join(stack.env())}")
        click.echo(f"\ngcloud storage cp photo.jpg gs://{bucket}/incoming/upscale/photo.jpg")
        click.echo("imagen submit photo.jpg --operation upscale --wait")
        click.echo(f"gcloud pubsub topics publish {EVENTS_TOPIC} '--attribute=^;^operation=remove-background,upscale' "
                   f"""--message='{{"source": "gs://{bucket}/incoming/upscale/photo.jpg", """
                   """"operation": "remove-background,upscale"}'""")
        click.echo(f"\nworker (pull): {', '.join(stack.WORKER_OPERATIONS)}, metrics "
                   f"http://127.0.0.1:{stack.worker_metrics_port}/metrics")
        click.echo(f"imagen serve (push): {', '.join(stack.SERVE_OPERATIONS)}, "
                   f"http://127.0.0.1:{stack.serve_port}/readyz")
        click.echo("chains run where one process serves all their operations (e.g. remove-background,upscale; "
                   "enhance,comic); any other is skipped by both")
        click.echo("a worker of your own: make worker-<operation> (subscriptions imagen-<operation> exist)")
        click.echo(f"dead letters (unparseable or refused: at once; else after {MAX_DELIVERIES} deliveries): "
                   f"imagen dlq list --subscription {DEAD_LETTER}")
        click.echo(f"logs: {stack.log_dir}   (Ctrl-C stops everything)")
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        # Stop first: stdout may already be gone (a closed terminal, a pipe whose reader got
        # the same Ctrl-C), and a failed echo must not leave the stack running.
        stack.stop()
        with contextlib.suppress(OSError):
            click.echo("stopped.")
