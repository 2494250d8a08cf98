"""Model-test helpers: a private copy of the shared `tiny_cache` (tests/conftest.py), and offline mode."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest


@pytest.fixture
def copy_cache(tiny_cache, tmp_path) -> Path:
    """A private copy of `tiny_cache` that a test may break (snapshot links stay relative)."""
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy, symlinks=True)
    return copy


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while offline: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
