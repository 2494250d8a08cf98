"""enhance: the SDXL refiner as low-strength img2img; the output has the input's size.

Large inputs are refined tile by tile at the refiner's own 1024-pixel resolution rather than
shrunk and enlarged again, which would blur the very detail the user asked for.
"""

from __future__ import annotations

from image.operations._img2img import Img2ImgOperation


class Enhance(Img2ImgOperation):
    name = "enhance"
    tile_large_inputs = True
