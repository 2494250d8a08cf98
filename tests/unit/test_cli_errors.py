"""The CLI's failures a user meets first: one line naming the fix, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from handlers.cli import main


def test_no_google_credentials_is_one_line_naming_the_fix(tmp_path):
    # The "Try it locally" commands without `imagen dev`'s exports: the client libraries'
    # DefaultCredentialsError was a traceback.
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json"), "GOOGLE_CLOUD_PROJECT": "p",
           "STORAGE_EMULATOR_HOST": "", "PUBSUB_EMULATOR_HOST": ""}
    result = CliRunner().invoke(main, ["dlq", "list", "--subscription", "imagen-dead-letter"], env=env)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("imagen: DefaultCredentialsError: ") and "Traceback" not in result.output
    assert "gcloud auth application-default login" in result.output and "imagen dev" in result.output


def test_a_bucket_option_takes_a_bucket_name(tmp_path):
    # submit --bucket gs://... hung on retries against a bucket that cannot exist.
    picture = tmp_path / "a.png"
    picture.write_bytes(b"not read")
    result = CliRunner().invoke(main, ["submit", str(picture), "--operation", "upscale", "--bucket", "gs://imagen-dev"])
    assert result.exit_code == 2 and "'gs://imagen-dev' is not a bucket name: give the name alone" in result.output
    result = CliRunner().invoke(main, ["dev", "--bucket", "Imagen"])
    assert result.exit_code == 2 and "'Imagen' is not a bucket name" in result.output
    result = CliRunner().invoke(main, ["submit", str(picture), "--operation", "upscale"], env={"IMAGEN_BUCKET": ""})
    assert result.exit_code == 2 and "give the input bucket: --bucket or IMAGEN_BUCKET" in result.output
    result = CliRunner().invoke(main, ["submit", str(picture), "--operation", "upscale"],
                                env={"IMAGEN_BUCKET": "gs://imagen-dev"})
    assert result.exit_code == 2 and "IMAGEN_BUCKET: 'gs://imagen-dev' is not a bucket name" in result.output
    # Another command, or --bucket given, is not stopped by it.
    assert CliRunner().invoke(main, ["models", "list", "--help"], env={"IMAGEN_BUCKET": "gs://x"}).exit_code == 0


def _gone_emulators() -> dict:
    """A shell still holding `imagen dev`'s exports after the stack stopped: nothing listens."""
    from handlers.localstack import free_port

    port = free_port()
    return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{port}",
            "GOOGLE_CLOUD_PROJECT": "p"}


@pytest.mark.parametrize("args, variable", [
    (["submit", "{picture}", "--operation", "upscale", "--bucket", "some-bucket"], "STORAGE"),
    (["process", "gs://some-bucket/incoming/upscale/a.png"], "STORAGE"),
    (["process", "gs://some-bucket/a.png", "--operation", "upscale"], "STORAGE"),
    (["backfill", "gs://some-bucket/", "--topic", "t", "--dry-run"], "STORAGE"),
    (["dlq", "list", "--subscription", "s"], "PUBSUB"),
    (["dlq", "replay", "--subscription", "s"], "PUBSUB"),
    (["models", "pull", "--from", "gs://some-bucket/models", "--operations", "comic"], "STORAGE"),
])
def test_a_gone_emulator_is_named_at_once(tmp_path, args, variable):
    # Each waited out the client libraries' retries (one to two minutes) without a word.
    picture = tmp_path / "a.png"
    picture.write_bytes(b"not read")
    env = _gone_emulators()
    result = CliRunner().invoke(main, [arg.format(picture=picture) for arg in args],
                                env={**env, "MODEL_CACHE_DIR": str(tmp_path / "models")})
    assert result.exit_code == 2, result.output
    host = env[f"{variable}_EMULATOR_HOST"]
    assert f"imagen: ConfigError: {variable}_EMULATOR_HOST={host} does not answer (Connection refused)" \
        in result.output


