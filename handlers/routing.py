"""Routing: what an event asks for, and where its output and failure report go.

The ignore rules of DESIGN.md live here (non-finalize events, folder placeholders, our own
prefixes and outputs), and so does the bucket layout: every output and failure path is built
by `output_location` and `failure_location` and stays under its prefix, whatever the input name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from handlers.errors import SourceNotAllowed, UnsafeObjectName
from handlers.events import FINALIZE, JobRequest, ObjectEvent, parse_gs_uri
from image.errors import InputError
from image.params import parse_chain

# Custom metadata keys: the contract with users and other services (DESIGN.md).
OPERATION_KEY = "imagen-operation"
PARAMS_KEY = "imagen-params"
SOURCE_KEY = "imagen-source"
SOURCE_GENERATION_KEY = "imagen-source-generation"
MODEL_KEY = "imagen-model"
VERSION_KEY = "imagen-version"
SECONDS_KEY = "imagen-seconds"
OUTPUT_KEYS = (SOURCE_KEY, SOURCE_GENERATION_KEY, MODEL_KEY, VERSION_KEY, SECONDS_KEY)
# On a failure report, beside imagen-source-generation: the message whose delivery wrote it.
MESSAGE_ID_KEY = "imagen-message-id"
# On a job message's refusal written because job messages are not enabled (no allowlist): a
# later one may replace it, a job's own report never.
REFUSAL_KEY = "imagen-refusal"

MAX_NAME_BYTES = 1024  # Cloud Storage's limit on object names
# The running marker beside a failure report (handlers/processor.py): the report's name leaves
# room for it, or a marker Cloud Storage refused left a job that kills its worker uncounted.
MARKER_SUFFIX = ".running"
# Longest operation text used as a folder of a report path; longer ones file under "_invalid",
# so a report name always fits in MAX_NAME_BYTES.
MAX_SEGMENT_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things go: prefixes end with '/'; output_bucket None means the source's bucket."""

    input_prefix: str = "incoming/"
    output_prefix: str = "processed/"
    failed_prefix: str = "failed/"
    output_bucket: str | None = None

    @classmethod
    def from_settings(cls, settings) -> Layout:
        return cls(
            settings.input_prefix,
            settings.output_prefix,
            settings.failed_prefix,
            settings.output_bucket,
        )


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: an operation (or chain) on one object generation."""

    bucket: str
    name: str
    generation: str | None  # None: the live generation, resolved at download
    operation: str  # "upscale" or "remove-background,upscale", as imagen spells it when it
    # parses ("a, b" is "a,b", so reports and outputs land in one folder); validated later
    params: Mapping[str, Any] | str | None  # a dict, or the raw `imagen-params` JSON text
    rel_path: str  # the name below incoming/<operation>/, reused under processed/ and failed/
    output: tuple[str, str] | None = None  # explicit (bucket, name) from a job message
    origin: str = "notification"  # "notification", "job-message" or "cli"
    size: int | None = None  # bytes, when the event says
    problem: str | None = None  # what else is wrong with a job message (reported: events.JobRequest)

    @property
    def source_uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Ignored:
    """An event that is not a job; `reason` is logged."""

    reason: str


def ignored_by_name(event: ObjectEvent, layout: Layout) -> Ignored | None:
    """Why an event is none of ours whatever its object's metadata says (its kind, a folder
    placeholder, imagen's own prefixes), or None."""
    if event.kind != FINALIZE:
        return Ignored(f"not a finalize event ({event.kind})")
    if event.name.endswith("/"):
        return Ignored("folder placeholder")
    for prefix in (layout.output_prefix, layout.failed_prefix):
        if event.name.startswith(prefix):
            return Ignored(f"under imagen's own prefix {prefix!r}")
    return None


