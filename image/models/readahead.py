"""Read files into the page cache from a pool of threads: a cold start's head start.

    read_ahead(library_files())          # the shared libraries and sources torch and diffusers import
    read_ahead(weight_files(snapshot))   # then the weights; both return at once

Torch-free on purpose: `Engine.setup` starts it before torch, diffusers and transformers are
imported. On a cold disk those imports page their libraries in a few kilobytes at a time, and
the weights follow one file per stream; here 16 threads read the same bytes in 32 MiB chunks,
libraries first (the imports need them first), so the disk works at its parallel throughput
while Python imports and CUDA initialises. Each file is queued once per process. Nothing
waits for the threads: the imports and the loader read the same files and find them cached,
or read alongside. Errors only cost the head start (the loader reports a broken file).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("imagen.models")

WEIGHT_SUFFIXES = (".safetensors", ".bin")
THREADS = 16
CHUNK = 32 << 20  # bytes per read task

LIBRARY_PACKAGES = ("torch", "nvidia", "diffusers", "transformers", "safetensors", "tokenizers",
                    "huggingface_hub", "numpy", "PIL")
"""What `Engine.setup` imports on its way to a loaded pipeline: their shared libraries and
Python sources (bytecode caches included) are read ahead of the import."""

_LIBRARY_SUFFIXES = (".so", ".py", ".pyc")
_SELDOM_USED = frozenset({"cusparse", "cusparselt", "cufft", "cusolver", "curand", "nccl", "nvshmem", "cufile",
                          "cuda_cupti", "nvtx", "include", "bin", "test", "tests", "testing", "_vendor"})
"""Folders not read ahead: CUDA libraries torch links but a diffusion pipeline hardly calls
(the loader maps a few pages of each), headers, tools and test suites."""

_LIBRARIES, _WEIGHTS = 0, 1  # queue priorities: libraries first
_queued: set[Path] = set()
_lock = threading.Lock()
_tasks: queue.PriorityQueue = queue.PriorityQueue()
_order = itertools.count()
_workers: list[threading.Thread] = []


def weight_files(snapshot: Path) -> list[Path]:
    """The snapshot's weight files (resolved past the cache's links), largest first."""
    files = {path.resolve() for path in Path(snapshot).rglob("*") if path.suffix in WEIGHT_SUFFIXES}
    return sorted(files, key=lambda path: -path.stat().st_size)


def library_files(packages: Iterable[str] = LIBRARY_PACKAGES, skip: frozenset = _SELDOM_USED) -> list[Path]:
    """The installed packages' shared libraries and Python files, found without importing
    them, outside folders named in `skip`; shared libraries first, then sources. Missing
    packages are skipped."""
    libraries, sources = [], []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder, subfolders, names in os.walk(root):
                subfolders[:] = [sub for sub in subfolders if sub not in skip]
                for file in names:
                    if file.endswith(_LIBRARY_SUFFIXES) or ".so." in file:
                        path = Path(folder, file)
                        (sources if file.endswith((".py", ".pyc")) else libraries).append(path)
    return libraries + sources


def read_ahead(paths: Iterable[Path], *, libraries: bool = False) -> list[Path]:
    """Queue the files not queued before (libraries ahead of weights) and start the readers;
    returns the files queued now."""
    priority = _LIBRARIES if libraries else _WEIGHTS
    queued = []
    with _lock:
        for path in paths:
            if path in _queued:
                continue
            _queued.add(path)
            queued.append(path)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            for offset in range(0, max(size, 1), CHUNK):
                _tasks.put((priority, next(_order), path, offset))
        while queued and len(_workers) < THREADS:
            worker = threading.Thread(target=_read_chunks, daemon=True, name=f"read-ahead-{len(_workers)}")
            _workers.append(worker)
            worker.start()
    return queued


def wait(timeout: float | None = None) -> bool:
    """Block until everything queued so far has been read (tests and the bench); True when done."""
    done = threading.Event()

    def join():
        _tasks.join()
        done.set()

    threading.Thread(target=join, daemon=True).start()
    return done.wait(timeout)


def _read_chunks() -> None:
    buffer = bytearray(min(CHUNK, 4 << 20))
    while True:
        _, _, path, offset = _tasks.get()
        try:
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                left = CHUNK
                while left > 0:
                    read = handle.readinto(memoryview(buffer)[: min(left, len(buffer))])
                    if not read:
                        break
                    left -= read
        except OSError as error:
            logger.debug("read-ahead of %s failed: %s", path, error)
        finally:
            _tasks.task_done()
