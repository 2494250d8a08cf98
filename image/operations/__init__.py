"""The operations imagen runs, one module each, looked up by name.

    get_operation("upscale")  # -> the Upscale class (imported on first use)

This package's own import is light (no torch): settings validation only needs the names.
"""

from __future__ import annotations

import importlib

from image.errors import UnknownOperation

OPERATION_NAMES = ("upscale", "enhance", "comic", "remove-background")

_CLASSES = {
    "upscale": ("image.operations.upscale", "Upscale"),
    "enhance": ("image.operations.enhance", "Enhance"),
    "comic": ("image.operations.comic", "Comic"),
    "remove-background": ("image.operations.remove_background", "RemoveBackground"),
}


def check_operation(name: str) -> None:
    """UnknownOperation, naming the valid ones, unless `name` is an operation; imports nothing
    (torch stays out of a process until its models load: image.engine.Engine.setup)."""
    try:
        _CLASSES[name]
    except (KeyError, TypeError):
        raise UnknownOperation(
            f"unknown operation {str(name)[:60]!r}; choose from {', '.join(OPERATION_NAMES)}"
        ) from None


def get_operation(name: str):
    """The `Operation` subclass for `name` (its module imported: torch and the model
    libraries); `UnknownOperation` names the valid ones."""
    check_operation(name)
    module_name, class_name = _CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)
