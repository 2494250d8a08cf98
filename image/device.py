"""Which device and precision the models run on.

`auto` takes the GPU in fp16 when CUDA is present, else the CPU in fp32 (fp16 on the CPU is
slow and poorly supported). `cuda` without a GPU is a start-up error, not a silent fallback:
a GPU service that quietly runs on the CPU would look healthy and be 100x slower.
"""

from __future__ import annotations

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
            raise ModelError(
                f"device {name!r} was asked for but CUDA is not available on this machine "
                "(no GPU or no CUDA build of torch); use device 'auto' or 'cpu'"
            )
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
