"""Compiled kernels shared between processes: torch.compile's caches as one artefact per
operation, model revision, switches, GPU and PyTorch version, in a store every instance reads.

    cache = DirectoryCache("/var/cache/imagen/compiled")     # or handlers' Cloud Storage one
    Engine(["comic"], cache_dir, compile_cache=cache).setup()

Before an operation compiles its model it loads the artefact named for it, if the store has
one (`torch.compiler.load_cache_artifacts`): Inductor then finds the kernels it generated
before and skips code generation, and Dynamo only traces (seconds instead of 50-80 s of CPU
per model). After compiling it stores what it made, unless the store has it already: the
first instance on a kind of GPU compiles, every later one loads. A store that fails costs
only that: a warning, and the compile runs as without one. Torch is imported only by the
functions that need it (a store is built before the engine imports torch).

An artefact holds code that the loading process runs: a store must be writable only by the
workers themselves (Terraform grants each worker its own operation's folder, nothing else).

The name changes with everything the kernels depend on, so a stale artefact is never loaded
for the wrong model: `comic/torch-2.11.0+cu130/nvidia-h200-sm90/<digest>.bin`, the digest
over the model revision, the dtype and the switches that change the compiled graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("imagen.operations")

_NOT_IN_THE_GRAPH = frozenset({"read_ahead", "direct_to_device", "background_compile"})
"""Switches that change how a model loads or when it compiles, not what is compiled."""


class CompileCache(Protocol):
    """Where the artefacts live: `get` a name's bytes (None: not there), `put` them (False:
    one was there already, kept). `str()` names the place for the log."""

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, data: bytes) -> bool: ...


class DirectoryCache:
    """Artefacts as files under `root` (a volume shared by the instances, or a local disk)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def get(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def put(self, name: str, data: bytes) -> bool:
        path = self.root / name
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: another instance may be reading the folder meanwhile.
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.chmod(partial, 0o644)  # readable by the other instances' users
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return True


def artefact_name(operation: str, model_id: str, dtype: torch.dtype, tuning, device: torch.device) -> str:
    """The artefact's name for this operation, model, switches, device and PyTorch."""
    import torch

    switches = {k: v for k, v in tuning.as_dict().items() if k not in _NOT_IN_THE_GRAPH}
    identity = json.dumps([model_id, str(dtype), switches], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{operation}/torch-{torch.__version__}/{device_tag(device)}/{digest}.bin"


def device_tag(device: torch.device) -> str:
    """"nvidia-h200-sm90" for a GPU (Inductor's kernels are per GPU model), "cpu" otherwise."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"{name}-sm{major}{minor}"


def load(cache: CompileCache | None, name: str, operation: str) -> bool:
    """Load the artefact `name` from `cache` into this process's compile caches; True when
    loaded. Any failure (missing store, network, an artefact from another build) is a warning."""
    import torch

    if cache is None:
        return False
    try:
        data = cache.get(name)
        if data is None:
            logger.info("%s: no compiled artefact in %s yet; compiling from scratch", operation, cache)
            return False
        if torch.compiler.load_cache_artifacts(data) is None:  # PyTorch could not read it
            logger.warning("%s: the compiled artefact %s in %s is unreadable here, compiling from scratch",
                           operation, name, cache)
            return False
    except Exception as error:  # noqa: BLE001 - a head start only: compiling works without it
        logger.warning("%s: loading the compiled artefact %s from %s failed, compiling from scratch: %s: %s",
                       operation, name, cache, type(error).__name__, error)
        return False
    logger.info("%s: compiled artefact loaded from %s (%s, %.1f MB)", operation, cache, name, len(data) / 1e6)
    return True


def save(cache: CompileCache | None, name: str, operation: str) -> bool:
    """Store what this process compiled as `name`, unless `cache` has it; True when stored."""
    import torch

    if cache is None:
        return False
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        stored = cache.put(name, saved[0])
    except Exception as error:  # noqa: BLE001 - the compiled model is in use regardless
        logger.warning("%s: storing the compiled artefact %s in %s failed: %s: %s",
                       operation, name, cache, type(error).__name__, error)
        return False
    if stored:
        logger.info("%s: compiled artefact stored in %s (%s, %.1f MB)", operation, cache, name, len(saved[0]) / 1e6)
    return stored


def inductor_counts() -> dict[str, int]:
    """Inductor's cache hits and misses so far in this process (what a loaded artefact saved)."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"hits": inductor["fxgraph_cache_hit"], "misses": inductor["fxgraph_cache_miss"]}
