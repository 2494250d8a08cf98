"""remove-background: BRIA RMBG-1.4, with its model card's pre- and post-processing.

Pre: resize to 1024 x 1024 (bilinear), divide by 255, normalise with mean 0.5 and std 1.0.
Post: `model(x)[0][0]` is a [1, 1, 1024, 1024] mask in 0..1; it is resized back to the
input's size (bilinear) and min-max normalised. An input that already had transparency
keeps it (the mask is multiplied by the old alpha).

Output: RGBA (the input's colours, the mask as alpha; black under fully transparent pixels,
so the background removed is not in the file: a viewer or tool that ignores alpha would show
it, and it made PNGs several times larger); `mask_only` gives the mask as an "L" image;
`background` composites onto that colour and gives RGB.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops

from image.operations.base import Operation

INPUT_SIZE = (1024, 1024)
MEAN, STD = 0.5, 1.0


class RemoveBackground(Operation):
    name = "remove-background"
    fills_hidden_colours = False  # its result keeps the input's colours where they show

    def prepare(self) -> None:
        self.model.eval()

    def tune(self, tuning) -> list[str]:
        from image.operations.tuning import tune_network

        return tune_network(self.model, tuning, self.device)

    def process(self, rgb, alpha, params, seed):
        # 1. Pre-process (model card)
        pixels = torch.from_numpy(np.asarray(rgb).copy()).to(self.device)
        x = pixels.permute(2, 0, 1).unsqueeze(0).float()
        x = F.interpolate(x, size=INPUT_SIZE, mode="bilinear")
        x = (x / 255.0 - MEAN) / STD

        # 2. Run
        result = self.model(x.to(self.dtype))[0][0]

        # 3. Post-process: back to the input's size, min-max normalised
        mask = F.interpolate(result.float(), size=(rgb.height, rgb.width), mode="bilinear")[0, 0]
        low, high = mask.min(), mask.max()
        if float(high - low) > 1e-6:
            mask = (mask - low) / (high - low)
        else:  # a constant mask: nothing to stretch
            mask = mask.clamp(0, 1)
        mask = Image.fromarray((mask * 255).round().to(torch.uint8).cpu().numpy(), "L")
        if alpha is not None:
            mask = ImageChops.multiply(mask, alpha)

        # 4. Compose the output
        if params["mask_only"]:
            return mask
        if params["background"] is not None:
            background = Image.new("RGB", rgb.size, params["background"])
            return Image.composite(rgb, background, mask)
        out = Image.new("RGB", rgb.size)
        out.paste(rgb, mask=mask.point(lambda level: 255 if level else 0))
        out.putalpha(mask)
        return out
