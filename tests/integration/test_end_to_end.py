"""End to end on the emulator stack with the real operations (tiny models, real loader):
upload -> Storage notification -> worker or `imagen serve` -> output in the bucket."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

from handlers.localstack import EVENTS_TOPIC, answers_200, free_port, gcloud_storage_env

from .conftest import PROJECT, png_bytes, wait_for


def _wait_blob(bucket, name, timeout=90):
    return wait_for(lambda: bucket.get_blob(name), timeout=timeout, what=f"gs://{bucket.name}/{name}")


def _size(blob):
    return Image.open(io.BytesIO(blob.download_as_bytes())).size


def _env(tiny_settings, **extra):
    env = dict(os.environ)
    env.update({
        "MODEL_CACHE_DIR": str(tiny_settings.model_cache_dir),
        "STORAGE_EMULATOR_HOST": tiny_settings.storage_emulator_host,
        "PUBSUB_EMULATOR_HOST": tiny_settings.pubsub_emulator_host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "IMAGEN_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "IMAGEN_ALLOWED_BUCKETS": ",".join(tiny_settings.allowed_buckets),
    })
    env.update(extra)
    return env


def _ignored() -> float:
    """Events this process's worker ignored so far (its Prometheus counter)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("imagen_jobs_total", {"operation": "none", "status": "ignored"}) or 0


def _jobs(url: str, status: str) -> float:
    """imagen_jobs_total of `status`, all operations, from an `imagen serve` /metrics page."""
    with urllib.request.urlopen(url + "/metrics") as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("imagen_jobs_total{") and f'status="{status}"' in line)


