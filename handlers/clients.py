"""Google Cloud clients, built from settings (emulators included) in one place."""

from __future__ import annotations

from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage

EMULATOR_PROJECT = "imagen-local"


def storage_client(settings) -> storage.Client:
    if settings.storage_emulator_host:
        # The library reads STORAGE_EMULATOR_HOST itself; it still needs credentials and a project.
        return storage.Client(
            project=settings.project or EMULATOR_PROJECT, credentials=AnonymousCredentials()
        )
    return storage.Client(project=settings.project)


def publisher_client() -> pubsub_v1.PublisherClient:
    # PUBSUB_EMULATOR_HOST, when set, is honoured by the library itself.
    return pubsub_v1.PublisherClient()


def subscriber_client() -> pubsub_v1.SubscriberClient:
    return pubsub_v1.SubscriberClient()


def topic_path(settings, topic: str) -> str:
    """A topic name or full path -> full path in the settings' project."""
    if topic.startswith("projects/"):
        return topic
    return pubsub_v1.PublisherClient.topic_path(_project(settings), topic)


def subscription_path(settings, subscription: str) -> str:
    if subscription.startswith("projects/"):
        return subscription
    return pubsub_v1.SubscriberClient.subscription_path(_project(settings), subscription)


def _project(settings) -> str:
    if settings.project:
        return settings.project
    if settings.pubsub_emulator_host:
        return EMULATOR_PROJECT
    import google.auth

    _, project = google.auth.default()
    if not project:
        from handlers.errors import ConfigError

        raise ConfigError("GOOGLE_CLOUD_PROJECT: set it, or pass full projects/... paths")
    return project
