"""Job parameters: every one of them, with its type, range and default, in one table.

A job carries one flat mapping of parameters (the `imagen-params` metadata, a job message's
`params`, or `--param k=v` on the command line). A key applies to every operation of the
chain that accepts it; a key no operation of the chain accepts is an error, never ignored.

| key | applies to | type | range | default |
|---|---|---|---|---|
| `format` | every job | choice | png, webp, jpeg (`jpg` is read as jpeg) | png |
| `quality` | every job | int | 1..100 (webp and jpeg) | 90 |
| `seed` | every job | int | 0..2**32-1 | derived from the input bytes |
| `prompt` | upscale | str | up to 1000 chars | "high quality, detailed" |
| `prompt` | enhance | str | up to 1000 chars | "high quality, sharp focus, detailed" |
| `prompt` | comic | str | up to 1000 chars; "ghibli style" is prefixed when missing | "ghibli style" |
| `negative_prompt` | upscale | str | up to 1000 chars | "blurry, low quality, artifacts" |
| `negative_prompt` | enhance | str | up to 1000 chars | "blurry, low quality, artifacts, deformed" |
| `negative_prompt` | comic | str | up to 1000 chars | "blurry, low quality, deformed" |
| `steps` | upscale | int | 1..150 | 20 |
| `steps` | enhance, comic | int | 1..150 (steps x strength must reach 1) | 30 |
| `guidance` | upscale | float | 0..30 | 9.0 |
| `guidance` | enhance | float | 0..30 | 5.0 |
| `guidance` | comic | float | 0..30 | 7.5 |
| `strength` | enhance | float | 0 < s <= 1 | 0.3 |
| `strength` | comic | float | 0 < s <= 1 | 0.6 |
| `noise_level` | upscale | int | 0..350 | 20 |
| `mask_only` | remove-background | bool | true/false | false |
| `background` | remove-background | colour | "#rrggbb", "#rgb", "white", "rgb(1,2,3)"... | none (transparent) |

`mask_only` and `background` exclude each other.

Values are coerced strictly: an int parameter takes an int, an integral float (20.0) or a
decimal string ("20", as `--param steps=20` gives); a float takes a number or a numeric
string. Booleans are never numbers and numbers are never booleans; NaN, infinity, nested
objects and lists, and over-long values are refused with `InvalidParameter`, naming the key
and what it accepts.

    chain = parse_chain("remove-background,upscale")
    params = validate_params(chain, {"steps": "20", "format": "webp"})  # user-given, normalised
    canonical_json(params)        # '{"format":"webp","steps":20}' -> imagen-params metadata
    resolve("upscale", params)    # that operation's parameters with defaults filled in
    resolve_common(params, data)  # format, quality and seed (default seed from the bytes)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from image.errors import InvalidParameter, UnknownOperation
from image.operations import OPERATION_NAMES

MAX_TEXT_CHARS = 1000
SEED_MAX = 2**32 - 1
OUTPUT_FORMATS = ("png", "webp", "jpeg")  # kept equal to image.codec.OUTPUT_FORMATS by a test
COMIC_TRIGGER = "ghibli style"
_NUMBER_CHARS = 40  # longest numeric string accepted; Python ints beyond are a DoS vector
_INT_TEXT = re.compile(r"[+-]?[0-9]+")  # ASCII: \d takes any script's digits


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter's type and range. `kind` is int, float, str, bool, colour or choice."""

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    max_chars: int = MAX_TEXT_CHARS

    def describe(self) -> str:
        """What the parameter accepts, in words, for error messages."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return f"a string of at most {self.max_chars} characters"
        if self.kind == "colour":
            return 'a colour such as "#rrggbb", "#rgb", "white" or "rgb(255,255,255)"'
        low = "" if self.minimum is None else _fmt(self.minimum)
        high = "" if self.maximum is None else _fmt(self.maximum)
        kind = "a whole number" if self.kind == "int" else "a number"
        if self.exclusive_minimum:
            return f"{kind} with {low} < value <= {high}"
        return f"{kind} from {low} to {high}"


# -- the one table --------------------------------------------------------------------------

_TEXT = Param("str")
_STEPS = Param("int", 1, 150)
_GUIDANCE = Param("float", 0.0, 30.0)
_STRENGTH = Param("float", 0.0, 1.0, exclusive_minimum=True)

COMMON: dict[str, Param] = {
    "format": Param("choice", choices=OUTPUT_FORMATS),
    "quality": Param("int", 1, 100),
    "seed": Param("int", 0, SEED_MAX),
}
COMMON_DEFAULTS: dict[str, Any] = {"format": "png", "quality": 90}  # seed: default_seed(data)

OPERATION_PARAMS: dict[str, dict[str, Param]] = {
    "upscale": {
        "prompt": _TEXT,
        "negative_prompt": _TEXT,
        "steps": _STEPS,
        "guidance": _GUIDANCE,
        "noise_level": Param("int", 0, 350),  # the x4 upscaler's max_noise_level
    },
    "enhance": {
        "prompt": _TEXT,
        "negative_prompt": _TEXT,
        "steps": _STEPS,
        "strength": _STRENGTH,
        "guidance": _GUIDANCE,
    },
    "comic": {
        "prompt": _TEXT,
        "negative_prompt": _TEXT,
        "steps": _STEPS,
        "strength": _STRENGTH,
        "guidance": _GUIDANCE,
    },
    "remove-background": {
        "mask_only": Param("bool"),
        "background": Param("colour"),
    },
}

DEFAULTS: dict[str, dict[str, Any]] = {
    # 20 steps at guidance 9 and noise 20 is the usual production setting for the x4
    # upscaler (the model card's 75 steps cost 3.75x for little visible gain).
    "upscale": {
        "prompt": "high quality, detailed",
        "negative_prompt": "blurry, low quality, artifacts",
        "steps": 20,
        "guidance": 9.0,
        "noise_level": 20,
    },
    # The refiner at low strength sharpens and adds detail without changing the content.
    "enhance": {
        "prompt": "high quality, sharp focus, detailed",
        "negative_prompt": "blurry, low quality, artifacts, deformed",
        "steps": 30,
        "strength": 0.3,
        "guidance": 5.0,
    },
    # 0.6 restyles clearly while keeping the composition; 0.75 (the bench's anchor setting)
    # drifts away.
    "comic": {
        "prompt": COMIC_TRIGGER,
        "negative_prompt": "blurry, low quality, deformed",
        "steps": 30,
        "strength": 0.6,
        "guidance": 7.5,
    },
    "remove-background": {
        "mask_only": False,
        "background": None,
    },
}


# -- public functions -----------------------------------------------------------------------


def parse_chain(text: str) -> tuple[str, ...]:
    """"remove-background,upscale" -> ("remove-background", "upscale"), in order.

    Spaces around names are ignored; an empty chain, an empty segment or an unknown name
    raise `UnknownOperation` naming the valid operations; a name given twice raises
    `InvalidParameter`.
    """
    if not isinstance(text, str):
        raise UnknownOperation(f"the operation must be a string, got {type(text).__name__}")
    names = tuple(part.strip() for part in text.split(","))
    if not text.strip():
        raise UnknownOperation(f"no operation given; choose from {', '.join(OPERATION_NAMES)}")
    for name in names:
        if name not in OPERATION_NAMES:
            shown = repr(name[:60]) if name else "an empty name"
            raise UnknownOperation(
                f"unknown operation {shown} in {text[:200]!r}; "
                f"choose from {', '.join(OPERATION_NAMES)}"
            )
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidParameter(f"operation {name!r} appears twice in the chain {text!r}")
    return names


def validate_params(chain: tuple[str, ...] | list[str], raw: Mapping[str, object]) -> dict:
    """The user-given parameters for `chain`, type-checked and normalised (no defaults added).

    Raises `InvalidParameter` for a key no operation of the chain accepts, a value of the
    wrong type or out of range, or a combination an operation cannot run (steps x strength
    below one step, `mask_only` with `background`, or before another operation).
    """
    # 1. Check inputs
    if not isinstance(raw, Mapping):
        raise InvalidParameter(f"parameters must be a JSON object, got {type(raw).__name__}")
    for op in chain:
        if op not in OPERATION_PARAMS:
            raise UnknownOperation(
                f"unknown operation {op!r}; choose from {', '.join(OPERATION_NAMES)}"
            )

    # 2. Coerce each key against the table of the operations that take it
    accepted = dict(COMMON)
    for op in chain:
        accepted.update(OPERATION_PARAMS[op])
    result: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in accepted:
            raise InvalidParameter(
                f"unknown parameter {str(key)[:60]!r} for {','.join(chain)}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
        result[key] = _coerce(key, value, accepted[key])

    # 3. Check combinations per operation, with defaults filled in, and across the chain
    for op in chain:
        check_combination(op, resolve(op, result))
    if result.get("mask_only") and chain[-1] != "remove-background":
        raise InvalidParameter(
            f"mask_only gives a mask, so remove-background must end the chain ({','.join(chain)}): "
            "the operations after it would take the mask for a picture"
        )
    return result


def resolve(chain_op: str, validated: Mapping[str, Any]) -> dict[str, Any]:
    """`chain_op`'s own parameters: its defaults overlaid with the validated values.

    Common keys (format, quality, seed) are not included: see `resolve_common`.
    """
    if chain_op not in DEFAULTS:
        raise UnknownOperation(
            f"unknown operation {chain_op!r}; choose from {', '.join(OPERATION_NAMES)}"
        )
    params = dict(DEFAULTS[chain_op])
    params.update({k: v for k, v in validated.items() if k in OPERATION_PARAMS[chain_op]})
    return params


def resolve_common(validated: Mapping[str, Any], data: bytes) -> dict[str, Any]:
    """`format`, `quality` and `seed` for a job; the seed defaults to `default_seed(data)`."""
    common = dict(COMMON_DEFAULTS)
    common.update({k: v for k, v in validated.items() if k in COMMON})
    if "seed" not in common:
        common["seed"] = default_seed(data)
    return common


def canonical_json(params: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, ASCII only: equal parameters give equal strings."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# Image (and document) formats an output name may announce that imagen does not write: a
# result named so would be PNG (or WebP, JPEG) data under the wrong extension, which viewers
# and pipelines misread. Names with no extension, or another one (.out, .bin), take the format
# parameter.
_UNWRITTEN_EXTENSIONS = frozenset({
    "gif", "apng", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl", "jxr", "jp2", "j2k", "jpx", "ico", "icns",
    "svg", "pdf", "eps", "psd", "ppm", "pgm", "pbm", "pnm", "tga", "dds", "exr", "hdr", "dng", "raw", "cr2",
    "nef", "qoi", "pcx", "xbm", "xpm",
})
_NAMED_FORMATS = {"png": "png", "webp": "webp", "jpg": "jpeg", "jpeg": "jpeg", "jpe": "jpeg", "jfif": "jpeg"}


def output_format(name: str, given: str | None) -> str | None:
    """The format an output named `name` is written in, `given` being the validated format
    parameter (or None): the one its extension names (png, webp, jpeg), refused when the two
    disagree (a .png holding WebP data); else `given` (no extension, or one that is no image
    format). An image format imagen cannot write is refused."""
    base = name.rsplit("/", 1)[-1]
    extension = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    if extension in _UNWRITTEN_EXTENSIONS:
        raise InvalidParameter(f"output {base!r} names a .{extension} file, which imagen does not write: "
                               f"name it .png, .webp or .jpg")
    named = _NAMED_FORMATS.get(extension)
    if given and named and given != named:
        raise InvalidParameter(f"output {base!r} names a {named} file but the format parameter is {given}: "
                               f"make them agree, or leave the format to the name")
    return given or named


def default_seed(data: bytes) -> int:
    """A seed in 0..2**32-1 derived from the input bytes: reprocessing gives the same result."""
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big")


def comic_prompt(prompt: str) -> str:
    """The comic prompt with Ghibli-Diffusion's trigger words, prefixed when missing."""
    if COMIC_TRIGGER in prompt.lower():
        return prompt
    return f"{COMIC_TRIGGER}, {prompt}" if prompt.strip() else COMIC_TRIGGER


