"""Which device and precision the models run on.

`auto` takes the GPU in fp16 when CUDA is present, else the CPU in fp32 (fp16 on the CPU is
slow and poorly supported). `cuda` without a GPU is a start-up error, not a silent fallback:
a GPU service that quietly runs on the CPU would look healthy and be 100x slower.

`out_of_memory(error)` tells a GPU out of memory apart from other failures, in the forms the
CUDA libraries raise it besides PyTorch's own; `device_failure(error)` finds the CUDA errors
after which the process's CUDA context is unusable.
"""

from __future__ import annotations

import re

import torch

from image.errors import ModelError

DEVICE_NAMES = ("auto", "cuda", "cpu")


def resolve_device(name: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for "auto", "cuda" (or "cuda:N") or "cpu"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu"), torch.float32
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {name!r} was asked for but CUDA is not available here: {_why_no_cuda()}")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ModelError(f"device {name!r} is not a valid CUDA device name") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return device, torch.float16
    raise ModelError(f"device {name!r} is not one of {', '.join(DEVICE_NAMES)}")


def _why_no_cuda() -> str:
    """Why torch sees no GPU, and what to do: a CPU build of torch, or CUDA that would not
    start (no GPU attached, or one that failed: restarting on the same GPU does not help)."""
    if torch.version.cuda is None:
        return "this torch is a CPU build; use device 'auto' or 'cpu', or install torch's CUDA build"
    try:
        torch.cuda.init()
        reason = "no CUDA device found"
    except Exception as error:  # torch's own words: no driver, no device, a driver or GPU fault
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"CUDA did not start ({reason}): no GPU attached, or a failed GPU or driver (on GKE, a restart "
            "lands on the same GPU: cordon the node and delete the pod); use device 'auto' or 'cpu' to run "
            "without one")


# The first line of an error that says the GPU ran out of memory, besides PyTorch's own
# OutOfMemoryError: a CUDA call's "CUDA error: out of memory", a CUDA library that could not
# allocate its workspace (cuBLAS, cuDNN, cuFFT, cuSOLVER, cuRAND).
_OUT_OF_MEMORY = re.compile(r"out of memory|_ALLOC_FAILED|_ALLOCATION_FAILED", re.IGNORECASE)


def out_of_memory(error: BaseException) -> str | None:
    """What says the device ran out of memory (a first line, at most 300 characters), found in
    `error` or an error it was raised from (its `__cause__`, a compiler's `inner_exception`:
    Dynamo and Inductor wrap what failed inside them); None when none does. Not `__context__`:
    an error raised while an out-of-memory one was being handled is a failure of its own. Only
    a first line counts, so a wrapper's message that quotes the failure further down is looked
    through."""
    for current, first in _causes(error):
        if isinstance(current, torch.OutOfMemoryError):
            return first or "out of memory"
        if isinstance(current, RuntimeError) and _OUT_OF_MEMORY.search(first):
            return first
    return None


def _causes(error: BaseException):
    """`error` and the errors it was raised from, each with its first line."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        lines = str(current).strip().splitlines()
        yield current, lines[0][:300] if lines else ""
        pending += [current.__cause__, getattr(current, "inner_exception", None)]


# The first line of a CUDA error after which the process's CUDA context is unusable (CUDA's
# "sticky" errors: every later call fails too), as PyTorch words them ("CUDA error: an illegal
# memory access was encountered") and as cuBLAS and cuDNN report a kernel that failed after
# one. Other CUDA errors (an invalid launch configuration for a huge tensor) leave the
# context usable and stay failures of their job.
_DEVICE_FAILED = re.compile(
    r"illegal memory access|unspecified launch failure|device-side assert|misaligned address|"
    r"illegal instruction|hardware stack error|invalid program counter|invalid address space|"
    r"launch timed out|uncorrectable ECC|_STATUS_EXECUTION_FAILED|CUDA error: unknown error",
    re.IGNORECASE)


def device_failure(error: BaseException) -> str | None:
    """What says the GPU failed for good in this process (a first line, at most 300
    characters), found as `out_of_memory` looks; None for out of memory and anything else."""
    if out_of_memory(error) is not None:
        return None
    for current, first in _causes(error):
        if isinstance(current, RuntimeError) and _DEVICE_FAILED.search(first):
            return first
    return None
