"""Cold start: a fresh Python process, from its start until the model is ready on the device.

- stock: `python -c` that imports torch and diffusers, runs `from_pretrained` on the
  snapshot and `.to(device)` (what the anchor measured; no warm-up);
- imagen: `python -c` that builds an `Engine` for the operation and runs `Engine.setup()`
  (load through the production loader, tune, warm up): the moment `/readyz` would say 200.

Before each start the page cache is emptied, as `--drop-caches` says: `all` drops the whole
page cache (`/proc/sys/vm/drop_caches`, as root; libraries are read from disk again too, as
on a fresh instance), `weights` evicts only the snapshot's files (`posix_fadvise(DONTNEED)`,
no root needed, harmless on a shared machine), `none` keeps it warm. `all` falls back to
`weights` where it is not allowed; the table says what was done. The parent times from
`Popen` to the child's ready line.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench.cases import stock_kwargs
from bench.child import READY, time_child
from bench.compare import for_operation
from bench.configs import snapshot_of
from image.models.registry import REGISTRY


_STOCK = """
import time; started = time.perf_counter()
import json, resource, torch, diffusers
imported = time.perf_counter()
cls = getattr(diffusers, {pipeline!r})
pipe = cls.from_pretrained({snapshot!r}, dtype=getattr(torch, {dtype!r}), **{extra!r}).to({device!r})
if torch.cuda.is_available() and {device!r}.startswith("cuda"):
    torch.cuda.synchronize()
done = time.perf_counter()
print({ready!r} + json.dumps({{"import_seconds": imported - started, "setup_seconds": done - imported,
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}), flush=True)
"""

_IMAGEN = """
import time; started = time.perf_counter()
import json, resource
from image.engine import Engine
from image.models.lock import Lock
from image.operations.switches import Tuning
imported = time.perf_counter()
engine = Engine([{operation!r}], {cache!r}, device={device!r}, tuning={tuning}, lock=Lock())
engine.setup()
done = time.perf_counter()
op = engine._ops[{operation!r}]
print({ready!r} + json.dumps({{"import_seconds": imported - started, "setup_seconds": done - imported,
      "load_seconds": op.load_seconds, "warmup_seconds": op.warmup_seconds,
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}), flush=True)
"""


def stock_code(operation: str, cache_dir: Path, device: str, dtype: str) -> str:
    return _STOCK.format(pipeline=REGISTRY[operation].pipeline, snapshot=str(snapshot_of(operation, cache_dir)),
                         dtype=dtype, extra=stock_kwargs(operation), device=device, ready=READY)


def imagen_code(operation: str, cache_dir: Path, device: str, tuning) -> str:
    # The defaults go as None, as `imagen serve` passes them. Either way nothing imports
    # torch before Engine.setup starts reading the weights (the switches are torch-free).
    from image.operations.switches import Tuning

    default = tuning is not None and tuning == Tuning.for_device(device, operation)
    tuning_code = "None" if tuning is None or default else repr(tuning)
    return _IMAGEN.format(operation=operation, cache=str(cache_dir), device=device,
                          tuning=tuning_code, ready=READY)


def drop_page_cache(paths: list[Path], how: str = "weights") -> str:
    """Empty the page cache as `how` says (all, weights, none); returns what was done."""
    if how == "all":
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "dropped"
        except OSError:
            pass
    if how == "none":
        return "warm"
    evicted = False
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            evicted = True
        finally:
            os.close(fd)
    return "weights evicted" if evicted else "warm"


def run_cold(operations: list[str], cache_dir: Path, *, device: str, dtype: str, tuning,
             repeats: int = 1, target_seconds: float | None = None, drop_caches: str = "weights") -> list[dict]:
    """Cold start of each operation, stock then imagen, `repeats` times each (median kept)."""
    rows = []
    for operation in operations:
        snapshot = snapshot_of(operation, cache_dir)
        weights = [p.resolve() for p in snapshot.rglob("*") if p.suffix in (".safetensors", ".bin")]
        row = {"operation": operation, "target_seconds": target_seconds}
        for label, code in (("stock", stock_code(operation, cache_dir, device, dtype)),
                            ("imagen", imagen_code(operation, cache_dir, device,
                                                   for_operation(tuning, operation)))):
            times, phases = [], {}
            for _ in range(repeats):
                row["page_cache"] = drop_page_cache(weights, drop_caches)
                try:
                    seconds, phases = time_child(code)
                except RuntimeError as error:
                    row[f"{label}_error"] = str(error)[-500:]
                    break
                times.append(seconds)
            if times:
                row[f"{label}_seconds"] = round(statistics.median(times), 2)
                row[f"{label}_runs"] = [round(t, 2) for t in times]
                row[f"{label}_phases"] = {k: round(v, 2) for k, v in phases.items()}
        rows.append(row)
    return rows