def test_upload_to_output_through_the_pull_worker(worker, bucket, publisher, tiny_settings):
    ignored_before = _ignored()
    # A user's upload, with parameters in metadata.
    blob = bucket.blob("incoming/upscale/holiday/cat.png")
    blob.metadata = {"imagen-params": json.dumps({"steps": 2, "seed": 5})}
    blob.upload_from_string(png_bytes((40, 32)), content_type="image/png")
    # A chain, a corrupt file, and a job message from another service on the same topic.
    bucket.blob("incoming/remove-background,upscale/logo.png").upload_from_string(
        png_bytes((32, 32), mode="RGBA"), content_type="image/png")
    bucket.blob("incoming/comic/broken.jpg").upload_from_string(b"\xff\xd8\xff\xe0 not really", content_type="image/jpeg")
    bucket.blob("uploads/portrait.png").upload_from_string(png_bytes((48, 40)), content_type="image/png")
    job = {"source": f"gs://{bucket.name}/uploads/portrait.png", "operation": "remove-background",
           "params": {"background": "#00ff00"}, "output": f"gs://{bucket.name}/catalog/portrait.webp"}
    publisher.publish(publisher.topic_path(PROJECT, EVENTS_TOPIC), json.dumps(job).encode()).result()

    out = _wait_blob(bucket, "processed/upscale/holiday/cat.png")
    assert _size(out) == (160, 128)
    # The contract's metadata (DESIGN.md, bucket layout), as the real engine and cache make it.
    from importlib.metadata import version

    repo = tiny_settings.model_cache_dir / "models--stabilityai--stable-diffusion-x4-upscaler"
    commit = (repo / "refs" / "main").read_text().strip()
    metadata = dict(out.metadata)
    assert float(metadata.pop("imagen-seconds")) > 0
    assert metadata == {
        "imagen-source": f"gs://{bucket.name}/incoming/upscale/holiday/cat.png",
        "imagen-source-generation": str(bucket.get_blob(blob.name).generation),
        "imagen-operation": "upscale",
        "imagen-params": metadata["imagen-params"],
        "imagen-model": f"stabilityai/stable-diffusion-x4-upscaler@{commit}+tiny",  # not the real weights
        "imagen-version": version("imagen"),
    }
    assert json.loads(metadata["imagen-params"]) == {"seed": 5, "steps": 2}

    chained = _wait_blob(bucket, "processed/remove-background,upscale/logo.png")
    image = Image.open(io.BytesIO(chained.download_as_bytes()))
    assert image.size == (128, 128) and image.mode == "RGBA"

    report = json.loads(_wait_blob(bucket, "failed/comic/broken.jpg.json").download_as_bytes())
    assert report["error"]["type"] == "ImageDecodeError"

    catalog = _wait_blob(bucket, "catalog/portrait.webp")
    assert catalog.content_type == "image/webp" and _size(catalog) == (48, 40)

    # Our own outputs raise notifications too: they must be ignored, not processed again. Five
    # are (the four written and uploads/, outside incoming/): once they are, nothing more comes.
    wait_for(lambda: _ignored() - ignored_before >= 5, timeout=60, what="the outputs' notifications ignored")
    names = sorted(b.name for b in bucket.list_blobs())
    assert names == sorted([
        "catalog/portrait.webp", "failed/comic/broken.jpg.json", "incoming/comic/broken.jpg",
        "incoming/remove-background,upscale/logo.png", "incoming/upscale/holiday/cat.png",
        "processed/remove-background,upscale/logo.png", "processed/upscale/holiday/cat.png",
        "uploads/portrait.png",
    ])


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the gcloud CLI")
def test_gcloud_storage_cp_as_a_new_user_would(worker, bucket, tmp_path, storage_emulator):
    local = tmp_path / "photo.png"
    local.write_bytes(png_bytes((36, 28)))
    env = dict(os.environ, **gcloud_storage_env(storage_emulator.url))
    subprocess.run(
        ["gcloud", "storage", "cp", str(local), f"gs://{bucket.name}/incoming/enhance/photo.png"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    out = _wait_blob(bucket, "processed/enhance/photo.png")
    assert _size(out) == (36, 28)


@pytest.fixture
def serve(tiny_settings, tmp_path):
    """`imagen serve` as a real process on a free port, ready (models loaded and warm)."""
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port), "--host", "127.0.0.1"],
        env=_env(tiny_settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        if process.poll() is not None:
            raise AssertionError((tmp_path / "serve.log").read_text())
        return answers_200(url + "/readyz")

    wait_for(ready, timeout=120, what="imagen serve /readyz")
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_serve_answers_not_ready_until_its_models_are_loaded(tiny_settings, bucket, monkeypatch):
    """Cloud Run's startup probe and every push wait on /readyz: 503 while the models load
    (here held by a model restore that waits), 200 once they are warm. The serve tests
    above only ever saw 200: `imagen serve` wired to say ready at once passed them all. In
    this process (gunicorn's run replaced): the app serve builds, and the set-up it starts."""
    import threading

    from click.testing import CliRunner

    import handlers.cli.serve as serve
    import handlers.service as service
    from handlers.cli import main

    built, restoring, release = {}, threading.Event(), threading.Event()

    class Captured:  # gunicorn, which would fork and serve: keeps what it was given
        def __init__(self, app, host, port, threads, post_worker_init):
            built.update(app=app, post_worker_init=post_worker_init)

        def run(self):
            pass

    def slow_restore(settings):  # a model mirror being copied in
        restoring.set()
        assert release.wait(120)

    monkeypatch.setattr(serve, "_server", Captured)
    monkeypatch.setattr(serve, "configure_logging", lambda *args, **kwargs: None)  # pytest's own capture stays
    monkeypatch.setattr(service, "restore_models", slow_restore)
    result = CliRunner().invoke(main, ["serve", "--operations", "remove-background"], env=_env(tiny_settings),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = built["app"].test_client()
    built["post_worker_init"](None)  # in the forked worker: the models load in a thread
    assert restoring.wait(60)
    envelope = {"message": {"data": base64.b64encode(json.dumps({"bucket": bucket.name, "name": "incoming/x.png",
                                                                  "generation": "1"}).encode()).decode(),
                            "attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"},
                            "messageId": "1"}, "subscription": "projects/p/subscriptions/s"}
    try:
        assert client.get("/healthz").status_code == 200  # alive while loading: not restarted
        assert client.get("/readyz").status_code == 503
        pushed = client.post("/", json=envelope)
        assert pushed.status_code == 503 and pushed.headers["Retry-After"]
    finally:
        release.set()
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout=120, what="/readyz once the models load")


