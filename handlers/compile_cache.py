"""IMAGEN_COMPILE_CACHE: where instances share compiled kernels (image/operations/compile_cache.py).

`gs://BUCKET/PREFIX` (Terraform's default: a bucket of its own) or a folder (a volume every
instance mounts). The first instance on a kind of GPU compiles in the background after it is
ready and stores the artefact; later instances load it and skip Inductor's code generation
(only Dynamo's trace is left). In Cloud Storage an artefact is created once and never
replaced (`ifGenerationMatch=0`): two instances racing both compile, one stores. The
location must be writable by the workers only (an artefact is code they run): settings
refuse a bucket that job messages may read or that results go to.
"""

from __future__ import annotations

from collections.abc import Callable

from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud import storage

from handlers.model_mirror import parse_mirror_uri
from image.operations.compile_cache import DirectoryCache


class StorageCompileCache:
    """Artefacts as objects under gs://BUCKET/PREFIX/. The client is made on first use (from
    the compile's thread): a problem with credentials is then the compile cache's warning,
    not a failed start."""

    def __init__(self, client: Callable[[], storage.Client], uri: str) -> None:
        self._client, self._bucket = client, None
        self.bucket_name, self.prefix = parse_mirror_uri(uri)

    def __str__(self) -> str:
        return f"gs://{self.bucket_name}/{self.prefix}"

    def _blob(self, name: str) -> storage.Blob:
        if self._bucket is None:
            self._bucket = self._client().bucket(self.bucket_name)
        return self._bucket.blob(self.prefix + name)

    def has(self, name: str) -> bool:
        return self._blob(name).exists()

    def get(self, name: str) -> bytes | None:
        try:
            return self._blob(name).download_as_bytes()
        except NotFound:
            return None

    def put(self, name: str, data: bytes) -> bool:
        blob = self._blob(name)
        try:
            # Created, never replaced: idempotent, so the library retries it on transient errors.
            blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=0)
        except PreconditionFailed:
            return False
        return True


def open_compile_cache(settings):
    """The settings' compile cache (None when IMAGEN_COMPILE_CACHE is unset)."""
    location = settings.compile_cache
    if not location:
        return None
    if location.startswith("gs://"):
        from handlers.clients import storage_client

        return StorageCompileCache(lambda: storage_client(settings), location)
    return DirectoryCache(location)
