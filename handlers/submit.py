"""Submit: upload local files as jobs and wait for each output or failure report.

The scriptable replacement for `gsutil cp` plus polling: each upload's generation is noted,
and only an output (or failure report) for that very generation counts as its result.
"""

from __future__ import annotations

import dataclasses
import json
import mimetypes
import time
from pathlib import Path

from google.api_core.exceptions import NotFound
from google.cloud import storage

from handlers import routing
from handlers.logs import clip
from handlers.processor import Plan, plan_job
from handlers.routing import Job, Layout
from image.errors import InvalidParameter
from image.operations import OPERATION_NAMES
from image.params import canonical_json


@dataclasses.dataclass
class Submission:
    path: Path
    job: Job
    output: tuple[str, str]
    report: tuple[str, str]
    status: str = "queued"  # queued, succeeded, failed, superseded
    reason: str = ""
    seconds: str = ""
    local_output: Path | None = None
    output_generation: int | None = None  # the output object checked: the one downloaded

    @property
    def output_uri(self) -> str:
        return f"gs://{self.output[0]}/{self.output[1]}"


def prepare(paths: list[Path], bucket: str, operation: str, params: dict, layout: Layout) -> list[tuple[Path, Job, Plan]]:
    """Each file's job, validated before anything is uploaded: bad parameters fail here, and
    so do two files that would land on one object (a/photo.jpg, b/photo.jpg) or write one
    output (photo.jpg, photo.png), which would otherwise cost one of them its result."""
    planned, names, outputs = [], {}, {}
    for path in paths:
        plan = plan_job(Job(bucket, path.name, None, operation, params, path.name), layout,
                        frozenset(OPERATION_NAMES))
        # The folder, and the report's, name the operation as imagen spells it.
        name = f"{layout.input_prefix}{plan.operation}/{path.name}"
        job = Job(bucket, name, None, plan.operation, params, path.name)
        output_uri = "gs://{}/{}".format(*plan.output)
        for seen, key, where in ((names, name, f"gs://{bucket}/{name}"), (outputs, plan.output, output_uri)):
            if key in seen:
                raise InvalidParameter(f"{seen[key]} and {path} would both go to {where}: rename one")
            seen[key] = path
        planned.append((path, job, plan))
    return planned


def upload(client: storage.Client, path: Path, job: Job, plan: Plan, layout: Layout) -> Submission:
    """Upload one prepared file under incoming/<operation>/ with its parameters."""
    blob = client.bucket(job.bucket).blob(job.name)
    blob.metadata = {routing.PARAMS_KEY: canonical_json(plan.params)} if plan.params else None
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    blob.upload_from_filename(str(path), content_type=content_type)
    job = dataclasses.replace(job, generation=str(blob.generation))
    return Submission(path, job, plan.output, routing.failure_location(job, layout))


def poll(client: storage.Client, submission: Submission) -> bool:
    """Look once for the submission's result; True when it has one (or, `superseded`, when
    a newer upload of the same name has its result or report: this one will never)."""
    source = submission.job
    output = _blob(client, *submission.output)
    metadata = (output.metadata or {}) if output is not None else {}
    if output is not None and metadata.get(routing.SOURCE_GENERATION_KEY) == source.generation:
        submission.status = "succeeded"
        submission.seconds = metadata.get(routing.SECONDS_KEY, "")
        submission.output_generation = output.generation
        return True
    if metadata.get(routing.SOURCE_KEY) == source.source_uri and _newer(metadata.get(routing.SOURCE_GENERATION_KEY),
                                                                        source.generation):
        return _superseded(submission, metadata[routing.SOURCE_GENERATION_KEY])
    report = _blob(client, *submission.report)
    if report is not None:
        try:
            body = json.loads(report.download_as_bytes())
        except (NotFound, ValueError):
            return False
        if not isinstance(body, dict) or body.get("source") != clip(source.source_uri):
            return False  # another object's, routed to the same place (a job message's, another folder's)
        if body.get("generation") == source.generation:
            submission.status = "failed"
            error = body.get("error") or {}
            submission.reason = f"{error.get('type')}: {error.get('message')}"
            return True
        if _newer(body.get("generation"), source.generation):
            return _superseded(submission, body["generation"])
    return False


def _newer(generation, than: str) -> bool:
    try:
        return int(generation) > int(than)
    except (TypeError, ValueError):
        return False


def _superseded(submission: Submission, newer: str) -> bool:
    submission.status = "superseded"
    submission.reason = (f"gs://{submission.job.bucket}/{submission.job.name} was uploaded again (generation "
                         f"{newer}) before this upload's result: its result is that one's")
    return True


def download(client: storage.Client, submission: Submission, out_dir: Path) -> Path:
    """The output `poll` found, that very generation (a newer one may have replaced it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    local = out_dir / Path(submission.output[1]).name
    bucket, name = submission.output
    client.bucket(bucket).blob(name, generation=submission.output_generation).download_to_filename(str(local))
    submission.local_output = local
    return local


def wait(client: storage.Client, submissions: list[Submission], timeout: float,
         on_result=lambda submission: None, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(submissions)
    while pending and time.monotonic() < deadline:
        for submission in list(pending):
            if poll(client, submission):
                pending.remove(submission)
                on_result(submission)
        if pending:
            time.sleep(interval)
    for submission in pending:
        report = f"gs://{submission.report[0]}/{submission.report[1]}"
        submission.status = "timed out"
        submission.reason = (f"no result after {timeout:.0f} s (watched {submission.output_uri} and {report}); "
                             f"still queued or running, or no worker serves {submission.job.operation!r}: on "
                             f"Terraform's filtered subscriptions it waits in <prefix>-unrouted (imagen dlq list "
                             f"--subscription ...), elsewhere the workers' logs say 'job skipped: ... is not this "
                             f"worker's'")


def _blob(client: storage.Client, bucket: str, name: str):
    return client.bucket(bucket).get_blob(name)
