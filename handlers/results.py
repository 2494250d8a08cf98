"""The optional results topic: one message per finished job (IMAGEN_RESULTS_TOPIC)."""

from __future__ import annotations

import json
import logging

from google.cloud import pubsub_v1

from handlers.logs import error_fields

log = logging.getLogger("imagen.results")
PUBLISH_TIMEOUT_SECONDS = 30


class ResultPublisher:
    def __init__(self, publisher: pubsub_v1.PublisherClient, topic_path: str):
        self._publisher = publisher
        self._topic = topic_path

    def publish(self, outcome) -> None:
        """Publish `outcome` (a processor Outcome); a publishing fault is logged, not raised.

        The job itself is done by now: failing it would redo finished GPU work.
        """
        data = {
            "source": outcome.source,
            "generation": outcome.generation,
            "output": outcome.output,
            "model": outcome.model,
            "seconds": outcome.seconds,
            "error": outcome.error,
            "reason": outcome.reason,  # why it was skipped (or failed), in words
        }
        try:
            future = self._publisher.publish(
                self._topic,
                json.dumps(data).encode(),
                status=outcome.status,
                operation=_attribute(outcome.operation or ""),
            )
            future.result(timeout=PUBLISH_TIMEOUT_SECONDS)
        except Exception as error:
            log.error(
                "could not publish the job result: %s", error,
                extra={"fields": {"topic": self._topic, "error": error_fields(error), "source": outcome.source}},
            )


def _attribute(value: str) -> str:
    """`value` as an attribute Pub/Sub takes: at most 1024 bytes of UTF-8 (a failed job's
    operation is whatever its sender wrote)."""
    return value.encode("utf-8", "replace")[:1024].decode("utf-8", "ignore")
