"""`host_timesteps`: the scheduler's step reads each timestep from a CPU copy of the schedule.

diffusers' pipelines put the schedule on the device (`set_timesteps(device=...)`) and hand each
step a 0-d device tensor. DDIM (the x4 upscaler's) and PNDM (comic's) then index their CPU
`alphas_cumprod` with it and test `prev_timestep >= 0`: each a device-to-host read that waits
for everything queued before it, the UNet call included (the upscaler's step does six). So the
GPU idles at every step while Python runs the rest of the step, the loop's bookkeeping and the
next UNet call's launch. Given the same timestep as a CPU tensor, the step computes the same
values (it indexed the CPU table and got a CPU value before too) without waiting, and Python
runs ahead of the GPU.

The step finds which timestep it was given without reading it: the pipeline iterates over
`scheduler.timesteps` (or a slice of it, img2img), so its timestep is a view of the same
storage, at the offset of its index. Anything else (a timestep the pipeline made itself, a
schedule set again behind the wrapper's back) goes to the step as it came: stock behaviour.
The copy itself is one read of the device per pipeline call (an upscale tile, an image).

With the GPU behind, the per-step deadline check (`Operation.step_check`) runs when Python
reaches that step, up to one pipeline call's remaining steps before the GPU does (a tile of
upscale, a whole comic image); the output's copy to the host waits for them, and upscale's
pace check between tiles (`Operation.tile_check`) still sees the GPU's pace.
"""

from __future__ import annotations

import functools

import torch

SCHEDULERS = ("DDIMScheduler", "PNDMScheduler")
"""Schedulers whose step reads the timestep only to index a CPU table and compare it. Euler
(enhance) steps by a Python index over CPU sigmas: nothing to take out; DDPM searches the
device schedule for the timestep (`nonzero`) however it comes."""


class HostTimesteps:
    """Wraps one scheduler instance's `set_timesteps` and `step`; see the module docstring.
    The wrappers keep the wrapped methods' signatures: pipelines pass `eta` and `generator`
    only to a step whose signature names them."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.copy: tuple[torch.Tensor, torch.Tensor] | None = None  # (the device schedule, on the CPU)
        set_timesteps, self.step = scheduler.set_timesteps, scheduler.step

        @functools.wraps(set_timesteps)
        def set_timesteps_and_copy(*args, **kwargs):
            result = set_timesteps(*args, **kwargs)
            timesteps = self.scheduler.timesteps
            is_schedule = isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1
            # A copy on the CPU side even of a CPU schedule (the tests follow which one the step gets)
            self.copy = (timesteps, timesteps.to("cpu", copy=True)) if is_schedule else None
            return result

        @functools.wraps(self.step)
        def step_on_host(model_output, timestep, *args, **kwargs):
            host = self.host_timestep(timestep)
            return self.step(model_output, timestep if host is None else host, *args, **kwargs)

        step_on_host.host_timesteps = self
        scheduler.set_timesteps, scheduler.step = set_timesteps_and_copy, step_on_host

    def host_timestep(self, timestep) -> torch.Tensor | None:
        """The CPU copy of `timestep`, when it is an element of the schedule copied; else None."""
        if self.copy is None:
            return None
        schedule, on_host = self.copy
        if (self.scheduler.timesteps is not schedule or not isinstance(timestep, torch.Tensor) or timestep.dim() != 0
                or timestep.device != schedule.device or timestep.dtype != schedule.dtype):
            return None
        if timestep.untyped_storage().data_ptr() != schedule.untyped_storage().data_ptr():
            return None
        index, stride = timestep.storage_offset() - schedule.storage_offset(), schedule.stride(0)
        if stride <= 0 or index % stride or not 0 <= index // stride < len(on_host):
            return None
        return on_host[index // stride]


def host_timesteps(pipe) -> list[str]:
    """`host_timesteps` on `pipe.scheduler` where its class is one of SCHEDULERS."""
    scheduler = getattr(pipe, "scheduler", None)
    if type(scheduler).__name__ not in SCHEDULERS or hasattr(scheduler.step, "host_timesteps"):
        return []  # another scheduler, or wrapped already
    HostTimesteps(scheduler)
    return ["host_timesteps"]
