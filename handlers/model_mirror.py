"""A Cloud Storage copy of the model cache: `imagen models mirror` and `pull --from`.

The seed's GCS model store, and the fastest cold start for large models on Cloud Run:
copying from a bucket in the same region beats the Hub. The bucket holds the cache as it
is on disk, under `gs://BUCKET/PREFIX/`: `models--org--name/blobs/*` and `refs/*` as
objects, and the snapshots' links (`snapshots/<commit>/<file>` -> `../../blobs/<hash>`)
recorded in a manifest rather than uploaded twice. The manifest, `PREFIX/imagen-mirror.json`,
is written last, so a mirror without one is incomplete and is never restored from. It also
holds each `refs/*` file's content (40 bytes, the same size whatever commit it names): a
restore writes them from it, so a cache holding another commit's ref takes the mirror's, and
a mirror run that failed after uploading a new ref still restores the manifest's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage import transfer_manager

from image.errors import ModelError, ModelMissing
from image.models.lock import COMMIT
from image.models.store import TINY_MARKER, is_tiny

logger = logging.getLogger("imagen.models")

MANIFEST = "imagen-mirror.json"
LARGE_FILE_BYTES = 128 * 1024 * 1024
"""Files from this size (bytes) up are downloaded in concurrent slices, not whole."""

_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Transfer:
    """What a mirror or restore did: file counts and bytes moved."""

    files: int
    links: int
    bytes: int
    skipped: int


def parse_mirror_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/prefix` -> (bucket, "prefix/"); the prefix may be empty."""
    if not uri.startswith("gs://") or not uri[len("gs://") :].split("/", 1)[0]:
        raise ModelError(f"expected gs://BUCKET/PREFIX, got {uri!r}")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def mirror_cache(
    cache_dir: Path,
    uri: str,
    *,
    client: storage.Client,
    cache_names: Iterable[str] | None = None,
    commits: Mapping[str, str] | None = None,
    max_workers: int = 8,
) -> Transfer:
    """Copy the models in `cache_dir` (only `cache_names`, e.g. "models--org--name", if given).

    `commits` (cache name -> commit): of those models only that snapshot and its blobs, not
    every revision the cache still holds (each would be restored, into the memory of every
    Cloud Run instance, and a stale one's missing blob would stop the mirror). Blobs already
    in the bucket with the same size are not sent again: they are named by their content.
    """
    bucket_name, prefix = parse_mirror_uri(uri)
    bucket = client.bucket(bucket_name)
    files, links, refs = _scan(Path(cache_dir), cache_names, commits or {})
    if not files:
        raise ModelMissing(f"no models in {cache_dir} to mirror; run `imagen models pull` first")
    present = {blob.name[len(prefix) :]: blob.size for blob in client.list_blobs(bucket, prefix=prefix)}
    send = [name for name, size in files.items() if not ("/blobs/" in name and present.get(name) == size)]
    logger.info("mirroring %d files (%d already there) from %s to %s", len(send), len(files) - len(send), cache_dir, uri)
    results = transfer_manager.upload_many_from_filenames(
        bucket,
        send,
        source_directory=str(cache_dir),
        blob_name_prefix=prefix,
        worker_type=transfer_manager.THREAD,
        max_workers=max_workers,
        raise_exception=True,
    )
    _raise_failures(results, send, "uploading")
    _write_manifest(bucket, prefix + MANIFEST, files, links, refs)
    return Transfer(len(send), len(links), sum(files[name] for name in send), len(files) - len(send))


def _write_manifest(bucket: storage.Bucket, name: str, files: dict[str, int], links: dict[str, str],
                    refs: dict[str, str]) -> None:
    """Record the mirrored models in the manifest, keeping the entries of every other model
    already there: mirrors made one operation at a time (from per-operation images) add up
    instead of each hiding the others'. Written with a generation precondition, so two
    mirrors at once both land."""
    mirrored = {entry.split("/", 1)[0] for entry in [*files, *links]}
    for _ in range(5):
        blob = bucket.get_blob(name)
        manifest = {"format": _FORMAT, "files": {}, "links": {}}
        if blob is not None:
            previous = json.loads(blob.download_as_bytes())
            if previous.get("format") == _FORMAT:
                manifest = previous
        for key, entries in (("files", files), ("links", links), ("refs", refs)):
            kept = {k: v for k, v in manifest.get(key, {}).items() if k.split("/", 1)[0] not in mirrored}
            manifest[key] = {**kept, **entries}
        try:
            bucket.blob(name).upload_from_string(
                json.dumps(manifest, indent=1, sort_keys=True), content_type="application/json",
                if_generation_match=blob.generation if blob is not None else 0,
            )
            return
        except api_exceptions.PreconditionFailed:
            continue  # another mirror wrote it meanwhile: merge with theirs
    raise ModelError(f"gs://{bucket.name}/{name} kept changing while it was written; mirror again")


