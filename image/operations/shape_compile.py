"""A forward compiled for the input shapes its warm-up saw, and eager for any other.

The `compile_vae` switch puts the VAE's decoder and encoder forwards behind one of these:

    vae.decoder.forward = ShapeCompiled(vae.decoder.forward)   # records while warming up
    ... the warm-up decodes one latent per shape it wants compiled ...
    vae.decoder.forward.stop_recording()
    vae.decoder.forward.adopt(torch.compile(vae.decoder.forward.forward, dynamic=False), lock)

`torch.compile` with fixed shapes compiles again for every new input shape, and a compile
takes tens of seconds: in a request's path that is a stalled job. Here a call takes the
compiled function only for a signature (shapes, strides, dtypes, devices, other values) that
was compiled; anything else (an image size the warm-up did not see) runs eagerly, as
graphs.GraphedForward does with its captured shapes. Upscale's signatures are its tile
buckets, img2img's the native size its CUDA warm-up runs.

`adopt` compiles by calling the compiled function once per recorded signature on copies of the
warm-up's arguments, outside `lock`, so calls go on eagerly meanwhile (image/operations/
tuning.py runs it in the background compile's thread), then swaps it in holding `lock`. Calls
outside inference mode always run eagerly: the compile was made under it, and Dynamo would
compile again for them (the operations run every job under it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from image.operations.graphs import SCALARS, no_captures


def signature(args: tuple, kwargs: dict) -> tuple | None:
    """What a fixed-shape compile guards on, for the arguments of one call; None for
    arguments it cannot key (objects other than tensors and plain values)."""
    leaves, spec = tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
        elif isinstance(leaf, SCALARS):
            key.append((type(leaf), leaf))
        else:
            return None
    return str(spec), tuple(key)


class ShapeCompiled:
    """`forward`, compiled for the signatures recorded before `stop_recording` once `adopt`
    has compiled them, eager otherwise; see the module docstring."""

    def __init__(self, forward: Callable[..., Any], max_shapes: int = 4) -> None:
        self.forward = forward
        self.max_shapes = max_shapes
        self.recording = True
        self.examples: dict[tuple, tuple[tuple, dict]] = {}
        self._compiled: tuple[Callable[..., Any] | None, frozenset] = (None, frozenset())

    def __call__(self, *args, **kwargs):
        key = signature(args, kwargs)
        compiled, keys = self._compiled  # one read: `adopt` swaps both at once
        if compiled is not None and key in keys and torch.is_inference_mode_enabled():
            return compiled(*args, **kwargs)
        if self.recording and key is not None and key not in self.examples and len(self.examples) < self.max_shapes:
            self.examples[key] = tree_map(_copy, (args, kwargs))
        return self.forward(*args, **kwargs)

    def stop_recording(self) -> None:
        """No more signatures: what was recorded is what `adopt` compiles."""
        self.recording = False

    @property
    def compiled_shapes(self) -> int:
        return len(self._compiled[1])

    def adopt(self, compiled: Callable[..., Any], lock=None) -> int:
        """Compile `compiled` (a torch.compile of `forward`) for every recorded signature by
        calling it on the recorded arguments, outside `lock`, then route those signatures to
        it holding `lock`; returns how many. Under inference mode, as the operations run. An
        exception leaves the eager forward in place. On CUDA, as GraphedForward.adopt: graph
        captures wait meanwhile (compiling synchronises the device), the calls run on a stream
        of their own beside the jobs' work, and the memory it cached is returned after the
        swap, while no job runs."""
        self.stop_recording()
        examples = dict(self.examples)
        device = _cuda_device(examples.values())
        with torch.inference_mode(), no_captures() if device else contextlib.nullcontext(), _side_stream(device):
            for args, kwargs in examples.values():
                compiled(*args, **kwargs)
        with lock if lock is not None else contextlib.nullcontext():
            self._compiled = (compiled, frozenset(examples))
            if device is not None:
                torch.cuda.empty_cache()
        self.examples.clear()  # the copies are not needed any more
        return len(examples)


def _cuda_device(arguments) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among `arguments`, if any."""
    for leaf in tree_flatten(list(arguments))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            return leaf.device
    return None


@contextlib.contextmanager
def _side_stream(device: torch.device | None):
    """On `device` (CUDA), a stream of its own, waited for before returning; else nothing."""
    if device is None:
        yield
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    side.synchronize()


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