def check_combination(op: str, params: Mapping[str, Any]) -> None:
    """Rules across keys of one operation's resolved parameters."""
    if "strength" in params and "steps" in params:
        if int(params["steps"] * params["strength"]) < 1:
            raise InvalidParameter(
                f"{op}: steps x strength must be at least 1 denoising step, got "
                f"steps={params['steps']} x strength={params['strength']}; raise either"
            )
    if params.get("mask_only") and params.get("background") is not None:
        raise InvalidParameter(f"{op}: mask_only and background cannot be combined")


# -- coercion -------------------------------------------------------------------------------


def _coerce(key: str, value: object, param: Param) -> Any:
    def bad(why: str = "") -> InvalidParameter:
        return InvalidParameter(
            f"parameter {key!r}: {why or 'got ' + _short_repr(value)}; expected {param.describe()}"
        )

    if param.kind == "int":
        number = _as_int(value, bad)
        if number < param.minimum or number > param.maximum:
            raise bad(f"{number} is out of range" if abs(number) < 10**18 else "far out of range")
        return number
    if param.kind == "float":
        number = _as_float(value, bad)
        too_low = number <= param.minimum if param.exclusive_minimum else number < param.minimum
        if too_low or number > param.maximum:
            raise bad(f"{_fmt(number)} is out of range")
        return number
    if param.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
            return _BOOL_TEXT[value.strip().lower()]
        raise bad()
    if param.kind == "str":
        if not isinstance(value, str):
            raise bad(f"got {type(value).__name__}")
        if len(value) > param.max_chars:
            raise bad(f"{len(value)} characters is too long")
        if "\x00" in value:
            raise bad("contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, as JSON's "\ud800" gives: no tokenizer takes it
            raise bad("is not valid Unicode (a lone surrogate)") from None
        return value
    if param.kind == "choice":
        if isinstance(value, str):
            text = value.strip().lower()
            text = {"jpg": "jpeg"}.get(text, text)
            if text in param.choices:
                return text
        raise bad()
    if param.kind == "colour":
        return _as_colour(value, bad)
    raise AssertionError(f"unknown parameter kind {param.kind!r}")  # a bug in the table


_BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _as_int(value: object, bad) -> int:
    if isinstance(value, bool):
        raise bad("a boolean is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise bad()
    if isinstance(value, str) and len(value) <= _NUMBER_CHARS:
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text)
        try:
            number = _decimal(text)
        except ValueError:
            raise bad() from None
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise bad()


def _as_float(value: object, bad) -> float:
    if isinstance(value, bool):
        raise bad("a boolean is not a number")
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise bad()
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str) and len(value) <= _NUMBER_CHARS:
        try:
            number = _decimal(value.strip())
        except ValueError:
            raise bad() from None
    else:
        raise bad()
    if not math.isfinite(number):
        raise bad()
    return number + 0.0  # -0.0 is 0.0: equal parameters give one canonical form


def _decimal(text: str) -> float:
    """`float(text)` for ASCII decimal text only (Python also reads "１２", "٣" and "1_0")."""
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    return float(text)


def _as_colour(value: object, bad) -> str:
    from PIL import ImageColor

    if not isinstance(value, str) or len(value) > 64:
        raise bad()
    try:
        rgb = ImageColor.getrgb(value.strip())
    except ValueError:
        raise bad() from None
    if not all(0 <= channel <= 255 for channel in rgb):  # Pillow passes rgb(999,0,0) through
        raise bad()
    if len(rgb) == 4 and rgb[3] != 255:
        raise bad("a background cannot be transparent")
    return "#{:02x}{:02x}{:02x}".format(*rgb[:3])


def _short_repr(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return "a very large number"
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fmt(number: float) -> str:
    if abs(number) >= 1e15:  # 1e308 as 1e+308, not 309 digits
        return f"{float(number):g}"
    return str(int(number)) if float(number).is_integer() else repr(float(number))