def route_event(event: ObjectEvent, layout: Layout) -> Job | Ignored:
    """A Storage event -> the job it asks for, or why it is none of ours."""
    if ignored := ignored_by_name(event, layout):
        return ignored
    name, metadata = event.name, event.metadata
    if any(key in metadata for key in OUTPUT_KEYS):
        return Ignored("an imagen output (carries imagen-* output metadata)")
    operation = metadata.get(OPERATION_KEY, "").strip()  # metadata wins over the folder
    if operation:  # as a job message's path: incoming/photos/a.jpg keeps photos/
        rel_path = route_request_rel_path(name, layout, operation)
    elif name.startswith(layout.input_prefix):
        rest = name[len(layout.input_prefix) :]
        operation, _, rel_path = rest.partition("/")
        if not rel_path:  # dropped straight into incoming/: no operation folder
            operation, rel_path = "", rest
    else:
        return Ignored(f"outside the input prefix {layout.input_prefix!r}")
    return Job(
        bucket=event.bucket,
        name=name,
        generation=event.generation,
        operation=spelled(operation),
        params=metadata.get(PARAMS_KEY),
        rel_path=rel_path,
        origin="notification",
        size=event.size,
    )


def spelled(operation: str) -> str:
    """The operation or chain as imagen writes it, when it parses; as given otherwise (the
    processor reports what is wrong with it)."""
    try:
        return ",".join(parse_chain(operation)) if operation else operation
    except InputError:
        return operation


def route_request(request: JobRequest, layout: Layout) -> Job:
    """A job message -> a job (the bucket allowlist is checked by `check_source_allowed`)."""
    return Job(
        bucket=request.bucket,
        name=request.name,
        generation=request.generation,
        operation=spelled(request.operation),
        params=dict(request.params),
        rel_path=route_request_rel_path(request.name, layout, request.operation),
        output=parse_gs_uri(request.output) if request.output else None,
        origin="job-message",
        problem=request.problem,
    )


def bucket_refused(job: Job, allowed_buckets: frozenset[str], code_buckets: frozenset[str]) -> bool:
    """Whether the job's bucket is one no message may have read or written in: outside a set
    allowlist (a notification is told apart by attributes any publisher on the topic can set,
    so it must come from a listed bucket too: Terraform lists the input bucket), or holding
    code the workers run (`code_buckets`: the compile cache's, the model mirror's). Its
    refusal is a dead letter: nothing is written there. The command line's jobs are the
    user's own."""
    return job.origin != "cli" and (job.bucket in code_buckets or
                                    bool(allowed_buckets) and job.bucket not in allowed_buckets)


def check_source_allowed(job: Job, allowed_buckets: frozenset[str], code_buckets: frozenset[str] = frozenset()) -> None:
    """SourceNotAllowed for a `bucket_refused` job, and for every job message where no
    allowlist is set (job messages were never enabled): refused, never tried."""
    if bucket_refused(job, allowed_buckets, code_buckets):
        if job.bucket in code_buckets:
            raise SourceNotAllowed(f"gs://{job.bucket} holds code the workers run (IMAGEN_COMPILE_CACHE or "
                                   f"IMAGEN_MODEL_MIRROR): never read or written as a job's")
        sender = "job messages" if job.origin == "job-message" else "notifications"
        raise SourceNotAllowed(
            f"{sender} may not read gs://{job.bucket}: it is not in IMAGEN_ALLOWED_BUCKETS "
            f"({', '.join(sorted(allowed_buckets))})"
            + ("" if job.origin == "job-message" else "; list every bucket whose notifications reach this topic "
               "(a publisher on the topic can make a message look like a notification)")
        )
    if job.origin == "job-message" and not allowed_buckets:
        raise SourceNotAllowed("job messages are refused here: IMAGEN_ALLOWED_BUCKETS is unset; set it to the "
                               "buckets job messages may read (Terraform: allowed_buckets)")


