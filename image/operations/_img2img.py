"""What enhance and comic share: img2img at the input's own size.

The UNet takes sizes in multiples of `multiple` pixels (the VAE's factor times the UNet's
down-sampling) and works well near its training resolution `native` (the UNet's sample size
times the VAE's factor: 512 for SD1.5, 1024 for the SDXL refiner). So:

- an input whose short side is below `min_side_ratio * native` is enlarged first (diffusion
  models draw noise, not detail, far below their resolution); one above
  `max_pixels_ratio * native**2` pixels is reduced, or for `tile_large_inputs` operations
  processed in fixed-size overlapping tiles at its own resolution (no detail lost);
- the working image is reflect-padded to a multiple, run, cropped, and resized back, so the
  output has exactly the input's size whatever that is.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from image.models._quiet import quiet_libraries
from image.operations.base import Operation, attach_alpha, to_bytes
from image.params import resolve
from image.tiling import pad_to_multiple, plan_tiles, upscale_tiled


class Img2ImgOperation(Operation):
    """A diffusers img2img pipeline run on the whole image, restoring its size."""

    min_side_ratio: ClassVar[float] = 0.75
    max_pixels_ratio: ClassVar[float] = 2.25  # (1.5 * native) ** 2
    #: Large inputs: tiles at native size (keeps detail) instead of a resize.
    tile_large_inputs: ClassVar[bool] = False
    tile_overlap_ratio: ClassVar[float] = 0.125
    max_aspect_ratio = 32
    warmup_params: ClassVar[dict[str, Any]] = {"steps": 2, "strength": 0.5}

    def prepare(self) -> None:
        pipe = self.model
        pipe.set_progress_bar_config(disable=True)
        self.multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        self.native = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def warm_up(self) -> None:
        """On a GPU, at the native size: the shape most jobs have gets its kernels chosen (and
        its CUDA graph captured, its compiled code built) before the first request. On the
        CPU, the small default (the tests' engines start in seconds)."""
        if self.device is not None and self.device.type == "cuda":
            side = self.native
            self.run(Image.new("RGB", (side, side), (128, 128, 128)),
                     resolve(self.name, self.warmup_params), seed=0)
        else:
            super().warm_up()

    def prompt(self, params: dict[str, Any]) -> str:
        return params["prompt"]

    def process(self, rgb, alpha, params, seed):
        # 1. Choose the working size
        width, height = rgb.size
        scale = working_scale(
            rgb.size,
            min_side=self.min_side_ratio * self.native,
            max_pixels=self.max_pixels_ratio * self.native**2,
        )
        if scale < 1 and self.tile_large_inputs:
            out = self._tiled(rgb, params, seed)
        else:
            work = rgb
            if scale != 1:
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                work = rgb.resize(size, Image.Resampling.LANCZOS)
            # 2. Pad to what the UNet takes, run, crop
            array = pad_to_multiple(np.asarray(work), self.multiple)
            result = self._pipe(Image.fromarray(array), params, self.generator(seed), "")
            out = result.crop((0, 0, work.width, work.height))
            # 3. Back to the input's size
            if out.size != rgb.size:
                out = out.resize(rgb.size, Image.Resampling.LANCZOS)
        return attach_alpha(out, alpha)

    def _pipe(self, image: Image.Image, params: dict[str, Any], generator, where: str,
              noise: torch.Tensor | None = None) -> Image.Image:
        """The pipeline on `image`; `noise` (latent-sized, on the CPU): the noise its encoded
        image starts from, instead of noise the pipeline draws from `generator` (a tile's
        slice of its image's `noise_field`)."""
        # The SDXL pipeline re-casts its VAE on every call and warns each time: noise in
        # the service's logs, one line per job.
        with quiet_libraries(warnings=False):
            latents = None if noise is None else self._noised_latents(image, params, generator, noise)
            images = self.model(
                **self.prompt_arguments(self.prompt(params), params["negative_prompt"] or None),
                image=image,
                strength=params["strength"],
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance"],
                generator=generator,
                latents=latents,
                output_type="pt",
                callback_on_step_end=self.step_check(where),
            ).images
        return Image.fromarray(to_bytes(images)[0], "RGB")

    def _noised_latents(self, image: Image.Image, params: dict[str, Any], generator, noise: torch.Tensor):
        """What the pipeline's own prepare_latents makes of `image` (encoded, with `generator`
        for the encoder's sample), with `noise` added at the first timestep `strength` leaves
        instead of noise drawn from `generator`. The pipeline sets its schedule again the same
        way when it runs. SDXL's img2img pipeline (enhance): SD1.5's prepare_latents, comic's,
        has no `add_noise` (comic does not tile)."""
        pipe = self.model
        device, dtype = pipe._execution_device, pipe.unet.dtype
        pipe.scheduler.set_timesteps(params["steps"], device=device)
        timesteps, _ = pipe.get_timesteps(params["steps"], params["strength"], device)
        first = timesteps[:1]
        encoded = pipe.prepare_latents(pipe.image_processor.preprocess(image), first, 1, 1, dtype, device, generator,
                                       add_noise=False)
        return pipe.scheduler.add_noise(encoded, noise.to(device=device, dtype=dtype), first)

    def _tiled(self, rgb: Image.Image, params: dict[str, Any], seed: int) -> Image.Image:
        tile = self.native
        overlap = _round_to(self.native * self.tile_overlap_ratio, self.multiple // 2 or 1)
        # Tiles start on the latent grid, so neighbours' slices of the image's noise field
        # line up where they overlap (the image padded to that grid first, cropped after).
        factor = self.model.vae_scale_factor
        array = pad_to_multiple(np.asarray(rgb), factor)
        plan = plan_tiles(array.shape[1], array.shape[0], tile, overlap, align=factor)
        channels = self.model.vae.config.latent_channels
        field = self.noise_field((channels, plan.canvas_height // factor, plan.canvas_width // factor), seed)
        counter = iter(range(1 << 30))

        def process(batch: np.ndarray) -> np.ndarray:
            outs = []
            for tile_array in batch:
                number = next(counter)
                box = plan.boxes[number]
                noise = field[None, :, box.top // factor:box.bottom // factor, box.left // factor:box.right // factor]
                generator = self.generator(seed, tile=number)
                tile_image = Image.fromarray(tile_array.astype(np.uint8))
                out = self._pipe(tile_image, params, generator, f"tile {number + 1} ", noise=noise)
                outs.append(np.asarray(out, np.float32))
            return np.stack(outs)

        out = upscale_tiled(array, process, scale=1, tile=tile, overlap=overlap, levels=1.0,
                            on_tile=self.tile_check(), align=factor)
        return Image.fromarray(out[:rgb.height, :rgb.width], "RGB")


def working_scale(size: tuple[int, int], *, min_side: float, max_pixels: float) -> float:
    """The factor that brings `size` into the model's range (1.0 when already in it)."""
    width, height = size
    if width * height > max_pixels:
        return math.sqrt(max_pixels / (width * height))
    if min(width, height) < min_side:
        # Enlarging must not push the image past the pixel budget (very long strips).
        return min(min_side / min(width, height), math.sqrt(max_pixels / (width * height)))
    return 1.0


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)
