"""`imagen serve`'s probes: what Cloud Run's startup and liveness probes are told."""

from __future__ import annotations

from handlers.http import create_app
from image import engine


def _client(state: str):
    return create_app(processor=None, state=lambda: state).test_client()


def test_health_and_readiness_follow_the_engine():
    assert _client(engine.STARTING).get("/healthz").status_code == 200  # alive while it loads
    assert _client(engine.STARTING).get("/readyz").status_code == 503
    assert _client(engine.READY).get("/readyz").status_code == 200


def test_a_failed_gpu_fails_the_liveness_probe():
    # Cloud Run restarts the instance, instead of it failing every job fast (and so taking
    # most of them) with a GPU its process can no longer use.
    client = _client(engine.DEVICE_FAILED)
    answer = client.get("/healthz")
    assert answer.status_code == 503 and answer.get_json() == {"status": "device failed", "state": "DEVICE_FAILED"}
    assert client.get("/readyz").status_code == 503
