"""upscale: the Stable Diffusion x4 upscaler, in fixed-size tiles for any input size.

Every UNet call sees exactly `tile_size` x `tile_size` input pixels (smaller images are
reflect-padded up to one tile), so GPU memory is bounded whatever the input, and one compiled
graph serves every job. Tiles overlap by `tile_overlap` pixels and are blended with cosine
ramps (`image.tiling`); their initial latents, and the noise the pipeline adds to its input
(its `noise_level`), are slices of noise fields over the whole image, so neighbours see the
same input and invent the same texture where they overlap (`Upscale.noise`). The tile defaults to
twice the UNet's training crop (its `sample_size`: 128 for the real model, so 256-pixel tiles
giving 1024-pixel outputs); the `upscale_tile` and `upscale_tile_batch` switches of `Tuning`
change the tile and how many tiles go through the UNet at once.

`upscale_tile` may also name several sizes, buckets (e.g. (256, 512)): each image then takes
the bucket that needs the fewest tile pixels for it (ties: the larger tile, fewer seams), so
a 512-pixel input runs as one 512 tile instead of nine overlapping 256 ones, and there is
still one fixed shape per bucket. Each bucket is warmed up at start-up.

Alpha is not the model's business: it is enlarged bicubically and re-attached.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from image.models._quiet import quiet_libraries
from image.operations.base import Operation, attach_alpha, to_bytes
from image.params import resolve
from image.tiling import pad_to, plan_tiles, upscale_tiled

# Output at most 16384 x 16384 (268 MP), from MAX_INPUT_PIXELS below: the tiles
# stream into a uint8 result (image.tiling.Stitcher), so at this limit the CPU side peaks at
# about 3 GB (4.3 GB with alpha; up to ~5 GB for a 32:1 strip, whose float band of rows
# spans its long side), the input's noise fields (Upscale.noise) 0.47 GB of it.
# Time is what bounds it on a GPU: a job whose first tiles show it cannot finish within its
# budget stops there (Deadline.check_pace).
MAX_INPUT_PIXELS = 4096 * 4096


class Upscale(Operation):
    name = "upscale"
    max_input_pixels = MAX_INPUT_PIXELS
    max_aspect_ratio = 32
    warmup_params: ClassVar[dict[str, Any]] = {"steps": 2}

    def __init__(self) -> None:
        super().__init__()
        self.tile_size: int | None = None  # input pixels; None: the tuning's, else 2 x the UNet's sample_size
        self.tile_overlap: int | None = None  # input pixels: tile_size / 8
        self.tile_batch: int | None = None  # None: the tuning's (1 by default)
        self.tile_sizes: tuple[int, ...] = ()  # the buckets, smallest first (tile_size is the first)
        self.scale = 4

    def prepare(self) -> None:
        pipe = self.model
        pipe.set_progress_bar_config(disable=True)
        self.scale = pipe.vae_scale_factor
        multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if self.tile_size is not None:
            sizes = (self.tile_size,)
        else:
            chosen = self.tuning.upscale_tile if self.tuning else None
            sizes = (chosen,) if isinstance(chosen, int) else tuple(chosen or ())
            sizes = sizes or (2 * pipe.unet.config.sample_size,)
        if self.tile_batch is None:
            self.tile_batch = self.tuning.upscale_tile_batch if self.tuning else 1
        self._multiple = multiple
        self.tile_sizes = tuple(sorted(set(sizes)))
        for tile in self.tile_sizes:
            overlap = self._overlap(tile)
            if tile % multiple or 2 * overlap > tile:
                raise ValueError(
                    f"upscale tile {tile} (overlap {overlap}) must be a multiple "
                    f"of {multiple} with overlap at most half the tile"
                )
        self.tile_size = self.tile_sizes[0]
        self.tile_overlap = self._overlap(self.tile_size)

    def _overlap(self, tile: int) -> int:
        return max(self._multiple, tile // 8)

    def tile_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """(tile, overlap) in input pixels for an image of `size`: the bucket with the
        fewest tile pixels, the larger one on a tie."""
        best = None
        for tile in self.tile_sizes:
            overlap = self._overlap(tile)
            pixels = len(plan_tiles(size[0], size[1], tile, overlap).boxes) * tile * tile
            if best is None or pixels <= best[0]:
                best = (pixels, tile, overlap)
        return best[1], best[2]

    def warm_up(self) -> None:
        """One short run per tile bucket: each shape's first call happens here."""
        params = resolve(self.name, self.warmup_params)
        for tile in self.tile_sizes:
            side = self.warmup_size[0] if tile == self.tile_size else tile  # one tile of that size
            self.run(Image.new("RGB", (side, side), (128, 128, 128)), params, seed=0)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * self.scale, size[1] * self.scale

    def _step_callback(self, where: str):
        """The deadline check in the form the x4 pipeline takes (its older `callback`)."""
        check = self.step_check(where)
        return None if check is None else (lambda step, timestep, latents: check(None, step, timestep, None))

    def noise(self, plan, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A tiled image's initial latents and the noise added to its input pixels, each one
        `noise_field` over the whole canvas ((channels, height, width): the x4 UNet's latents
        have the input's size), whose slices the tiles take: drawn per tile, neighbours saw
        differently noised input where they overlap (7.6 levels apart at the default
        noise_level, 87 at its highest) and the cross-fade averaged what each made of it.
        None for one tile (the pipeline draws both from the tile's generator, as stock
        diffusers does for the same seed)."""
        if len(plan.boxes) == 1:
            return None
        latent = self.noise_field((self.model.vae.config.latent_channels, plan.canvas_height, plan.canvas_width), seed)
        pixels = self.noise_field((3, plan.canvas_height, plan.canvas_width), seed + 1)
        return latent, pixels

    def process(self, rgb, alpha, params, seed):
        # 1. Tiles go through the pipeline in batches, each with its own seeded generator (one
        # tile's noise: the pipeline draws it) and, tiled, its slices of the image's noise fields
        pipe = self.model
        tile, overlap = self.tile_for(rgb.size)
        plan = plan_tiles(rgb.width, rgb.height, tile, overlap)
        boxes, noise = plan.boxes, self.noise(plan, seed)
        done = 0

        def upscale_batch(batch: np.ndarray, output_type: str = "np"):
            nonlocal done
            count = len(batch)
            generators = [self.generator(seed, tile=done + i) for i in range(count)]
            latents = pixel_noise = None
            if noise is not None:
                latents, pixel_noise = (
                    torch.stack([field[:, box.top:box.bottom, box.left:box.right]
                                 for box in boxes[done:done + count]]).to(self.device, self.dtype)
                    for field in noise)
            where = f"tile {done + 1} " if count == 1 else f"tiles {done + 1}-{done + count} "
            done += count
            with _input_noise(pipe.low_res_scheduler, pixel_noise):
                return pipe(
                    **self.prompt_arguments(params["prompt"], params["negative_prompt"], count),
                    image=batch,
                    num_inference_steps=params["steps"],
                    guidance_scale=params["guidance"],
                    noise_level=params["noise_level"],
                    generator=generators if count > 1 else generators[0],
                    latents=latents,
                    output_type=output_type,
                    callback=self._step_callback(where),
                ).images

        # 2. Tile, upscale and blend (float 0..1 throughout, one rounding as rows are done;
        # one tile: rounded on the device).
        # As img2img's: a prompt past CLIP's 77 tokens (README says it is cut there) was two
        # warnings per tile, one quoting the cut text.
        array = np.asarray(rgb, dtype=np.float32)
        array /= 255.0
        with quiet_libraries(warnings=False):
            if len(boxes) == 1:
                # One tile (reflect-padded to it, as upscale_tiled pads): nothing to blend, so the
                # device rounds the cropped pixels to bytes, the values the blend would give.
                images = upscale_batch(pad_to(array, tile, tile)[None], output_type="pt")
                out = to_bytes(images[:, :, :rgb.height * self.scale, :rgb.width * self.scale])[0]
            else:
                out = upscale_tiled(
                    array,
                    upscale_batch,
                    scale=self.scale,
                    tile=tile,
                    overlap=overlap,
                    batch_size=self.tile_batch,
                    on_tile=self.tile_check(),  # hundreds of tiles on a slow card: stop after the first
                    levels=255.0,
                )
        del array
        image = Image.fromarray(out, "RGB")
        del out

        # 3. Alpha: enlarged bicubically to the new size
        return attach_alpha(image, alpha)


@contextlib.contextmanager
def _input_noise(scheduler, noise: torch.Tensor | None):
    """For one pipeline call, `noise` (the tiles' slices of the image's field) in place of the
    noise the x4 pipeline draws from its generator for its low-resolution input (it adds it
    with `low_res_scheduler.add_noise`, its only call); nothing changed for None. The engine
    runs one job at a time, so the scheduler is this call's alone meanwhile."""
    if noise is None:
        yield
        return
    add_noise = scheduler.add_noise

    def shared(original: torch.Tensor, drawn: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(original, noise.to(drawn), timesteps)

    scheduler.add_noise = shared
    try:
        yield
    finally:
        del scheduler.add_noise
