"""Transparency around the models: what they see under fully transparent pixels."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageDraw

from image.operations.base import attach_alpha, fill_hidden_colours, split_alpha
from tests.reliability.crafted import png
from tests.unit.test_codec import rgb_profile


def _disc(size=(64, 48)) -> Image.Image:
    """A white disc on transparent black: what a cut-out usually looks like inside."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((12, 8, 44, 40), fill=(255, 255, 255, 255))
    return image


def test_hidden_pixels_take_the_visible_colours_and_visible_ones_stay():
    image = _disc()
    image.putpixel((60, 44), (0, 0, 255, 128))  # half transparent: its colour is its own
    rgb, alpha = split_alpha(image)
    filled = np.asarray(fill_hidden_colours(rgb, alpha))
    visible = np.asarray(alpha) > 0
    assert (filled[visible] == np.asarray(rgb)[visible]).all()
    assert (filled[:40, :48] > 200).all()  # around the disc: its white, not the black beneath
    assert tuple(filled[44, 60]) == (0, 0, 255)


def test_nothing_hidden_or_nothing_visible_leaves_the_image_alone():
    rgb = Image.new("RGB", (8, 8), (1, 2, 3))
    assert fill_hidden_colours(rgb, Image.new("L", (8, 8), 255)) is rgb
    assert fill_hidden_colours(rgb, Image.new("L", (8, 8), 0)) is rgb


def test_an_enlarged_cut_out_has_no_dark_fringe():
    """The edge of an upscaled cut-out (bicubic standing in for the model, the alpha enlarged
    as attach_alpha does) stays white where it is half transparent."""
    rgb, alpha = split_alpha(_disc())

    def enlarged(colours: Image.Image) -> np.ndarray:
        big = attach_alpha(colours.resize((256, 192), Image.Resampling.BICUBIC), alpha)
        pixels = np.asarray(big)
        edge = (pixels[..., 3] > 0) & (pixels[..., 3] < 255)
        return pixels[edge][:, :3].mean()

    assert enlarged(rgb) < 200  # the black beneath bleeds in
    assert enlarged(fill_hidden_colours(rgb, alpha)) > 250


def test_an_enlarged_cut_out_keeps_its_edge_without_a_halo():
    # x4 (upscale): the alpha's hard edge becomes a ramp a few pixels wide, and nothing else
    # changes: no faint ring of opacity outside the cut-out, no dip inside it.
    alpha = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(alpha).rectangle((16, 16, 47, 47), fill=255)
    big = np.asarray(attach_alpha(Image.new("RGB", (256, 256)), alpha))[..., 3].astype(int)
    ramp = 8  # output pixels on either side of the edge
    outside = np.ones_like(big, dtype=bool)
    outside[64 - ramp:192 + ramp, 64 - ramp:192 + ramp] = False
    assert (big[outside] == 0).all()
    assert (big[64 + ramp:192 - ramp, 64 + ramp:192 - ramp] == 255).all()
    assert 0 < big[128, 63] < 255 or 0 < big[128, 64] < 255  # a ramp, not a staircase


def test_the_fill_is_the_same_whatever_the_band_of_rows(monkeypatch):
    """The full-size level is worked band by band (memory): bands of 2 rows, of 6, or the
    whole image in one give the same pixels, odd sizes and scattered holes included."""
    from image.operations import base

    rng = np.random.default_rng(7)
    for height, width in ((37, 23), (64, 1), (1, 50), (129, 65)):
        rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        opacity = rng.integers(0, 256, (height, width), dtype=np.uint8)
        opacity[rng.random((height, width)) < 0.6] = 0
        alpha = Image.fromarray(opacity, "L")
        results = []
        for band in (2, 6, 4096):
            monkeypatch.setattr(base, "_FILL_BAND", band)
            results.append(np.asarray(fill_hidden_colours(rgb, alpha)))
        assert all((result == results[-1]).all() for result in results[:-1]), (height, width)
        visible = opacity > 0
        assert (results[-1][visible] == np.asarray(rgb)[visible]).all()


def test_any_pillow_image_is_split_as_the_decoder_would_make_it():
    """Engine.run takes a notebook's Image.open result too: 16-bit and float grey are scaled
    (not clipped to white or black), a colour key becomes alpha, an ICC profile is applied."""
    from PIL import ImageCms

    rgb, alpha = split_alpha(Image.new("I;16", (4, 4), 30000))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (117, 117, 117) and alpha is None
    assert split_alpha(Image.new("F", (4, 4), 0.5))[0].getpixel((0, 0)) == (128, 128, 128)
    keyed = Image.new("RGB", (2, 1), (10, 20, 30))
    keyed.putpixel((1, 0), (1, 2, 3))
    keyed.info["transparency"] = (1, 2, 3)
    assert np.asarray(split_alpha(keyed)[1]).tolist() == [[255, 0]]
    # A 16-bit RGB PNG opened, not yet loaded: its colour key in the pixels' 8 bits, as decoded.
    row = b"\x00" + struct.pack(">6H", 100, 100, 100, 25700, 25700, 25700)
    sixteen = Image.open(io.BytesIO(png(2, 1, 16, 2, row, ((b"tRNS", struct.pack(">3H", 100, 100, 100)),))))
    assert np.asarray(split_alpha(sixteen)[1]).tolist() == [[0, 255]]
    assert sixteen.info["transparency"] == (100, 100, 100)  # the caller's image is left as it was
    grey = Image.new("LA", (2, 2), (100, 128))
    rgb, alpha = split_alpha(grey)
    assert rgb.getpixel((0, 0)) == (100, 100, 100) and alpha.getpixel((0, 0)) == 128
    # A profile whose red is sRGB's green (as the codec's own test builds it).
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile
    red, green, blue = (c[0] for c in (srgb.red_colorant, srgb.green_colorant, srgb.blue_colorant))
    tagged = Image.new("RGB", (1, 1), (255, 0, 0))
    tagged.info["icc_profile"] = rgb_profile(green, red, blue)
    assert split_alpha(tagged)[0].getpixel((0, 0)) == (0, 255, 0)
    plain = Image.new("RGBA", (2, 2), (1, 2, 3, 255))
    rgb, alpha = split_alpha(plain)  # the decoder's own RGBA: split as it is
    assert rgb.getpixel((0, 0)) == (1, 2, 3) and alpha.getpixel((0, 0)) == 255