@pytest.mark.parametrize("args, says", [
    (["submit", "{picture}", "--operation", "upscal", "--bucket", "some-bucket"], "unknown operation"),
    (["submit", "{picture}", "--operation", "upscale", "--param", "steps=0", "--bucket", "some-bucket"], "'steps'"),
    (["process", "gs://some-bucket/a.png", "--param", "steps=3"], "--param and --output need --operation"),
    (["process", "gs://some-bucket/a.png", "--operation", "upscal"], "unknown operation"),
    (["backfill", "gs://some-bucket/", "--topic", "t", "--operation", "upscal"], "unknown operation"),
    (["submit", "--help"], "Usage: "),
    (["dlq", "replay", "--help"], "Usage: "),
])
def test_the_commands_own_mistakes_come_before_the_emulator(tmp_path, args, says):
    picture = tmp_path / "a.png"
    picture.write_bytes(b"not read")
    result = CliRunner().invoke(main, [arg.format(picture=picture) for arg in args], env=_gone_emulators())
    assert says in result.output and "does not answer" not in result.output, result.output


def test_an_emulator_that_answers_slowly_or_is_named_otherwise_is_left_to_the_libraries(monkeypatch):
    import socket

    from handlers.clients import check_emulators
    from handlers.settings import Settings

    def slow(*args, **kwargs):
        raise TimeoutError("timed out")  # a listener whose backlog is full: up, only slow

    monkeypatch.setattr(socket, "create_connection", slow)
    check_emulators(Settings(storage_emulator_host="http://127.0.0.1:9"), "storage")
    for target in ("dns:///127.0.0.1:8085", "ipv4:127.0.0.1:8085", "localhost"):  # gRPC's forms, no port
        check_emulators(Settings(pubsub_emulator_host=target), "pubsub")


@pytest.mark.parametrize("env", [{"IMAGEN_DEVICE": "gpu"}, {"PORT": "abc"}, {"IMAGEN_OPERATIONS": "foo"}])
def test_an_option_overrides_a_bad_variable_and_help_never_reads_them(tmp_path, env):
    # DESIGN: command-line options override the variables. Every variable was checked before
    # the command saw its options, so `--device cpu` could not mend IMAGEN_DEVICE=gpu, and
    # `imagen run --help` printed only the ConfigError.
    for command in (["run"], ["serve"], ["worker"], ["models"], ["models", "verify"], ["dlq", "replay"]):
        result = CliRunner().invoke(main, [*command, "--help"], env=env)
        assert result.exit_code == 0 and "Usage:" in result.output, (command, result.output)
    overrides = {"IMAGEN_DEVICE": ["--operations", "comic"], "PORT": ["--operations", "comic"],
                 "IMAGEN_OPERATIONS": ["--operations", "comic"]}
    result = CliRunner().invoke(main, ["models", "list", "--cache-dir", str(tmp_path), *overrides[next(iter(env))]],
                                env=env)
    if "IMAGEN_OPERATIONS" in env:  # overridden: lists the one operation asked for
        assert result.exit_code == 0 and "comic" in result.output and "upscale" not in result.output, result.output
    else:  # not overridden: still refused, naming the variable
        assert result.exit_code == 2 and f"ConfigError: {next(iter(env))}" in result.output, result.output


def test_a_device_option_replaces_a_bad_device_variable(tmp_path):
    picture = tmp_path / "a.txt"
    picture.write_bytes(b"not a picture")
    args = ["run", str(picture), "--operation", "upscale", "--model-cache-dir", str(tmp_path), "-o", str(tmp_path)]
    refused = CliRunner().invoke(main, args, env={"IMAGEN_DEVICE": "gpu"})
    assert refused.exit_code == 2 and "IMAGEN_DEVICE: 'gpu' is not one of" in refused.output
    mended = CliRunner().invoke(main, [*args, "--device", "cpu"], env={"IMAGEN_DEVICE": "gpu"})
    # Past the settings, to the input's own refusal (before any model loads).
    assert mended.exit_code == 1 and "ImageDecodeError: not a supported image" in mended.output, mended.output
