"""imagen's image work, with no cloud in it: usable from a notebook.

    from image import Engine, decode_image, encode_image, parse_chain, validate_params

    chain = parse_chain("remove-background,upscale")
    engine = Engine(chain, "~/.cache/imagen/models")
    engine.setup()
    image = decode_image(open("photo.jpg", "rb").read(), max_bytes=50_000_000, max_pixels=16_777_216)
    out = engine.run(chain, image, validate_params(chain, {"steps": 20}), seed=0)
    open("photo.png", "wb").write(encode_image(out, "png"))

Names are imported on first use, so `import image` does not load torch.
"""

from __future__ import annotations

import importlib

from image.operations import OPERATION_NAMES

_EXPORTS = {
    "Engine": "image.engine",
    "decode_image": "image.codec",
    "encode_image": "image.codec",
    "parse_chain": "image.params",
    "validate_params": "image.params",
    "resolve": "image.params",
    "resolve_common": "image.params",
    "canonical_json": "image.params",
    "default_seed": "image.params",
    "get_operation": "image.operations",
}

__all__ = ["OPERATION_NAMES", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'image' has no attribute {name!r}")
