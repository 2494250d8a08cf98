"""Compiled kernels shared between processes: torch.compile's caches as one artefact per
operation, model revision, switches, GPU and PyTorch version, in a store every instance reads.

    cache = DirectoryCache("/var/cache/imagen/compiled")     # or handlers' Cloud Storage one
    Engine(["comic"], cache_dir, compile_cache=cache).setup()

Before an operation compiles its model it loads the artefact named for it, if the store has
one (`torch.compiler.load_cache_artifacts`): Inductor then finds the kernels it generated
before and skips code generation, and Dynamo only traces (on an H200, comic's time until
compiled went from 74 s to 26 s). After compiling it stores what it made, unless the store
has it already or everything came from the artefact: the first instance on a kind of GPU
compiles, every later one loads. Each operation's compile records its artefacts apart (one
operation's artefact holds no other's kernels). A store that fails costs only that: a
warning, and the compile runs as without one. Torch is imported only by the functions that
need it (a store is built before the engine imports torch).

An artefact holds code that the loading process runs: a store must be writable only by the
workers themselves (Terraform grants each worker its own operation's folder, nothing else).

The name changes with everything the kernels depend on, so a stale artefact is never loaded
for the wrong model: `comic/torch-2.11.0+cu130/nvidia-h200-sm90/<digest>.bin`, the digest
over the model revision, the dtype, the switches that change the compiled graph, the
diffusers and Triton versions and imagen's operations code (a release that changes how a
model is set up gets new artefacts; artefacts are never replaced).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

from image.files import write_atomically

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("imagen.operations")

_NOT_IN_THE_GRAPH = frozenset({"read_ahead", "direct_to_device", "background_compile", "host_timesteps",
                               "prompt_cache"})
"""Switches that change how a model loads, when it compiles or what runs around it (the
scheduler's step, the text encoder), not what is compiled."""


class CompileCache(Protocol):
    """Where the artefacts live: `has` a name, `get` its bytes (None: not there), `put` them
    (False: one was there already, kept). `str()` names the place for the log."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, data: bytes) -> bool: ...


class DirectoryCache:
    """Artefacts as files under `root` (a volume shared by the instances, or a local disk)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def get(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def put(self, name: str, data: bytes) -> bool:
        path = self.root / name
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)  # another instance may be reading the folder meanwhile
        return True


def artefact_name(operation: str, model_id: str, dtype: torch.dtype, tuning, device: torch.device) -> str:
    """The artefact's name for this operation, model, switches, device and PyTorch."""
    import torch

    switches = {k: v for k, v in tuning.as_dict().items() if k not in _NOT_IN_THE_GRAPH}
    identity = json.dumps([model_id, str(dtype), switches, _versions()], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{operation}/torch-{torch.__version__}/{device_tag(device)}/{digest}.bin"


@functools.cache
def _versions() -> dict[str, str | None]:
    """What else the compiled kernels depend on: diffusers (the model code), Triton (the
    kernels' compiler) and imagen's operations code (how models are set up and compiled)."""
    found = {}
    for package in ("diffusers", "triton"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    found["imagen-operations"] = code.hexdigest()[:16]
    return found


def device_tag(device: torch.device) -> str:
    """"nvidia-h200-sm90" for a GPU (Inductor's kernels are per GPU model), "cpu" otherwise."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"{name}-sm{major}{minor}"


class CompileSession:
    """One operation's compile, inside `with`: its artefact loaded first (if `cache` has it),
    what it compiled stored after (unless everything came from the artefact, or the store
    has one already), and its artefacts recorded apart from any other operation's.

        with CompileSession(cache, name, "comic") as session:
            ...                                   # the first calls of the compiled model
        logger.info("compiled (%s)", session.describe())

    An exception inside, or `discard()` (a part that failed and was caught), stores nothing:
    a store keeps the first artefact of a name for good, so a partial one would stay. Compiles
    must not overlap (they do not: the warm-ups run one after another, the background compiles
    one at a time).
    """

    def __init__(self, cache: CompileCache | None, name: str, operation: str) -> None:
        self.cache, self.name, self.operation = cache, name, operation
        self.loaded = False
        self.counts: dict[str, int] | None = None  # Inductor graphs: hits and misses inside
        self.discarded = False
        self._apart = contextlib.ExitStack()

    def __enter__(self) -> Self:
        self._apart.enter_context(_artefacts_apart())
        self.loaded = load(self.cache, self.name, self.operation)
        self._before = inductor_counts()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.counts = self._since_start()
            if kind is None and not self.discarded and (self.counts["misses"] or not self.loaded):
                save(self.cache, self.name, self.operation)
        finally:
            self._apart.close()

    def discard(self) -> None:
        """Store nothing at the end: part of the compile failed."""
        self.discarded = True

    def _since_start(self) -> dict[str, int]:
        now = inductor_counts()
        return {key: now[key] - self._before[key] for key in now}

    def describe(self) -> str:
        """"Inductor graphs: 3 from the cache, 0 compiled", for the log."""
        counts = self.counts or self._since_start()
        return f"Inductor graphs: {counts['hits']} from the cache, {counts['misses']} compiled"


def _artefacts_apart():
    """PyTorch records every compile artefact of the process for save_cache_artifacts; this
    keeps one operation's apart. CacheArtifactManager is PyTorch's internal: where it lacks
    this, artefacts accumulate (harmless: one operation's artefact also holds the earlier ones)."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        return CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


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
        if cache.has(name):
            return False
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
