"""Google Cloud clients, built from settings (emulators included) in one place.

Emulator endpoints come from the settings object, not from the libraries' own reading of the
environment, so a process can talk to an emulator it started itself (the local stack) and the
environment is read in one place only.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import grpc
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

EMULATOR_PROJECT = "imagen-local"


POOL_CONNECTIONS = 10
"""Connections requests keeps per host by default (its HTTPAdapter's pool_maxsize)."""


def storage_client(settings, *, connections: int = POOL_CONNECTIONS) -> storage.Client:
    """A Storage client; `connections`: how many threads will use it at once. Above requests'
    pool of 10, each request past the tenth opened a connection (a TLS handshake) and threw it
    away after, with a "Connection pool is full" warning per request."""
    if settings.storage_emulator_host:
        client = storage.Client(
            project=settings.project or EMULATOR_PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": _with_scheme(settings.storage_emulator_host)},
        )
    else:
        client = storage.Client(project=settings.project)
    if connections > POOL_CONNECTIONS:
        # The library has no option for it: its session (an AuthorizedSession, a
        # requests.Session) gets larger pools, as its maintainers advise
        # (googleapis/python-storage#253). The adapters already mounted are resized rather
        # than replaced, so a mutual-TLS one keeps its certificate.
        for scheme in ("https://", "http://"):
            client._http.get_adapter(scheme).init_poolmanager(POOL_CONNECTIONS, connections)
    return client


def publisher_client(settings) -> pubsub_v1.PublisherClient:
    if settings.pubsub_emulator_host:  # the emulator speaks plain gRPC, no TLS, no credentials
        channel = grpc.insecure_channel(settings.pubsub_emulator_host)
        return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=channel))
    return pubsub_v1.PublisherClient()


def subscriber_client(settings) -> pubsub_v1.SubscriberClient:
    if settings.pubsub_emulator_host:
        channel = grpc.insecure_channel(settings.pubsub_emulator_host)
        return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
    return pubsub_v1.SubscriberClient()


def check_emulators(settings, *services: str) -> None:
    """ConfigError naming an emulator the settings point at (`services`: "storage", "pubsub")
    that refuses connections: the client libraries retry a refused connection for one to two
    minutes before saying anything (a shell still holding `imagen dev`'s exports, the stack gone)."""
    from handlers.errors import ConfigError

    for service in services:
        name = f"{service.upper()}_EMULATOR_HOST"
        if not (host := getattr(settings, f"{service}_emulator_host", None)):
            continue
        try:  # HOST:PORT, or a URL with one; any other form (gRPC's dns:///...) the libraries' to read
            address = urlsplit(_with_scheme(host))
            endpoint = (address.hostname, address.port)
        except ValueError:
            continue
        if None in endpoint:
            continue
        try:
            socket.create_connection(endpoint, timeout=2).close()
        except (ConnectionRefusedError, socket.gaierror) as error:  # a slow answer is still one
            raise ConfigError(f"{name}={host} does not answer ({error.strerror or error}): start the emulator "
                              f"(`imagen dev` prints the exports), or fix or unset {name} to use Google "
                              f"Cloud") from None
        except OSError:
            pass


def _with_scheme(host: str) -> str:
    # STORAGE_EMULATOR_HOST may be "localhost:4443" or "http://localhost:4443".
    return host if "://" in host else f"http://{host}"


def topic_path(settings, topic: str) -> str:
    """A topic name or full path -> full path in the settings' project."""
    if topic.startswith("projects/"):
        return topic
    return pubsub_v1.PublisherClient.topic_path(_project(settings), topic)


def subscription_path(settings, subscription: str) -> str:
    if subscription.startswith("projects/"):
        return subscription
    return pubsub_v1.SubscriberClient.subscription_path(_project(settings), subscription)


def log_project(settings) -> str | None:
    """The project whose traces log lines name (Cloud Run's request traces): the settings',
    else the credentials'; None where neither says (a laptop without credentials)."""
    if settings.project:
        return settings.project
    import google.auth
    import google.auth.exceptions

    try:
        return google.auth.default()[1]
    except google.auth.exceptions.DefaultCredentialsError:
        return None


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