def test_serve_whose_models_cannot_load_stops_instead_of_idling_on_the_gpu(tiny_settings, tmp_path):
    # An instance that can never be ready would hold a billed GPU for the startup probe's
    # whole window: it exits at once, its reason the last JSON line, and the platform retries.
    settings = tiny_settings.replace(model_cache_dir=tmp_path / "empty-cache")
    process = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "serve", "--port", str(free_port()), "--host", "127.0.0.1",
         "--operations", "remove-background"],
        env=_env(settings), capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 3, process.stdout + process.stderr
    assert process.stderr == ""  # gunicorn's own lines too: JSON on stdout
    lines = [json.loads(line) for line in process.stdout.splitlines()]
    [stopped] = [line for line in lines if line["severity"] == "CRITICAL"]
    assert stopped["message"].startswith("model set-up failed; stopping: ")
    assert stopped["error"]["type"] == "ModelMissing" and "imagen models pull" in stopped["error"]["message"]


def test_serve_restores_its_models_from_a_mirror_before_loading_them(tiny_settings, gcs, tmp_path):
    # Cloud Run with model_mirror: an image without models, IMAGEN_MODEL_MIRROR and an empty
    # MODEL_CACHE_DIR. The restore is serve's own, so its lines, and why it stopped when the
    # mirror is not there, are JSON like the rest (a shell running `models pull --from` first
    # wrote plain text that no severity filter or alert saw).
    from handlers.model_mirror import mirror_cache
    from image.models.registry import REGISTRY

    mirror = gcs.create_bucket(f"mirror-{uuid.uuid4().hex[:12]}")  # not where images are uploaded
    uri = f"gs://{mirror.name}/models"
    mirror_cache(tiny_settings.model_cache_dir, uri, client=gcs,
                 cache_names=[REGISTRY["remove-background"].cache_name])
    command = [sys.executable, "-m", "handlers.cli", "serve", "--host", "127.0.0.1", "--operations",
               "remove-background"]
    missing = subprocess.run(
        [*command, "--port", str(free_port())], capture_output=True, text=True, timeout=120,
        env=_env(tiny_settings, IMAGEN_MODEL_MIRROR=f"gs://{mirror.name}/elsewhere",
                 MODEL_CACHE_DIR=str(tmp_path / "nothing-yet")))
    assert missing.returncode == 3 and missing.stderr == "", missing.stdout + missing.stderr
    [stopped] = [line for line in map(json.loads, missing.stdout.splitlines()) if line["severity"] == "CRITICAL"]
    assert stopped["error"]["type"] == "ModelMissing" and "no model mirror at" in stopped["error"]["message"]

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.PIPE, start_new_session=True,
            env=_env(tiny_settings, IMAGEN_MODEL_MIRROR=uri, MODEL_CACHE_DIR=str(tmp_path / "restored")))
    try:
        wait_for(lambda: process.poll() is None and answers_200(f"http://127.0.0.1:{port}/readyz") or
                 process.poll() is not None, timeout=120, what="imagen serve /readyz")
        assert process.poll() is None, log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    assert process.stderr.read() == b""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    [restored] = [line for line in lines if line["message"] == f"models restored from {uri}"]
    assert restored["files"] > 0 and restored["cache_dir"] == str(tmp_path / "restored")


