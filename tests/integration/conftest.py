"""Helpers to drive the real emulators (started once per session by tests/conftest.py), and
the tiny-model engine and pull worker the integration tests share."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from handlers.clients import storage_client
from handlers.localstack import PROJECT  # noqa: F401  (re-exported for the tests)
from handlers.processor import Processor
from handlers.storage import Store
from handlers.worker import PullWorker

pytestmark = pytest.mark.integration


def png_bytes(size=(64, 48), mode="RGB", seed: int = 0) -> bytes:
    """A small generated test picture (gradients and a disc), PNG-encoded."""
    width, height = size
    image = Image.new(mode, size)
    pixels = image.load()
    for y in range(height):
        for x in range(width):
            inside = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(size) / 3) ** 2
            value = (x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (seed * 37) % 256)
            if inside:
                value = (255 - value[0], 200, 40)
            pixels[x, y] = value + ((255 if inside else 128),) if mode == "RGBA" else value
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def engine(tiny_cache):
    from image.engine import Engine

    engine = Engine(("upscale", "enhance", "comic", "remove-background"), tiny_cache, device="cpu")
    engine.setup()
    return engine


@pytest.fixture
def tiny_settings(settings, tiny_cache, bucket):
    return settings.replace(model_cache_dir=tiny_cache, allowed_buckets=frozenset({bucket.name}))


@pytest.fixture
def worker(tiny_settings, engine, subscriber, events_subscription):
    processor = Processor(engine=engine, store=Store(storage_client(tiny_settings)), settings=tiny_settings)
    pull = PullWorker(subscriber, events_subscription, processor)
    thread = threading.Thread(target=pull.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    yield pull
    pull.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()
