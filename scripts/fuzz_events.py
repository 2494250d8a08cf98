"""Fuzz the event parsers: `python -m scripts.fuzz_events [--inputs 100000] [--seed 0]`.

Hypothesis generates requests and messages near the real shapes (the golden files under
tests/golden/, with fields dropped, added, retyped or made hostile), plus arbitrary JSON and
bytes; each is cut and bit-flipped into several inputs. Every input goes the whole way a worker
takes it:

    push body      -> parse_push_envelope -> parse_message -> route -> output/failure location
    pulled message -> parse_message                        -> route -> output/failure location
    CloudEvent     -> is_cloudevent, parse_cloudevent      -> route -> output/failure location

and must end in `EventError` or in an event whose routing never raises anything but
`InputError` for the output and always gives a failure report location that is safe to write.
Any other exception is a crash: the script stops, prints the input, and exits 1.
`tests/reliability/test_fuzz_events.py` runs 3,000 inputs in `make test`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from handlers.errors import EventError
from handlers.events import (
    JobRequest,
    Message,
    ObjectEvent,
    is_cloudevent,
    parse_cloudevent,
    parse_message,
    parse_push_envelope,
)
from handlers.routing import (
    Ignored,
    Layout,
    check_safe_name,
    failure_location,
    output_location,
    route_event,
    route_request,
)
from image.errors import InputError

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
LAYOUT = Layout()
CHAINS = ("upscale", "remove-background", "remove-background,upscale")


@dataclasses.dataclass(frozen=True)
class ParserInput:
    """One input: a push body, a pulled message, or a CloudEvent (headers + body)."""

    kind: str  # "push", "message" or "cloudevent"
    body: bytes = b""
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Crash(AssertionError):
    """A parser or the routing after it raised something other than its own error."""


# -- the check every input goes through -----------------------------------------------------


def check(entry: ParserInput) -> str:
    """Run `entry` the whole way; returns "rejected", "ignored" or "routed". Raises Crash."""
    try:
        if entry.kind == "push":
            event = parse_message(parse_push_envelope(entry.body))
        elif entry.kind == "message":
            event = parse_message(Message(entry.body, entry.attributes))
        else:
            is_cloudevent(entry.headers)
            event, _, _ = parse_cloudevent(entry.headers, entry.body)
    except EventError as error:
        if not isinstance(error.reason, str) or not error.reason:
            raise Crash(f"EventError without a reason for {entry!r}") from error
        return "rejected"
    except Exception as error:
        raise Crash(f"{type(error).__name__}: {error} for {entry!r}") from error
    try:
        return _check_routing(event)
    except Crash:
        raise
    except Exception as error:
        raise Crash(f"routing {event!r}: {type(error).__name__}: {error}") from error


def _check_routing(event: ObjectEvent | JobRequest) -> str:
    _check_fields(event)
    if isinstance(event, ObjectEvent):
        job = route_event(event, LAYOUT)
        if isinstance(job, Ignored):
            return "ignored"
    else:
        job = route_request(event, LAYOUT)
    for chain in CHAINS:
        try:
            bucket, name = output_location(job, LAYOUT, chain, "png")
        except InputError:
            pass
        else:
            check_safe_name(name)
            if (bucket, name) == (job.bucket, job.name):
                raise Crash(f"output equals the input for {job!r}")
    bucket, name = failure_location(job, LAYOUT)
    check_safe_name(name)
    name.encode("utf-8")  # strict: Cloud Storage names are UTF-8
    if bucket != job.bucket or not name.startswith(LAYOUT.failed_prefix):
        raise Crash(f"failure report gs://{bucket}/{name} outside the layout for {job!r}")
    return "routed"


def _check_fields(event: ObjectEvent | JobRequest) -> None:
    if not (
        isinstance(event.bucket, str)
        and event.bucket
        and isinstance(event.name, str)
        and event.name
    ):
        raise Crash(f"event without a bucket or name: {event!r}")
    if event.generation is not None and not (
        event.generation.isascii() and event.generation.isdigit()
    ):
        raise Crash(f"generation {event.generation!r} is not a number")
    if isinstance(event, ObjectEvent):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in event.metadata.items()):
            raise Crash(f"metadata is not a map of strings: {event!r}")
        if event.size is not None and not isinstance(event.size, int):
            raise Crash(f"size is not an int: {event!r}")


# -- strategies ------------------------------------------------------------------------------

_odd_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(categories=["Cc", "Cs", "Zl", "Zp", "Cf"]), max_size=8),
)
_object_names = st.builds(
    str.__add__,
    st.sampled_from(
        ["incoming/upscale/", "incoming/remove-background/", "incoming/", "uploads/", ""]
    ),
    _odd_text,
)
_hostile_text = st.one_of(
    _odd_text,
    _object_names,
    st.builds("gs://{}/{}".format, st.sampled_from(["b", "imagen-demo", ""]), _object_names),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "/",
            "//",
            "incoming/",
            "incoming/upscale/",
            "incoming/upscale/../../x.png",
            "processed/upscale/a.png",
            "failed/upscale/a.png.json",
            "a\nb",
            "%2F",
            "#",
            "?",
            "\x00",
            "gs://",
            "gs://b",
            "gs://b/",
            "gs:///o",
            "gs://b/o",
            "NaN",
            "-1",
            "1e400",
            "٣",
            "²",
            "\ud800",
            "incoming/upscale/" + "a" * 1100,
            "OBJECT_FINALIZE",
            "JSON_API_V1",
            "NONE",
            "google.cloud.storage.object.v1.finalized",
            "1.0",
            "application/json",
        ]
    ),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _hostile_text,
)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)


def _shapes(keep) -> list[dict]:
    """The golden inputs for which `keep(input)` is true."""
    inputs = [json.loads(path.read_text())["input"] for path in sorted(GOLDEN.glob("*.json"))]
    return [shape for shape in inputs if keep(shape)]


@st.composite
def _mutated(draw, value: Any, rate: int | None = None) -> Any:
    """`value` with keys dropped, added or replaced by hostile values, at any depth; `rate` is
    the percentage of values touched (drawn once per input when not given)."""
    if rate is None:
        rate = draw(st.sampled_from((0, 3, 10, 30, 60)))
    touch = lambda: draw(st.integers(0, 99)) < rate
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            if not touch():
                out[key] = draw(_mutated(child, rate)) if isinstance(child, (dict, list)) else child
                continue
            action = draw(st.sampled_from(("drop", "replace", "retype")))
            if action == "replace":
                out[key] = draw(_hostile_text)
            elif action == "retype":
                out[key] = draw(json_values)
        if touch():
            out[draw(_hostile_text)] = draw(json_values)
        return out
    if isinstance(value, list):
        return [draw(_mutated(child, rate)) for child in value]
    if touch():
        return draw(st.one_of(_hostile_text, json_values))
    return value


# Field-aware values: mostly plausible, sometimes hostile, so inputs get past the first checks
# and reach the routing with odd names, generations, sizes and operations.
def _mostly(plausible: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """`plausible` four times in five, else `hostile`."""
    return st.integers(0, 4).flatmap(lambda i: hostile if i == 0 else plausible)


_long_text = st.builds(
    str.__mul__, st.sampled_from(["a", "é", "/", "\ud800", "upscale,"]), st.integers(0, 1500)
)
_buckets = _mostly(st.sampled_from(["b", "imagen-demo"]), st.one_of(_hostile_text, json_values))
_names = _mostly(
    st.one_of(_object_names, _object_names.map(lambda n: n + ".png")),
    st.one_of(_long_text, json_values),
)
_numbers = _mostly(
    st.one_of(st.integers(0, 2**64).map(str), st.integers(0, 2**64), st.none()),
    st.one_of(
        st.integers(-(2**64), -1),
        _hostile_text,
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
    ),
)
_operations = _mostly(
    st.sampled_from(
        ["upscale", "comic", "remove-background,upscale", " upscale ", "upscale,upscale"]
    ),
    st.one_of(_hostile_text, _long_text, json_values),
)
_metadata = _mostly(
    st.fixed_dictionaries(
        {},
        optional={
            "imagen-operation": _operations,
            "imagen-params": st.one_of(_hostile_text, json_values),
            "imagen-source": _hostile_text,
            "imagen-source-generation": _numbers,
        },
    ),
    json_values,
)


def _sometimes(draw, fields: dict[str, st.SearchStrategy]) -> dict:
    """Each field present with its strategy's value, or (1 time in 16) left out."""
    return {key: draw(value) for key, value in fields.items() if draw(st.integers(0, 15))}