def _post(url, body: bytes, headers: dict):
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_push_subscription_and_cloudevents_into_serve(serve, bucket, subscriber, publisher):
    with urllib.request.urlopen(serve + "/healthz") as response:
        assert response.status == 200
    with urllib.request.urlopen(serve + "/metrics") as response:
        assert b"imagen_model_load_seconds" in response.read()

    push = subscriber.subscription_path(PROJECT, f"push-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(
        name=push, topic=subscriber.topic_path(PROJECT, EVENTS_TOPIC),
        push_config={"push_endpoint": serve + "/"}, ack_deadline_seconds=60,
    )
    try:
        source = bucket.blob("incoming/comic/street.png")
        source.metadata = {"imagen-params": '{"steps": 2}'}
        source.upload_from_string(png_bytes((40, 40)), content_type="image/png")
        out = _wait_blob(bucket, "processed/comic/street.png")
        assert _size(out) == (40, 40)

        # A redelivered notification (same object generation) must not write again.
        source.reload()
        resource = {"kind": "storage#object", "bucket": bucket.name, "name": source.name,
                    "generation": str(source.generation), "metadata": source.metadata}
        publisher.publish(
            publisher.topic_path(PROJECT, EVENTS_TOPIC), json.dumps(resource).encode(),
            eventType="OBJECT_FINALIZE", payloadFormat="JSON_API_V1", bucketId=bucket.name,
            objectId=source.name, objectGeneration=str(source.generation),
        ).result()
        wait_for(lambda: _jobs(serve, "skipped") >= 1, timeout=60, what="the redelivery skipped by serve")
        assert bucket.get_blob("processed/comic/street.png").generation == out.generation
    finally:
        subscriber.delete_subscription(subscription=push)

    # Eventarc: a binary-mode CloudEvent straight into serve.
    ce_source = bucket.blob("incoming/remove-background/shoe.png")
    ce_source.upload_from_string(png_bytes((30, 20)), content_type="image/png")
    ce_source.reload()
    resource = {"bucket": bucket.name, "name": ce_source.name, "generation": str(ce_source.generation),
                "contentType": "image/png", "size": str(ce_source.size)}
    status, body = _post(serve + "/", json.dumps(resource).encode(), {
        "ce-specversion": "1.0", "ce-id": "evt-1", "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket.name}",
        "ce-subject": f"objects/{ce_source.name}", "content-type": "application/json",
    })
    assert status == 200 and body["status"] == "succeeded", body
    out = bucket.get_blob("processed/remove-background/shoe.png")
    assert Image.open(io.BytesIO(out.download_as_bytes())).mode == "RGBA"

    # Structured mode, and the same event again: a duplicate, acked with 200.
    structured = {"specversion": "1.0", "id": "evt-2", "type": "google.cloud.storage.object.v1.finalized",
                  "source": "//storage.googleapis.com/projects/_/buckets/" + bucket.name,
                  "datacontenttype": "application/json", "data": resource}
    status, body = _post(serve + "/", json.dumps(structured).encode(),
                         {"content-type": "application/cloudevents+json"})
    assert status == 200 and body["status"] == "skipped"

    # A body that cannot be parsed at all: 400, so Pub/Sub dead-letters it.
    status, body = _post(serve + "/", b"{garbage", {"content-type": "application/json"})
    assert status == 400 and body["error"]
    envelope = {"message": {"data": base64.b64encode(b"[]").decode(), "messageId": "9"}, "subscription": "s"}
    status, _ = _post(serve + "/", json.dumps(envelope).encode(), {"content-type": "application/json"})
    assert status == 400
    with urllib.request.urlopen(serve + "/metrics") as response:
        scraped = response.read().decode()
    assert 'imagen_jobs_total{operation="remove-background",status="succeeded"} 1.0' in scraped
    assert 'imagen_jobs_total{operation="remove-background",status="skipped"} 1.0' in scraped


def test_sigterm_during_a_job_loses_nothing(tiny_settings, bucket, events_subscription, tmp_path):
    """SIGTERM while a job runs: the worker finishes it, writes its output and exits 0 (a
    job still waiting for the GPU would go back to Pub/Sub: tests/integration/test_worker.py)."""
    log_path = tmp_path / "worker.log"
    metrics_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "handlers.cli", "worker", "--subscription", events_subscription,
         "--operations", "upscale", "--metrics-port", str(metrics_port)],
        env=_env(tiny_settings), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: b'"pulling"' in log_path.read_bytes(), timeout=120, what="worker start")
        blob = bucket.blob("incoming/upscale/slow.png")
        blob.metadata = {"imagen-params": '{"steps": 10}'}  # ~10 s here: the signal comes within 1 s
        blob.upload_from_string(png_bytes((160, 160)), content_type="image/png")
        wait_for(lambda: b"job started" in log_path.read_bytes(), timeout=60, what="job start")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            scraped = response.read().decode()
        assert "imagen_jobs_in_flight 1.0" in scraped
        assert 'imagen_model_load_seconds{operation="upscale"}' in scraped
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=240) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    messages = [json.loads(line)["message"] for line in log_path.read_text().splitlines() if line.startswith("{")]
    stopping = next(i for i, m in enumerate(messages) if m.startswith("stopping: finishing the job on the GPU"))
    finished = next(i for i, m in enumerate(messages) if m.startswith("job succeeded: "))
    assert stopping < finished, messages  # the signal came while the job ran, and it finished
    done = bucket.get_blob("processed/upscale/slow.png")
    assert done is not None and _size(done) == (640, 640)


