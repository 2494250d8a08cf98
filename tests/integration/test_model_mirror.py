"""Model cache -> Cloud Storage -> model cache, against a real fake-gcs-server."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from handlers.cli import models as models_cli
from handlers.localstack import StorageEmulator
from handlers.model_mirror import MANIFEST, mirror_cache, parse_mirror_uri, restore_cache
from handlers.settings import Settings
from image.errors import ModelError, ModelMissing
from image.models import store
from image.models.loading import load_model
from image.models.lock import Lock
from image.models.registry import REGISTRY
from image.models.tiny import build_tiny

pytestmark = pytest.mark.integration

SPECS = [REGISTRY["comic"], REGISTRY["remove-background"]]


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
    # Its own, without notifications: a mirror's uploads are no jobs. The project's emulator,
    # not the wrapper's FakeGCSServer, which pipes the server's log and never reads it: the
    # server stalls once ~64 KB of it are unread.
    emulator = StorageEmulator(log_dir=tmp_path_factory.mktemp("mirror-gcs")).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def gcs(fake_gcs) -> storage.Client:
    return storage.Client(project="test", credentials=AnonymousCredentials())


@pytest.fixture
def bucket(gcs) -> storage.Bucket:
    return gcs.create_bucket(f"models-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    build_tiny(SPECS, cache, lock=Lock.packaged())
    return cache


def _tree(root: Path) -> dict[str, tuple[str, object]]:
    """Every entry under root: ("link", target) or ("file", bytes)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            tree[name] = ("link", os.readlink(path))
        elif path.is_file():
            tree[name] = ("file", path.read_bytes())
    return tree


def test_parse_mirror_uri():
    assert parse_mirror_uri("gs://b/models/prod/") == ("b", "models/prod/")
    assert parse_mirror_uri("gs://b") == ("b", "")
    with pytest.raises(ModelError, match="gs://BUCKET/PREFIX"):
        parse_mirror_uri("s3://b/models")


def test_round_trip_keeps_the_cache_layout(gcs, bucket, cache, tmp_path, monkeypatch):
    uri = f"gs://{bucket.name}/models/v1"
    sent = mirror_cache(cache, uri, client=gcs)
    assert sent.files > 0 and sent.links > 0 and sent.skipped == 0
    names = {blob.name for blob in gcs.list_blobs(bucket)}
    assert f"models/v1/{MANIFEST}" in names
    assert not [n for n in names if "/snapshots/" in n], "snapshot links travel in the manifest"

    restored = tmp_path / "restored"
    # A low threshold sends the UNet through the sliced (concurrent ranges) download.
    got = restore_cache(uri, restored, client=gcs, large_file_bytes=100_000)
    assert got.files == sent.files and got.links == sent.links
    assert _tree(restored) == _tree(cache)
    assert store.verify(SPECS, restored, Lock.packaged()) == []
    loaded = load_model(REGISTRY["remove-background"], restored, device=torch.device("cpu"),
                        dtype=torch.float32, allow_download=False)
    assert loaded.tiny

    # A second restore fetches nothing and writes nothing: a complete cache on a read-only
    # volume (GKE's PVC) restores as it is.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patched:
        for method in ("symlink_to", "unlink", "write_text", "write_bytes"):
            patched.setattr(Path, method, read_only)
        again = restore_cache(uri, restored, client=gcs)
    assert (again.files, again.skipped) == (0, sent.files)
    resent = mirror_cache(cache, uri, client=gcs)
    refs = [n for n in _tree(cache) if "/refs/" in n]
    assert resent.files == len(refs), "blobs already in the bucket are not sent again"


def test_restore_gives_a_cache_the_mirrors_refs(gcs, bucket, cache, tmp_path):
    """A ref is 40 bytes whatever commit it names: a cache filled at another commit (or with
    tiny models) takes the mirror's ref, or unpinned models would load the old weights; and a
    ref the mirror's manifest does not name (a failed later mirror run) is not restored."""
    uri = f"gs://{bucket.name}/refs-check"
    mirror_cache(cache, uri, client=gcs)
    restored = tmp_path / "restored"
    restore_cache(uri, restored, client=gcs)
    ref = next(name for name in _tree(cache) if "/refs/" in name)
    (restored / ref).write_text("f" * 40)  # what another commit's pull left
    bucket.blob(f"refs-check/{ref}").upload_from_string("e" * 40)  # a mirror run cut short
    got = restore_cache(uri, restored, client=gcs)
    assert (restored / ref).read_text() == (cache / ref).read_text()
    assert got.files == 1  # the ref alone


