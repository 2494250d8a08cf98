"""Timing and peak memory of one callable: warm-up runs, then the median of timed runs.

On CUDA each run is timed with CUDA events between two `torch.cuda.synchronize()` calls
(device time, no queued work left over), and the peak is `torch.cuda.max_memory_allocated`
over the timed runs (weights included, as the anchor measured it). That figure leaves out a
CUDA graph's memory pool: the activations a replayed graph writes were allocated at capture
and are "reserved", not "allocated", during a replay. So the peak of
`torch.cuda.max_memory_reserved` is kept too (what the process holds from the GPU: the
graph pool, and the allocator's cached blocks, for both paths), and the size of the private
pools after the runs (`graph_pool_bytes`: CUDA graphs' memory, which the allocator cannot give
to anything else while the graphs live; the rest of reserved less allocated is cache it frees
and retries with before it reports out of memory). On the CPU runs are timed with
`time.perf_counter` and there are no peak figures (None).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Timing:
    """Seconds per run (each timed run, and their median) and peak bytes (None on the CPU)."""

    seconds: float
    runs: list[float]
    peak_bytes: int | None
    reserved_bytes: int | None = None
    pool_bytes: int | None = None  # the private (CUDA graph) pools' size after the timed runs


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> tuple[Timing, object]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; returns the timing and
    the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(max(1, repeats)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(device)
            runs.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            result = fn()
            runs.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) if cuda else None
    pool = graph_pool_bytes(device) if cuda else None
    return Timing(statistics.median(runs), runs, peak, reserved, pool), result


def graph_pool_bytes(device: torch.device) -> int | None:
    """Bytes of `device`'s memory held by private pools (the ones CUDA graphs capture into):
    the segments not in the default pool, whose id is (0, 0). A pool does not shrink while a
    graph in it lives, and a replay allocates nothing, so after the runs this is its peak.
    None where the allocator's snapshot cannot be read (the timings stand without it)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        segments = torch.cuda.memory_snapshot()
        return sum(segment["total_size"] for segment in segments if segment.get("device", index) == index
                   and tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0))
    except (RuntimeError, KeyError, TypeError):
        return None


def free(device: torch.device, *, compiled: bool = False) -> None:
    """Release what the last model held, so the next one's peak is its own. `compiled`: its
    compiled code too (Dynamo's caches can hold a model's parameters alive), once the model is
    gone; not while it still runs (its compiled code, its background compile)."""
    if compiled:
        import torch._dynamo

        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def profile(fn: Callable[[], object], device: torch.device, path) -> str:
    """Run `fn` once under torch.profiler and write its top operators by self device time
    (CPU time on the CPU) to `path`; returns the table. On CUDA the top operators by self
    CPU time follow: where the host spends its time while the device may wait for it
    (copies to the host, synchronisations, each operator's launch work; Python between
    operators shows only as the gap between this table's total and the run's)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    table = None
    for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=key, row_limit=30)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    table = table or averages.table(row_limit=30)
    if cuda:
        try:
            host = averages.table(sort_by="self_cpu_time_total", row_limit=30)
            table += "\n\nBy self CPU time (the host's side of the same run):\n" + host
        except (AttributeError, KeyError, ValueError):
            pass
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(table + "\n")
    return table
