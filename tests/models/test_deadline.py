"""A job's time budget (image/deadline.py): the operations stop between denoising steps once
it has passed, and run exactly as before while it has not. Tiny models on the CPU."""

from __future__ import annotations

import contextvars
import re
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from image.deadline import Deadline
from image.engine import Engine
from image.errors import InputError, JobTooLong
from image.models.lock import Lock
from image.operations import get_operation
from image.params import resolve

pytestmark = pytest.mark.models


class Clock(Deadline):
    """A deadline whose every check finds one more second gone."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.checks = 0

    def elapsed(self) -> float:
        self.checks += 1
        return float(self.checks)


@pytest.fixture(scope="module")
def ops(tiny_cache):
    loaded = {}
    for name in ("comic", "enhance", "upscale", "remove-background"):
        loaded[name] = get_operation(name)()
        loaded[name].setup(tiny_cache, torch.device("cpu"), torch.float32, lock=Lock())
    return loaded


def _image(side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))


def test_the_budget_is_a_permanent_error_that_says_where_and_how_long():
    deadline = Deadline(30)
    deadline.check("comic at denoising step 3")  # within it: nothing
    deadline.started -= 45
    with pytest.raises(JobTooLong) as raised:
        deadline.check("comic at denoising step 3")
    assert isinstance(raised.value, InputError)  # a retry would take as long: report, no retry
    assert str(raised.value).startswith("comic at denoising step 3: stopped after 45 s, past the job's time "
                                        "budget of 30 s; a retry would take as long.")


class Stopwatch(Deadline):
    """A deadline on which every check finds the same time gone."""

    def __init__(self, seconds: float, elapsed: float) -> None:
        super().__init__(seconds)
        self.fixed = elapsed

    def elapsed(self) -> float:
        return self.fixed


def test_a_job_that_cannot_finish_in_time_stops_after_its_first_parts():
    deadline = Stopwatch(100, 10)  # 10 s for the first of 20 tiles: all would take 200 s
    with pytest.raises(JobTooLong) as raised:
        deadline.check_pace(1, 20, "tiles", "upscale after tile 1")
    assert isinstance(raised.value, InputError)
    assert str(raised.value).startswith("upscale after tile 1: 1 of 20 tiles took 10 s, so the job would take "
                                        "about 200 s, past its time budget of 100 s; a retry would take as long.")
    deadline.check_pace(1, 10, "tiles", "upscale")  # about 100 s: close calls are left to check()
    deadline.check_pace(2, 21, "tiles", "upscale")  # 105 s: within a tenth over
    deadline.check_pace(20, 20, "tiles", "upscale")  # done: nothing left to project
    # Work before the tiles (a chain's earlier operation) counts once, not once per tile.
    later = Stopwatch(100, 40)
    later.check_pace(1, 4, "tiles", "upscale", since=30)  # 30 + 4 x 10 = 70 s
    with pytest.raises(JobTooLong, match=r"^upscale: 1 of 10 tiles took 10 s \(after 30 s of other work\), so "
                                         "the job would take about 130 s"):
        later.check_pace(1, 10, "tiles", "upscale", since=30)


class Ticker(Deadline):
    """A deadline on which every check finds `step` more seconds gone."""

    def __init__(self, seconds: float, step: float) -> None:
        super().__init__(seconds)
        self.step, self.now = step, 0.0

    def elapsed(self) -> float:
        self.now += self.step
        return self.now


def test_upscale_stops_after_the_first_tile_when_the_rest_would_not_fit(ops):
    params = resolve("upscale", {"steps": 2})
    image = _image(96)  # four 64-pixel tiles on the tiny upscaler
    # Checks, 10 s apart: before the start, as the tiles start, after each step, after tile 1.
    with pytest.raises(JobTooLong, match=r"^upscale after tile 1: 1 of 4 tiles took 30 s \(after 20 s of other "
                                         r"work\), so the job would take about 140 s, past its time budget of 100 s"):
        ops["upscale"].run(image, params, seed=1, deadline=Ticker(100, 10))
    done = ops["upscale"].run(image, params, seed=1, deadline=Stopwatch(100, 25))  # no time passes: it runs
    assert done.size == (384, 384)


def test_enhance_stops_after_the_first_tile_of_a_large_image_that_would_not_fit(ops):
    params = resolve("enhance", {"steps": 4})  # x 0.3 strength: one step per tile
    image = _image(600)  # past 2.25 x the tiny refiner's native 256^2: nine native tiles
    with pytest.raises(JobTooLong, match=r"^enhance after tile 1: 1 of 9 tiles took 20 s \(after 20 s of other "
                                         r"work\), so the job would take about 200 s"):
        ops["enhance"].run(image, params, seed=1, deadline=Ticker(100, 10))


@pytest.mark.parametrize(("name", "side", "steps", "where"), [
    ("comic", 64, 4, "comic at denoising step 2"),  # 4 x 0.75 strength: 3 steps run
    ("enhance", 64, 10, "enhance at denoising step 2"),  # SDXL's pipeline; 10 x 0.3: 3 steps
    ("upscale", 32, 4, "upscale tile 1 at denoising step 2"),  # the x4 pipeline's older callback; one tile
])
def test_diffusion_stops_at_the_first_step_past_the_budget(ops, name, side, steps, where):
    params = resolve(name, {"steps": steps})
    clock = Clock(2.5)  # check 1: before the start, 2: after step 1, 3: past
    with pytest.raises(JobTooLong, match=f"^{where}: stopped after 3 s"):
        ops[name].run(_image(side), params, seed=1, deadline=clock)
    assert clock.checks == 3
    assert ops[name].deadline is None  # nothing left behind for the next job


@pytest.mark.parametrize(("name", "side"), [("comic", 64), ("upscale", 32), ("remove-background", 48)])
def test_within_the_budget_the_pixels_are_the_same(ops, name, side):
    params = resolve(name, {"steps": 2} if name != "remove-background" else {})
    free = np.asarray(ops[name].run(_image(side), params, seed=5))
    budgeted = np.asarray(ops[name].run(_image(side), params, seed=5, deadline=Deadline(3600)))
    assert np.array_equal(free, budgeted)


def test_a_job_that_starts_past_its_budget_does_not_run(ops):
    late = Deadline(1)
    late.started -= 5
    with pytest.raises(JobTooLong, match="^remove-background before it started: stopped after 5 s"):
        ops["remove-background"].run(_image(48), resolve("remove-background", {}), seed=0, deadline=late)


def test_the_engine_budgets_the_whole_chain_from_when_it_runs(tiny_cache, monkeypatch):
    from image import engine as engine_module

    engine = Engine(["remove-background", "upscale"], tiny_cache, device="cpu", lock=Lock())
    engine.setup()
    params = {"steps": 2}
    chain = ["remove-background", "upscale"]
    assert engine.run(chain, _image(32), params, seed=0, max_seconds=3600).size == (128, 128)
    # One budget for the chain: remove-background's check uses the first second, upscale's
    # start the second, its first step (of its one tile) the third.
    clocks = []
    monkeypatch.setattr(engine_module, "Deadline", lambda seconds: clocks.append(Clock(seconds)) or clocks[-1])
    with pytest.raises(JobTooLong, match="^upscale tile 1 at denoising step 1: stopped after 3 s, past the job's "
                                         "time budget of 2.5 s"):
        engine.run(chain, _image(32), params, seed=0, max_seconds=2.5)
    assert len(clocks) == 1 and clocks[0].checks == 3
    # A budget given as a callable is asked once the device is the job's, after `started`.
    asked = []
    with pytest.raises(JobTooLong, match="past the job's time budget of 2.5 s"):
        engine.run(chain, _image(32), params, seed=0, started=lambda: asked.append("started"),
                   max_seconds=lambda: asked.append("budget") or 2.5)
    assert asked == ["started", "budget"] and len(clocks) == 2


def test_a_job_stuck_on_the_device_past_its_budget_is_overdue(tiny_cache, monkeypatch):
    # The budget is checked between steps: a job stuck inside one (a GPU call that never
    # returns) is seen only from outside, by engine.overdue (handlers/watchdog.py asks it).
    engine = Engine(["remove-background"], tiny_cache, device="cpu", lock=Lock())
    engine.setup()
    op = engine._ops["remove-background"]
    inside, release = threading.Event(), threading.Event()
    run = op.run

    def stuck(*args, **kwargs):
        inside.set()
        release.wait(60)
        return run(*args, **kwargs)

    monkeypatch.setattr(op, "run", stuck)
    ended = []
    caller = contextvars.ContextVar("caller")

    def job(max_seconds):
        caller.set(f"job with budget {max_seconds}")  # what the job's log lines carry (handlers.logs)
        try:
            engine.run(["remove-background"], _image(48), {}, seed=0, max_seconds=max_seconds)
            ended.append("output")
        except JobTooLong:
            ended.append("JobTooLong")

    for max_seconds, grace, overdue in [(None, 0, False), (60, 0, False), (0.2, 30, False), (0.2, 0.1, True)]:
        inside.clear()
        release.clear()
        thread = threading.Thread(target=job, args=(max_seconds,))
        thread.start()
        assert inside.wait(30)
        time.sleep(0.4)
        found = engine.overdue(grace)
        assert engine.busy_context()[caller] == f"job with budget {max_seconds}"  # the watchdog logs in it
        if overdue:
            assert re.fullmatch(r"remove-background has held the device for \d+ s, more than 0\.1 s past its "
                                r"budget of 0\.2 s", found), found
        else:
            assert found is None  # no budget, within it, or within the grace past it
        release.set()
        thread.join(30)
        assert engine.overdue(0) is None and engine.busy_context() is None  # the device is free again
    assert ended == ["output", "output", "JobTooLong", "JobTooLong"]


def test_a_background_compile_stuck_swapping_its_model_in_is_overdue(tiny_cache, monkeypatch):
    # The background compile swaps its graphs in holding the run lock, GPU work with no job on
    # the device: hung there, the watchdog saw nothing, and jobs waited behind it for ever.
    from image import engine as engine_module
    from image.operations.remove_background import RemoveBackground

    holds = []
    monkeypatch.setattr(RemoveBackground, "start_background", lambda op, lock: holds.append(lock) or False)
    monkeypatch.setattr(engine_module, "SWAP_SECONDS", 0.2)
    engine = Engine(["remove-background"], tiny_cache, device="cpu", lock=Lock())
    engine.setup()
    [hold] = holds  # what the operation's background compile holds around each swap
    swapping, release = threading.Event(), threading.Event()

    def swap():
        with hold:
            swapping.set()
            release.wait(60)

    for _ in range(2):  # held around each swap: as often as the compile swaps
        release.clear()
        thread = threading.Thread(target=swap)
        thread.start()
        assert swapping.wait(30)
        time.sleep(0.4)
        assert re.fullmatch(r"remove-background \(swapping its compiled model in\) has held the device for \d+ s, "
                            r"more than 0\.1 s past its budget of 0\.2 s", engine.overdue(0.1) or "")
        release.set()
        thread.join(30)
        assert engine.overdue(0) is None
    assert engine.run(["remove-background"], _image(48), {}, seed=0).size == (48, 48)  # the lock is free
