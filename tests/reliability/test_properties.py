"""Properties (hypothesis) of the pieces every job goes through:

- any object name and metadata map to an output and a failure report path that stay under
  their prefixes, are deterministic, never equal the input, and are never routed again;
- the event parsers raise nothing but EventError (the same check as scripts/fuzz_events.py);
- the decoder refuses any declared size over its pixel limit before decoding, and never
  allocates past it (checked under a hard RLIMIT_AS cap in a subprocess).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from handlers.errors import ConfigError, UnsafeObjectName
from handlers.events import JobRequest, ObjectEvent
from handlers.routing import (
    OUTPUT_KEYS,
    Ignored,
    Layout,
    check_safe_name,
    failure_location,
    output_location,
    route_event,
    route_request,
)
from handlers.settings import Settings
from image.errors import InputError
from scripts.fuzz_events import ParserInput, check, parser_inputs
from tests.reliability.crafted import check_declared_size, declared_sizes

ROOT = Path(__file__).resolve().parents[2]
CHAINS = ("upscale", "remove-background", "remove-background,upscale", "comic,enhance")
EXTENSIONS = ("png", "webp", "jpeg")
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------------

_segment_chars = st.characters(exclude_characters="/", exclude_categories=("Cc", "Cs"))
_prefix = st.lists(
    st.text(_segment_chars, min_size=1, max_size=10).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=3,
).map(lambda parts: "/".join(parts) + "/")


@st.composite
def layouts(draw) -> Layout:
    """The default layout, or any that settings accept (prefixes that do not overlap)."""
    output_bucket = draw(st.sampled_from([None, "out-bucket", "src"]))
    if draw(st.booleans()):
        return Layout(output_bucket=output_bucket)
    try:
        chosen = Settings(
            input_prefix=draw(_prefix),
            output_prefix=draw(_prefix),
            failed_prefix=draw(_prefix),
            output_bucket=output_bucket,
        ).validate()
    except ConfigError:
        assume(False)
    return Layout.from_settings(chosen)


_odd_segments = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "a",
            "a.png",
            "x y.JPG",
            "%2F",
            "100%",
            "#1",
            "?q=1",
            "é",
            "猫.webp",
            "a\nb",
            "\x00",
            "\ud800",
            ".png",
            "a.",
            "..png",
            " ",
            "\u2028",
            "upscale",
        ]
    ),
    st.text(max_size=12),
    st.text(st.characters(categories=["Cc", "Cs", "Zs", "Zl", "Cf"]), max_size=3),
    st.integers(1, 1100).map(lambda n: "a" * n),
)
_operations = st.one_of(
    st.sampled_from(
        [
            "upscale",
            "remove-background,upscale",
            "sharpen",
            "",
            " ",
            "../..",
            "a/b",
            "\ud800",
            "up\nscale",
        ]
    ),
    st.text(max_size=20),
    st.integers(150, 2100).map(lambda n: "u" * n),
)


@st.composite
def object_events(draw, layout: Layout) -> ObjectEvent:
    """A finalize event for any name, mostly below the input prefix, with any metadata."""
    folder = draw(
        st.sampled_from(
            [
                layout.input_prefix,
                layout.input_prefix + "upscale/",
                layout.input_prefix + "remove-background,upscale/",
                layout.output_prefix + "upscale/",
                layout.failed_prefix + "upscale/",
                "",
                "uploads/",
            ]
        )
    )
    name = folder + "/".join(draw(st.lists(_odd_segments, max_size=4)))
    assume(name)
    metadata = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "imagen-operation": _operations,
                "imagen-params": st.text(max_size=20),
                "imagen-source": st.just("gs://src/x.png"),
                "other": st.text(max_size=5),
            },
        )
    )
    kind = draw(st.sampled_from(["finalize", "finalize", "finalize", "delete", "metadata-update"]))
    return ObjectEvent(kind, "src", name, "123", metadata)


# -- routing ---------------------------------------------------------------------------------


def _assert_report_location(job, layout: Layout) -> None:
    bucket, name = failure_location(job, layout)
    assert (bucket, name) == failure_location(job, layout), "not deterministic"
    assert bucket == job.bucket
    assert name.startswith(layout.failed_prefix) and name.endswith(".json")
    check_safe_name(name)  # at most 1024 bytes of UTF-8, no control characters, no '..'
    assert len(name.encode("utf-8")) <= 1024  # strict UTF-8: Cloud Storage refuses the rest
    assert (bucket, name) != (job.bucket, job.name)
    # A report never becomes a job: its own notification is ignored.
    assert isinstance(route_event(ObjectEvent("finalize", bucket, name, "1", {}), layout), Ignored)


@PROPERTY
@given(st.data())
def test_every_name_maps_into_the_layout_or_is_ignored(data):
    layout = data.draw(layouts())
    event = data.draw(object_events(layout))
    routed = route_event(event, layout)
    assert routed == route_event(event, layout), "routing is not deterministic"
    if isinstance(routed, Ignored):
        return
    assert event.kind == "finalize"
    assert not event.name.startswith((layout.output_prefix, layout.failed_prefix))
    assert not any(key in event.metadata for key in OUTPUT_KEYS)
    for chain in CHAINS:
        for extension in EXTENSIONS:
            try:
                location = output_location(routed, layout, chain, extension)
            except UnsafeObjectName:
                continue  # allowed: the job then ends in a failure report
            bucket, name = location
            assert location == output_location(routed, layout, chain, extension)
            assert bucket == (layout.output_bucket or event.bucket)
            assert name.startswith(f"{layout.output_prefix}{chain}/") and name.endswith(
                "." + extension
            )
            check_safe_name(name)
            assert location != (event.bucket, event.name)
            # No loops: the output's own notification is ignored, by prefix and by metadata.
            assert isinstance(
                route_event(ObjectEvent("finalize", bucket, name, "1", {}), layout), Ignored
            )
            tagged = ObjectEvent(
                "finalize", event.bucket, event.name, "1", {OUTPUT_KEYS[0]: "gs://x/y"}
            )
            assert isinstance(route_event(tagged, layout), Ignored)
    _assert_report_location(routed, layout)


@PROPERTY
@given(st.data())
def test_job_messages_write_only_the_output_bucket_and_never_the_source(data):
    layout = data.draw(layouts())
    source_bucket = data.draw(st.sampled_from(["src", "out-bucket", "other"]))
    name = "/".join(data.draw(st.lists(_odd_segments, min_size=1, max_size=4)))
    assume(name)
    output = data.draw(
        st.one_of(
            st.none(),
            st.builds(
                "gs://{}/{}".format,
                st.sampled_from(["src", "out-bucket", "other"]),
                st.sampled_from(
                    [
                        name,
                        layout.input_prefix + "x.png",
                        "results/" + name,
                        layout.failed_prefix + "r.png",
                        "a/../b.png",
                    ]
                ),
            ),
        )
    )
    operation = data.draw(_operations)
    job = route_request(JobRequest(source_bucket, name, operation, {}, output), layout)
    allowed_bucket = layout.output_bucket or source_bucket
    for chain in CHAINS:
        try:
            bucket, out_name = output_location(job, layout, chain, "png")
        except InputError:
            continue  # SourceNotAllowed or UnsafeObjectName: a failure report, never a write
        assert bucket == allowed_bucket
        assert (bucket, out_name) != (source_bucket, name)
        assert not out_name.startswith(layout.input_prefix)
        check_safe_name(out_name)
    _assert_report_location(job, layout)


@pytest.mark.parametrize(
    "request_",
    [
        JobRequest("src", "incoming/upscale/\udc80.png", "upscale", {}),  # a lone surrogate
        JobRequest("src", "x.png", "u" * 2000, {}),  # an operation too long for a folder
        JobRequest("src", "x.png", "\ud800", {}),
    ],
    ids=["surrogate-name", "long-operation", "surrogate-operation"],
)
def test_found_by_fuzzing_report_locations_for_forged_jobs(request_):
    """Each once gave a report name Cloud Storage refuses (a retry storm instead of a report)."""
    job = route_request(request_, Layout())
    _assert_report_location(job, Layout())


# -- parsers ---------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(parser_inputs())
def test_parsers_raise_nothing_but_event_error(entry):
    check(entry)  # raises scripts.fuzz_events.Crash on anything else


def test_found_by_fuzzing_infinite_size_is_an_event_error():
    """JSON's `Infinity` as an object size once escaped as OverflowError."""
    body = b'{"bucket": "b", "name": "incoming/upscale/a.png", "size": Infinity}'
    attributes = {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}
    assert check(ParserInput("message", body, attributes)) == "rejected"


# -- decoder ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=400, deadline=None)
@given(declared_sizes())
def test_declared_sizes_over_the_pixel_limit_are_refused_before_decoding(case):
    check_declared_size(*case)


def test_decoder_stays_within_its_limits_under_a_memory_cap():
    """The same property in a process whose address space is capped (RLIMIT_AS): a bomb that
    got as far as allocating would raise MemoryError there and fail the run."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.reliability.decode_capped", "300"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bomb" in result.stdout