def test_restore_only_the_operations_asked_for(gcs, bucket, cache, tmp_path):
    uri = f"gs://{bucket.name}/m"
    mirror_cache(cache, uri, client=gcs)
    restore_cache(uri, tmp_path, client=gcs, cache_names=[REGISTRY["remove-background"].cache_name])
    assert [p.name for p in tmp_path.iterdir()] == [REGISTRY["remove-background"].cache_name]


def test_mirrors_of_one_operation_at_a_time_add_up(gcs, bucket, cache, tmp_path):
    """Each per-operation image mirrors its own model: the manifest keeps the others', so
    every operation's instances can restore theirs."""
    uri = f"gs://{bucket.name}/shared"
    names = [spec.cache_name for spec in SPECS]
    for name in names:
        mirror_cache(cache, uri, client=gcs, cache_names=[name])
    for name in names:
        restore_cache(uri, tmp_path / name, client=gcs, cache_names=[name])
        assert [p.name for p in (tmp_path / name).iterdir()] == [name]
    mirror_cache(cache, uri, client=gcs, cache_names=names[:1])  # again: replaces its own entries only
    restore_cache(uri, tmp_path / "all", client=gcs)
    assert _tree(tmp_path / "all") == _tree(cache)


def test_restore_without_a_mirror_names_the_fix(gcs, bucket, tmp_path):
    with pytest.raises(ModelMissing, match="imagen models mirror"):
        restore_cache(f"gs://{bucket.name}/nothing", tmp_path, client=gcs)


def test_cli_mirror_then_pull_from(fake_gcs, bucket, cache, tmp_path):
    settings = Settings(model_cache_dir=cache, storage_emulator_host=fake_gcs.url)
    uri = f"gs://{bucket.name}/cli"
    runner = CliRunner()
    # Random weights would reach every instance: refused unless asked for.
    refused = runner.invoke(models_cli.command, ["mirror", uri, "--operations", "comic,remove-background"], obj=settings)
    assert refused.exit_code == 2 and "tiny random-weight models (comic, remove-background)" in refused.output
    assert not list(bucket.list_blobs())
    mirrored = runner.invoke(models_cli.command, ["mirror", uri, "--operations", "comic,remove-background", "--tiny"],
                             obj=settings)
    assert mirrored.exit_code == 0, mirrored.output

    target = Settings(model_cache_dir=tmp_path / "fresh", storage_emulator_host=fake_gcs.url)
    pulled = runner.invoke(models_cli.command, ["pull", "--from", uri, "--operations", "comic,remove-background"],
                           obj=target)
    assert pulled.exit_code == 0, pulled.output
    assert "restored" in pulled.output
    verified = runner.invoke(models_cli.command, ["verify", "--operations", "comic,remove-background"], obj=target)
    assert verified.exit_code == 0, verified.output
    assert "tiny random-weight (noise, for trying the plumbing): comic, remove-background" in verified.output


def test_cli_mirror_names_a_bad_destination_before_any_work(fake_gcs, cache):
    settings = Settings(model_cache_dir=cache, storage_emulator_host=fake_gcs.url)
    runner = CliRunner()
    missing = runner.invoke(models_cli.command, ["mirror", "gs://imagen-no-such-bucket/m", "--operations", "comic",
                                                 "--tiny"], obj=settings)
    assert missing.exit_code == 2, missing.output
    assert "bucket imagen-no-such-bucket does not exist (or this account cannot see it)" in missing.output
    assert "NotFound" not in missing.output  # a raw 404 from the first listing, before
    malformed = runner.invoke(models_cli.command, ["mirror", "bucket/m", "--operations", "comic", "--tiny"],
                              obj=settings)
    assert malformed.exit_code == 2 and "expected gs://BUCKET/PREFIX, got 'bucket/m'" in malformed.output