def output_location(job: Job, layout: Layout, chain: str, extension: str) -> tuple[str, str]:
    """(bucket, name) of the job's output: processed/<chain>/<path without extension>.<ext>."""
    bucket = layout.output_bucket or job.bucket
    if job.output is not None:
        out_bucket, out_name = job.output
        if out_bucket != bucket:
            raise SourceNotAllowed(
                f"output gs://{out_bucket}/... is refused: imagen writes only to gs://{bucket}"
            )
        check_safe_name(out_name)
        if out_name.startswith(layout.input_prefix) or (out_bucket, out_name) == (
            job.bucket,
            job.name,
        ):
            raise SourceNotAllowed(
                f"output {out_name!r} would be processed again (it is the source or under "
                f"{layout.input_prefix!r})"
            )
        if out_name.startswith(layout.failed_prefix):
            raise SourceNotAllowed(
                f"output {out_name!r} is refused: {layout.failed_prefix!r} holds failure reports"
            )
        return out_bucket, out_name
    check_safe_name(job.rel_path)
    name = f"{layout.output_prefix}{chain}/{posixpath.splitext(job.rel_path)[0]}.{extension}"
    if (size := len(name.encode("utf-8"))) > MAX_NAME_BYTES:  # the source's own name fits
        raise UnsafeObjectName(f"its output's name would be {size} bytes ({layout.output_prefix}{chain}/...), over "
                               f"Cloud Storage's {MAX_NAME_BYTES}: shorten the source's name by "
                               f"{size - MAX_NAME_BYTES} bytes")
    return bucket, name


def failure_location(job: Job, layout: Layout) -> tuple[str, str]:
    """(bucket, name) of the job's failure report: failed/<operation>/<path>.json.

    Unsafe or unusable names get a report named by their hash, so the report itself always lands
    under the failure prefix (with its running marker, MARKER_SUFFIX, within the name limit).
    """
    operation = job.operation or "_none"
    operation = operation if _is_safe_segment(operation) else "_invalid"
    try:
        check_safe_name(job.rel_path)
        name = f"{layout.failed_prefix}{operation}/{job.rel_path}.json"
        check_safe_name(name + MARKER_SUFFIX)
    except UnsafeObjectName:
        digest = hashlib.sha256(job.name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        name = f"{layout.failed_prefix}{operation}/_unsafe/{digest}.json"
    return job.bucket, name


def check_safe_name(name: str) -> None:
    """Raise UnsafeObjectName for names we refuse to read from or write to."""
    if not name:
        raise UnsafeObjectName("empty object name")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, from a forged event: Cloud Storage wants UTF-8
        raise UnsafeObjectName(f"object name {name!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise UnsafeObjectName(f"object name longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(name):
        raise UnsafeObjectName(f"object name {name!r} contains control characters")
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise UnsafeObjectName(f"object name {name!r} has an empty, '.' or '..' segment")


def route_request_rel_path(name: str, layout: Layout, operation: str) -> str:
    """The path an explicitly requested job (of `operation`) files its output under: below
    incoming/<op>/ when the source lies in an operation's folder, below incoming/ elsewhere
    under it, else the whole name (as an upload routed by metadata)."""
    if name.startswith(layout.input_prefix):
        rest = name[len(layout.input_prefix) :]
        segment, _, below = rest.partition("/")
        return below if below and _operation_folder(segment, operation) else rest
    return name


def _operation_folder(segment: str, operation: str) -> bool:
    """Whether a folder under the input prefix is a routing folder, left out of output and
    report paths: it names an operation or chain, or the job's own operation (a misspelt one
    is reported under its name); any other folder is part of the paths."""
    if spelled(segment) == spelled(operation):
        return True
    try:
        parse_chain(segment)
    except InputError:
        return False
    return True


def _is_safe_segment(text: str) -> bool:
    """A name fit for one folder of a report path: the operation as given, when it is one."""
    if not text or "/" in text or text in (".", "..") or _CONTROL.search(text):
        return False
    try:
        return len(text.encode("utf-8")) <= MAX_SEGMENT_BYTES
    except UnicodeEncodeError:
        return False

