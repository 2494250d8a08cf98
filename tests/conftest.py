"""Fixtures shared by every test tier."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A model cache holding all four tiny models, at the commits the packaged lock pins.

    Built once per session through `imagen models pull --tiny`'s code and shared read-only:
    copy it (`copy_cache` in tests/models) before changing anything in it.
    """
    from image.models.lock import Lock
    from image.models.registry import REGISTRY
    from image.models.tiny import build_tiny

    cache = tmp_path_factory.mktemp("tiny-models")
    build_tiny(list(REGISTRY.values()), cache, lock=Lock.packaged())
    return cache
