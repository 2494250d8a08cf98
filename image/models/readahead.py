"""Read weight files into the page cache in background threads: a cold start's head start.

    read_ahead(weight_files(snapshot))   # returns at once; threads read, one per file

Torch-free on purpose: `Engine.setup` starts it before torch, diffusers and transformers are
imported, so reading gigabytes of weights from a cold disk overlaps those imports and CUDA's
initialisation. A file is read once per process however often it is asked for. Nothing waits
for the threads: the loader reads the same files and finds them cached, or reads alongside.
Errors only cost the head start (the loader reports a broken file properly).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("imagen.models")

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHUNK = 16 << 20  # bytes per read
_started: set[Path] = set()
_lock = threading.Lock()


def weight_files(snapshot: Path) -> list[Path]:
    """The snapshot's weight files (resolved past the cache's links), largest first."""
    files = {path.resolve() for path in Path(snapshot).rglob("*") if path.suffix in WEIGHT_SUFFIXES}
    return sorted(files, key=lambda path: -path.stat().st_size)


def read_ahead(paths: Iterable[Path]) -> list[threading.Thread]:
    """Start one daemon thread per file not already being read; returns the new threads."""
    threads = []
    with _lock:
        for path in paths:
            if path in _started:
                continue
            _started.add(path)
            threads.append(threading.Thread(target=_read_file, args=(path,), daemon=True,
                                            name=f"read-ahead {path.name}"))
    for thread in threads:
        thread.start()
    return threads


def _read_file(path: Path) -> None:
    try:
        with open(path, "rb", buffering=0) as handle:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            buffer = bytearray(_CHUNK)
            while handle.readinto(buffer):
                pass
    except OSError as error:
        logger.debug("read-ahead of %s failed: %s", path, error)
