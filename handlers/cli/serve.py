"""`imagen serve`: the HTTP service for Eventarc and Pub/Sub push (Cloud Run)."""

from __future__ import annotations

import logging
import os
import re
import threading

import click

from handlers.logs import configure_logging, error_fields
from handlers.settings import DEVICES

log = logging.getLogger("imagen.serve")

PUSH_JOB_SECONDS = 510
"""Cloud Run ends a push or Eventarc request after 600 s (infra/terraform); the other 90 s are
for download, decode, encode, upload and the failure report."""
PUSH_REQUEST_SECONDS = 585
"""A job's whole time (Cloud Run's 600 s, less its own queueing and ours): a job whose input
came slowly or whose output is huge gets less time on the GPU, so that it still ends inside
the request (processor.Processor's job_seconds)."""


@click.command("serve")
@click.option("--port", type=int, help="Port to listen on [env PORT, default 8080].")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--operations", help="Comma-separated operations to serve [env IMAGEN_OPERATIONS].")
@click.option("--device", type=click.Choice(DEVICES), help="[env IMAGEN_DEVICE]")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(2),
              help="HTTP threads (jobs still run one at a time); at least 2: one answers the health checks while "
                   "a job runs (with one, gunicorn serves a request at a time and the liveness probe fails).")
@click.option(
    "--max-job-seconds", default=PUSH_JOB_SECONDS, show_default=True, type=click.IntRange(1),
    help="A job's budget on the GPU: past it the job stops and fails with a report, before the "
    "platform's 600 s request limit would kill it and Pub/Sub redeliver it to run again. A job "
    "whose input came slowly or whose output is huge (a PNG of hundreds of megapixels takes "
    "minutes to encode) gets less, so that it still ends inside the request.",
)
@click.pass_obj
def command(settings, port, host, operations, device, threads, max_job_seconds):
    """Accept CloudEvents and Pub/Sub push requests at / (plus /healthz and /readyz)."""
    from handlers.clients import log_project
    from handlers.http import create_app
    from handlers.service import build_dead_letters, build_engine, build_processor
    from handlers.watchdog import watch

    # --port, --device and --operations are in `settings` already (handlers/cli/__init__.py).
    configure_logging(settings.log_level, service=True)
    engine = build_engine(settings)
    processor = build_processor(settings, engine, max_job_seconds=max_job_seconds,
                                job_seconds=max(max_job_seconds, PUSH_REQUEST_SECONDS), wait_counts=True)
    authenticator = None
    if settings.push_audience:
        from handlers.auth import PushAuthenticator

        authenticator = PushAuthenticator(settings.push_audience, settings.push_service_accounts)
    app = create_app(processor, lambda: engine.state, authenticator, on_device_failed=_stop_for_a_failed_gpu,
                     dead_letters=build_dead_letters(settings), project=log_project(settings), max_jobs=threads - 1)

    def load_models(_worker):
        # Runs in the serving process after gunicorn forks, so CUDA is initialised there;
        # /readyz answers 503 until the models are loaded and warm.
        threading.Thread(target=_setup, args=(settings, engine), name="imagen-setup", daemon=True).start()
        watch(engine, on_hung=lambda: os._exit(_STOP_SERVER))

    log.info("serving", extra={"fields": {"port": settings.port, "operations": settings.operations}})
    _server(app, host, settings.port, threads, post_worker_init=load_models).run()


# gunicorn stops the whole server when its worker exits with this code (its "worker failed
# to boot"), so the container exits and the platform starts another.
_STOP_SERVER = 3


def _stop_for_a_failed_gpu() -> None:
    # /healthz says 503 too, but the liveness probe takes a minute or more to act, and every
    # push meanwhile would get a fast 503 and spend a delivery attempt.
    log.warning("the GPU failed: stopping, so that a new instance takes over")  # the engine's CRITICAL said why
    os._exit(_STOP_SERVER)


def _setup(settings, engine) -> None:
    from handlers.metrics import record_model_loads
    from handlers.service import check_output_bucket, restore_models

    try:
        check_output_bucket(settings)
        restore_models(settings)  # an image built without models, with IMAGEN_MODEL_MIRROR
        engine.setup()
        record_model_loads(engine.setup_seconds)
    except Exception as error:
        # Not ready ever: waiting out the startup probe's window (up to 30 minutes) would
        # only bill the GPU for it. Stop, so the platform says so and tries a new instance.
        log.critical("model set-up failed; stopping: %s", error, exc_info=error,
                     extra={"fields": {"error": error_fields(error)}})
        os._exit(_STOP_SERVER)


# gunicorn's own ERROR lines when the server stops on purpose (_STOP_SERVER: a failed GPU, a
# stuck job, a set-up that failed, a dead worker), each after imagen's CRITICAL line saying why:
# as errors, each was one more notification of the errors alert, and "Worker failed to boot"
# sent the reader to the start-up. INFO instead.
_OUR_STOP = re.compile(rf"Worker \(pid:\d+\) exited with code {_STOP_SERVER}\.|Shutting down: Master|"
                       r"Reason: (Worker failed to boot\.|the worker died)")


def _our_stop(record: logging.LogRecord) -> bool:
    if record.levelno == logging.ERROR and _OUR_STOP.fullmatch(record.getMessage()):
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def _worker_died(server, worker) -> None:
    """gunicorn's hook in the server process when its worker exits any other way than
    _STOP_SERVER (a native crash, the kernel's OOM killer): it started another in the same
    instance, which loaded the models for minutes while /healthz answered 200 and every push
    got a 503, a delivery attempt spent each. The whole server stops instead, so that the
    platform starts a new instance, as for a failed GPU. Not while the server itself stops
    (its listeners are closed first), nor for a worker it replaced on purpose (a SIGHUP's
    reload: the new one is already there)."""
    if server.LISTENERS and len(server.WORKERS) < server.num_workers:
        from gunicorn.errors import HaltServer

        log.critical("the server's worker process died: stopping, so that a new instance takes over (pid %s)",
                     worker.pid)
        raise HaltServer("the worker died", _STOP_SERVER)


def _server(app, host: str, port: int, threads: int, post_worker_init):
    """gunicorn serving `app`: one worker process (the GPU's one set of models), `threads`
    request threads, no worker timeout (a job may take minutes; Cloud Run bounds a request,
    and --max-job-seconds the job), `post_worker_init` run in the worker once forked."""
    import gunicorn.app.base
    import gunicorn.glogging

    class JsonLogger(gunicorn.glogging.Logger):
        """gunicorn's own lines ("worker was sent SIGKILL! Perhaps out of memory?") through
        the root logger's JSON handler, not its plain-text one."""

        def setup(self, cfg):
            super().setup(cfg)
            for handler in [h for h in self.error_log.handlers if getattr(h, "_gunicorn", False)]:
                self.error_log.removeHandler(handler)
            self.error_log.propagate = True
            self.error_log.addFilter(_our_stop)

    class Server(gunicorn.app.base.BaseApplication):
        def load_config(self):
            options = {"bind": f"{host}:{port}", "workers": 1, "threads": threads, "timeout": 0,
                       "loglevel": "error", "post_worker_init": post_worker_init,
                       "child_exit": _worker_died, "logger_class": JsonLogger}
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return app

    return Server()
