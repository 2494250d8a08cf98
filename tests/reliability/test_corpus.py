"""A corpus of bad and odd inputs, each pushed through `imagen serve`'s app (Pub/Sub push
envelope -> parser -> processor -> storage emulator) the way a real notification arrives.

Each case ends in exactly one of: an output, a failure report, or ignored (nothing written);
the app answers 200 (never 500: the worker survives), and after every case the bucket holds
nothing outside the layout. Cases whose model does not matter run on the FakeEngine; those
whose pixels reach the model (odd modes, sizes, animation) run on the tiny remove-background
model through the real Engine.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import uuid

import pytest
from PIL import Image, ImageCms

from tests.integration.conftest import png_bytes
from tests.integration.test_processor import FakeEngine
from tests.reliability import crafted
from tests.reliability.conftest import (
    app_for,
    assert_within_layout,
    job_envelope,
    notification_envelope,
    processor_for,
)

pytestmark = pytest.mark.integration

RB = "incoming/remove-background/"
UP = "incoming/upscale/"
STATUS = {"output": "succeeded", "report": "failed", "ignored": "ignored", "skipped": "skipped"}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    name: str
    expect: str  # "output", "report", "ignored" or "skipped" (nothing written, acked)
    data: bytes = b""
    content_type: str = "image/png"
    metadata: dict | None = None
    error: str | None = None  # the failure report's error type
    size: tuple[int, int] | None = None  # the output's size in pixels
    model: bool = False  # run on the tiny model rather than the FakeEngine
    output: str | None = None  # the output's name, when it matters
    report: str | None = None  # the report's name (prefix), when it matters


def _png(size=(12, 8), mode="RGB") -> bytes:
    return crafted.encode(crafted.picture(size, mode), "PNG")


def _truncated(kind: str) -> bytes:
    data = crafted.sample(kind, size=(48, 32))
    return data[: len(data) * 3 // 5]


def _with_icc(profile) -> bytes:
    return crafted.encode(crafted.picture((16, 12)), "JPEG", icc_profile=profile)


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
_GREY16 = crafted.encode(
    Image.fromarray(
        __import__("numpy").arange(0, 65535, 65535 // 120, dtype="uint16")[:120].reshape(10, 12)
    ),
    "PNG",
)
_PALETTE = crafted.encode(
    crafted.picture((14, 10)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0
)

CASES = [
    # -- bytes that are not (whole) images --------------------------------------------------
    *[
        Case(
            f"truncated-{kind.lower()}",
            f"{RB}cut-{kind.lower()}.img",
            "report",
            _truncated(kind),
            error="ImageDecodeError",
        )
        for kind in crafted.KINDS
    ],
    Case("zero-bytes", f"{RB}empty.png", "report", b"", error="ImageDecodeError"),
    Case(
        "html-as-jpeg",
        f"{RB}page.jpg",
        "report",
        b"<!doctype html><p>hi</p>",
        "image/jpeg",
        error="ImageDecodeError",
    ),
    Case(
        "svg",
        f"{RB}logo.svg",
        "report",
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        "image/svg+xml",
        error="ImageDecodeError",
    ),
    Case(
        "pdf-as-png",
        f"{RB}doc.png",
        "report",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        error="ImageDecodeError",
    ),
    Case(
        "psd-plugin-not-tried",
        f"{RB}art.psd",
        "report",
        b"8BPS\x00\x01" + b"\x00" * 40,
        error="ImageDecodeError",
    ),
    # -- decompression bombs and tiny files with enormous dimensions ------------------------
    Case(
        "bomb-png-declared",
        f"{RB}bomb.png",
        "report",
        crafted.declare_size("PNG", crafted.sample("PNG"), 100_000, 100_000),
        error="DecompressionBomb",
    ),
    Case(
        "bomb-png-zlib",
        f"{RB}zeros.png",
        "report",
        crafted.zlib_bomb_png(10_000, 10_000),  # over the default IMAGEN_MAX_PIXELS (8192²)
        error="DecompressionBomb",
    ),
    Case(
        "bomb-gif",
        f"{RB}bomb.gif",
        "report",
        crafted.declare_size("GIF", crafted.sample("GIF"), 65535, 65535),
        error="DecompressionBomb",
    ),
    Case(
        "bomb-webp-vp8x",
        f"{RB}bomb.webp",
        "report",
        crafted.declare_size("WEBP-VP8X", crafted.sample("WEBP-VP8X"), 2**24, 2**24),
        error="DecompressionBomb",
    ),
    Case(
        "bomb-webp-vp8l",
        f"{RB}bomb-lossless.webp",
        "report",
        crafted.declare_size("WEBP-VP8L", crafted.sample("WEBP-VP8L"), 16384, 16384),
        error="DecompressionBomb",
    ),
    Case(
        "huge-jpeg-header",
        f"{RB}huge.jpg",
        "report",
        crafted.declare_size("JPEG", crafted.sample("JPEG"), 65000, 65000),
        "image/jpeg",
        error="DecompressionBomb",
    ),
    Case(
        "huge-bmp-header",
        f"{RB}huge.bmp",
        "report",
        crafted.declare_size("BMP", crafted.sample("BMP"), 60000, 60000),
        "image/bmp",
        error="DecompressionBomb",
    ),
    Case(
        "huge-tiff-header",
        f"{RB}huge.tif",
        "report",
        crafted.declare_size("TIFF", crafted.sample("TIFF"), 100_000, 100_000),
        "image/tiff",
        error="DecompressionBomb",
    ),
    Case(
        "long-thin-png",
        f"{RB}line.png",
        "report",
        crafted.declare_size("PNG", crafted.sample("PNG"), 1, 100_000_000),
        error="DecompressionBomb",
    ),
    # -- odd but valid images: each reaches the model ----------------------------------------
    Case(
        "animated-gif",
        f"{RB}anim.gif",
        "output",
        crafted.animated_gif(),
        "image/gif",
        size=(16, 12),
        model=True,
    ),
    Case("grey-16bit", f"{RB}grey16.png", "output", _GREY16, size=(12, 10), model=True),
    Case(
        "rgb-16bit", f"{RB}rgb16.png", "output", crafted.png_16bit_rgb(), size=(10, 6), model=True
    ),
    Case(
        "rgba-16bit",
        f"{RB}rgba16.png",
        "output",
        crafted.png_16bit_rgb(alpha=True),
        size=(10, 6),
        model=True,
    ),
    Case("palette-transparent", f"{RB}palette.png", "output", _PALETTE, size=(14, 10), model=True),
    Case(
        "cmyk-jpeg",
        f"{RB}cmyk.jpg",
        "output",
        crafted.encode(crafted.picture((20, 10), "CMYK"), "JPEG"),
        "image/jpeg",
        size=(20, 10),
        model=True,
    ),
    Case(
        "cmyk-tiff",
        f"{RB}cmyk.tif",
        "output",
        crafted.encode(crafted.picture((20, 10), "CMYK"), "TIFF"),
        "image/tiff",
        size=(20, 10),
    ),
    Case(
        "grey-jpeg",
        f"{RB}grey.jpg",
        "output",
        crafted.encode(crafted.picture((9, 7), "L"), "JPEG"),
        "image/jpeg",
        size=(9, 7),
    ),
    Case("grey-alpha-png", f"{RB}la.png", "output", _png((9, 7), "LA"), size=(9, 7)),
    Case(
        "one-bit-bmp",
        f"{RB}mono.bmp",
        "output",
        crafted.encode(crafted.picture((9, 7), "1"), "BMP"),
        "image/bmp",
        size=(9, 7),
    ),
    Case("one-pixel", f"{RB}dot.png", "output", _png((1, 1)), size=(1, 1), model=True),
    Case(
        "one-by-two-thousand",
        f"{RB}strip.png",
        "output",
        _png((1, 2000)),
        size=(1, 2000),
        model=True,
    ),
    Case(
        "webp-lossless-alpha",
        f"{RB}alpha.webp",
        "output",
        crafted.encode(crafted.picture((10, 8), "RGBA"), "WEBP", lossless=True),
        "image/webp",
        size=(10, 8),
    ),
    *[
        Case(
            f"exif-orientation-{o}",
            f"{RB}orient-{o}.jpg",
            "output",
            crafted.with_orientation(o),
            "image/jpeg",
            size=(40, 20) if o < 5 else (20, 40),
        )
        for o in range(1, 9)
    ],
    Case("icc-srgb", f"{RB}srgb.jpg", "output", _with_icc(_SRGB), "image/jpeg", size=(16, 12)),
    Case(
        "icc-lab-mismatch",
        f"{RB}lab.jpg",
        "output",
        _with_icc(_LAB),
        "image/jpeg",
        size=(16, 12),
        model=True,
    ),
    Case(
        "icc-garbage",
        f"{RB}junk-icc.jpg",
        "output",
        _with_icc(b"\x00" * 64 + b"garbage"),
        "image/jpeg",
        size=(16, 12),
    ),
    # -- object names --------------------------------------------------------------------------
    Case(
        "name-spaces",
        f"{RB}my holiday/cat photo.png",
        "output",
        _png(),
        output="processed/remove-background/my holiday/cat photo.png",
    ),
    Case(
        "name-unicode",
        f"{RB}фото/猫 🐱.png",
        "output",
        _png(),
        output="processed/remove-background/фото/猫 🐱.png",
    ),
    Case(
        "name-percent",
        f"{RB}100% real%2F.png",
        "output",
        _png(),
        output="processed/remove-background/100% real%2F.png",
    ),
    Case(
        "name-hash", f"{RB}a#b.png", "output", _png(), output="processed/remove-background/a#b.png"
    ),
    Case(
        "name-question",
        f"{RB}why?.png",
        "output",
        _png(),
        output="processed/remove-background/why?.png",
    ),
    Case(
        "name-newline",
        f"{RB}new\nline.png",
        "report",
        _png(),
        error="UnsafeObjectName",
        report="failed/remove-background/_unsafe/",
    ),
    Case(
        "name-dotdot",
        f"{RB}../../escape.png",
        "report",
        _png(),
        error="UnsafeObjectName",
        report="failed/remove-background/_unsafe/",
    ),
    Case(
        "name-1024-bytes",
        RB + "n" * (1024 - len(RB) - 4) + ".png",
        "report",
        _png(),
        error="UnsafeObjectName",
        report="failed/remove-background/_unsafe/",
    ),
    Case("name-1000-bytes", RB + "n" * (1000 - len(RB) - 4) + ".png", "output", _png()),
    Case(
        "name-no-operation-folder",
        "incoming/loose.png",
        "report",
        _png(),
        error="InvalidParameter",
        report="failed/_none/loose.png.json",
    ),
    Case(
        "name-unknown-operation",
        "incoming/sharpen/a.png",
        "report",
        _png(),
        error="UnknownOperation",
        report="failed/sharpen/a.png.json",
    ),
    Case("name-folder-placeholder", RB + "folder/", "ignored"),
    Case("name-under-output-prefix", "processed/remove-background/x.png", "ignored", _png()),
    Case("name-outside-input", "uploads/x.png", "ignored", _png()),
    Case(
        "name-outside-input-with-operation",
        "uploads/y.png",
        "output",
        _png(),
        metadata={"imagen-operation": "remove-background"},
        output="processed/remove-background/uploads/y.png",
    ),
    Case(
        "copy-of-an-output",
        f"{RB}copy.png",
        "ignored",
        _png(),
        metadata={
            "imagen-source": "gs://b/incoming/remove-background/x.png",
            "imagen-source-generation": "1",
        },
    ),
    # -- parameter abuse (imagen-params and imagen-operation metadata) -----------------------
    *[
        Case(
            f"params-{id_}",
            f"{UP}p-{id_}.png",
            "report",
            _png(),
            metadata={"imagen-params": params},
            error=error,
        )
        for id_, params, error in [
            ("huge-prompt", json.dumps({"prompt": "x" * 5000}), "InvalidParameter"),
            ("nan", '{"guidance": NaN}', "InvalidParameter"),
            ("infinity", '{"guidance": Infinity}', "InvalidParameter"),
            ("negative-steps", '{"steps": -4}', "InvalidParameter"),
            ("enormous-steps", '{"steps": 1e300}', "InvalidParameter"),
            ("enormous-int-text", json.dumps({"steps": "9" * 5000}), "InvalidParameter"),
            ("unknown-key", '{"colour": "red"}', "InvalidParameter"),
            ("wrong-type-str", '{"steps": "many"}', "InvalidParameter"),
            ("wrong-type-list", '{"steps": [20]}', "InvalidParameter"),
            ("wrong-type-bool", '{"steps": true}', "InvalidParameter"),
            ("not-an-object", "[1, 2, 3]", "InvalidParameter"),
            ("null", "null", "InvalidParameter"),
            ("not-json", "{steps: 4", "InvalidParameter"),
            (
                "deeply-nested",
                '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
                "InvalidParameter",
            ),
            ("nul-in-prompt", json.dumps({"prompt": "a\x00b"}), "InvalidParameter"),
            ("oversize", json.dumps({f"k{i}": "v" * 20 for i in range(4000)}), "InvalidParameter"),
        ]
    ],
    Case(
        "params-valid-webp",
        f"{UP}ok.png",
        "output",
        _png((6, 4)),
        metadata={"imagen-params": '{"steps": 2, "seed": 1, "format": "webp"}'},
        output="processed/upscale/ok.webp",
        size=(12, 8),
    ),
    Case(
        "mask-only-not-bool",
        f"{RB}m.png",
        "report",
        _png(),
        metadata={"imagen-params": '{"mask_only": "perhaps"}'},
        error="InvalidParameter",
    ),
    Case(
        "operation-twice",
        "uploads/twice.png",
        "report",
        _png(),
        metadata={"imagen-operation": "upscale,upscale"},
        error="InvalidParameter",
    ),
    Case(
        "operation-path",
        "uploads/path.png",
        "report",
        _png(),
        metadata={"imagen-operation": "../../etc"},
        error="UnknownOperation",
        report="failed/_invalid/uploads/path.png.json",
    ),
    Case(
        "operation-2000-chars",
        "uploads/long-op.png",
        "report",
        _png(),
        metadata={"imagen-operation": "u" * 2000},
        error="UnknownOperation",
        report="failed/_invalid/uploads/long-op.png.json",
    ),
]


def _run(case: Case, bucket, settings, engine):
    blob = bucket.blob(case.name)
    blob.metadata = case.metadata
    blob.upload_from_string(case.data, content_type=case.content_type)
    client = app_for(processor_for(settings, engine))
    response = client.post("/", json=notification_envelope(blob))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_each_input_ends_in_exactly_one_outcome(case, bucket, settings, request):
    engine = request.getfixturevalue("rb_engine") if case.model else FakeEngine()
    body = _run(case, bucket, settings, engine)
    assert body["status"] == STATUS[case.expect], body
    found = assert_within_layout(bucket, {case.name})
    if case.expect == "output":
        assert len(found["outputs"]) == 1 and not found["reports"], found
        name = found["outputs"][0]
        assert body["output"] == f"gs://{bucket.name}/{name}"
        if case.output:
            assert name == case.output
        blob = bucket.get_blob(name)
        assert blob.metadata["imagen-source"] == f"gs://{bucket.name}/{case.name}"
        image = Image.open(io.BytesIO(blob.download_as_bytes()))
        if case.size:
            assert image.size == case.size
        if case.model:  # the tiny model's real post-processing: an alpha mask
            assert image.mode == "RGBA"
    elif case.expect == "report":
        assert len(found["reports"]) == 1 and not found["outputs"], found
        name = found["reports"][0]
        if case.report:
            assert name.startswith(case.report), name
        report = json.loads(bucket.get_blob(name).download_as_bytes())
        assert report["error"]["type"] == case.error, report
        assert report["source"] == f"gs://{bucket.name}/{case.name}"
        assert len(json.dumps(report)) < 12_000, "the report echoes too much of the input"
    else:
        assert not found["outputs"] and not found["reports"], found


def test_the_corpus_has_at_least_thirty_cases_and_each_kind():
    kinds = {case.expect for case in CASES}
    assert len(CASES) >= 30 and {"output", "report", "ignored"} <= kinds


# -- requests that are not even events: straight into the app ------------------------------

_FINALIZED = "google.cloud.storage.object.v1.finalized"


def _b64(value) -> str:
    return base64.b64encode(
        json.dumps(value).encode() if not isinstance(value, bytes) else value
    ).decode()


def _ce_headers(**overrides) -> dict:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "e1",
        "ce-source": "//storage.googleapis.com/b",
        "ce-type": _FINALIZED,
        "content-type": "application/json",
    }
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v is not None}


# The bucket the requests name: a report or output written for one would land there.
OTHER = "corpus-requests"
_NOTIFY = {"eventType": "OBJECT_FINALIZE", "payloadFormat": "NONE"}
REQUESTS = [
    # (id, headers, body, expected HTTP status, expected outcome status or None)
    ("empty-body", {"content-type": "application/json"}, b"", 400, None),
    ("not-json", {"content-type": "application/json"}, b"{garbage", 400, None),
    ("json-array", {"content-type": "application/json"}, b"[]", 400, None),
    ("no-message", {}, {"subscription": "s"}, 400, None),
    ("message-not-object", {}, {"message": "hello"}, 400, None),
    ("data-not-base64", {}, {"message": {"data": "!!not base64!!"}}, 400, None),
    ("data-not-string", {}, {"message": {"data": 42}}, 400, None),
    ("attributes-not-strings", {}, {"message": {"data": "", "attributes": {"a": 1}}}, 400, None),
    (
        "delivery-attempt-text",
        {},
        {"message": {"data": _b64({})}, "deliveryAttempt": "five"},
        400,
        None,
    ),
    (
        "notification-no-bucket",
        {},
        {"message": {"attributes": {**_NOTIFY, "objectId": "incoming/upscale/a.png"}}},
        400,
        None,
    ),
    (
        "notification-no-object",
        {},
        {"message": {"attributes": {**_NOTIFY, "bucketId": OTHER}}},
        400,
        None,
    ),
    (
        "notification-bad-generation",
        {},
        {
            "message": {
                "attributes": {
                    **_NOTIFY,
                    "bucketId": OTHER,
                    "objectId": "incoming/upscale/a.png",
                    "objectGeneration": "-1",
                }
            }
        },
        400,
        None,
    ),
    (
        "notification-payload-not-json",
        {},
        {
            "message": {
                "data": _b64(b"\xff\xfe"),
                "attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"},
            }
        },
        400,
        None,
    ),
    (
        "notification-delete",
        {},
        {
            "message": {
                "attributes": {
                    "eventType": "OBJECT_DELETE",
                    "payloadFormat": "NONE",
                    "bucketId": OTHER,
                    "objectId": "incoming/upscale/a.png",
                }
            }
        },
        200,
        "ignored",
    ),
    (
        "job-source-not-gs",
        {},
        {"message": {"data": _b64({"source": "https://x/a.png", "operation": "upscale"})}},
        400,
        None,
    ),
    (
        "cloudevent-no-type",
        _ce_headers(**{"ce-type": None}),
        {"bucket": OTHER, "name": "a"},
        400,
        None,
    ),
    ("cloudevent-no-id", _ce_headers(**{"ce-id": None}), {"bucket": OTHER, "name": "a"}, 400, None),
    (
        "cloudevent-no-source",
        _ce_headers(**{"ce-source": None}),
        {"bucket": OTHER, "name": "a"},
        400,
        None,
    ),
    (
        "cloudevent-other-type",
        _ce_headers(**{"ce-type": "com.example.thing"}),
        {"bucket": OTHER, "name": "a"},
        400,
        None,
    ),
    ("cloudevent-no-name", _ce_headers(), {"bucket": OTHER}, 400, None),
    ("cloudevent-data-not-object", _ce_headers(), [OTHER, "a"], 400, None),
    (
        "cloudevent-structured-no-data",
        {"content-type": "application/cloudevents+json"},
        {"specversion": "1.0", "id": "1", "source": "//s", "type": _FINALIZED},
        400,
        None,
    ),
    (
        "cloudevent-structured-missing-id",
        {"content-type": "application/cloudevents+json"},
        {
            "specversion": "1.0",
            "source": "//s",
            "type": _FINALIZED,
            "data": {"bucket": OTHER, "name": "a"},
        },
        400,
        None,
    ),
    (
        "cloudevent-deleted",
        _ce_headers(**{"ce-type": "google.cloud.storage.object.v1.deleted"}),
        {"bucket": OTHER, "name": "incoming/upscale/a.png", "generation": "1"},
        200,
        "ignored",
    ),
    (
        "push-of-a-10-mb-message-is-read-not-refused",  # then refused for what it says
        {"content-type": "application/json"},
        {"message": {"data": base64.b64encode(b"x" * 10_000_000).decode(), "messageId": "1"},
         "subscription": "projects/p/subscriptions/s"},
        400,
        None,
    ),
    (
        "body-over-14-mib",  # more than a 10 MB Pub/Sub message, base64-encoded, can be
        {"content-type": "application/json"},
        b"{" + b" " * (14 * 1024 * 1024) + b"}",
        413,
        None,
    ),
]


@pytest.mark.parametrize(
    "id_, headers, body, status, outcome", REQUESTS, ids=[r[0] for r in REQUESTS]
)
def test_malformed_requests_are_refused_without_side_effects(
    id_, headers, body, status, outcome, bucket, settings
):
    named = bucket.client.lookup_bucket(OTHER) or bucket.client.create_bucket(OTHER)
    for left in named.list_blobs():  # by a case that failed before: each case sees its own
        left.delete()
    client = app_for(processor_for(settings, FakeEngine()))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers}
    response = client.post("/", data=data, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    if outcome:
        assert response.get_json()["status"] == outcome
    elif status == 400:
        assert response.get_json()["error"]  # the reason, for the dead-letter inspector
    assert not list(bucket.list_blobs()) and not list(named.list_blobs())


@pytest.mark.parametrize("job, folder, problem", [
    ({"operation": "upscale", "priority": 1}, "upscale", "job message has unknown field(s): priority"),
    ({}, "_none", "job message needs 'operation' (a string such as 'upscale')"),
    ({"operation": "upscale", "params": [1]}, "upscale", "job message 'params' must be an object"),
    ({"operation": "upscale", "output": "/tmp/x.png"}, "upscale", "job message 'output': expected a gs://"),
    ({"operation": "upscale", "generation": "12a"}, "upscale", "job message 'generation': generation must be"),
], ids=["unknown-field", "no-operation", "params-list", "output-not-gs", "bad-generation"])
def test_a_job_message_that_names_its_source_is_reported_for_what_else_is_wrong(job, folder, problem, bucket,
                                                                                 settings):
    """DESIGN.md: 400 only for a body that cannot be parsed at all. A job message naming its
    source in an allowed bucket gets a failure report there, as a bad upload does; outside the
    allowlist it is still refused unread (400 here: no dead-letter topic configured)."""
    bucket.blob("a.png").upload_from_string(png_bytes(), content_type="image/png")
    envelope = job_envelope({"source": f"gs://{bucket.name}/a.png", **job})
    engine = FakeEngine()
    allowed = processor_for(settings, engine, allowed_buckets=frozenset({bucket.name}))
    response = app_for(allowed).post("/", json=envelope)
    assert response.status_code == 200 and response.get_json()["status"] == "failed", response.get_json()
    report = json.loads(bucket.blob(f"failed/{folder}/a.png.json").download_as_bytes())
    assert report["error"]["type"] == "BadJobMessage" and report["error"]["message"].startswith(problem)
    assert engine.calls == 0 and not list(bucket.list_blobs(prefix="processed/"))
    refused = processor_for(settings, engine, allowed_buckets=frozenset({"partner-bucket"}))
    response = app_for(refused).post("/", json=envelope)
    assert response.status_code == 400 and "IMAGEN_ALLOWED_BUCKETS" in response.get_json()["error"]


def test_notification_for_a_deleted_object_is_skipped(bucket, settings):
    blob = bucket.blob(f"{RB}gone.png")
    blob.upload_from_string(png_bytes(), content_type="image/png")
    envelope = notification_envelope(blob)
    blob.delete()
    response = app_for(processor_for(settings, FakeEngine())).post("/", json=envelope)
    assert response.status_code == 200 and response.get_json()["status"] == "skipped"
    assert not list(bucket.list_blobs())


def test_refused_job_message_writes_nothing_to_the_foreign_bucket(gcs, bucket, settings):
    foreign = gcs.create_bucket(f"foreign-{uuid.uuid4().hex[:10]}")
    foreign.blob("secret.png").upload_from_string(png_bytes(), content_type="image/png")
    processor = processor_for(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    job = {"source": f"gs://{foreign.name}/secret.png", "operation": "upscale"}
    response = app_for(processor).post("/", json=job_envelope(job))
    # No bucket of ours to report in: 400, so the message ends in the dead-letter topic.
    assert response.status_code == 400 and "IMAGEN_ALLOWED_BUCKETS" in response.get_json()["error"]
    assert [b.name for b in foreign.list_blobs()] == ["secret.png"]


def test_job_message_naming_a_lone_surrogate_gets_a_report(bucket, settings):
    """Real object names are UTF-8; a forged job message's need not be. It must end in a
    report (under _unsafe/), not in a report that cannot be written and endless retries."""
    processor = processor_for(settings, FakeEngine(), allowed_buckets=frozenset({bucket.name}))
    job = {"source": f"gs://{bucket.name}/incoming/upscale/\udc80.png", "operation": "upscale"}
    response = app_for(processor).post(
        "/", data=json.dumps(job_envelope(job)), content_type="application/json"
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "failed"
    found = assert_within_layout(bucket, set())
    assert len(found["reports"]) == 1 and found["reports"][0].startswith("failed/upscale/_unsafe/")