def test_a_second_signal_stops_the_worker_at_once(tiny_settings, bucket, events_subscription, tmp_path):
    """Ctrl-C waits for the job on the GPU (minutes for a job on a CPU); a second Ctrl-C did
    nothing, so a local worker could only be killed. It ends the process now; the job's message
    comes back from Pub/Sub when its lease runs out, and no output is written."""
    log_path = tmp_path / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "handlers.cli", "worker", "--subscription", events_subscription,
         "--operations", "upscale", "--metrics-port", str(free_port())],
        env=_env(tiny_settings), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: b'"pulling"' in log_path.read_bytes(), timeout=120, what="worker start")
        blob = bucket.blob("incoming/upscale/long.png")
        blob.metadata = {"imagen-params": '{"steps": 150}'}  # a minute or more here
        blob.upload_from_string(png_bytes((160, 160)), content_type="image/png")
        wait_for(lambda: b"job on the GPU" in log_path.read_bytes(), timeout=60, what="job on the GPU")
        process.send_signal(signal.SIGINT)
        wait_for(lambda: b"stopping: finishing the job on the GPU" in log_path.read_bytes(), timeout=30,
                 what="the first signal")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 128 + signal.SIGINT, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert b"SIGINT again: stopping now" in log_path.read_bytes()
    assert bucket.get_blob("processed/upscale/long.png") is None


def test_sigterm_while_the_models_load_stops_the_worker_before_any_job(tiny_settings, events_subscription, tmp_path):
    """On GKE the worker is its container's PID 1, which the kernel sends no signal it has no
    handler for: a SIGTERM during set-up (a scale-down, a drain) was dropped and the pod went on
    to take jobs until the grace period's SIGKILL. Now it stops there, holding nothing."""
    log_path = tmp_path / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "handlers.cli", "worker", "--subscription", events_subscription,
         "--operations", "comic,enhance,upscale,remove-background"],
        env=_env(tiny_settings), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: b": loading " in log_path.read_bytes(), timeout=120, what="the first model's load")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log_path.read_text()
    assert "SIGTERM while starting: stopped before taking any job" in text and '"pulling"' not in text


def test_a_subscription_that_does_not_exist_stops_the_worker_before_the_models_load(tiny_settings, tmp_path):
    """A mistyped subscription was found only once every model had loaded and warmed up: a
    whole cold start, then a restart loop doing it again."""
    log_path = tmp_path / "worker.log"
    process = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "worker", "--subscription", "imagen-upscael", "--operations", "upscale"],
        env=_env(tiny_settings), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, timeout=120,
    )
    text = log_path.read_text()
    assert process.returncode == 2, text
    assert "subscriptions/imagen-upscael does not exist: check --subscription" in text
    assert ": loading " not in text


def test_an_output_bucket_that_does_not_exist_stops_the_worker_before_the_models_load(
        tiny_settings, events_subscription, tmp_path):
    """A missing output bucket reads as "no output yet": every job ran the model and was
    refused at its upload, retried until its report."""
    log_path = tmp_path / "worker.log"
    env = {**_env(tiny_settings), "IMAGEN_OUTPUT_BUCKET": "no-such-output-bucket"}
    process = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "worker", "--subscription", events_subscription,
         "--operations", "upscale"],
        env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, timeout=120,
    )
    text = log_path.read_text()
    assert process.returncode == 2, text
    assert "IMAGEN_OUTPUT_BUCKET: bucket no-such-output-bucket does not exist" in text and ": loading " not in text