@st.composite
def _resources(draw) -> dict:
    """A Cloud Storage object resource (JSON_API_V1 payload, CloudEvent data)."""
    return _sometimes(
        draw,
        {
            "bucket": _buckets,
            "name": _names,
            "generation": _numbers,
            "metadata": _metadata,
            "size": _numbers,
            "contentType": st.one_of(st.just("image/png"), json_values),
        },
    )


@st.composite
def _structured_inputs(draw) -> ParserInput:
    kind = draw(st.sampled_from(("notification", "job", "push", "cloudevent")))
    resource = draw(_resources())
    attributes = {
        "eventType": draw(
            st.sampled_from(["OBJECT_FINALIZE", "OBJECT_DELETE", "X"]) | _hostile_text
        ),
        "payloadFormat": draw(st.sampled_from(["JSON_API_V1", "NONE"]) | _hostile_text),
        "bucketId": draw(_hostile_text),
        "objectId": draw(_hostile_text),
        "objectGeneration": draw(_hostile_text),
    }
    attributes = {k: v for k, v in attributes.items() if draw(st.integers(0, 5))}
    if kind == "notification":
        return ParserInput("message", _dumps(resource), attributes)
    job = _sometimes(
        draw,
        {
            "source": _mostly(st.builds("gs://{}/{}".format, _buckets, _names), _hostile_text),
            "operation": _operations,
            "params": _mostly(st.just({}), json_values),
            "output": _mostly(st.none(), _hostile_text),
            "generation": _numbers,
        },
    )
    if kind == "job":
        return ParserInput("message", _dumps(job))
    if kind == "push":
        data, attrs = draw(st.sampled_from([(resource, attributes), (job, {})]))
        message = {"data": _b64(_dumps(data)), "attributes": attrs, "messageId": draw(json_values)}
        envelope = {"message": message, "subscription": "s", "deliveryAttempt": draw(_numbers)}
        return ParserInput(
            "push", _dumps(_sometimes(draw, {k: st.just(v) for k, v in envelope.items()}))
        )
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "1",
        "ce-source": "//storage.googleapis.com/b",
        "ce-type": draw(
            st.sampled_from(
                [
                    "google.cloud.storage.object.v1.finalized",
                    "google.cloud.storage.object.v1.deleted",
                    "google.cloud.storage.object.v1.",
                    "other",
                ]
            )
        ),
        "content-type": "application/json",
    }
    headers = {k: v for k, v in headers.items() if draw(st.integers(0, 7))}
    return ParserInput("cloudevent", _dumps(resource), headers=headers)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def _push_inputs(draw, shapes: st.SearchStrategy[dict]) -> ParserInput:
    envelope = json.loads(json.dumps(draw(shapes)))
    message = envelope["message"]
    if "data" in message and draw(st.booleans()):  # mutate the payload, re-encoded as base64
        payload = json.loads(base64.b64decode(message["data"]))
        message["data"] = _b64(_dumps(draw(_mutated(payload))))
    if draw(st.booleans()):
        message["attributes"] = draw(_mutated(message.get("attributes", {})))
    return ParserInput("push", _dumps(draw(_mutated(envelope))))


