"""comic: Ghibli-Diffusion (SD1.5) img2img; the output has the input's size.

The model only draws its style when the prompt holds its trigger words, so "ghibli style"
is prefixed to a prompt that lacks them (`image.params.comic_prompt`). Large inputs are
resized to the model's range and back: a style is a global look, and tiles would each
restyle their piece differently.
"""

from __future__ import annotations

from image.operations._img2img import Img2ImgOperation
from image.params import comic_prompt


class Comic(Img2ImgOperation):
    name = "comic"

    def prompt(self, params):
        return comic_prompt(params["prompt"])