def test_cli_mirrors_only_the_revision_it_runs(fake_gcs, gcs, bucket, tmp_path):
    """A cache still holding an older revision (pulled before the lock moved) mirrors only the
    one imagen resolves: every instance restores the whole mirror, and the old revision's blob
    being gone must not stop it."""
    spec = REGISTRY["remove-background"]
    cache = tmp_path / "cache"
    build_tiny([spec], cache, lock=Lock.packaged())
    current = store.resolve_snapshot(spec, cache, lock=Lock.packaged())
    old = current.parent / ("2" * 40)
    old.mkdir()
    blob = cache / spec.cache_name / "blobs" / "old-weights"
    blob.write_bytes(b"old")
    (old / "model.safetensors").symlink_to(os.path.relpath(blob, old))
    (old / "config.json").symlink_to(os.path.relpath(blob, old))
    blob.unlink()  # its link in the old snapshot is broken now
    (cache / spec.cache_name / "refs" / "v1.0").write_text(old.name)  # a ref to the old revision
    settings = Settings(model_cache_dir=cache, storage_emulator_host=fake_gcs.url)
    uri = f"gs://{bucket.name}/one-revision"
    runner = CliRunner()
    mirrored = runner.invoke(models_cli.command, ["mirror", uri, "--operations", "remove-background", "--tiny"],
                             obj=settings)
    assert mirrored.exit_code == 0, mirrored.output
    restored = tmp_path / "restored"
    restore_cache(uri, restored, client=gcs)
    snapshots = restored / spec.cache_name / "snapshots"
    assert [path.name for path in snapshots.iterdir()] == [current.name]
    blobs = {path.name for path in (restored / spec.cache_name / "blobs").iterdir()}
    assert blobs == {os.readlink(path).rsplit("/", 1)[1] for path in current.rglob("*") if path.is_symlink()}
    assert store.verify([spec], restored, Lock.packaged()) == []
    refs = restored / spec.cache_name / "refs"
    assert {ref.name: ref.read_text() for ref in refs.iterdir()} == {spec.revision: current.name}


def test_an_incomplete_cache_is_not_mirrored(fake_gcs, bucket, cache, tmp_path):
    # Every instance restores a mirror as it is: a cut weights file would reach them all.
    broken = tmp_path / "broken"
    build_tiny([REGISTRY["remove-background"]], broken, lock=Lock.packaged())
    weights = store.resolve_snapshot(REGISTRY["remove-background"], broken, lock=Lock.packaged()) / "model.safetensors"
    os.truncate(weights.resolve(), 1000)
    settings = Settings(model_cache_dir=broken, storage_emulator_host=fake_gcs.url)
    result = CliRunner().invoke(models_cli.command, ["mirror", f"gs://{bucket.name}/m", "--operations",
                                                     "remove-background"], obj=settings)
    assert result.exit_code == 1 and "model.safetensors is 1000 bytes" in result.output
    assert not list(bucket.list_blobs())


def test_a_manifest_naming_paths_outside_the_cache_is_refused(gcs, bucket, tmp_path):
    # The manifest is data from a bucket: it must not write, or link, outside the cache.
    import json

    from handlers.model_mirror import _FORMAT

    files = {"models--org--name/blobs/abc": 3}
    for links, refs in (({"models--org--name/../../escaped": "/etc/passwd"}, {}),
                        ({"models--org--name/snapshots/" + "c" * 40 + "/x": "../../../../etc/passwd"}, {}),
                        ({}, {"models--org--name/refs/main": "../../../../elsewhere"})):  # a snapshot path
        manifest = {"format": _FORMAT, "files": files, "links": links, "refs": refs}
        bucket.blob(f"m/{MANIFEST}").upload_from_string(json.dumps(manifest))
        with pytest.raises(ModelError, match="outside the model cache|not a commit"):
            restore_cache(f"gs://{bucket.name}/m", tmp_path / "restored", client=gcs)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "restored").exists()


def test_a_real_model_restored_over_a_tiny_one_is_not_taken_for_tiny(gcs, bucket, cache, tmp_path):
    spec = REGISTRY["remove-background"]
    real = tmp_path / "real"
    build_tiny([spec], real, lock=Lock.packaged())
    snapshot = store.resolve_snapshot(spec, real, lock=Lock.packaged())
    (snapshot / store.TINY_MARKER).unlink()  # as a real download at that commit leaves it
    uri = f"gs://{bucket.name}/real"
    mirror_cache(real, uri, client=gcs, cache_names=[spec.cache_name])
    target = tmp_path / "target"
    build_tiny([spec], target, lock=Lock.packaged())  # a test cache, restored into
    leftover = store.resolve_snapshot(spec, target, lock=Lock.packaged()) / "model.pth"
    leftover.write_bytes(b"a tiny file the real model does not have")
    restore_cache(uri, target, client=gcs, cache_names=[spec.cache_name])
    restored = store.resolve_snapshot(spec, target, lock=Lock.packaged())
    assert not store.is_tiny(restored) and store.verify([spec], target, Lock.packaged()) == []
    assert not leftover.exists(), "the tiny snapshot is replaced, not overlaid"
