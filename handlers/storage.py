"""Cloud Storage access for jobs, through google-cloud-storage and its own retry policies.

Reads name the exact generation an event is about; output writes carry a generation
precondition, so an older job never overwrites a newer result. Library errors are translated
here into imagen's tree: permanent (403/404/400) vs transient (429/5xx, timeouts).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping

from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from handlers.errors import (
    OutputRefused,
    PreconditionLost,
    ReportRefused,
    SourceSuperseded,
    StoragePermanentError,
    TransientError,
)
from image.errors import ImageDecodeError, ImageTooLarge

TIMEOUT_SECONDS = 120
# The most a failure report or running marker may hold to be read as one: imagen's are a few
# KiB (clipped messages, parameters of at most 4 KiB). A larger object at that name was put
# there by someone else; a running marker is read holding the GPU, and read whole it could
# take the worker's memory.
MAX_REPORT_BYTES = 64 * 1024
_CHUNK = 64 * 1024  # what gunzip feeds zlib at a time
MAX_MEMBERS = 64  # gzip members in one object (gcloud storage cp -Z writes one)
_PERMANENT = (
    api_exceptions.Forbidden,
    api_exceptions.Unauthorized,
    api_exceptions.BadRequest,
    api_exceptions.NotFound,
    api_exceptions.MethodNotAllowed,
)


def gunzip(data: bytes, max_bytes: int, uri: str) -> bytes:
    """`data` unpacked from gzip (each of up to MAX_MEMBERS members, then any zero padding, as
    `gzip.decompress` reads it), refused with ImageTooLarge as soon as it passes `max_bytes`:
    a few megabytes of zeros unpack to gigabytes. Fed in slices, so neither many members nor
    a large file costs more than one pass over it."""
    view, out, position, members = memoryview(data), bytearray(), 0, 0
    try:
        while position < len(data) and (data[position] or data[position:].lstrip(b"\0")):  # zeros: padding
            members += 1
            if members > MAX_MEMBERS:
                raise zlib.error(f"more than {MAX_MEMBERS} gzip members")
            unpacker = zlib.decompressobj(wbits=31)  # gzip only
            while not unpacker.eof:
                if position >= len(data):
                    raise zlib.error("the compressed data ends early")
                chunk = view[position:position + _CHUNK]
                out += unpacker.decompress(chunk, max_bytes + 1 - len(out))
                if len(out) > max_bytes or unpacker.unconsumed_tail:
                    raise ImageTooLarge(
                        f"{uri} (Content-Encoding: gzip) unpacks to more than {max_bytes} bytes; the limit "
                        f"(IMAGEN_MAX_BYTES) is for the unpacked file"
                    )
                position += len(chunk) - len(unpacker.unused_data)
    except zlib.error as error:
        raise ImageDecodeError(f"{uri} says it is gzip-compressed (Content-Encoding) but is not: {error}") from None
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class ObjectState:
    """What a live object says about itself."""

    generation: int
    metadata: Mapping[str, str]
    size: int | None


class Store:
    """The storage operations a job needs."""

    def __init__(self, client: storage.Client):
        self._client = client

    def stat(self, bucket: str, name: str, *, output: bool = False,
             timeout: float = TIMEOUT_SECONDS) -> ObjectState | None:
        """The live generation of an object and its metadata; None when it does not exist.
        `output`: the job's output, whose refusal is OutputRefused, as its write's is;
        `timeout`: for each try and the retries together."""
        blob = self._client.bucket(bucket).blob(name)
        try:
            blob.reload(timeout=timeout, retry=DEFAULT_RETRY.with_timeout(timeout))
        except api_exceptions.NotFound:
            return None
        except Exception as error:
            if output and isinstance(error, (api_exceptions.Forbidden, api_exceptions.Unauthorized)):
                raise _output_refused("read", bucket, name, error) from error
            raise _translate(error, f"gs://{bucket}/{name}") from error
        return ObjectState(int(blob.generation), dict(blob.metadata or {}), blob.size)

    def read_source(
        self, bucket: str, name: str, generation: str | None, max_bytes: int
    ) -> bytes:
        """The source's bytes, at the given generation if any.

        Raises SourceSuperseded when that generation no longer exists, and ImageTooLarge before
        downloading anything larger than max_bytes. An object stored gzip-compressed
        (Content-Encoding: gzip, as `gcloud storage cp -Z` writes) is unpacked here under the
        same limit: the library would unpack it whole, whatever its size, before any check.
        """
        uri = f"gs://{bucket}/{name}" + (f"#{generation}" if generation else "")
        blob = self._client.bucket(bucket).blob(name, generation=int(generation) if generation else None)
        try:
            blob.reload(timeout=TIMEOUT_SECONDS)
            if blob.time_deleted is not None:  # a bucket keeping versions: a noncurrent one
                raise SourceSuperseded(f"{uri} was replaced: it is no longer the live version")
            if blob.size is not None and blob.size > max_bytes:
                raise ImageTooLarge(
                    f"{uri} is {blob.size} bytes; the limit (IMAGEN_MAX_BYTES) is {max_bytes}"
                )
            encoding = (blob.content_encoding or "").strip().lower()
            if encoding not in ("", "identity", "gzip"):
                raise ImageDecodeError(
                    f"{uri} is stored with Content-Encoding {blob.content_encoding!r}: upload it as it is, "
                    f"or gzip-compressed"
                )
            data = blob.download_as_bytes(timeout=TIMEOUT_SECONDS, raw_download=True)
        except api_exceptions.NotFound:
            raise SourceSuperseded(f"{uri} no longer exists (deleted or replaced)") from None
        except (ImageTooLarge, ImageDecodeError, SourceSuperseded):
            raise
        except Exception as error:
            raise _translate(error, uri) from error
        if len(data) > max_bytes:  # the object changed size under us; never trust metadata alone
            raise ImageTooLarge(f"{uri} is {len(data)} bytes; the limit is {max_bytes}")
        if encoding == "gzip":
            data = gunzip(data, max_bytes, uri)
        return data

    def write_output(
        self,
        bucket: str,
        name: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str],
        if_generation_match: int,
    ) -> int:
        """Write an output only if the live generation is still `if_generation_match` (0: absent).

        Returns the new generation; raises PreconditionLost when someone wrote first.
        """
        blob = self._client.bucket(bucket).blob(name)
        blob.metadata = dict(metadata)
        try:
            blob.upload_from_string(
                data,
                content_type=content_type,
                if_generation_match=if_generation_match,
                timeout=TIMEOUT_SECONDS,
                retry=DEFAULT_RETRY,  # safe: the precondition makes the write idempotent
            )
        except api_exceptions.PreconditionFailed:
            raise PreconditionLost(f"gs://{bucket}/{name} changed while the job ran") from None
        except (api_exceptions.Forbidden, api_exceptions.Unauthorized, api_exceptions.NotFound) as error:
            # The deployment's fault, not the job's (a grant not yet propagated, a bucket not
            # made yet): retried, and reported only if it lasts, instead of failing for good
            # each job whose GPU work is done.
            raise _output_refused("write", bucket, name, error) from error
        except Exception as error:
            raise _translate(error, f"gs://{bucket}/{name}") from error
        return int(blob.generation)

    def read_report(self, bucket: str, name: str, *, timeout: float = TIMEOUT_SECONDS) -> dict | None:
        """A failure report written by `write_report`; None when there is none (or it is
        not a JSON object, or larger than any report imagen writes: its first
        MAX_REPORT_BYTES + 1 bytes are all that is read, whatever was put there)."""
        try:
            data = self._client.bucket(bucket).blob(name).download_as_bytes(
                start=0, end=MAX_REPORT_BYTES, timeout=timeout, retry=DEFAULT_RETRY.with_timeout(timeout))
        except api_exceptions.NotFound:
            return None
        except Exception as error:
            raise _translate(error, f"gs://{bucket}/{name}") from error
        if len(data) > MAX_REPORT_BYTES:
            return None
        try:
            report = json.loads(data)
        except ValueError:
            return None
        return report if isinstance(report, dict) else None

    def write_report(self, bucket: str, name: str, report: Mapping, metadata: Mapping[str, str] | None = None, *,
                     if_generation_match: int | None = None, timeout: float = TIMEOUT_SECONDS) -> None:
        """Write (or replace) a JSON failure report, with `metadata` as its custom metadata;
        each try and the retries within `timeout` seconds. `if_generation_match`: only over
        that generation of it (0: none there), else PreconditionLost."""
        blob = self._client.bucket(bucket).blob(name)
        blob.metadata = dict(metadata) if metadata else None
        body = json.dumps(report, indent=2, ensure_ascii=False, sort_keys=True)
        try:
            data = body.encode()
        except UnicodeEncodeError:  # a forged name with a lone surrogate: JSON can escape it
            data = json.dumps(report, indent=2, ensure_ascii=True, sort_keys=True).encode()
        try:
            blob.upload_from_string(
                data,
                content_type="application/json",
                if_generation_match=if_generation_match,
                timeout=timeout,
                retry=DEFAULT_RETRY.with_timeout(timeout),  # replacing a report with the same content is idempotent
            )
        except api_exceptions.PreconditionFailed:
            raise PreconditionLost(f"gs://{bucket}/{name} changed as its failure report was written") from None
        except Exception as error:
            # A report that cannot be written must not be lost: retry the whole job later.
            refused = ReportRefused if isinstance(error, _PERMANENT) else TransientError
            raise refused(f"cannot write failure report gs://{bucket}/{name}: {error}") from error

    def delete(self, bucket: str, name: str, *, if_generation_match: int | None = None,
               timeout: float = TIMEOUT_SECONDS) -> None:
        """Delete an object of imagen's own (a job's running marker, a stale failure report);
        one already gone is fine. `if_generation_match`: only that generation of it, else
        PreconditionLost."""
        try:
            self._client.bucket(bucket).blob(name).delete(if_generation_match=if_generation_match, timeout=timeout,
                                                          retry=DEFAULT_RETRY.with_timeout(timeout))
        except api_exceptions.NotFound:
            return
        except api_exceptions.PreconditionFailed:
            raise PreconditionLost(f"gs://{bucket}/{name} changed before it was deleted") from None
        except Exception as error:
            raise _translate(error, f"gs://{bucket}/{name}") from error


def _output_refused(action: str, bucket: str, name: str, error: api_exceptions.GoogleAPICallError) -> OutputRefused:
    """The deployment's refusal of the job's output (`action`: read or write), retried."""
    need = "write access" if action == "write" else "access"
    return OutputRefused(f"Cloud Storage refused to {action} the output gs://{bucket}/{name}: {error.code} "
                         f"{error.message} (the runtime service account needs {need} to the output prefix)")


def _translate(error: Exception, what: str) -> Exception:
    if isinstance(error, _PERMANENT):
        code = getattr(error, "code", "")
        return StoragePermanentError(f"Cloud Storage refused {what}: {code} {error.message}".strip())
    return TransientError(f"Cloud Storage error on {what}: {error}")
