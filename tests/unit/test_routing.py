"""Routing: operation, parameters, ignore rules and the output/failure layout."""

from __future__ import annotations

import pytest

from handlers.errors import SourceNotAllowed, UnsafeObjectName
from handlers.events import JobRequest, ObjectEvent
from handlers.routing import (
    Ignored,
    Job,
    Layout,
    check_safe_name,
    check_source_allowed,
    failure_location,
    output_location,
    route_event,
    route_request,
)

LAYOUT = Layout()


def _event(name, kind="finalize", metadata=None):
    return ObjectEvent(kind, "bkt", name, "100", metadata or {})


def test_operation_from_first_folder():
    job = route_event(_event("incoming/upscale/holiday/cat.jpg"), LAYOUT)
    assert (job.operation, job.rel_path, job.generation) == ("upscale", "holiday/cat.jpg", "100")
    assert output_location(job, LAYOUT, "upscale", "png") == ("bkt", "processed/upscale/holiday/cat.png")
    assert failure_location(job, LAYOUT) == ("bkt", "failed/upscale/holiday/cat.jpg.json")


def test_a_chain_is_spelled_as_imagen_writes_it():
    """"a, b" in metadata or a job message is the chain a,b: its report and output folders are
    the chain's, wherever the job came from (backfill looks for the report there)."""
    job = route_event(_event("incoming/upscale/a.png", metadata={"imagen-operation": "remove-background , upscale"}),
                      LAYOUT)
    assert job.operation == "remove-background,upscale"
    assert failure_location(job, LAYOUT) == ("bkt", "failed/remove-background,upscale/a.png.json")
    assert route_request(JobRequest("bkt", "u/a.png", " comic", {}), LAYOUT).operation == "comic"
    assert route_event(_event("incoming/upscal/a.png"), LAYOUT).operation == "upscal"  # reported as it is


def test_chain_folder_and_params_metadata():
    job = route_event(
        _event("incoming/remove-background,upscale/a.png", metadata={"imagen-params": '{"steps": 5}'}),
        LAYOUT,
    )
    assert job.operation == "remove-background,upscale"
    assert job.params == '{"steps": 5}'


def test_operation_from_metadata_outside_the_input_prefix():
    job = route_event(_event("photos/a.jpg", metadata={"imagen-operation": "comic"}), LAYOUT)
    assert (job.operation, job.rel_path) == ("comic", "photos/a.jpg")
    assert output_location(job, LAYOUT, "comic", "webp") == ("bkt", "processed/comic/photos/a.webp")


def test_metadata_operation_overrides_the_folder():
    job = route_event(_event("incoming/upscale/a.jpg", metadata={"imagen-operation": "comic"}), LAYOUT)
    assert (job.operation, job.rel_path) == ("comic", "a.jpg")


def test_a_folder_that_names_no_operation_stays_in_the_path():
    """incoming/photos/p.jpg and incoming/archive/p.jpg routed by metadata both became
    processed/comic/p.png: the second got OutputTaken (or a job message's replaced the first)."""
    for name in ("incoming/photos/p.jpg", "incoming/archive/2024/p.jpg"):
        job = route_event(_event(name, metadata={"imagen-operation": "comic"}), LAYOUT)
        rest = name.removeprefix("incoming/")
        assert (job.operation, job.rel_path) == ("comic", rest)
        assert output_location(job, LAYOUT, "comic", "png") == ("bkt", f"processed/comic/{rest[:-4]}.png")
        assert failure_location(job, LAYOUT) == ("bkt", f"failed/comic/{rest}.json")
        assert route_request(JobRequest("bkt", name, "comic", {}), LAYOUT).rel_path == rest
    # An operation's or chain's folder is the routing folder, whichever operation runs.
    for folder in ("upscale", "remove-background,upscale"):
        job = route_event(_event(f"incoming/{folder}/p.jpg", metadata={"imagen-operation": "comic"}), LAYOUT)
        assert job.rel_path == "p.jpg"
        assert route_request(JobRequest("bkt", f"incoming/{folder}/p.jpg", "comic", {}), LAYOUT).rel_path == "p.jpg"
    # Without metadata the folder is the operation, even a misspelt one (reported under it).
    assert route_event(_event("incoming/upscal/p.jpg"), LAYOUT).rel_path == "p.jpg"


def test_file_directly_in_incoming_has_no_operation():
    job = route_event(_event("incoming/a.jpg"), LAYOUT)
    assert (job.operation, job.rel_path) == ("", "a.jpg")
    assert failure_location(job, LAYOUT) == ("bkt", "failed/_none/a.jpg.json")


@pytest.mark.parametrize(
    "event, reason",
    [
        (_event("incoming/upscale/a.jpg", kind="delete"), "not a finalize"),
        (_event("incoming/upscale/"), "folder"),
        (_event("processed/upscale/a.png"), "own prefix"),
        (_event("failed/upscale/a.jpg.json"), "own prefix"),
        (_event("incoming/upscale/a.png", metadata={"imagen-source": "gs://x/y"}), "imagen output"),
        (_event("elsewhere/a.png"), "outside the input prefix"),
    ],
)
def test_ignore_rules(event, reason):
    routed = route_event(event, LAYOUT)
    assert isinstance(routed, Ignored) and reason in routed.reason


