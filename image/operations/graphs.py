"""CUDA graphs for a model's forward: capture once per input shape, then replay every step.

A diffusion UNet at batch 2 is small work for an H100/H200 but a thousand kernel launches
from Python; per step the GPU waits on the CPU more than it computes. A CUDA graph records
those launches once and replays them with one call, so a step costs what the GPU takes.

    unet.forward = GraphedForward(unet.forward)     # what the `cuda_graphs` switch does

How it keeps the model's function:

- one graph per *signature*: the shapes, dtypes and devices of the tensor arguments and the
  values of the others (None, flags). A new signature (a new image size, a new tile bucket)
  is captured on its first call: two eager runs on a side stream (cuBLAS and cuDNN pick their
  kernels and workspaces), then the capture. Calls outside `torch.inference_mode()` (the
  graph's tensors are inference tensors), whose tensors are not all on CUDA, or that come
  while another capture runs go through eagerly;
- the arguments are copied into the graph's own input tensors before each replay, and the
  output is copied out after it, so nothing a caller holds is overwritten by the next step
  (schedulers keep past outputs);
- the live graphs of the process share one memory pool, so shapes and models do not each keep
  their own activations; it is safe because replays never overlap (the engine runs one job
  at a time) and each replay's output is copied out before any other graph runs. A pool
  never shrinks while one of its graphs lives: `adopt` releases a model's graphs before
  capturing their replacements, so where they were the process's only ones their pool goes
  back to the device and the new ones start another;
- at most `max_graphs` signatures are captured; later ones run eagerly (many distinct image
  sizes would otherwise pile up graphs). A capture that fails (an operation that cannot be
  captured) marks its signature eager, logs once, and the call runs eagerly. One capture at a
  time per process: a call that finds another under way runs eagerly and captures later;
  captures use CUDA's thread-local mode (other threads' allocations do not spoil them);
- `adopt(compiled, lock)` swaps a faster forward (torch.compile's) into the captured
  signatures while the model keeps serving: it compiles outside `lock`, then captures again
  and swaps holding it (the `background_compile` switch, image/operations/tuning.py).

The parameters must not move or change after the first capture (the graph holds their
addresses): the switch is applied last, after every other one.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from image.device import out_of_memory

logger = logging.getLogger("imagen.operations")

SCALARS = (type(None), bool, int, float, str)  # plain values a signature keys by value
_pool = None  # the graph memory pool the live graphs share
_live: weakref.WeakSet = weakref.WeakSet()  # the captured graphs still alive
_capturing = threading.Lock()  # one capture at a time in the process (CUDA graphs allow no more)
_broken = False  # a failed capture left CUDA unusable for captures: eager from then on


def _shared_pool():
    """The live graphs' pool; a new one once they are all gone. PyTorch retires a pool when
    its last graph dies, and capturing into a retired pool fails an internal assertion that
    also leaves the CUDA generator mid-capture (each later random draw then fails). Only a
    process that drops its models (the bench, tests) gets here twice."""
    global _pool
    if _pool is None or not _live:
        _pool = torch.cuda.graph_pool_handle()
    return _pool


class GraphedForward:
    """`forward` with CUDA-graph replay per signature; see the module docstring."""

    def __init__(self, forward: Callable[..., Any], *, max_graphs: int = 8, warmup_runs: int = 2):
        self.forward = forward
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.graphs: dict[tuple, _Graph] = {}
        self.eager_signatures: set[tuple] = set()
        self.adopted: Callable[..., Any] | None = None  # the forward `adopt` swapped in

    def __call__(self, *args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return self.forward(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = signature(leaves, spec)
        if key is None or key in self.eager_signatures:
            return self.forward(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs or _broken or torch.cuda.is_current_stream_capturing():
                return self.forward(*args, **kwargs)
            if not _capturing.acquire(blocking=False):
                return self.forward(*args, **kwargs)  # a background compile: captured later
            try:
                graph = self._capture(key, leaves, spec, self.forward)
            except Exception as error:  # noqa: BLE001 - any capture failure: run this shape eagerly
                # The text, not the error: a log record that holds it (a queued handler, a test's
                # capture) would hold the failed frames and their device memory.
                logger.warning("CUDA graph capture failed, running this shape eagerly: %s", str(error))
                self.eager_signatures.add(key)
            finally:
                _capturing.release()
            if graph is None:
                # Past the handler, so what the failed capture held (an out-of-memory one
                # included) is released before the eager run needs the memory.
                return self.forward(*args, **kwargs)
            self.graphs[key] = graph
            logger.debug("captured a CUDA graph for %s (%d in all)", _describe(key), len(self.graphs))
        return graph.replay(leaves)

    def adopt(self, forward: Callable[..., Any], lock) -> int:
        """Capture every graph again with `forward`, the same function with other kernels (a
        compiled one), and replay those from then on; returns how many. Safe while the model
        serves from another thread that holds `lock` around its calls. The whole time it holds
        the process's capture lock: no other capture starts (new signatures run eagerly and
        are captured later), since one capture per process is all CUDA graphs allow and
        compiling synchronises the device.

        1. `forward` runs once per captured signature on a side stream, outside `lock`: this
           is where torch.compile compiles, for as long as it takes, while calls go on
           replaying the old graphs;
        2. holding `lock` (no call in flight anywhere), the old graphs are released first
           (their memory is the new ones': never both at once), then each signature is captured
           again (a recompile here fails instead of compiling inside the capture) and the set
           swapped in, and the allocator's cache is emptied. Where no other model has graphs,
           their pool dies with them and goes back to the device whole (a pool never shrinks
           while one of its graphs lives), and the new ones start a pool of their own. A failed
           capture raises after capturing the signatures again with the original forward,
           in the memory the failure freed (one that fails again is captured at its next call).

        Signatures first seen later are captured with the original forward.
        """
        with _capturing, torch.inference_mode():
            compiled = dict(self.graphs)
            side = torch.cuda.Stream()
            for graph in compiled.values():
                args, kwargs = tree_unflatten(graph.input_copies(), graph.spec)
                side.wait_stream(torch.cuda.current_stream())  # the copies are made there
                with torch.cuda.stream(side):
                    forward(*args, **kwargs)
                side.synchronize()
            with lock, torch.compiler.set_stance("fail_on_recompile"):
                signatures = [(key, graph.input_copies(), graph.spec) for key, graph in compiled.items()]
                self.graphs, graph = {}, None
                compiled.clear()  # the old graphs die here, under the lock
                torch.cuda.synchronize()
                # Their pool where it was theirs alone, and what compiling cached (blocks of the
                # side streams it ran on, which the jobs' stream never reuses), as
                # ShapeCompiled.adopt does, go back to the device before the captures.
                torch.cuda.empty_cache()
                adopted, failure = {}, None
                try:
                    for key, leaves, spec in signatures:
                        adopted[key] = self._capture(key, leaves, spec, forward)
                except Exception as error:
                    # Without its frames, which hold the failed capture's memory, and without
                    # what it did capture: room for the uncompiled graphs again.
                    failure = error.with_traceback(None)
                    adopted.clear()
                if failure is not None:
                    self.graphs = self._capture_each(signatures, self.forward)
                    raise failure
                self.graphs, self.adopted = adopted, forward
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return len(signatures)

    def _capture_each(self, signatures: list, forward) -> dict:
        """The graphs of `signatures` ((key, leaves, spec) each) that capture; one that fails is
        left to be captured at its next call (none once CUDA is left unusable for captures)."""
        graphs = {}
        for key, leaves, spec in signatures:
            if _broken:
                break
            try:
                graphs[key] = self._capture(key, leaves, spec, forward)
            except Exception as error:  # noqa: BLE001 - as in __call__: that shape waits for its next call
                logger.warning("CUDA graph capture failed again, capturing at the next call: %s", str(error))
        return graphs

    def _capture(self, key: tuple, leaves: list, spec, forward) -> _Graph:
        inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = tree_unflatten(inputs, spec)
        stream = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(self.warmup_runs):
                    forward(*args, **kwargs)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls other threads make meanwhile (another operation's job, a
            # background compile) do not invalidate this capture.
            with torch.cuda.graph(graph, pool=_shared_pool(), capture_error_mode="thread_local"):
                output = forward(*args, **kwargs)
        except BaseException:
            # A failed capture can leave the capture stream current: put the caller's back.
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize()
            _check_after_failed_capture()
            raise
        captured = _Graph(graph, inputs, spec, *tree_flatten(output))
        _live.add(captured)
        return captured


def _check_after_failed_capture() -> None:
    """Some capture failures leave CUDA's default generator mid-capture (PyTorch unwinds only
    part of it): every later random draw on it then fails. Say so, and capture no more in
    this process (the jobs' own generators still work, eagerly)."""
    global _broken
    try:
        torch.empty(1, device="cuda").normal_()
        torch.cuda.synchronize()
    except RuntimeError as error:
        if out_of_memory(error):
            return  # the device is full (the capture may have run out too), not left mid-capture
        _broken = True
        logger.error("a failed CUDA graph capture left CUDA in a bad state (%s); no more graphs in this "
                     "process: restart it to get them back", error)


class _Graph:
    """One captured graph, its input tensors and its output structure."""

    def __init__(self, graph, inputs: list, spec, outputs: list, output_spec) -> None:
        self.graph, self.inputs, self.spec = graph, inputs, spec
        self.outputs, self.output_spec = outputs, output_spec

    def input_copies(self) -> list:
        """Copies of the input leaves, as the capture saw them (for capturing again)."""
        return [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in self.inputs]

    def replay(self, leaves: list):
        for static, value in zip(self.inputs, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        self.graph.replay()
        out = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in self.outputs]
        return tree_unflatten(out, self.output_spec)


def no_captures():
    """Held while something else compiles on the device (shape_compile.ShapeCompiled.adopt):
    compiling synchronises the device, which a capture under way cannot survive. A model
    call that finds it held runs eagerly and captures later, as during `adopt`."""
    return _capturing


def signature(leaves: list, spec) -> tuple | None:
    """What a graph is captured for: tensor shapes, dtypes and devices, the other values.

    None when the call cannot be replayed from a graph: a tensor off CUDA or needing
    gradients, or an argument that is neither a tensor nor a plain value.
    """
    key = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cuda" or leaf.requires_grad:
                return None
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        elif isinstance(leaf, SCALARS):
            key.append((type(leaf).__name__, leaf))
        else:
            return None
    return tuple(key)


def _describe(key: tuple) -> str:
    shapes = [item[0] for item in key[1:] if isinstance(item[0], tuple)]
    return " ".join("x".join(map(str, shape)) or "scalar" for shape in shapes)


def graph_module(module: torch.nn.Module, **options) -> GraphedForward:
    """Route `module`'s forward through CUDA graphs (in place); returns the wrapper."""
    graphed = GraphedForward(module.forward, **options)
    module.forward = graphed
    return graphed
