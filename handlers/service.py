"""Assembly: settings -> engine, store, results publisher and processor (cog's setup seam)."""

from __future__ import annotations

import logging

from handlers.clients import publisher_client, storage_client, topic_path
from handlers.errors import ConfigError
from handlers.processor import Processor
from handlers.results import ResultPublisher
from handlers.storage import Store

log = logging.getLogger("imagen.service")


ONE_SHOT = ("compile=off", "compile_vae=off")
"""Tuning changes for a process that runs one job and exits (`imagen process`, `imagen run`):
a compile would outlast the job. IMAGEN_TUNING comes after, so it can still turn it on."""


def build_engine(settings, operations=None, *, one_shot: bool = False):
    """The model engine for the served operations (not loaded yet: call `setup()`)."""
    # Light (torch comes in Engine.setup), yet off the CLI's path.
    from handlers.compile_cache import open_compile_cache
    from image.engine import Engine

    return Engine(
        operations or settings.operations,
        settings.model_cache_dir,
        device=settings.device,
        allow_download=settings.allow_model_download,
        tuning_changes=(ONE_SHOT if one_shot else ()) + tuple(settings.tuning),
        compile_cache=None if one_shot else open_compile_cache(settings),  # one job: no compile to share
    )


def restore_models(settings, operations=None) -> None:
    """Restore the models of `operations` (default: the served ones) from IMAGEN_MODEL_MIRROR
    into MODEL_CACHE_DIR, where a mirror is set (an image built without models); files
    already there with the right size are kept."""
    if not settings.model_mirror:
        return
    import time

    from handlers.model_mirror import restore_cache
    from image.models.registry import specs_for

    started = time.perf_counter()
    done = restore_cache(settings.model_mirror, settings.model_cache_dir, client=storage_client(settings),
                         cache_names=[spec.cache_name for spec in specs_for(operations or settings.operations)])
    log.info("models restored from %s", settings.model_mirror, extra={"fields": {
        "files": done.files, "bytes": done.bytes, "already_here": done.skipped,
        "cache_dir": str(settings.model_cache_dir), "seconds": round(time.perf_counter() - started, 3)}})


def check_output_bucket(settings) -> None:
    """IMAGEN_OUTPUT_BUCKET that does not exist, said before the models load: its 404 reads as
    "no output yet", so every job ran the model and was refused only at its upload, retried
    until its report. An account that may write objects but not read the bucket's own
    settings, or a look that fails, goes on."""
    if not settings.output_bucket:
        return
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    try:
        exists = storage_client(settings).bucket(settings.output_bucket).exists(timeout=30)
    except (GoogleAPIError, GoogleAuthError):  # no credentials here: the first job says so
        return
    if not exists:
        raise ConfigError(f"IMAGEN_OUTPUT_BUCKET: bucket {settings.output_bucket} does not exist "
                          f"(or this account cannot see it)")


def build_processor(settings, engine, max_job_seconds: float | None = None,
                    job_seconds: float | None = None, wait_counts: bool = False) -> Processor:
    results = None
    if settings.results_topic:
        results = ResultPublisher(publisher_client(settings), topic_path(settings, settings.results_topic))
    return Processor(
        engine=engine, store=Store(storage_client(settings)), settings=settings, results=results,
        max_job_seconds=max_job_seconds, job_seconds=job_seconds, wait_counts=wait_counts,
    )


def build_dead_letters(settings):
    """Where serve and worker move a message no delivery can settle (IMAGEN_DEAD_LETTER_TOPIC),
    or None."""
    if not settings.dead_letter_topic:
        return None
    from handlers.dlq import DeadLetterer

    return DeadLetterer(publisher_client(settings), topic_path(settings, settings.dead_letter_topic))
