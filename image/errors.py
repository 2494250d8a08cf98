"""Exceptions raised by image work.

    ImagenError                 base of every error imagen raises on purpose
    ├── InputError              the job's input is at fault: retrying cannot help
    │   ├── ImageDecodeError    not an image, truncated, or an unsupported format
    │   ├── ImageTooLarge       more bytes than allowed
    │   ├── DecompressionBomb   more pixels than allowed (checked before decoding)
    │   ├── InvalidParameter    a parameter is unknown, of the wrong type or out of range
    │   ├── UnknownOperation    an operation name that does not exist
    │   └── JobTooLong          the job's GPU work ran past its time budget (a retry would too)
    └── ModelError              the models on this machine are at fault
        ├── ModelMissing        a model is not in the cache (names the command that fixes it)
        ├── OutOfDeviceMemory   the job ran out of GPU memory here (retried: elsewhere or later
        │                       it may fit)
        └── DeviceFailed        the GPU failed in a way this process cannot recover from (a
                                CUDA error other than out of memory): the process must restart

`handlers.errors` adds the cloud-side failures to the same tree.
"""

from __future__ import annotations


class ImagenError(Exception):
    """Base class: `str(error)` is a sentence a user can act on."""


class InputError(ImagenError):
    """Permanent: the same input will fail the same way every time."""


class ImageDecodeError(InputError):
    pass


class ImageTooLarge(InputError):
    pass


class DecompressionBomb(InputError):
    pass


class InvalidParameter(InputError):
    pass


class UnknownOperation(InputError):
    pass


class JobTooLong(InputError):
    pass


class Withdrawn(ImagenError):
    """The job was called off before it got the device (its process is stopping): nothing
    ran, and it should go back to where it came from to run elsewhere."""


class ModelError(ImagenError):
    pass


class ModelMissing(ModelError):
    pass


class OutOfDeviceMemory(ModelError):
    """The job ran out of GPU memory on this instance: retried like a fault of the instance
    (another instance, or this one later, may have the memory free) and reported once the
    attempts run out; `compiling`: a background compile was holding memory meanwhile."""

    def __init__(self, message: str, compiling: bool = False) -> None:
        super().__init__(message)
        self.compiling = compiling


class DeviceFailed(ModelError):
    """A CUDA error other than out of memory ("an illegal memory access was encountered",
    "unspecified launch failure", a device-side assert): the CUDA context of this process is
    unusable from then on, so every later job here would fail too. The engine stops taking
    jobs (`Engine.state` DEVICE_FAILED); the service reports itself unhealthy and the worker
    exits, so the platform starts a fresh process, and the job is retried elsewhere.
    `ran`: False for a job refused because the GPU had failed in an earlier one (it waited for
    the device meanwhile): it never touched the GPU, so it is no suspect."""

    def __init__(self, message: str, ran: bool = True) -> None:
        super().__init__(message)
        self.ran = ran