def test_output_bucket_setting():
    layout = Layout(output_bucket="results")
    job = route_event(_event("incoming/comic/x.jpeg"), layout)
    assert output_location(job, layout, "comic", "jpeg") == ("results", "processed/comic/x.jpeg")
    assert failure_location(job, layout)[0] == "bkt"


@pytest.mark.parametrize(
    "rel, expected",
    [
        ("noext", "processed/upscale/noext.png"),
        (".hidden", "processed/upscale/.hidden.png"),
        ("a.b.c.jpg", "processed/upscale/a.b.c.png"),
        ("dir.v2/file", "processed/upscale/dir.v2/file.png"),
        ("spaces and ünïcödé %#?.png", "processed/upscale/spaces and ünïcödé %#?.png"),
    ],
)
def test_output_names(rel, expected):
    job = route_event(_event(f"incoming/upscale/{rel}"), LAYOUT)
    assert output_location(job, LAYOUT, "upscale", "png")[1] == expected


@pytest.mark.parametrize(
    "name",
    ["incoming/upscale/../../etc/passwd", "incoming/upscale/a\nb.png", "incoming/upscale//x.png",
     "incoming/upscale/./x.png", "incoming/upscale/" + "x" * 1010 + ".png"],
)
def test_unsafe_names_fail_with_a_report_under_the_failure_prefix(name):
    job = route_event(_event(name), LAYOUT)
    with pytest.raises(UnsafeObjectName):
        output_location(job, LAYOUT, "upscale", "png")
    bucket, report = failure_location(job, LAYOUT)
    assert report.startswith("failed/upscale/_unsafe/") and report.endswith(".json")
    check_safe_name(report)


def test_a_report_name_leaves_room_for_its_running_marker():
    """A report name within 8 bytes of the limit took a marker name Cloud Storage refuses (a
    400, swallowed): a job that killed its worker every time was never counted or reported."""
    from handlers.routing import MARKER_SUFFIX, MAX_NAME_BYTES

    for length in range(990, 1010):
        job = route_event(_event("incoming/upscale/" + "k" * length + ".png"), LAYOUT)
        _, report = failure_location(job, LAYOUT)
        assert len((report + MARKER_SUFFIX).encode()) <= MAX_NAME_BYTES, length
        if not report.startswith("failed/upscale/_unsafe/"):
            assert report == f"failed/upscale/{'k' * length}.png.json"


def test_an_output_name_too_long_says_it_is_the_outputs_and_by_how_much():
    """The source's name fits but its output's does not: the report said only "object name
    longer than 1024 bytes", of a source whose name is shorter than that."""
    job = route_event(_event("incoming/upscale/" + "x" * 1004 + ".j"), LAYOUT)  # 1023 bytes
    with pytest.raises(UnsafeObjectName, match=r"its output's name would be 1026 bytes \(processed/upscale/\.\.\.\), "
                                               r"over Cloud Storage's 1024: shorten the source's name by 2 bytes"):
        output_location(job, LAYOUT, "upscale", "png")


def test_job_message_routing_and_allowlist():
    request = JobRequest("bkt", "uploads/p.png", "upscale", {"steps": 3}, "gs://bkt/out/p.png")
    job = route_request(request, LAYOUT)
    assert job.origin == "job-message" and job.rel_path == "uploads/p.png"
    assert output_location(job, LAYOUT, "upscale", "png") == ("bkt", "out/p.png")
    check_source_allowed(job, frozenset({"bkt"}))
    with pytest.raises(SourceNotAllowed, match="IMAGEN_ALLOWED_BUCKETS"):
        check_source_allowed(job, frozenset())


@pytest.mark.parametrize(
    "output, layout",
    [
        ("gs://other/out.png", LAYOUT),  # not the output bucket
        ("gs://bkt/out.png", Layout(output_bucket="results")),
        ("gs://bkt/incoming/upscale/loop.png", LAYOUT),  # would trigger itself
        ("gs://bkt/uploads/p.png", LAYOUT),  # the source itself
        ("gs://bkt/a/../b.png", LAYOUT),
        ("gs://bkt/failed/upscale/p.png.json", LAYOUT),  # where failure reports go
    ],
)
def test_explicit_outputs_are_confined(output, layout):
    job = route_request(JobRequest("bkt", "uploads/p.png", "upscale", {}, output), layout)
    with pytest.raises((SourceNotAllowed, UnsafeObjectName)):
        output_location(job, layout, "upscale", "png")


def test_cli_jobs_skip_the_allowlist():
    job = Job("any", "x.png", None, "upscale", {}, "x.png", origin="cli")
    check_source_allowed(job, frozenset())