def restore_cache(
    uri: str,
    cache_dir: Path,
    *,
    client: storage.Client,
    cache_names: Iterable[str] | None = None,
    max_workers: int = 8,
    large_file_bytes: int = LARGE_FILE_BYTES,
) -> Transfer:
    """Recreate the mirrored cache (only `cache_names`, if given) under `cache_dir`.

    Files already present with the right size are kept, so an interrupted restore resumes.
    """
    bucket_name, prefix = parse_mirror_uri(uri)
    bucket = client.bucket(bucket_name)
    manifest_blob = bucket.blob(prefix + MANIFEST)
    if not manifest_blob.exists():
        raise ModelMissing(f"no model mirror at {uri} ({MANIFEST} is missing); run `imagen models mirror {uri}`")
    manifest = json.loads(manifest_blob.download_as_bytes())
    if manifest.get("format") != _FORMAT:
        raise ModelError(f"{uri}/{MANIFEST} has format {manifest.get('format')!r}; this imagen reads {_FORMAT}")
    wanted = _only(cache_names)
    files = {name: size for name, size in manifest["files"].items() if wanted(name)}
    links = {name: target for name, target in manifest["links"].items() if wanted(name)}
    refs = {name: text for name, text in manifest.get("refs", {}).items() if wanted(name)}
    if not files:
        raise ModelMissing(f"the model mirror at {uri} holds none of {', '.join(cache_names or ())}")
    cache_dir = Path(cache_dir)
    _check_inside(cache_dir, uri, [*files, *refs], links)
    if bad := [name for name, text in refs.items() if not COMMIT.fullmatch(text.strip())]:
        raise ModelError(f"{uri}/{MANIFEST} gives {bad[0]} a value that is not a commit: not restoring from it")
    # A ref is as long whatever commit it names: written from the manifest below, or (a mirror
    # made before refs were in it) always fetched.
    fetch = [name for name, size in files.items()
             if name not in refs and (_is_ref(name) or not _has(cache_dir / name, size))]
    for name in fetch:
        if (cache_dir / name).is_symlink():
            (cache_dir / name).unlink()  # write a file here, not through the link into its target
    large = [name for name in fetch if files[name] >= large_file_bytes]
    small = [name for name in fetch if files[name] < large_file_bytes]
    logger.info("restoring %d files (%d large) from %s to %s", len(fetch), len(large), uri, cache_dir)
    results = transfer_manager.download_many_to_path(
        bucket,
        small,
        destination_directory=str(cache_dir),
        blob_name_prefix=prefix,
        worker_type=transfer_manager.THREAD,
        max_workers=max_workers,
        raise_exception=True,
    )
    _raise_failures(results, small, "downloading")
    for name in large:
        _download_large(bucket, prefix + name, cache_dir / name, max_workers)
    wrong = [name for name in fetch if not _has(cache_dir / name, files[name])]
    if wrong:
        raise ModelError(f"restored files have the wrong size: {', '.join(wrong[:5])}")
    # A tiny model at a commit the mirror holds a real model for (a test cache restored into):
    # its marker would make the snapshot pass for tiny, and a file the real model lacks (a
    # .safetensors beside the real .bin) would still load. Gone before the real one is linked.
    snapshots = {Path(name).parent for name in links if Path(name).parent.parent.name == "snapshots"}
    for snapshot in snapshots:
        if (snapshot / TINY_MARKER).as_posix() not in links and is_tiny(cache_dir / snapshot):
            shutil.rmtree(cache_dir / snapshot)
    for name, target in links.items():
        link = cache_dir / name
        if link.is_symlink() and os.readlink(link) == target:
            continue  # as it should be: a complete cache (a read-only volume too) is not written
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    written = [name for name, text in refs.items() if _write_ref(cache_dir / name, text)]
    moved = len(fetch) + len(written)
    return Transfer(moved, len(links), sum(files.get(name, 0) for name in [*fetch, *written]), len(files) - moved)


