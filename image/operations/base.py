"""The base every operation builds on: set up once, then run many times.

    op = get_operation("upscale")()
    op.setup(cache_dir, device, dtype, allow_download=False)   # load, move, warm up
    out = op.run(image, resolve("upscale", params), seed=1234)  # as often as needed

`setup` also applies the speed switches of a `Tuning` (image/operations/tuning.py; the
defaults for the device unless one is given) between loading and the warm-up; a compile cache
(image/operations/compile_cache.py) lends a compile the kernels an earlier process made.

`run` is the same for every operation: check the inputs, split off the alpha channel (the
models see RGB), run the model under `torch.inference_mode()` with a generator seeded from
`seed` on the model's device, and re-attach the alpha. A subclass writes `prepare` (after
loading) and `process` (the model step), and says how it changes the image size.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from image.codec import to_srgb_8bit
from image.errors import ImageTooLarge, InputError, InvalidParameter, ModelError
from image.params import DEFAULTS, SEED_MAX, check_combination, resolve

logger = logging.getLogger("imagen.operations")


class Operation:
    """One operation over one model. Subclasses set `name` and write `process`."""

    name: ClassVar[str]
    #: Largest input, pixels (width x height); None: any size the decoder accepted.
    max_input_pixels: ClassVar[int | None] = None
    #: Longest side over shortest, at most; None: any. Operations that pad the short side up
    #: to a tile or the UNet's multiple set it: a 1 x 100000 strip would otherwise be worked
    #: on (and held in memory) as a 256 x 100000 or 1024 x 100000 one.
    max_aspect_ratio: ClassVar[int | None] = None
    #: Whether the colours under fully transparent pixels are replaced by those of the nearest
    #: visible ones before the model sees the image (`fill_hidden_colours`).
    fills_hidden_colours: ClassVar[bool] = True
    #: Parameters the warm-up overrides (few steps: it only has to touch every kernel once).
    warmup_params: ClassVar[dict[str, Any]] = {}
    warmup_size: ClassVar[tuple[int, int]] = (64, 64)

    def __init__(self) -> None:
        self.loaded = None  # image.models LoadedModel, once set up
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.tuning = None  # the Tuning in force, once set up
        self.tuned: list[str] = []  # the switches that were applied
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.background: threading.Thread | None = None  # a compile after ready, if any
        self.compile_cache = None  # where compiled artefacts are loaded from and stored
        self.deadline = None  # the running job's image.deadline.Deadline, if it has one
        self._prompts = None  # prompts.PromptEmbeddings of the loaded pipeline, once asked

    # -- set-up ----------------------------------------------------------------------------

    @property
    def spec(self):
        """This operation's `ModelSpec` in the model registry."""
        from image.models.registry import REGISTRY

        return REGISTRY[self.name]

    @property
    def model(self):
        """The loaded pipeline or network."""
        return self._loaded().model

    @property
    def model_id(self) -> str:
        """"repo@commit" of the loaded model."""
        return self._loaded().model_id

    def _loaded(self):
        if self.loaded is None:
            raise ModelError(f"{self.name}: the model is not loaded; call setup() first")
        return self.loaded

    def setup(
        self,
        cache_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        allow_download: bool = False,
        lock=None,
        tuning=None,
        compile_cache=None,
    ) -> None:
        """Load the model from `cache_dir` onto `device`, prepare, tune and warm it up.

        `tuning` is a `Tuning`; None takes `Tuning.for_device(device, self.name)`.
        `compile_cache` (a compile_cache.CompileCache) serves and keeps compiled artefacts
        where `tuning` compiles.
        """
        from image.models.loading import load_model
        from image.operations.compile_cache import CompileSession
        from image.operations.tuning import (
            Tuning,
            compile_parts,
            compiles_in_background,
            shape_compiled_parts,
        )

        # 1. Load
        started = time.perf_counter()
        self.device, self.dtype = torch.device(device), dtype
        self.tuning = Tuning.for_device(self.device, self.name) if tuning is None else tuning
        self.loaded = load_model(
            self.spec,
            Path(cache_dir),
            device=self.device,
            dtype=dtype,
            allow_download=allow_download,
            lock=lock,
            read_ahead=self.tuning.read_ahead,
            direct_to_device=self.tuning.direct_to_device,
        )
        self.load_seconds = time.perf_counter() - started

        # 2. Prepare (per operation: sizes the model takes, progress bars off...), then tune
        self.prepare()
        self.tuned = self.tune(self.tuning)
        self.compile_cache = compile_cache
        parts = shape_compiled_parts(self.model)  # compile_vae's: they compile the warm-up's shapes
        compiles_now = (self.tuning.compile or bool(parts)) and not compiles_in_background(self.tuning, self.device)
        session = (CompileSession(compile_cache, self.artefact_name, self.name) if compiles_now
                   else contextlib.nullcontext())

        # 3. Warm up outside the request path: first calls allocate, pick kernels, compile
        started = time.perf_counter()
        with session:
            self.warm_up()
            for _, part in parts:
                part.stop_recording()
            if parts and compiles_now:
                logger.info("%s: compiled VAE in the warm-up: %s", self.name,
                            ", ".join(compile_parts(parts, session=session)) or "nothing")
        self.warmup_seconds = time.perf_counter() - started
        if compiles_now:
            logger.info("%s: compiled in the warm-up (%s)", self.name, session.describe())
        logger.info(
            "%s: %s loaded in %.2f s, warmed up in %.2f s (%s)",
            self.name,
            self.loaded.model_id,
            self.load_seconds,
            self.warmup_seconds,
            ", ".join(self.tuned) or "stock",
        )

    def start_background(self, lock) -> bool:
        """Start what `tuning` leaves until after ready: the background compile (True when
        started). `lock` must be held around every call of the model while it runs."""
        from image.operations.tuning import (
            compile_in_background,
            compiles_in_background,
            shape_compiled_parts,
        )

        if self.background is not None or not compiles_in_background(self.tuning, self.device):
            return False
        # Ready already on the uncompiled graphs; the compiled ones replace them when done.
        self.background = compile_in_background(self.name, getattr(self.model, "unet", self.model),
                                                self.tuning, lock, self.compile_cache, self.artefact_name,
                                                parts=shape_compiled_parts(self.model))
        return True

    @property
    def compiles_vae(self) -> bool:
        """Whether `compile_vae` applies here (a model with a VAE): its kernels join the artefact."""
        from image.operations.tuning import shape_compiled_parts

        return bool(shape_compiled_parts(self.model))

    @property
    def artefact_name(self) -> str:
        """The name of this model's compiled artefact in a compile cache."""
        from image.operations.compile_cache import artefact_name

        return artefact_name(self.name, self.model_id, self.dtype, self.tuning, self.device)

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait for the background compile, if any (the bench times the compiled model);
        True once nothing runs in the background."""
        if self.background is not None:
            self.background.join(timeout)
            return not self.background.is_alive()
        return True

    def prepare(self) -> None:
        """Called once after loading; reads what the model accepts from its config."""

    def warm_up(self) -> None:
        """One short run on a small grey image (`warmup_size`, `warmup_params`)."""
        warmup = Image.new("RGB", self.warmup_size, (128, 128, 128))
        self.run(warmup, resolve(self.name, self.warmup_params), seed=0)

    def tune(self, tuning) -> list[str]:
        """Apply `tuning`'s runtime switches to the loaded model; returns those applied."""
        from image.operations.tuning import tune_pipeline

        return tune_pipeline(self.model, tuning, self.device)

    # -- sizes -----------------------------------------------------------------------------

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the result for an input of `size`; same size by default."""
        return size

    def check_size(self, size: tuple[int, int]) -> None:
        """Raise `ImageTooLarge` if this operation cannot take an input of `size` pixels."""
        width, height = size
        if width < 1 or height < 1:
            raise InputError(f"{self.name}: the image is empty ({width}x{height})")
        if self.max_aspect_ratio is not None and max(size) > self.max_aspect_ratio * min(size):
            raise ImageTooLarge(
                f"{self.name} takes images at most {self.max_aspect_ratio} times longer on one side than the other; "
                f"this one is {width}x{height}: crop it, or cut it into pieces"
            )
        if self.max_input_pixels is not None and width * height > self.max_input_pixels:
            raise ImageTooLarge(
                f"{self.name} takes at most {self.max_input_pixels} input pixels "
                f"({_side(self.max_input_pixels)}); this image is {width}x{height} = "
                f"{width * height} pixels"
            )

    # -- running ---------------------------------------------------------------------------

    def check_inputs(self, image: Image.Image, params: Mapping[str, Any], seed: int) -> None:
        """Concise errors before any model work; `params` are resolved (all keys present)."""
        self._loaded()
        if not isinstance(image, Image.Image):
            raise InputError(f"{self.name}: expected a PIL image, got {type(image).__name__}")
        self.check_size(image.size)
        expected = set(DEFAULTS[self.name])
        if set(params) != expected:
            missing, extra = expected - set(params), set(params) - expected
            raise InvalidParameter(
                f"{self.name}: resolved parameters expected; "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        check_combination(self.name, params)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise InvalidParameter(f"{self.name}: seed must be a whole number from 0 to {SEED_MAX}")

    def run(self, image: Image.Image, params: Mapping[str, Any], seed: int, deadline=None) -> Image.Image:
        """The operation on one image; `params` as `image.params.resolve` returns them.

        Any mode comes in (RGB and RGBA from the decoder; L, LA, P... from a notebook);
        alpha is kept through the operation. The same seed gives the same pixels. A
        `deadline` (image.deadline.Deadline) is checked before the model runs and between
        its denoising steps: JobTooLong once it has passed.
        """
        # 1. Check inputs
        self.check_inputs(image, params, seed)
        if deadline is not None:
            deadline.check(f"{self.name} before it started")

        # 2. Split off alpha: the models see RGB
        rgb, alpha = split_alpha(image)
        if alpha is not None and self.fills_hidden_colours:
            rgb = fill_hidden_colours(rgb, alpha)

        # 3. Run the model
        self.deadline = deadline
        try:
            with torch.inference_mode():
                return self.process(rgb, alpha, dict(params), seed)
        finally:
            self.deadline = None

    def step_check(self, where: str):
        """A diffusers `callback_on_step_end` checking the job's deadline after each step
        (None without a deadline: the pipeline then runs exactly as stock)."""
        deadline = self.deadline
        if deadline is None:
            return None

        def check(pipe, step, timestep, outputs):
            deadline.check(f"{self.name} {where}at denoising step {step + 1}")
            return outputs

        return check

    def tile_check(self):
        """An `upscale_tiled` `on_tile` callback, made just before the tiles start: stops the
        job after a batch of tiles when, at their pace, all its tiles would overrun its deadline
        (Deadline.check_pace), rather than after the whole budget. None without a deadline."""
        deadline = self.deadline
        if deadline is None:
            return None
        since = deadline.elapsed()  # a chain's earlier operations, the input's preparation

        def check(done: int, total: int) -> None:
            deadline.check_pace(done, total, "tiles", f"{self.name} after tile {done}", since=since)

        return check

    def process(
        self, rgb: Image.Image, alpha: Image.Image | None, params: dict[str, Any], seed: int
    ) -> Image.Image:
        """The model step: RGB in (and the input's alpha, if any), the result out."""
        raise NotImplementedError

    def prompt_arguments(self, prompt: str, negative_prompt: str | None, count: int = 1) -> dict[str, Any]:
        """The pipeline's prompt arguments for a batch of `count`: with `prompt_cache` the
        embeddings, encoded once per distinct pair (image/operations/prompts.py); else the
        strings, as stock diffusers is given them."""
        from image.operations.prompts import PromptEmbeddings

        if not (self.tuning and self.tuning.prompt_cache):
            if count == 1:
                return {"prompt": prompt, "negative_prompt": negative_prompt}
            return {"prompt": [prompt] * count, "negative_prompt": [negative_prompt] * count}
        if self._prompts is None or self._prompts.pipeline is not self.model:
            self._prompts = PromptEmbeddings(self.model)
        return self._prompts.arguments(prompt, negative_prompt, count)

    def generator(self, seed: int, tile: int = 0) -> torch.Generator:
        """A generator on the model's device: same seed, same noise.

        Tile `tile` of a tiled run gets its own stream, so what it draws does not depend on
        how tiles are batched (the pixels may still differ by a level or so: kernels round
        differently at another batch size); the noise tiles must agree on where they overlap
        (upscale's latents and input noise, enhance's latents) are slices of one
        `noise_field` instead.
        """
        return torch.Generator(device=self.device).manual_seed((seed + 7919 * tile) % 2**32)

    @staticmethod
    def noise_field(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """One field of Gaussian noise over a tiled image's whole latent canvas, on the CPU
        (device memory stays bounded), whose slices its tiles take: neighbouring tiles then
        start their overlap from the same noise and invent the same texture there (with
        noise of their own, the cross-fade averaged two unrelated textures: a band of softer
        detail along every seam). A stream of its own: on the CPU, tile 0's generator (seed
        + 0) would give the same numbers."""
        return torch.randn(shape, generator=torch.Generator().manual_seed((seed ^ 0x9E3779B9) % 2**32))


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, alpha as "L" or None). Any other mode, an embedded ICC profile or a
    transparency key (a notebook's Image.open: 16-bit, float, CMYK, palette...) is first made
    8-bit sRGB as the decoder makes it, alpha kept (a fully opaque one dropped, as the decoder
    does; a plain RGBA image's alpha is kept whatever it holds)."""
    if image.mode not in ("RGB", "RGBA") or "icc_profile" in image.info or "transparency" in image.info:
        image = to_srgb_8bit(image)
    if image.mode == "RGBA":
        return image.convert("RGB"), image.getchannel("A")
    return image, None


def fill_hidden_colours(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    """`rgb` with each fully transparent pixel given the colour of the visible pixels around
    it: the alpha-weighted mean over the smallest enclosing 2^k block that holds any
    (push-pull over an image pyramid, linear in the pixels).

    What lies under transparency is usually black: a model that sees RGB would blend it into
    the edges, and the re-attached, resized alpha would show it as a dark fringe.

    The full-size level is worked band by band (a visible pixel keeps its colour, a hidden
    one takes its 2x2 block's parent), so the float planes are a quarter of the image's
    size: a chain can hand an operation a 16384 x 16384 cut-out, ~90 bytes a pixel whole.
    """
    opacity = np.asarray(alpha)
    hidden = opacity == 0
    if not hidden.any() or hidden.all():
        return rgb
    colour = np.asarray(rgb)
    height, width = hidden.shape
    weighted = np.empty(((height + 1) // 2, (width + 1) // 2, 3), np.float32)
    total = np.empty(weighted.shape[:2], np.float32)
    for top in range(0, height, _FILL_BAND):  # push from full size, one band of rows at a time
        weight = opacity[top:top + _FILL_BAND].astype(np.float32) / 255.0
        half = slice(top // 2, (top + _FILL_BAND) // 2)
        weighted[half] = _block_sums(colour[top:top + _FILL_BAND].astype(np.float32) * weight[..., None])
        total[half] = _block_sums(weight)
    levels = [(weighted, total)]
    while max(levels[-1][1].shape) > 1:  # push: sums over 2x2 blocks, down to one pixel
        levels.append(tuple(_block_sums(level) for level in levels[-1]))
    estimate = None
    for weighted, total in reversed(levels):  # pull: each level's colour, or its parent's
        mean = weighted / np.maximum(total, 1e-12)[..., None]
        if estimate is not None:
            parent = estimate.repeat(2, 0).repeat(2, 1)[: total.shape[0], : total.shape[1]]
            mean = np.where((total > 0)[..., None], mean, parent)
        estimate = mean
    out = np.empty_like(colour)
    for top in range(0, height, _FILL_BAND):  # full size: hidden pixels take their parent's colour
        rows = slice(top, top + _FILL_BAND)
        band = hidden[rows].shape[0]
        parent = estimate[top // 2:(top + band + 1) // 2].repeat(2, 0).repeat(2, 1)[:band, :width]
        filled = np.clip(np.rint(parent), 0, 255).astype(np.uint8)
        out[rows] = np.where(hidden[rows][..., None], filled, colour[rows])
    return Image.fromarray(out, "RGB")


_FILL_BAND = 512  # rows per band in fill_hidden_colours: even, so no 2x2 block spans two


def _block_sums(values: np.ndarray) -> np.ndarray:
    """Sums over 2x2 blocks (an odd edge padded with zeros): half the size each way."""
    height, width = values.shape[:2]
    pad = [(0, height % 2), (0, width % 2)] + [(0, 0)] * (values.ndim - 2)
    even = np.pad(values, pad)
    return even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2]


def to_bytes(images: torch.Tensor) -> np.ndarray:
    """A pipeline's images as `output_type="pt"` gives them ((N, C, H, W), 0..1, on the
    model's device) as (N, H, W, C) uint8 on the host. Rounded where they are, so only bytes
    cross to the host, not floats for it to convert, scale and round while the GPU waits; the
    values diffusers' own "np" and "pil" outputs round to (float32 x 255, half to even)."""
    pixels = (images.permute(0, 2, 3, 1).float() * 255).round_().clamp_(0, 255)
    # Contiguous there too: a strided array would have PIL transpose it byte by byte here.
    return pixels.to(torch.uint8).contiguous().cpu().numpy()


def attach_alpha(image: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """`image` with `alpha` re-attached (resized bicubically when the size changed: Lanczos
    rings around a cut-out's hard edge, a faint halo outside it and a dip inside); an RGB
    `image` gets it in place (a large result is gigabytes), so pass one nothing else uses."""
    if alpha is None:
        return image
    if alpha.size != image.size:
        alpha = alpha.resize(image.size, Image.Resampling.BICUBIC)
    out = image if image.mode == "RGB" else image.convert("RGB")
    out.putalpha(alpha)
    return out


def _side(pixels: int) -> str:
    side = int(pixels**0.5)
    return f"{side}x{side}" if side * side == pixels else f"{pixels} pixels"