@st.composite
def _message_inputs(draw, shapes: st.SearchStrategy[dict]) -> ParserInput:
    shape = draw(shapes)
    attributes = draw(_mutated(shape["attributes"]))
    attributes = (
        {str(k): str(v) for k, v in attributes.items()} if isinstance(attributes, dict) else {}
    )
    if draw(st.integers(0, 3)) == 0:
        attributes.update(
            draw(
                st.dictionaries(
                    st.sampled_from(
                        ["eventType", "payloadFormat", "bucketId", "objectId", "objectGeneration"]
                    ),
                    _hostile_text,
                    max_size=5,
                )
            )
        )
    data = (
        draw(_mutated(json.loads(shape["data"]))) if draw(st.integers(0, 4)) else draw(json_values)
    )
    return ParserInput("message", _dumps(data), attributes)


@st.composite
def _cloudevent_inputs(draw, shapes: st.SearchStrategy[dict]) -> ParserInput:
    shape = draw(shapes)
    headers = draw(_mutated(shape["headers"]))
    # HTTP header names and values are printable text: the web server refuses anything else.
    headers = {
        str(k): str(v) for k, v in headers.items() if str(k).isprintable() and str(v).isprintable()
    }
    return ParserInput("cloudevent", _dumps(draw(_mutated(shape["body"]))), headers=headers)


