"""Structured logging that Cloud Logging understands: one JSON object per line on stdout.

`severity` and `message` become the entry's severity and summary; `logging.googleapis.com/operation`
groups every line of one job; any other field lands in jsonPayload. Pass fields with
`log.info("...", extra={"fields": {...}})`.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

_OPERATION_KEY = "logging.googleapis.com/operation"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "logger": record.name,
        }
        fields = dict(getattr(record, "fields", None) or {})
        job_id = fields.get("job_id")
        if job_id:
            entry[_OPERATION_KEY] = {"id": job_id, "producer": "imagen"}
        entry.update(fields)
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        # ASCII with \u escapes: Cloud Logging decodes them, and a lone surrogate (an object
        # name that was not valid UTF-8) cannot make the line unwritable.
        return json.dumps(entry, default=str, ensure_ascii=True)


def configure_logging(level: str = "INFO") -> None:
    """Send every `imagen.*` (and library warning) record to stdout as JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("imagen").setLevel(level)
    logging.captureWarnings(True)  # warnings.warn (torch, diffusers, Pillow) as JSON lines too