def _check_inside(cache_dir: Path, uri: str, names: Iterable[str], links: Mapping[str, str]) -> None:
    """ModelError unless every name the manifest lists, and every link's target, lies inside
    `cache_dir`: a manifest is data from a bucket, not a say over the file system."""
    root = cache_dir.resolve()
    for name, target in [*((name, None) for name in names), *links.items()]:
        parent = (root / name).parent.resolve()  # not the name itself: it may be a link already
        inside = not Path(name).is_absolute() and ".." not in Path(name).parts and parent.is_relative_to(root)
        if inside and target is not None:
            inside = not Path(target).is_absolute() and (parent / target).resolve().is_relative_to(root)
        if not inside:
            raise ModelError(f"{uri}/{MANIFEST} names {name!r}{f' -> {target!r}' if target else ''}, outside the "
                             f"model cache: not restoring from it")


def _write_ref(path: Path, text: str) -> bool:
    """Make `path` hold `text` (a ref: the commit a branch names); False when it already does."""
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    return True


def _scan(cache_dir: Path, cache_names: Iterable[str] | None,
          commits: Mapping[str, str]) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """Files to upload (relative name -> bytes), links to record (name -> target) and the refs'
    contents (name -> commit; uploaded as files too). A model named in `commits` gives only that
    commit's snapshot and the blobs it links to.

    Only links that stay inside the cache are recorded as links; any other link is
    followed and its content uploaded as a file. Download leftovers are skipped.
    """
    wanted = _only(cache_names)
    root = cache_dir.resolve()
    files: dict[str, int] = {}
    links: dict[str, str] = {}
    refs: dict[str, str] = {}
    for repo in sorted(cache_dir.glob("models--*")):
        commit = commits.get(repo.name)
        blobs = None if commit is None else {
            path.resolve() for path in (repo / "snapshots" / commit).rglob("*") if path.is_symlink()
        }
        for path in sorted(repo.rglob("*")):
            name = path.relative_to(cache_dir).as_posix()
            if not wanted(name) or path.name.endswith((".incomplete", ".lock")):
                continue
            if blobs is not None and not _of_commit(name, commit, path, blobs):
                continue
            if path.is_symlink():
                target = os.readlink(path)
                resolved = path.resolve()
                if not resolved.exists():
                    raise ModelError(f"{path} is a broken link; run `imagen models verify`")
                if not os.path.isabs(target) and resolved.is_relative_to(root):
                    links[name] = target
                    continue
            if path.is_file():
                files[name] = path.stat().st_size
                if _is_ref(name):
                    refs[name] = path.read_text()
    return files, links, refs


def _of_commit(name: str, commit: str, path: Path, blobs: set[Path]) -> bool:
    """Whether a cache-relative name belongs to `commit`'s snapshot: its own files, the blobs
    its links (`blobs`, resolved) point at, and the refs that name it (one naming another
    commit would point a restore without that lock at a snapshot the mirror lacks)."""
    kind, _, rest = name.split("/", 1)[1].partition("/")
    if kind in ("snapshots", ".no_exist"):
        return rest.split("/", 1)[0] == commit
    if kind == "blobs":
        return path.resolve() in blobs
    if kind == "refs":
        return path.is_file() and path.read_text().strip() == commit
    return True


def _is_ref(name: str) -> bool:
    """Whether a cache-relative name is a ref, `models--org--name/refs/<branch>`."""
    return name.split("/", 2)[1:2] == ["refs"]


def _only(cache_names: Iterable[str] | None):
    if cache_names is None:
        return lambda name: True
    roots = tuple(f"{name}/" for name in cache_names)
    return lambda name: name.startswith(roots)


def _has(path: Path, size: int) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == size


def _download_large(bucket: storage.Bucket, name: str, path: Path, max_workers: int) -> None:
    blob = bucket.get_blob(name)  # slicing needs the size and checksum up front
    if blob is None:
        raise ModelMissing(f"gs://{bucket.name}/{name} is gone from the model mirror; mirror it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".incomplete")
    transfer_manager.download_chunks_concurrently(
        blob, str(partial), worker_type=transfer_manager.THREAD, max_workers=max_workers
    )
    os.replace(partial, path)


def _raise_failures(results: list, names: list[str], doing: str) -> None:
    failed = [(name, result) for name, result in zip(names, results) if isinstance(result, Exception)]
    if failed:
        name, error = failed[0]
        raise ModelError(f"{doing} {len(failed)} model files failed, first {name}: {error}")
