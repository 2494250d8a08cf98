"""upscale: the Stable Diffusion x4 upscaler, in fixed-size tiles for any input size.

Every UNet call sees exactly `tile_size` x `tile_size` input pixels (smaller images are
reflect-padded up to one tile), so GPU memory is bounded whatever the input, and one compiled
graph serves every job. Tiles overlap by `tile_overlap` pixels and are blended with cosine
ramps (`image.tiling`). The tile defaults to twice the UNet's training crop (its
`sample_size`: 128 for the real model, so 256-pixel tiles giving 1024-pixel outputs).

Alpha is not the model's business: it is enlarged with Lanczos and re-attached.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from PIL import Image

from image.operations.base import Operation, attach_alpha
from image.tiling import to_uint8, upscale_tiled

# Output at most 8192 x 8192: beyond that the PNG alone is hundreds of megabytes and the
# float blending canvas several gigabytes of host memory.
MAX_INPUT_PIXELS = 2048 * 2048


class Upscale(Operation):
    name = "upscale"
    max_input_pixels = MAX_INPUT_PIXELS
    warmup_params: ClassVar[dict[str, Any]] = {"steps": 2}

    def __init__(self, tile_size: int | None = None, tile_overlap: int | None = None,
                 tile_batch: int = 1) -> None:
        super().__init__()
        self.tile_size = tile_size  # input pixels; None: 2 x the UNet's sample_size
        self.tile_overlap = tile_overlap  # input pixels; None: tile_size / 8
        self.tile_batch = tile_batch
        self.scale = 4

    def prepare(self) -> None:
        pipe = self.model
        pipe.set_progress_bar_config(disable=True)
        self.scale = pipe.vae_scale_factor
        multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if self.tile_size is None:
            self.tile_size = 2 * pipe.unet.config.sample_size
        if self.tile_overlap is None:
            self.tile_overlap = max(multiple, self.tile_size // 8)
        if self.tile_size % multiple or 2 * self.tile_overlap > self.tile_size:
            raise ValueError(
                f"upscale tile {self.tile_size} (overlap {self.tile_overlap}) must be a multiple "
                f"of {multiple} with overlap at most half the tile"
            )

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * self.scale, size[1] * self.scale

    def process(self, rgb, alpha, params, seed):
        # 1. Tiles go through the pipeline in batches, each with its own seeded generator
        pipe = self.model
        done = 0

        def upscale_batch(batch: np.ndarray) -> np.ndarray:
            nonlocal done
            count = len(batch)
            generators = [self.generator(seed, tile=done + i) for i in range(count)]
            done += count
            return pipe(
                prompt=[params["prompt"]] * count,
                negative_prompt=[params["negative_prompt"]] * count,
                image=batch,
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance"],
                noise_level=params["noise_level"],
                generator=generators if count > 1 else generators[0],
                output_type="np",
            ).images

        # 2. Tile, upscale and blend (float 0..1 throughout, one rounding at the end)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
        out = upscale_tiled(
            array,
            upscale_batch,
            scale=self.scale,
            tile=self.tile_size,
            overlap=self.tile_overlap,
            batch_size=self.tile_batch,
        )
        image = Image.fromarray(to_uint8(out), "RGB")

        # 3. Alpha: Lanczos to the new size
        return attach_alpha(image, alpha)

