"""The real emulators, started once per test session, and helpers to drive them."""

from __future__ import annotations

import io
import os
import threading
import time
import uuid

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from PIL import Image

from handlers.clients import storage_client
from handlers.localstack import EVENTS_TOPIC, PROJECT, PubsubEmulator, StorageEmulator
from handlers.processor import Processor
from handlers.settings import Settings
from handlers.storage import Store
from handlers.worker import PullWorker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    emulator = PubsubEmulator(log_dir=tmp_path_factory.mktemp("pubsub")).start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    publisher = pubsub_v1.PublisherClient()
    publisher.create_topic(name=publisher.topic_path(PROJECT, EVENTS_TOPIC))
    yield emulator
    os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    emulator.stop()


@pytest.fixture(scope="session")
def storage_emulator(pubsub_emulator, tmp_path_factory):
    emulator = StorageEmulator(log_dir=tmp_path_factory.mktemp("gcs")).start(
        pubsub_host=pubsub_emulator.host
    )
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
    emulator.stop()


@pytest.fixture(scope="session")
def gcs(storage_emulator) -> storage.Client:
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials())


@pytest.fixture
def bucket(gcs) -> storage.Bucket:
    return gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def publisher(pubsub_emulator) -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient()


@pytest.fixture(scope="session")
def subscriber(pubsub_emulator) -> pubsub_v1.SubscriberClient:
    return pubsub_v1.SubscriberClient()


@pytest.fixture
def events_subscription(subscriber):
    """A fresh pull subscription on the Storage notification topic."""
    path = subscriber.subscription_path(PROJECT, f"events-{uuid.uuid4().hex[:10]}")
    subscriber.create_subscription(
        name=path, topic=subscriber.topic_path(PROJECT, EVENTS_TOPIC), ack_deadline_seconds=30
    )
    yield path
    subscriber.delete_subscription(subscription=path)


@pytest.fixture
def settings(storage_emulator, pubsub_emulator, tmp_path) -> Settings:
    return Settings.from_env({
        "STORAGE_EMULATOR_HOST": storage_emulator.url,
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "IMAGEN_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "MODEL_CACHE_DIR": str(tmp_path / "no-models"),
    })


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
