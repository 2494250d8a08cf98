"""Assembly: settings -> engine, store, results publisher and processor (cog's setup seam)."""

from __future__ import annotations

import logging

from handlers.clients import publisher_client, storage_client, topic_path
from handlers.processor import Processor
from handlers.results import ResultPublisher
from handlers.storage import Store

log = logging.getLogger("imagen.service")


def build_engine(settings, operations=None):
    """The model engine for the served operations (not loaded yet: call `setup()`)."""
    from image.engine import Engine  # light (torch comes in Engine.setup), yet off the CLI's path

    return Engine(
        operations or settings.operations,
        settings.model_cache_dir,
        device=settings.device,
        allow_download=settings.allow_model_download,
        tuning_changes=settings.tuning,
    )


def build_processor(settings, engine) -> Processor:
    results = None
    if settings.results_topic:
        results = ResultPublisher(publisher_client(settings), topic_path(settings, settings.results_topic))
    return Processor(
        engine=engine, store=Store(storage_client(settings)), settings=settings, results=results
    )
