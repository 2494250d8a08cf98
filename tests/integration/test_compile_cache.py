"""IMAGEN_COMPILE_CACHE in Cloud Storage (fake-gcs-server), and `imagen models compile`.

The end-to-end test compiles a tiny model for real (Inductor on the CPU) in one process,
stores the artefact in the bucket, and shows a second, fresh process (its own Inductor
cache folder) taking every compiled graph from it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from handlers.compile_cache import StorageCompileCache, open_compile_cache
from handlers.errors import ConfigError
from handlers.localstack import PROJECT
from handlers.settings import Settings
from image.operations.compile_cache import DirectoryCache

pytestmark = pytest.mark.integration


def test_an_artefact_is_created_once_and_never_replaced(gcs, bucket):
    store = StorageCompileCache(lambda: gcs, f"gs://{bucket.name}/compiled")
    assert str(store) == f"gs://{bucket.name}/compiled/"
    assert store.get("comic/a.bin") is None and not store.has("comic/a.bin")
    assert store.put("comic/a.bin", b"first") and store.has("comic/a.bin")
    assert not store.put("comic/a.bin", b"second")  # another instance got there first
    assert store.get("comic/a.bin") == b"first"
    assert [blob.name for blob in bucket.list_blobs()] == ["compiled/comic/a.bin"]


def test_the_setting_picks_the_store(storage_emulator, tmp_path):
    base = {"STORAGE_EMULATOR_HOST": storage_emulator.url, "GOOGLE_CLOUD_PROJECT": PROJECT}
    assert open_compile_cache(Settings.from_env(base)) is None
    in_bucket = open_compile_cache(Settings.from_env({**base, "IMAGEN_COMPILE_CACHE": "gs://b/p/"}))
    assert isinstance(in_bucket, StorageCompileCache) and str(in_bucket) == "gs://b/p/"
    folder = open_compile_cache(Settings.from_env({**base, "IMAGEN_COMPILE_CACHE": str(tmp_path)}))
    assert isinstance(folder, DirectoryCache) and folder.root == tmp_path
    for wrong in ("gs://", "gs:///prefix", "s3://bucket/prefix"):
        with pytest.raises(ConfigError, match="IMAGEN_COMPILE_CACHE"):
            Settings.from_env({"IMAGEN_COMPILE_CACHE": wrong})
    # Where uploaders can write, artefacts (code the workers run) would be theirs to write.
    for images in ({"IMAGEN_ALLOWED_BUCKETS": "uploads,other"}, {"IMAGEN_OUTPUT_BUCKET": "uploads"}):
        with pytest.raises(ConfigError, match="code the workers run"):
            Settings.from_env({**images, "IMAGEN_COMPILE_CACHE": "gs://uploads/compiled"})


def test_a_store_that_cannot_connect_fails_at_use_not_at_start(caplog):
    from image.operations import compile_cache

    def no_credentials():
        raise OSError("no credentials found")

    store = StorageCompileCache(no_credentials, "gs://somewhere/compiled")  # nothing called yet
    assert not compile_cache.load(store, "comic/a.bin", "comic")  # a warning; the compile goes on
    assert "no credentials found" in caplog.text


def _compile(env, tmp_path, run: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "handlers.cli", "models", "compile", *args], check=False,
        env={**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}")},
        capture_output=True, text=True, timeout=600,
    )


def _messages(stdout: str) -> list[str]:
    return [json.loads(line)["message"] for line in stdout.splitlines() if line.startswith("{")]


def test_models_compile_stores_what_a_fresh_process_then_loads(storage_emulator, bucket, tiny_cache, tmp_path):
    env = {
        **_base_env(),
        "STORAGE_EMULATOR_HOST": storage_emulator.url,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "HF_HUB_OFFLINE": "1",
        "MODEL_CACHE_DIR": str(tiny_cache),
        "IMAGEN_DEVICE": "cpu",
        "IMAGEN_TUNING": "compile=on",  # the CPU defaults compile nothing
        "IMAGEN_COMPILE_CACHE": f"gs://{bucket.name}/compiled",
    }
    first = _compile(env, tmp_path, "first", "--operations", "remove-background")
    assert first.returncode == 0, first.stderr[-3000:]
    [stored] = [blob.name for blob in bucket.list_blobs()]
    assert stored.startswith("compiled/remove-background/torch-") and "/cpu/" in stored
    assert first.stdout.splitlines()[-1] == f"remove-background: gs://{bucket.name}/{stored}"
    assert "remove-background: compiled in the warm-up (Inductor graphs: 0 from the cache, 1 compiled)" \
        in _messages(first.stdout)

    second = _compile(env, tmp_path, "second", "--operations", "remove-background")
    assert second.returncode == 0, second.stderr[-3000:]
    messages = _messages(second.stdout)
    assert any(m.startswith("remove-background: compiled artefact loaded from gs://") for m in messages)
    assert "remove-background: compiled in the warm-up (Inductor graphs: 1 from the cache, 0 compiled)" in messages
    assert not any("stored" in m or "storing" in m for m in messages)  # all from the artefact: nothing to store
    assert [blob.name for blob in bucket.list_blobs()] == [stored]


def test_models_compile_says_what_it_cannot_do(storage_emulator, bucket, tiny_cache, tmp_path):
    env = {**_base_env(), "HF_HUB_OFFLINE": "1", "MODEL_CACHE_DIR": str(tiny_cache), "IMAGEN_DEVICE": "cpu"}
    nowhere = _compile(env, tmp_path, "nowhere", "--operations", "remove-background")
    assert nowhere.returncode == 2 and "IMAGEN_COMPILE_CACHE" in nowhere.stderr
    off = _compile(env, tmp_path, "off", "--operations", "remove-background", "--to", str(tmp_path / "store"))
    assert off.returncode == 1
    assert "remove-background: not compiled (compile is off for it here; IMAGEN_TUNING=compile=on" in off.stderr


def _base_env() -> dict[str, str]:
    import os

    keep = ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")
    return {name: os.environ[name] for name in keep if name in os.environ}
