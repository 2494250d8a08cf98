"""The engine: the operations one process serves, set up once, run one job at a time.

This is the seam between the cloud side and the models (cog's predictor):

    engine = Engine(["remove-background", "upscale"], cache_dir, device="auto")
    engine.setup()                       # load + warm up each model once; state -> READY
    params = validate_params(chain, raw)
    out = engine.run(chain, image, params, seed=resolve_common(params, data)["seed"])
    engine.model_id(chain)               # "briaai/RMBG-1.4@<commit>,stabilityai/...@<commit>"

`tuning` (image/operations/switches.py) sets the speed switches: None takes each operation's
defaults for the device, a Tuning applies to every operation; `tuning_changes` ("NAME=VALUE"
items, IMAGEN_TUNING) are applied on top. `lock` is the model lock to load by (the packaged
one by default). `compile_cache` (image/operations/compile_cache.py; IMAGEN_COMPILE_CACHE) is
where compiled kernels are shared with other processes, for the operations that compile.

One model instance per operation per process. `setup` is idempotent and thread-safe (a
failed setup may be retried); `run` is serialised, since all operations share one device.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image

from image.codec import check_encodable
from image.deadline import Deadline
from image.fair_lock import FairLock
from image.errors import (
    DeviceFailed,
    ImagenError,
    InvalidParameter,
    ModelError,
    OutOfDeviceMemory,
    UnknownOperation,
    Withdrawn,
)
from image.operations import OPERATION_NAMES, check_operation, get_operation
from image.operations.switches import Tuning, parse_changes
from image.params import COMMON_DEFAULTS, parse_chain, resolve, validate_params

logger = logging.getLogger("imagen.engine")

STARTING, READY, SETUP_FAILED = "STARTING", "READY", "SETUP_FAILED"
DEVICE_FAILED = "DEVICE_FAILED"  # a CUDA error this process cannot recover from: restart it
WITHDRAWN_POLL_SECONDS = 1.0
"""How often a job waiting for the device asks whether it was handed back (`Engine.run`)."""
SWAP_SECONDS = 60.0
"""A background compile's budget for holding the device while it swaps the compiled model in
(the captures of at most eight graphs; seconds): past it, with the watchdog's grace, the GPU
is taken to be hung, as for a job."""


class Engine:
    """Operations loaded on one device; see the module docstring."""

    def __init__(
        self,
        operations: Sequence[str],
        cache_dir: Path,
        *,
        device: str = "auto",
        allow_download: bool = False,
        tuning=None,
        lock=None,
        tuning_changes: Sequence[str] = (),
        compile_cache=None,
    ):
        if isinstance(operations, str):
            operations = parse_chain(operations)
        for name in operations:
            # UnknownOperation before anything loads; nothing imported: setup reads the
            # weights ahead before torch and the model libraries are (a cold start's longest part).
            check_operation(name)
        self.operations: tuple[str, ...] = tuple(dict.fromkeys(operations))
        if not self.operations:
            raise UnknownOperation(f"no operation given; choose from {', '.join(OPERATION_NAMES)}")
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.allow_download = allow_download
        self.tuning = tuning
        self.tuning_changes = tuple(tuning_changes)
        if self.tuning_changes:  # a typo fails here, before anything loads
            try:
                parse_changes(Tuning(), self.tuning_changes)
            except ValueError as error:
                raise InvalidParameter(f"tuning: {error}") from None
        self.lock = lock
        self.compile_cache = compile_cache
        self.state = STARTING
        self.error: BaseException | None = None  # why setup failed
        self.setup_seconds: dict[str, float] = {}  # per operation: load + warm-up
        self._ops: dict = {}
        self._setup_lock = threading.Lock()
        self._run_lock = FairLock()  # jobs take the device in the order they asked for it
        # The job holding the device: when it started there, its budget, its chain, and the
        # context it runs in (its caller's context variables: what its log lines carry).
        self._busy: tuple[float, float | None, tuple[str, ...], contextvars.Context] | None = None

    def setup(self) -> None:
        """Load and warm up every operation once; logs each model's revision and seconds."""
        with self._setup_lock:
            if self.state == READY:
                return
            self._refuse_on_a_failed_device()
            self.state, self.error = STARTING, None
            try:
                self._read_weights_ahead()  # before torch and diffusers are imported
                from image.device import resolve_device

                device, dtype = resolve_device(self.device)
                logger.info(
                    "setting up %s on %s (%s) from %s",
                    ",".join(self.operations),
                    device,
                    str(dtype).removeprefix("torch."),
                    self.cache_dir,
                )
                for name in self.operations:
                    if name in self._ops:
                        continue  # loaded by an earlier, partly failed setup
                    started = time.perf_counter()
                    op = get_operation(name)()
                    op.setup(
                        self.cache_dir,
                        device,
                        dtype,
                        allow_download=self.allow_download,
                        lock=self.lock,
                        tuning=self._tuning_for(name, device),
                        compile_cache=self.compile_cache,
                    )
                    self._ops[name] = op
                    self.setup_seconds[name] = time.perf_counter() - started
            except BaseException as error:
                self.state, self.error = SETUP_FAILED, error
                # The failed operation, half set up (its model on the device), is dropped: the
                # error's traceback kept it alive through its frames, so a setup tried again
                # (out of memory at warm-up) loaded a second copy beside it.
                op = None  # noqa: F841
                traceback.clear_frames(error.__traceback__)
                raise
            self.state = READY
            each = ", ".join(f"{name} {secs:.2f} s" for name, secs in self.setup_seconds.items())
            logger.info("ready: %s in %.2f s", each, sum(self.setup_seconds.values()))
            for name, op in self._ops.items():
                # After every model is loaded (compiling overlaps nothing but jobs), holding
                # the run lock only to swap the compiled graphs in.
                if op.start_background(_DeviceHold(self, f"{name} (swapping its compiled model in)")):
                    logger.info("%s: compiling in the background; serving uncompiled meanwhile", name)

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: for good) for the background compiles
        started at setup; True once none is running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for op in self._ops.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not op.wait_background(left):
                return False
        return True

    def compiled_artefacts(self) -> dict[str, str]:
        """{operation: its artefact's name in the compile cache} for the operations that
        compile (image/operations/compile_cache.py); after setup."""
        return {name: op.artefact_name for name, op in self._ops.items() if op.tuning.compile or op.compiles_vae}

    def _tuning_for(self, name: str, device) -> Tuning:
        """The switches for operation `name`: the given tuning (None: its defaults on
        `device`, a torch.device or its name), with `tuning_changes` applied on top."""
        base = Tuning.for_device(device, name) if self.tuning is None else self.tuning
        return parse_changes(base, self.tuning_changes)

    def _read_weights_ahead(self) -> None:
        """Start reading every operation's weight files while the libraries import.

        Only where `read_ahead` is on (the switches are torch-free data); any problem is left
        to the loader.
        """
        from image.models import store
        from image.models.lock import Lock
        from image.models.readahead import read_ahead, weight_files
        from image.models.registry import REGISTRY

        lock = self.lock if self.lock is not None else Lock.packaged()
        for name in self.operations:
            if not self._tuning_for(name, self.device).read_ahead:  # "auto": as on any device
                continue
            try:
                read_ahead(weight_files(store.resolve_snapshot(REGISTRY[name], self.cache_dir, lock=lock)))
            except Exception as error:  # noqa: BLE001 - a head start only; the loader reports
                logger.debug("%s: no read-ahead (%s)", name, error)

    def run(
        self,
        chain: Sequence[str],
        image: Image.Image,
        params: Mapping[str, object],
        seed: int,
        max_seconds: float | Callable[[], float] | None = None,
        withdrawn: Callable[[], bool] | None = None,
        started: Callable[[], None] | None = None,
    ) -> Image.Image:
        """Run the operations of `chain` in order on `image`, in memory, on one device.

        `params` are `validate_params(chain, ...)`'s output (checked again here: it is
        cheap and idempotent); each operation gets its defaults filled in. `max_seconds`
        budgets the work from when the device is this job's (after any wait for it):
        past it the operation stops at its next denoising step with JobTooLong; a callable
        gives it then, after `started()` (a caller whose own time ran on while the job waited
        takes the wait off). `withdrawn()` is asked every second while the job waits for the
        device and once it is the job's: True raises Withdrawn before any work (a stopping
        worker hands back the jobs still waiting rather than run them all).
        `started()` is called next, holding the device, before the budget starts: what it
        raises ends the job there. Out of GPU memory raises OutOfDeviceMemory (a ModelError:
        retried) after freeing the cache.
        """
        # 1. Check inputs
        chain = _chain(chain)
        for name in chain:
            if name not in self.operations:
                raise UnknownOperation(
                    f"operation {name!r} is not served by this process "
                    f"(it serves {', '.join(self.operations)})"
                )
        params = validate_params(chain, params)
        self.output_size(chain, image.size, params.get("format", COMMON_DEFAULTS["format"]))

        # 2. Run the chain
        if not self._wait_for_device(withdrawn):
            raise Withdrawn("the job was handed back before it started: this process is stopping")
        try:
            self._refuse_on_a_failed_device()  # a job that waited for the device while it failed
            if withdrawn is not None and withdrawn():
                raise Withdrawn("the job was handed back before it started: this process is stopping")
            if started is not None:
                started()
            budget = max_seconds() if callable(max_seconds) else max_seconds
            deadline = Deadline(budget) if budget else None
            self._busy = (time.monotonic(), budget, chain, contextvars.copy_context())
            try:
                return self._run_chain(chain, image, params, seed, deadline)
            finally:
                self._busy = None
        finally:
            self._run_lock.release()

    def _wait_for_device(self, withdrawn: Callable[[], bool] | None) -> bool:
        """Take the run lock once it is free and the jobs that asked before have had it
        (FairLock); False, without it, as soon as `withdrawn()` is True while waiting (asked
        every WITHDRAWN_POLL_SECONDS): a stopping worker's waiting job goes back to Pub/Sub at
        once, not after the job on the device (up to an hour)."""
        return self._run_lock.acquire(cancelled=withdrawn, poll=WITHDRAWN_POLL_SECONDS)

    def overdue(self, grace: float) -> str | None:
        """What job has held the device more than `grace` seconds past its budget
        (`max_seconds`), as a sentence; None while none has. The budget is checked at every
        denoising step and tile, so a job that far past it is stuck inside one: a GPU call
        that never returns, or a deadlock. (imagen serve and imagen worker stop then:
        handlers/watchdog.py.)"""
        busy = self._busy
        if busy is None or not busy[1]:
            return None
        started, budget, chain, _ = busy
        held = time.monotonic() - started
        if held <= budget + grace:
            return None
        return (f"{', '.join(chain)} has held the device for {held:.0f} s, more than {grace:g} s past its "
                f"budget of {budget:g} s")

    def busy_context(self) -> contextvars.Context | None:
        """The context variables of the job holding the device (its caller's), or None: a
        watchdog logging about it from another thread runs its line in this context, so the
        line carries the job's fields."""
        busy = self._busy
        return None if busy is None else busy[3]

    def _run_chain(self, chain, image, params, seed, deadline) -> Image.Image:
        """The chain's operations in order. Out of device memory, the allocator's cache is
        given back and OutOfDeviceMemory raised: a fault of this instance for now (a background
        compile may hold memory, another instance may have more free), retried like one, whose
        last attempt's report says what ran out on what input."""
        from image.device import device_failure, out_of_memory  # imports torch: set up by now

        try:
            out = image
            for name in chain:
                out = self._ops[name].run(out, resolve(name, params), seed, deadline)
            return out
        except ImagenError:
            raise  # classified already
        except Exception as error:
            if (failure := device_failure(error)) is not None:
                self.error = error  # before the state: a reader that sees the state finds the cause
                self.state = DEVICE_FAILED
                logger.critical("the GPU failed and this process cannot use it again: %s", failure,
                                exc_info=error)
                raise DeviceFailed(f"the GPU failed while running {', '.join(chain)} ({failure}): this "
                                   "process takes no more jobs and must be restarted") from error
            what = out_of_memory(error)  # PyTorch's OutOfMemoryError, or a CUDA library's
            if what is None:
                raise
        # Past the handler: the error's traceback (the frames and tensors that ran out) is gone.
        _release_device_memory()
        compiling = sorted(name for name, op in self._ops.items() if not op.wait_background(0))
        raise OutOfDeviceMemory(
            f"{', '.join(chain)} ran out of GPU memory on a {image.width}x{image.height} input ({what})"
            + (f", while {', '.join(compiling)} compiled in the background" if compiling else "")
            + ": if every attempt does, send a smaller image or deploy on a GPU with more memory",
            compiling=bool(compiling))

    def output_size(self, chain: Sequence[str] | str, size: tuple[int, int], format: str) -> tuple[int, int]:
        """(width, height) of what `chain` makes of an input of `size`, once every size limit
        of the chain and of the output `format` has been checked (ImageTooLarge, before any
        GPU work). Sets the models up first if that has not happened yet."""
        if self.state != READY:
            if self.state == SETUP_FAILED:
                raise ModelError(f"the models failed to set up: {self.error}") from self.error
            self._refuse_on_a_failed_device()
            self.setup()
        for name in _chain(chain):
            if name not in self._ops:
                raise UnknownOperation(f"operation {name!r} is not served by this process")
            self._ops[name].check_size(size)
            size = self._ops[name].output_size(size)
        check_encodable(size, format)
        return size

    def _refuse_on_a_failed_device(self) -> None:
        """DeviceFailed once a CUDA error left the device unusable: no job runs on it, and no
        set-up either (only a new process can use the GPU)."""
        if self.state == DEVICE_FAILED:
            raise DeviceFailed(f"the GPU failed in an earlier job ({self.error}): this process takes no more "
                               "jobs", ran=False) from self.error

    def model_id(self, chain: Sequence[str] | str) -> str:
        """"repo@revision" for one operation; joined with "," for a chain."""
        chain = _chain(chain)
        missing = [name for name in chain if name not in self._ops]
        if missing:
            raise UnknownOperation(f"operation(s) {', '.join(missing)} not loaded in this process")
        return ",".join(self._ops[name].model_id for name in chain)

    def is_tiny(self) -> bool:
        """True when any loaded model is a tiny random-weight one (tests and demos)."""
        return any(op.loaded.tiny for op in self._ops.values())


def _release_device_memory() -> None:
    """Give the caching allocator's free blocks back to the device (a no-op without CUDA)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class _DeviceHold:
    """The engine's run lock as a background compile holds it, around each swap of its compiled
    model in (`with hold:`, as often as it swaps): held as a job holds it (`Engine._busy`, with
    SWAP_SECONDS as budget), so a swap that hangs on the GPU is seen by `Engine.overdue`, and
    the watchdog stops the process as it would for a job."""

    def __init__(self, engine: Engine, what: str) -> None:
        self._engine, self._what = engine, what

    def __enter__(self) -> None:
        self._engine._run_lock.acquire()
        self._engine._busy = (time.monotonic(), SWAP_SECONDS, (self._what,), contextvars.copy_context())

    def __exit__(self, *exc_info) -> None:
        self._engine._busy = None
        self._engine._run_lock.release()


def _chain(chain: Sequence[str] | str) -> tuple[str, ...]:
    """A chain given as "a,b" or as names, checked like `parse_chain` (unknown, empty, twice)."""
    if isinstance(chain, str):
        return parse_chain(chain)
    if any(not isinstance(name, str) for name in chain):
        raise UnknownOperation(f"operation names must be strings, got {list(chain)!r}")
    return parse_chain(",".join(chain))
