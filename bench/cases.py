"""What the bench runs: one `Case` per operation and size, the same inputs for both paths.

A case fixes the input size, steps, strength and guidance (the model cards' settings for the
full-size cases; scaled down for `--tiny`, which runs on a CPU in CI). Both paths get the
same input image, prompt, negative prompt, steps, dtype and seed:

- `StockRunner`: the diffusers pipeline loaded and called as a user writes it;
- `ImagenRunner`: imagen's operation (`setup` through the production loader, then `run`).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.configs import BENCH_LOCK, snapshot_of
from image.models.registry import REGISTRY
from image.params import comic_prompt, resolve

SEED = 1234


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed comparison. Sizes are the input's side in pixels (square inputs)."""

    name: str
    operation: str
    size: int
    steps: int
    guidance: float
    strength: float | None = None  # img2img only
    repeats: int = 3  # timed runs after the warm-up; the median is reported
    warmup: int = 1
    stock: bool = True  # False: imagen only (stock would not fit, or take too long)
    target_seconds: float | None = None  # issue 7's targets (H100/H200, fp16)
    target_peak_gib: float | None = None
    anchor_seconds: float | None = None  # stock fp16 on an H200, as issue 7 measured it
    anchor_peak_gib: float | None = None

    @property
    def output_size(self) -> int:
        return self.size * 4 if self.operation == "upscale" else self.size

    def params(self) -> dict:
        """The operation's resolved parameters for this case (prompts are the defaults)."""
        given = {"steps": self.steps, "guidance": self.guidance}
        if self.strength is not None:
            given["strength"] = self.strength
        return resolve(self.operation, given)


FULL_CASES = (
    Case("comic", "comic", 512, steps=50, strength=0.75, guidance=7.5,
         target_seconds=0.40, anchor_seconds=1.12, anchor_peak_gib=2.6),
    Case("enhance", "enhance", 1024, steps=50, strength=0.3, guidance=5.0,
         target_seconds=0.55, anchor_seconds=1.14, anchor_peak_gib=10.6),
    Case("upscale-256", "upscale", 256, steps=75, guidance=9.0, repeats=2,
         target_seconds=1.9, anchor_seconds=3.84, anchor_peak_gib=6.5),
    Case("upscale-512", "upscale", 512, steps=20, guidance=9.0, repeats=1,
         target_seconds=4.0, target_peak_gib=12.0, anchor_seconds=7.78, anchor_peak_gib=20.7),
    Case("upscale-1024", "upscale", 1024, steps=20, guidance=9.0, repeats=1, warmup=0,
         stock=False, target_peak_gib=16.0),
)
"""Issue 7's cases, at the settings of its anchor table."""

TINY_CASES = (
    Case("comic", "comic", 256, steps=8, strength=0.75, guidance=7.5),
    Case("enhance", "enhance", 256, steps=10, strength=0.3, guidance=5.0),
    Case("upscale-64", "upscale", 64, steps=10, guidance=9.0),
    Case("upscale-96", "upscale", 96, steps=4, guidance=9.0, repeats=1),
    Case("upscale-128", "upscale", 128, steps=1, guidance=9.0, repeats=1, warmup=0, stock=False),
)
"""The same kinds of work on the tiny models, small enough for a CPU in CI: img2img at the
tiny models' native 256 pixels; upscale in one tile (64 -> 256), in 2 x 2 tiles where stock
runs the whole image (96 -> 384), and imagen-only in 3 x 3 tiles (128 -> 512). The tiny
upscaler's tile is 64 input pixels (2 x its sample_size of 32)."""


def cases_named(kind: str, names: list[str] | None) -> list[Case]:
    """The cases of `kind` ("full" or "tiny"), all or those named (a name or its operation)."""
    cases = FULL_CASES if kind == "full" else TINY_CASES
    if not names:
        return list(cases)
    chosen = [case for case in cases if case.name in names or case.operation in names]
    known = {case.name for case in cases} | {case.operation for case in cases}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return chosen


def input_image(size: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: smooth gradients with some noise, `size` pixels square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x) * np.cos(4 * y)], axis=-1) * 255
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# -- the two paths -------------------------------------------------------------------------


def stock_kwargs(operation: str) -> dict:
    """What a user passes to `from_pretrained` besides the dtype: the model card's variant
    ("fp16") and None for the components imagen does without (the safety checker)."""
    import diffusers

    spec = REGISTRY[operation]
    kwargs: dict = {name: None for name in spec.disabled}
    parameters = inspect.signature(getattr(diffusers, spec.pipeline)).parameters
    if "safety_checker" in kwargs and "requires_safety_checker" in parameters:
        kwargs["requires_safety_checker"] = False
    if spec.variant:
        kwargs["variant"] = spec.variant
    return kwargs


class StockRunner:
    """Stock diffusers: `from_pretrained(...).to(device)` and a plain pipeline call."""

    label = "stock"
    warmed_by_setup = False  # compare: one more warm-up run

    def __init__(self, operation: str, cache_dir: Path, device: torch.device, dtype: torch.dtype):
        self.operation, self.device = operation, device
        spec = REGISTRY[operation]
        import diffusers

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False  # stock's default, whatever ran before
        started = time.perf_counter()
        pipeline_class = getattr(diffusers, spec.pipeline)
        self.pipe = pipeline_class.from_pretrained(
            snapshot_of(operation, cache_dir), dtype=dtype, **stock_kwargs(operation)
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        _sync(device)
        self.load_seconds = time.perf_counter() - started

    def __call__(self, case: Case, image: Image.Image) -> Image.Image:
        params = case.params()
        prompt = comic_prompt(params["prompt"]) if self.operation == "comic" else params["prompt"]
        kwargs = {
            "prompt": prompt,
            "negative_prompt": params["negative_prompt"] or None,
            "image": image,
            "num_inference_steps": params["steps"],
            "guidance_scale": params["guidance"],
            "generator": torch.Generator(device=self.device).manual_seed(SEED),
        }
        if "strength" in params:
            kwargs["strength"] = params["strength"]
        if "noise_level" in params:
            kwargs["noise_level"] = params["noise_level"]
        return self.pipe(**kwargs).images[0]

    def close(self) -> None:
        del self.pipe


class ImagenRunner:
    """imagen's operation: `setup` (load through the production loader, tune, warm up), `run`."""

    label = "imagen"
    warmed_by_setup = True  # its setup's warm-up ran the operation at the cases' shapes

    def __init__(self, operation: str, cache_dir: Path, device: torch.device, dtype: torch.dtype,
                 tuning=None):
        from image.operations import get_operation

        started = time.perf_counter()
        self.op = get_operation(operation)()
        self.op.setup(cache_dir, device, dtype, lock=BENCH_LOCK, tuning=tuning)
        self.op.start_background(threading.Lock())  # as Engine.setup does once all are ready
        self.op.wait_background()  # time the compiled model where it compiles after ready
        _sync(device)
        self.load_seconds = time.perf_counter() - started  # load + tune + warm-up (+ compile)

    def __call__(self, case: Case, image: Image.Image) -> Image.Image:
        return self.op.run(image, case.params(), SEED)

    def close(self) -> None:
        del self.op


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
