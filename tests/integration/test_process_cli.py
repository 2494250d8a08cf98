"""`imagen process gs://...` (Cloud Run Jobs, debugging), and the same result on every path."""

from __future__ import annotations

from click.testing import CliRunner

from handlers.cli import main

from .conftest import png_bytes


def _env(settings, tiny_cache) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": settings.storage_emulator_host,
        "PUBSUB_EMULATOR_HOST": settings.pubsub_emulator_host,
        "GOOGLE_CLOUD_PROJECT": "imagen-local",
        "MODEL_CACHE_DIR": str(tiny_cache),
        "IMAGEN_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        # As a Cloud Run Job given the workers' environment has it: the user's own command
        # reads any bucket it can (routed by folder, it was refused as a notification).
        "IMAGEN_ALLOWED_BUCKETS": "partner-bucket",
    }


def test_process_gives_the_same_bytes_as_imagen_run(settings, tiny_cache, bucket, tmp_path):
    data = png_bytes((40, 30), seed=3)
    blob = bucket.blob("incoming/comic/harbour.png")
    blob.metadata = {"imagen-params": '{"steps": 2}'}
    blob.upload_from_string(data, content_type="image/png")
    env = _env(settings, tiny_cache)

    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/comic/harbour.png"], env=env)
    assert result.exit_code == 0, result.output
    # stdout is the result alone (the JSON log lines go to stderr): a script can read it.
    assert result.stdout == f"gs://{bucket.name}/processed/comic/harbour.png\n"
    assert "setting up comic" in result.stderr
    cloud = bucket.get_blob("processed/comic/harbour.png").download_as_bytes()
    # Again: a duplicate, said before any model loads (it loaded them all, then skipped).
    again = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/comic/harbour.png"], env=env)
    assert again.exit_code == 0 and again.stdout.startswith("skipped: duplicate"), again.output
    assert "setting up comic" not in again.stderr
    assert "job skipped: duplicate" in again.stderr  # logged (and on the results topic) as any skip

    local_in, local_out = tmp_path / "harbour.png", tmp_path / "out.png"
    local_in.write_bytes(data)
    result = CliRunner().invoke(
        main, ["run", str(local_in), "-o", str(local_out), "--operation", "comic", "--param", "steps=2"], env=env
    )
    assert result.exit_code == 0, result.output
    assert local_out.read_bytes() == cloud  # same input, same parameters, same default seed


def test_process_exits_non_zero_with_the_report_location(settings, tiny_cache, bucket):
    bucket.blob("incoming/upscale/notes.png").upload_from_string(b"not a picture", content_type="image/png")
    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/upscale/notes.png"],
                                env=_env(settings, tiny_cache))
    assert result.exit_code == 1
    assert "not a supported image" in result.output
    assert f"gs://{bucket.name}/failed/upscale/notes.png.json" in result.output
    assert bucket.get_blob("failed/upscale/notes.png.json") is not None
    # A chain spelled with spaces reports where the service would: the chain's own folder.
    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/upscale/notes.png", "--operation",
                                       "remove-background, upscale"], env=_env(settings, tiny_cache))
    assert result.exit_code == 1
    assert bucket.get_blob("failed/remove-background,upscale/notes.png.json") is not None, \
        [blob.name for blob in bucket.list_blobs(prefix="failed/")]


def test_process_of_a_missing_object_fails_as_a_job_would(settings, tiny_cache, bucket):
    # It said ConfigError (exit 2), which names a setting to fix.
    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/comic/nothere.png"],
                                env=_env(settings, tiny_cache))
    assert result.exit_code == 1
    missing = f"gs://{bucket.name}/incoming/comic/nothere.png"
    assert result.output.strip() == f"imagen: StoragePermanentError: {missing} does not exist"


def test_process_of_an_object_in_an_unknown_folder_gets_the_report_an_upload_would(settings, tiny_cache, bucket):
    # It stopped at the command line (exit 1, no report) where an upload gets a report.
    bucket.blob("incoming/upscal/x.png").upload_from_string(png_bytes((20, 20)), content_type="image/png")
    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/upscal/x.png"],
                                env=_env(settings, tiny_cache))
    assert result.exit_code == 1 and f"report: gs://{bucket.name}/failed/" in result.output, result.output
    reports = [blob.name for blob in bucket.list_blobs(prefix="failed/")]
    assert len(reports) == 1 and "unknown operation 'upscal'" in bucket.blob(reports[0]).download_as_text()


def test_process_of_an_object_no_event_would_run_says_to_name_the_operation(settings, tiny_cache, bucket):
    # Outside incoming/: an upload there is ignored, so process asks for --operation (it
    # crashed with NameError instead).
    bucket.blob("photos/boot.png").upload_from_string(png_bytes((20, 20)), content_type="image/png")
    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/photos/boot.png"],
                                env=_env(settings, tiny_cache))
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"imagen: ConfigError: gs://{bucket.name}/photos/boot.png: ")
    assert result.output.strip().endswith("pass --operation to process it anyway")


def test_process_with_an_explicit_operation_outside_the_input_prefix(settings, tiny_cache, bucket):
    bucket.blob("photos/shoe.png").upload_from_string(png_bytes((20, 20)), content_type="image/png")
    result = CliRunner().invoke(
        main, ["process", f"gs://{bucket.name}/photos/shoe.png", "--operation", "remove-background",
               "--param", "mask_only=true"],
        env=_env(settings, tiny_cache),
    )
    assert result.exit_code == 0, result.output
    assert bucket.get_blob("processed/remove-background/photos/shoe.png") is not None


def test_a_mistake_on_the_command_line_is_said_before_any_model_loads(settings, bucket, tmp_path):
    # With an empty model cache: loading any model would fail with ModelMissing instead. A
    # parameter typo is the command line's, not the object's: no failure report for it.
    bucket.blob("photos/shoe.png").upload_from_string(png_bytes((20, 20)), content_type="image/png")
    env = _env(settings, tmp_path / "no-models")
    result = CliRunner().invoke(
        main, ["process", f"gs://{bucket.name}/photos/shoe.png", "--operation", "upscale", "--param", "steps=many"],
        env=env)
    assert result.exit_code == 2, result.output
    assert "steps" in result.output and "ModelMissing" not in result.output
    assert not list(bucket.list_blobs(prefix="failed/"))
    typo = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/photos/shoe.png", "--operation", "upscal"],
                              env=env)
    assert typo.exit_code == 2 and "upscal" in typo.output, typo.output
    # An upload no folder names an operation for fails as the service would fail it (its
    # report), without loading the four models first.
    bucket.blob("incoming/loose.png").upload_from_string(png_bytes((20, 20)), content_type="image/png")
    result = CliRunner().invoke(main, ["process", f"gs://{bucket.name}/incoming/loose.png"], env=env)
    assert result.exit_code == 1, result.output
    assert "no operation for" in result.output and "ModelMissing" not in result.output
    assert bucket.get_blob("failed/_none/loose.png.json") is not None
