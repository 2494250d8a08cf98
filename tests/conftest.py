"""Fixtures shared by every test tier: the tiny models, and the real emulators (fake-gcs-server
and Google's Pub/Sub emulator), each started once per session whichever tier asks first."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A model cache holding all four tiny models, at the commits the packaged lock pins.

    Built once per session through `imagen models pull --tiny`'s code and shared read-only:
    copy it (`copy_cache` in tests/models) before changing anything in it.
    """
    from image.models.lock import Lock
    from image.models.registry import REGISTRY
    from image.models.tiny import build_tiny

    cache = tmp_path_factory.mktemp("tiny-models")
    build_tiny(list(REGISTRY.values()), cache, lock=Lock.packaged())
    return cache


# -- the real emulators -----------------------------------------------------------------


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    from google.cloud import pubsub_v1

    from handlers.localstack import EVENTS_TOPIC, PROJECT, PubsubEmulator

    emulator = PubsubEmulator(log_dir=tmp_path_factory.mktemp("pubsub")).start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    publisher = pubsub_v1.PublisherClient()
    publisher.create_topic(name=publisher.topic_path(PROJECT, EVENTS_TOPIC))
    yield emulator
    os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    emulator.stop()


@pytest.fixture(scope="session")
def storage_emulator(pubsub_emulator, tmp_path_factory):
    from handlers.localstack import StorageEmulator

    emulator = StorageEmulator(log_dir=tmp_path_factory.mktemp("gcs")).start(
        pubsub_host=pubsub_emulator.host
    )
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
    emulator.stop()


@pytest.fixture(scope="session")
def gcs(storage_emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from handlers.localstack import PROJECT

    return storage.Client(project=PROJECT, credentials=AnonymousCredentials())


@pytest.fixture
def proxy(storage_emulator):
    """A fault-injecting proxy (scripts/fault_proxy.py) in front of the storage emulator: a
    client built with `storage_emulator_host=proxy.url` meets the faults its rules inject."""
    from scripts.fault_proxy import FaultProxy

    with FaultProxy(storage_emulator.url) as running:
        yield running


@pytest.fixture
def short_storage_deadlines(monkeypatch) -> float:
    """Cloud Storage's retry deadlines, 120 s in production, cut to 3 s, so that a fault that
    lasts (a proxy rule without `times`) outlasts the client's retries within a test: the
    deadline of google-cloud-storage's DEFAULT_RETRY (the policy of the library's own calls)
    and the `timeout` of the Store methods that retry within it (bound at import; each of
    their requests may take as long). Other requests' own timeouts stay as they are (a
    loaded machine may take a second to answer).
    Timeouts only: every request still goes to the emulator (through the proxy)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    from handlers.storage import Store

    seconds = 3.0
    for method in (Store.stat, Store.read_report, Store.write_report, Store.delete):
        monkeypatch.setitem(method.__kwdefaults__, "timeout", seconds)
    monkeypatch.setattr(DEFAULT_RETRY, "_timeout", seconds)  # one shared object: the default argument
    return seconds


@pytest.fixture
def bucket(gcs):
    return gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def publisher(pubsub_emulator):
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient()


@pytest.fixture(scope="session")
def subscriber(pubsub_emulator):
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()


@pytest.fixture
def events_subscription(subscriber):
    """A fresh pull subscription on the Storage notification topic."""
    from handlers.localstack import EVENTS_TOPIC, PROJECT

    path = subscriber.subscription_path(PROJECT, f"events-{uuid.uuid4().hex[:10]}")
    subscriber.create_subscription(
        name=path, topic=subscriber.topic_path(PROJECT, EVENTS_TOPIC), ack_deadline_seconds=30
    )
    yield path
    subscriber.delete_subscription(subscription=path)


@pytest.fixture
def settings(storage_emulator, pubsub_emulator, tmp_path):
    from handlers.localstack import PROJECT
    from handlers.settings import Settings

    return Settings.from_env({
        "STORAGE_EMULATOR_HOST": storage_emulator.url,
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "IMAGEN_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "MODEL_CACHE_DIR": str(tmp_path / "no-models"),
    })
