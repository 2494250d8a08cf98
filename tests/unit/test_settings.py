"""Settings: one object from the environment; misconfiguration names the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.errors import ConfigError
from handlers.settings import Settings


def test_defaults():
    settings = Settings.from_env({})
    assert settings.operations == ("upscale", "enhance", "comic", "remove-background")
    assert (settings.input_prefix, settings.output_prefix, settings.failed_prefix) == (
        "incoming/", "processed/", "failed/")
    assert settings.port == 8080 and settings.device == "auto"
    assert settings.allowed_buckets == frozenset() and settings.allow_model_download
    assert not settings.filtered_subscription


def test_every_variable_is_read():
    settings = Settings.from_env({
        "MODEL_CACHE_DIR": "/models", "IMAGEN_OPERATIONS": "upscale, comic",
        "IMAGEN_INPUT_PREFIX": "in/", "IMAGEN_OUTPUT_BUCKET": "out-bkt", "IMAGEN_OUTPUT_PREFIX": "out/",
        "IMAGEN_FAILED_PREFIX": "bad/", "IMAGEN_RESULTS_TOPIC": "results", "IMAGEN_SUBSCRIPTION": "sub",
        "IMAGEN_DEVICE": "cpu", "IMAGEN_MAX_PIXELS": "1000", "IMAGEN_MAX_BYTES": "2000",
        "IMAGEN_ALLOWED_BUCKETS": "bkt-a,bkt-b", "GOOGLE_CLOUD_PROJECT": "proj", "PORT": "9000",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:1", "PUBSUB_EMULATOR_HOST": "127.0.0.1:2",
        "HF_HUB_OFFLINE": "1", "IMAGEN_PUSH_AUDIENCE": "https://svc/",
        "IMAGEN_PUSH_SERVICE_ACCOUNTS": "push@p.iam.gserviceaccount.com",
        "IMAGEN_TUNING": " cuda_graphs=off; upscale_tile=256,512  vae_bf16=off ",
        "IMAGEN_FILTERED_SUBSCRIPTION": "true", "IMAGEN_MODEL_MIRROR": "gs://mirror/models",
        "IMAGEN_LOG_LEVEL": "debug", "IMAGEN_BUCKET": "in-bkt", "HF_TOKEN": "hf_secret",
    })
    assert settings.model_cache_dir == Path("/models")
    assert settings.operations == ("upscale", "comic")
    assert (settings.input_prefix, settings.output_prefix, settings.failed_prefix) == ("in/", "out/", "bad/")
    assert settings.output_bucket == "out-bkt" and settings.results_topic == "results"
    assert settings.subscription == "sub" and settings.device == "cpu"
    assert (settings.max_pixels, settings.max_bytes, settings.port) == (1000, 2000, 9000)
    assert settings.allowed_buckets == {"bkt-a", "bkt-b"} and settings.project == "proj"
    assert settings.storage_emulator_host and settings.pubsub_emulator_host
    assert not settings.allow_model_download
    assert settings.push_audience == "https://svc/"
    assert settings.push_service_accounts == {"push@p.iam.gserviceaccount.com"}
    assert settings.tuning == ("cuda_graphs=off", "upscale_tile=256,512", "vae_bf16=off")
    assert settings.filtered_subscription and settings.model_mirror == "gs://mirror/models"
    assert not Settings.from_env({"IMAGEN_FILTERED_SUBSCRIPTION": "false"}).filtered_subscription
    assert (settings.log_level, settings.bucket, settings.hf_token) == ("DEBUG", "in-bkt", "hf_secret")
    assert "hf_secret" not in repr(settings)  # settings are logged and printed; the token never


@pytest.mark.parametrize("value, offline", [("1", True), ("ON", True), ("True", True), ("yes", True), ("0", False),
                                            ("", False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(value, offline):
    assert Settings.from_env({"HF_HUB_OFFLINE": value}).allow_model_download is not offline


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"IMAGEN_OPERATIONS": "upscale,sharpen"}, "IMAGEN_OPERATIONS"),
        ({"IMAGEN_DEVICE": "tpu"}, "IMAGEN_DEVICE"),
        ({"IMAGEN_OUTPUT_PREFIX": "incoming/out/"}, "IMAGEN_INPUT_PREFIX"),
        ({"IMAGEN_FAILED_PREFIX": "processed/"}, "IMAGEN_OUTPUT_PREFIX"),
        ({"IMAGEN_INPUT_PREFIX": "incoming"}, "IMAGEN_INPUT_PREFIX"),
        ({"IMAGEN_OUTPUT_PREFIX": "processed/./"}, "IMAGEN_OUTPUT_PREFIX"),  # every job would fail on it
        ({"IMAGEN_FAILED_PREFIX": "failed/../x/"}, "IMAGEN_FAILED_PREFIX"),
        ({"IMAGEN_INPUT_PREFIX": "in\x01coming/"}, "IMAGEN_INPUT_PREFIX"),
        ({"IMAGEN_MAX_PIXELS": "lots"}, "IMAGEN_MAX_PIXELS"),
        ({"IMAGEN_MAX_PIXELS": "200000000"}, "IMAGEN_MAX_PIXELS"),  # over what Pillow opens
        ({"PORT": "-1"}, "PORT"),
        ({"IMAGEN_PUSH_SERVICE_ACCOUNTS": "a@b.iam.gserviceaccount.com"}, "IMAGEN_PUSH_AUDIENCE"),
        ({"IMAGEN_PUSH_AUDIENCE": "https://svc/"}, "IMAGEN_PUSH_SERVICE_ACCOUNTS"),  # would take anyone's token
        ({"IMAGEN_TUNING": "cuda_graph=off"}, "IMAGEN_TUNING"),  # a typo: no such switch
        ({"IMAGEN_TUNING": "vae_bf16=maybe"}, "IMAGEN_TUNING"),
        ({"IMAGEN_TUNING": "upscale_tile=0"}, "IMAGEN_TUNING"),
        ({"IMAGEN_FILTERED_SUBSCRIPTION": "sometimes"}, "IMAGEN_FILTERED_SUBSCRIPTION"),
        ({"IMAGEN_DEPLOYED_OPERATIONS": "upscale,sharpen"}, "IMAGEN_DEPLOYED_OPERATIONS"),
        ({"IMAGEN_MODEL_MIRROR": "mirror/models"}, "IMAGEN_MODEL_MIRROR"),
        ({"IMAGEN_MODEL_MIRROR": "gs:///models"}, "IMAGEN_MODEL_MIRROR"),
        ({"IMAGEN_MODEL_MIRROR": "gs://uploads/models", "IMAGEN_ALLOWED_BUCKETS": "uploads"}, "IMAGEN_MODEL_MIRROR"),
        ({"IMAGEN_MODEL_MIRROR": "gs://out/models", "IMAGEN_OUTPUT_BUCKET": "out"}, "IMAGEN_MODEL_MIRROR"),
    ],
)
def test_misconfiguration_names_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_command_line_overrides_are_validated():
    settings = Settings.from_env({})
    assert settings.replace(port=1234, device=None).port == 1234
    with pytest.raises(ConfigError):
        settings.replace(operations=("nope",))


def test_tuning_is_validated_without_torch():
    import subprocess
    import sys

    code = ("import sys; from handlers.settings import Settings; "
            "Settings.from_env({'IMAGEN_TUNING': 'cuda_graphs=off'}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bucket_settings_take_bucket_names_not_uris():
    # IMAGEN_OUTPUT_BUCKET=gs://out/ was taken as it was: every output write refused (and
    # retried as the deployment's fault), every job message dead-lettered, all in silence.
    with pytest.raises(ConfigError, match="IMAGEN_OUTPUT_BUCKET: 'gs://out/' is not a bucket name: give the name alone"):
        Settings.from_env({"IMAGEN_OUTPUT_BUCKET": "gs://out/"})
    with pytest.raises(ConfigError, match="IMAGEN_ALLOWED_BUCKETS: 'In' is not a bucket name"):
        Settings.from_env({"IMAGEN_ALLOWED_BUCKETS": "ok-bucket,In"})
    settings = Settings.from_env({"IMAGEN_OUTPUT_BUCKET": "out.example.com", "IMAGEN_ALLOWED_BUCKETS": "a_b-1,c9c"})
    assert settings.output_bucket == "out.example.com" and settings.allowed_buckets == {"a_b-1", "c9c"}


def test_the_log_level_is_checked():
    with pytest.raises(ConfigError, match="IMAGEN_LOG_LEVEL: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"):
        Settings.from_env({"IMAGEN_LOG_LEVEL": "loud"})
    # IMAGEN_BUCKET is submit's alone: checked there (tests/unit/test_cli_errors.py), stopping no other command.
    assert Settings.from_env({"IMAGEN_BUCKET": "gs://in"}).bucket == "gs://in"



def test_the_default_pixel_limit_takes_a_camera_photo():
    # 16.8 MP was the default: a 24 MP camera's photo (6000x4000) was refused as a decompression
    # bomb for every operation, remove-background and comic included.
    import io

    from PIL import Image

    from image.codec import decode_image

    photo = io.BytesIO()
    Image.new("RGB", (6000, 4000), (90, 120, 200)).save(photo, "JPEG")
    settings = Settings.from_env({})
    decoded = decode_image(photo.getvalue(), max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
    assert decoded.size == (6000, 4000)
