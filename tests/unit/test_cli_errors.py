"""The CLI's failures a user meets first: one line naming the fix, never a traceback."""

from __future__ import annotations

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