@st.composite
def _raw_inputs(draw) -> ParserInput:
    kind = draw(st.sampled_from(("push", "message", "cloudevent")))
    body = draw(st.one_of(st.binary(max_size=64), json_values.map(_dumps)))
    headers = {
        "content-type": draw(st.sampled_from(["application/json", "application/cloudevents+json"]))
    }
    if draw(st.booleans()):
        headers["ce-specversion"] = draw(_hostile_text)
    return ParserInput(kind, body, headers=headers)


def parser_inputs() -> st.SearchStrategy[ParserInput]:
    """Inputs near the real shapes, and arbitrary ones."""
    push = _shapes(lambda shape: "message" in shape)
    pulled = _shapes(lambda shape: "data" in shape and "message" not in shape)
    cloudevents = _shapes(lambda shape: "headers" in shape)
    return st.one_of(
        _push_inputs(st.sampled_from(push)),
        _message_inputs(st.sampled_from(pulled)),
        _cloudevent_inputs(st.sampled_from(cloudevents)),
        _structured_inputs(),
        _structured_inputs(),
        _raw_inputs(),
    )


def variants(entry: ParserInput, cuts: list[int], flips: list[int]) -> list[ParserInput]:
    """`entry`, plus copies of it cut short and with single bytes flipped."""
    out = [entry]
    body = entry.body
    for cut in cuts:
        if body:
            out.append(dataclasses.replace(entry, body=body[: cut % len(body)]))
    for flip in flips:
        if body:
            position = flip % len(body)
            changed = bytes([body[position] ^ (1 << (flip % 8))])
            out.append(
                dataclasses.replace(entry, body=body[:position] + changed + body[position + 1 :])
            )
    return out


# -- the loop --------------------------------------------------------------------------------


def run(inputs: int = 100_000, *, random_seed: int = 0, per_example: int = 4) -> dict[str, int]:
    """Feed at least `inputs` inputs; returns counts by result. Raises Crash on the first crash."""
    counts = {"inputs": 0, "rejected": 0, "ignored": 0, "routed": 0}
    cut_flip = st.lists(st.integers(0, 2**16), min_size=per_example // 2, max_size=per_example // 2)

    @seed(random_seed)
    @settings(
        max_examples=max(1, -(-inputs // per_example)),
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(parser_inputs(), cut_flip, cut_flip)
    def fuzz(entry, cuts, flips):
        for variant in variants(entry, cuts, flips):
            counts[check(variant)] += 1
            counts["inputs"] += 1

    fuzz()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz imagen's event parsers.")
    parser.add_argument(
        "--inputs", type=int, default=100_000, help="at least this many (default 100000)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        counts = run(args.inputs, random_seed=args.seed)
    except Crash as crash:
        print(f"CRASH: {crash}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    print(
        f"fuzzed {counts['inputs']:,} parser inputs in {seconds:.1f} s "
        f"({counts['inputs'] / seconds:,.0f}/s): {counts['rejected']:,} rejected (EventError), "
        f"{counts['ignored']:,} ignored, {counts['routed']:,} routed; 0 crashes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
