"""Fixtures for the reliability tier: a tiny remove-background engine (the real emulators come
from tests/conftest.py, shared with the integration tier), and helpers that drive the
processor the way Pub/Sub push does and check that nothing lands outside the layout."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from handlers.clients import storage_client
from handlers.http import create_app
from handlers.processor import Processor
from handlers.routing import Layout
from handlers.storage import Store

READY = "READY"


@pytest.fixture(scope="session")
def rb_engine(tiny_cache):
    """The real Engine with the tiny remove-background model (the fastest operation)."""
    from image.engine import Engine

    engine = Engine(("remove-background",), tiny_cache, device="cpu")
    engine.setup()
    return engine


def processor_for(base_settings, engine, **overrides) -> Processor:
    """A processor over the storage emulator; `overrides` replace settings fields."""
    chosen = base_settings.replace(**overrides) if overrides else base_settings
    return Processor(engine=engine, store=Store(storage_client(chosen)), settings=chosen)


def app_for(processor):
    """`imagen serve`'s Flask app over `processor`, ready, as a test client."""
    return create_app(processor, lambda: READY).test_client()


def notification_envelope(
    blob, *, attempt: int | None = None, event_type="OBJECT_FINALIZE"
) -> dict:
    """The push envelope Pub/Sub sends for `blob`'s Storage notification (JSON_API_V1)."""
    blob.reload()
    resource = dict(blob._properties)
    envelope = {
        "message": {
            "data": base64.b64encode(json.dumps(resource).encode()).decode(),
            "attributes": {
                "eventType": event_type,
                "payloadFormat": "JSON_API_V1",
                "bucketId": blob.bucket.name,
                "objectId": blob.name,
                "objectGeneration": str(blob.generation),
            },
            "messageId": uuid.uuid4().hex[:12],
        },
        "subscription": "projects/imagen-local/subscriptions/imagen-push",
    }
    if attempt is not None:
        envelope["deliveryAttempt"] = attempt
    return envelope


def job_envelope(job: dict, *, attempt: int | None = None) -> dict:
    envelope = {
        "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": "j1"},
        "subscription": "projects/imagen-local/subscriptions/imagen-push",
    }
    if attempt is not None:
        envelope["deliveryAttempt"] = attempt
    return envelope


def assert_within_layout(
    in_bucket, inputs: set[str], layout: Layout | None = None
) -> dict[str, list[str]]:
    """Every object in the bucket is an input, an output or a failure report (default layout);
    returns their names by kind."""
    layout = layout or Layout()
    found: dict[str, list[str]] = {"inputs": [], "outputs": [], "reports": []}
    for blob in in_bucket.list_blobs():
        if blob.name in inputs:
            found["inputs"].append(blob.name)
        elif blob.name.startswith(layout.output_prefix):
            found["outputs"].append(blob.name)
        elif blob.name.startswith(layout.failed_prefix) and blob.name.endswith(".json"):
            found["reports"].append(blob.name)
        else:
            raise AssertionError(f"gs://{in_bucket.name}/{blob.name!r} is outside the layout")
    return found
