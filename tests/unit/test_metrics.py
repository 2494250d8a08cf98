"""The metrics' `operation` label: bounded, whatever text job messages carry."""

from __future__ import annotations

import pytest

from handlers.metrics import operation_label


@pytest.mark.parametrize(("text", "label"), [
    ("upscale", "upscale"),
    ("remove-background, upscale", "remove-background,upscale"),  # as the chain runs
    (None, "none"),
    ("", "none"),
    ("upscale-v2", "invalid"),
    ("x" * 5000, "invalid"),
    ("upscale,upscale", "invalid"),
])
def test_operation_label(text, label):
    assert operation_label(text) == label
