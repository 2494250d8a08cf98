"""`imagen dev`: the local stack left running, as a developer starts it and stops it."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_imagen_dev_prints_what_to_paste_then_stops_everything(tiny_cache, tmp_path, monkeypatch):
    env = {**os.environ, "MODEL_CACHE_DIR": str(tiny_cache), "IMAGEN_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    for name in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"):
        env.pop(name, None)
    command = [sys.executable, "-m", "handlers.cli", "dev", "--work-dir", "here", "--bucket", "dev-bucket"]
    dev = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any(line.startswith("logs:") for line in lines):
            line = dev.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
        assert exports, "\n".join(lines)
        # Pasted into a shell in another folder: paths are absolute.
        assert exports["MODEL_CACHE_DIR"] == str(tiny_cache)
        # A worker started by hand dead-letters as the stack's do; one line undoes every export.
        assert exports["IMAGEN_DEAD_LETTER_TOPIC"] == "imagen-dead-letter"
        [unset] = [line for line in lines if "unset " in line]
        assert unset.split("unset ", 1)[1].split() == list(exports)
        logs = next(line for line in lines if line.startswith("logs:")).split()[1]
        assert Path(logs) == tmp_path / "here" / "logs"
        # Which process serves what, and where to look: a chain across the two goes nowhere.
        assert any(line.startswith("worker (pull): enhance, comic, metrics http://127.0.0.1:") for line in lines)
        assert any(line.startswith("imagen serve (push): upscale, remove-background, http://") for line in lines)
        # A message nothing can settle ends in the dead-letter subscription, not redelivered forever.
        from google.cloud import pubsub_v1

        assert any(line.startswith("dead letters (unparseable or refused: at once; else after 5 deliveries): "
                                   "imagen dlq list --subscription imagen-dead-letter") for line in lines)
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", exports["PUBSUB_EMULATOR_HOST"])
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        publisher.publish(publisher.topic_path("imagen-local", "imagen-events"), b"not json").result(timeout=30)
        dead = subscriber.subscription_path("imagen-local", "imagen-dead-letter")
        received = []
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            received = subscriber.pull(subscription=dead, max_messages=10, timeout=10).received_messages
        assert [m.message.data for m in received][:1] == [b"not json"]
        assert received[0].message.attributes["imagen-dead-letter-reason"].startswith("unparseable: ")
        # The job message it prints publishes as pasted (gcloud ignores PUBSUB_EMULATOR_HOST: the
        # exports carry its own override), the chain's comma kept; a worker of one's own reads
        # its copy from imagen-<operation>.
        assert exports["IMAGEN_BUCKET"] == "dev-bucket"
        [publish] = [line for line in lines if line.startswith("gcloud pubsub topics publish ")]
        if shutil.which("gcloud"):
            shell_env = {**env, **{key: shlex.split(value)[0] for key, value in exports.items()}}
            done = subprocess.run(publish, shell=True, env=shell_env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            own = subscriber.subscription_path("imagen-local", "imagen-upscale")
            found = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(b'"source"' in m.message.data for m in found):
                found += subscriber.pull(subscription=own, max_messages=10, timeout=10).received_messages
            [job] = [m.message for m in found if b'"source"' in m.message.data]
            assert job.attributes["operation"] == "remove-background,upscale"
    finally:
        dev.send_signal(signal.SIGINT)
        rest, _ = dev.communicate(timeout=120)
    assert dev.returncode == 0 and rest.strip().endswith("stopped."), rest
