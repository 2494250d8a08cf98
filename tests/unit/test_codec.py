"""image.codec: decoding with limits, mode normalisation, orientation, ICC, encoding.

Every input is made here with Pillow, and the hostile ones by patching real files' headers.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from image.codec import CONTENT_TYPES, OUTPUT_FORMATS, decode_image, encode_image
from image.errors import DecompressionBomb, ImageDecodeError, ImageTooLarge, InvalidParameter

MAX_BYTES = 10_000_000
MAX_PIXELS = 1_000_000
REPO = Path(__file__).resolve().parents[2]


def decode(data: bytes, **limits) -> Image.Image:
    return decode_image(data, **{"max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS, **limits})


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(mode: str = "RGB", size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), np.uint8)
    return Image.fromarray(values.squeeze(), mode)


def gradient(size: tuple[int, int] = (32, 24)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], 0)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None].repeat(size[0], 1)
    return Image.fromarray(np.dstack([x, y, 255 - x]))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# --- hostile headers -------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR claims `width` x `height`, CRC fixed."""
    data = save(Image.new("RGB", (4, 4), "red"), "PNG")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def gif_declaring(screen: tuple[int, int], frame: tuple[int, int] | None = None) -> bytes:
    """A real 4x4 GIF with its logical screen (and optionally its first frame) resized."""
    data = bytearray(save(Image.new("P", (4, 4)), "GIF", disposal=2))
    data[6:10] = struct.pack("<HH", *screen)
    if frame:
        descriptor = data.index(b",\x00\x00\x00\x00\x04\x00\x04\x00")
        data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", *frame)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A real lossy WebP in an extended (VP8X) container whose canvas claims `width` x `height`."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 1
    data = bytearray(save(Image.new("RGB", (4, 4), "red"), "WEBP", exif=exif.tobytes()))
    assert data[12:16] == b"VP8X"
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("RGB", (4, 4), "red"), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("RGB", (8, 8), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("L", (4, 4)), "TIFF"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: rewritten as LONG
            struct.pack_into("<HII", data, entry + 2, 4, 1, width if tag == 256 else height)
    return bytes(data)


HUGE_BOMBS = {
    "png 100000x100000": lambda: png_declaring(100_000, 100_000),
    "gif screen 65535x65535": lambda: gif_declaring((65535, 65535)),
    "gif frame 65535x65535 on a 4x4 screen": lambda: gif_declaring((4, 4), (65535, 65535)),
    "webp canvas 16383x16383": lambda: webp_declaring(16383, 16383),
    "bmp 50000x50000": lambda: bmp_declaring(50_000, 50_000),
    "jpeg 65500x65500": lambda: jpeg_declaring(65500, 65500),
    "tiff 100000x100000": lambda: tiff_declaring(100_000, 100_000),
}
# Under Pillow's own limit (about 89 MP): only decode_image's max_pixels stops these.
MODERATE_BOMBS = {
    "png": lambda: png_declaring(5000, 5000),
    "gif": lambda: gif_declaring((5000, 5000)),
    "webp": lambda: webp_declaring(5000, 5000),
    "bmp": lambda: bmp_declaring(5000, 5000),
    "jpeg": lambda: jpeg_declaring(5000, 5000),
    "tiff": lambda: tiff_declaring(5000, 5000),
}


# --- accepted formats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, tolerance",
    [("PNG", 0), ("TIFF", 0), ("BMP", 0), ("GIF", 0), ("JPEG", 12), ("WEBP", 24)],
)
def test_each_format_round_trips(fmt, tolerance):
    source = gradient()
    if fmt == "GIF":  # palette format: compare against what the palette can hold
        source = source.quantize(256).convert("RGB")
    image = decode(save(source, fmt))
    assert (image.mode, image.size) == ("RGB", source.size)
    assert np.abs(pixels(image) - pixels(source)).max() <= tolerance


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_alpha_is_kept(fmt):
    source = gradient().convert("RGBA")
    source.putalpha(Image.linear_gradient("L").resize(source.size))
    image = decode(save(source, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert image.mode == "RGBA"
    assert np.array_equal(pixels(image)[..., 3], pixels(source)[..., 3])


def test_fully_opaque_alpha_becomes_rgb():
    assert decode(save(gradient().convert("RGBA"), "PNG")).mode == "RGB"


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animation_or_pages_give_the_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "lime", "blue")]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode(data)
    assert image.size == (8, 8)
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_result_is_detached_and_carries_no_metadata():
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Phone"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = decode(save(gradient(), "JPEG", exif=exif.tobytes(), icc_profile=icc, comment=b"hi"))
    assert type(image) is Image.Image  # not an ImageFile holding the input
    assert image.info == {}
    assert len(image.getexif()) == 0


# --- orientation -----------------------------------------------------------------------------

# Where the red pixel stored at the top-left of a 2x3 image is seen, and the size seen.
ORIENTED = {
    1: ((0, 0), (2, 3)),
    2: ((1, 0), (2, 3)),  # mirrored
    3: ((1, 2), (2, 3)),  # rotated 180
    4: ((0, 2), (2, 3)),  # flipped
    5: ((0, 0), (3, 2)),  # transposed
    6: ((2, 0), (3, 2)),  # rotated 90 clockwise: row 0 is the right-hand side
    7: ((2, 1), (3, 2)),  # transversed
    8: ((0, 1), (3, 2)),  # rotated 90 counter-clockwise: row 0 is the left-hand side
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation(orientation):
    stored = Image.new("RGB", (2, 3), "white")
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image = decode(save(stored, "PNG", exif=exif.tobytes()))
    red, size = ORIENTED[orientation]
    assert image.size == size
    assert [xy for xy in np.ndindex(size) if image.getpixel(xy) == (255, 0, 0)] == [red]


def test_exif_orientation_of_a_phone_jpeg():
    stored = Image.new("RGB", (40, 60), "white")
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    image = decode(save(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (60, 40)
    assert pixels(image)[5, 55].tolist() == pytest.approx([255, 0, 0], abs=8)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_does_not_reject_the_image():
    data = save(gradient(), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff garbage")
    assert decode(data).size == (32, 24)


# --- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    image = decode(save(Image.fromarray(values), fmt))
    assert image.mode == "RGB"
    assert pixels(image)[0].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]


def test_every_16_bit_grey_value_rounds_to_the_nearest_8_bit_one():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = pixels(decode(save(Image.fromarray(values), "PNG")))
    assert got.shape == (256, 256, 3) and (got == got[..., :1]).all()
    assert np.array_equal(got[..., 0], np.rint(values / 65535 * 255).astype(int))


def test_16_bit_grey_png_with_a_transparent_value():
    values = np.array([[0, 65535]], np.uint16)
    image = decode(save(Image.fromarray(values), "PNG", transparency=65535))
    assert image.mode == "RGBA"
    assert pixels(image)[0].tolist() == [[0, 0, 0, 255], [255, 255, 255, 0]]


def test_16_bit_rgb_png_colour_key_marks_its_own_pixels():
    """Pillow reads 16-bit RGB as each sample's high byte but keeps the tRNS key in 16 bits:
    compared as they were, a near-black key turned grey pixels (high byte 100) transparent."""
    from tests.reliability.crafted import png

    row = b"\x00" + struct.pack(">6H", 100, 100, 100, 25700, 25700, 25700)
    data = png(2, 1, 16, 2, row, ((b"tRNS", struct.pack(">3H", 100, 100, 100)),))
    assert pixels(decode(data))[0].tolist() == [[0, 0, 0, 0], [100, 100, 100, 255]]


def test_16_bit_tiff_sample_format_and_photometric_are_honoured():
    """A signed 16-bit TIFF's -32768 is black and 32767 white; a WhiteIsZero one is inverted
    (Pillow does both only for 8-bit grey)."""
    signed = np.array([[-32768, 0, 32767]], np.int16).view(np.uint16)
    image = decode(save(Image.fromarray(signed), "TIFF", tiffinfo={339: 2}))
    assert pixels(image)[0, :, 0].tolist() == [0, 128, 255]
    white_is_zero = decode(save(Image.fromarray(np.array([[0, 65535]], np.uint16)), "TIFF", tiffinfo={262: 0}))
    assert pixels(white_is_zero)[0, :, 0].tolist() == [255, 0]


def test_32_bit_integer_tiff_is_read_as_16_bit_range():
    image = decode(save(Image.fromarray(np.array([[0, 65535, 70000]], np.int32), "I"), "TIFF"))
    assert pixels(image)[0, :, 0].tolist() == [0, 255, 255]


def test_unsigned_32_bit_tiff_is_not_read_as_signed():
    # Pillow holds it in int32: from 2**31 up it read as negative, the brightest pixels black.
    values = np.array([[0, 65535, -2**31, -1]], np.int32)  # the last two: 2**31 and 2**32 - 1 unsigned
    signed = save(Image.fromarray(values, "I"), "TIFF")  # Pillow writes SampleFormat 2 (signed)
    unsigned = signed.replace(struct.pack("<HHIH", 339, 3, 1, 2), struct.pack("<HHIH", 339, 3, 1, 1))
    assert unsigned != signed
    assert pixels(decode(signed))[0, :, 0].tolist() == [0, 255, 0, 0]
    assert pixels(decode(unsigned))[0, :, 0].tolist() == [0, 255, 255, 255]


@pytest.mark.parametrize("bits, row, key, expected", [
    (2, [0b11100100], 3, [0, 255, 255, 255]),  # values 3, 2, 1, 0; key 3
    (4, [0xF5, 0x00], 5, [255, 0, 255, 255]),  # values 15, 5, 0, 0; key 5
])
def test_low_bit_grey_png_colour_key_marks_its_own_pixels(bits, row, key, expected):
    # Pillow scales 2- and 4-bit grey to 8 bits but keeps the tRNS value as stored: no pixel
    # matched it, and the picture came out opaque.
    from tests.reliability.crafted import png

    data = png(4, 1, bits, 0, b"\x00" + bytes(row), ((b"tRNS", struct.pack(">H", key)),))
    image = decode(data)
    assert image.mode == "RGBA" and pixels(image)[0, :, 3].tolist() == expected


def test_float_tiff_is_read_as_0_to_1():
    values = np.array([[0.0, 0.5, 1.0, 7.0, -1.0, np.nan]], np.float32)
    image = decode(save(Image.fromarray(values, "F"), "TIFF"))
    assert pixels(image)[0, :, 0].tolist() == [0, 128, 255, 255, 0, 0]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_becomes_rgba(fmt):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255])
    palette_image.putpixel((1, 0), 1)
    image = decode(save(palette_image, fmt, transparency=1))
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0)) == (255, 0, 0, 255)
    assert image.getpixel((1, 0))[3] == 0


def test_palette_without_transparency_becomes_rgb():
    palette_image = gradient().quantize(16)
    image = decode(save(palette_image, "PNG"))
    assert image.mode == "RGB"
    assert np.array_equal(pixels(image), pixels(palette_image.convert("RGB")))


def test_rgb_with_colour_key_becomes_rgba():
    image = decode(save(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG", transparency=(1, 2, 3)))
    assert image.getpixel((0, 0)) == (1, 2, 3, 0)


@pytest.mark.parametrize("fmt, tolerance", [("JPEG", 6), ("TIFF", 0)])
def test_cmyk_becomes_rgb(fmt, tolerance):
    image = decode(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), fmt))
    assert image.mode == "RGB"
    assert pixels(image)[8, 8].tolist() == pytest.approx([255, 0, 0], abs=tolerance)


def test_cielab_tiff_becomes_the_same_colours_in_rgb():
    """L 50, a 0, b 0 is a mid grey (sRGB 119), not (0, 84, 251) as a plain conversion gives;
    pure red's L*a*b* (54, 81, 70) comes back red."""
    grey = decode(save(Image.new("LAB", (4, 4), (127, 128, 128)), "TIFF"))
    assert grey.mode == "RGB" and pixels(grey)[2, 2].tolist() == pytest.approx([119, 119, 119], abs=2)
    red = decode(save(Image.new("LAB", (4, 4), (138, 128 + 80, 128 + 67)), "TIFF"))
    assert pixels(red)[2, 2].tolist() == pytest.approx([255, 0, 0], abs=12)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_grey_with_alpha_becomes_rgba(fmt):
    image = decode(save(Image.new("LA", (2, 2), (100, 128)), fmt))
    assert (image.mode, image.getpixel((0, 0))) == ("RGBA", (100, 100, 100, 128))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_one_bit_and_grey_become_rgb(fmt):
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    image = decode(save(one_bit, fmt))
    assert (image.mode, image.getpixel((0, 0)), image.getpixel((1, 0))) == (
        "RGB", (0, 0, 0), (255, 255, 255),
    )
    assert decode(save(Image.new("L", (1, 1), 77), fmt)).getpixel((0, 0)) == (77, 77, 77)


def bmp_v4(alpha: int) -> bytes:
    """A 4x4 32-bit BMP with a BITMAPV4HEADER whose bit fields include an alpha mask, every
    pixel (200, 20, 30) with `alpha`: what Windows programs write, often with alpha left 0."""
    data = bytes([30, 20, 200, alpha]) * 16
    header = struct.pack("<IiiHHIIiiII", 108, 4, 4, 1, 32, 3, len(data), 2835, 2835, 0, 0)
    header += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + bytes(48)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + len(data), 0, 0, 14 + len(header)) + header + data


def test_a_bmp_alpha_channel_left_at_zero_is_opaque_as_browsers_show_it():
    assert decode(bmp_v4(alpha=0)).getpixel((0, 0)) == (200, 20, 30)  # was (200, 20, 30, 0): invisible
    assert decode(bmp_v4(alpha=128)).getpixel((0, 0)) == (200, 20, 30, 128)  # a used alpha is kept
    assert decode(save(Image.new("RGBA", (2, 2), (1, 2, 3, 0)), "PNG")).getpixel((0, 0)) == (1, 2, 3, 0)


def test_a_png_whose_compressed_text_is_over_pillows_limit_decodes_without_it():
    # Photoshop's XMP can inflate past PngImagePlugin.MAX_TEXT_CHUNK (1 MB); Pillow refused the
    # whole file, reported as "truncated or corrupt PNG". The text is dropped on decode anyway.
    from PIL import PngImagePlugin

    picture = gradient()
    for place in ("before", "after"):  # the chunk read with the header, or once the pixels are
        info = PngImagePlugin.PngInfo()
        info.add_text("XML:com.adobe.xmp", "<x:xmpmeta/>" * 200_000, zip=True)
        data = save(picture, "PNG", pnginfo=info)
        if place == "after":  # the text chunk moved behind the image data
            start = data.index(b"zTXt") - 4
            end = start + 12 + int.from_bytes(data[start:start + 4], "big")
            iend = data.index(b"IEND") - 4
            data = data[:start] + data[end:iend] + data[start:end] + data[iend:]
        assert b"zTXt" in data and len(data) < 100_000
        assert np.array_equal(pixels(decode(data)), pixels(picture)), place
    with pytest.raises(ImageDecodeError, match="truncated or corrupt PNG"):  # a broken chunk walk
        decode(data[:-20] + b"\x00" * 4)
    # Many chunks each under 1 MB, together over Pillow's 64 MB for all text.
    info = PngImagePlugin.PngInfo()
    for number in range(80):
        info.add_text(f"note{number}", "x" * 900_000, zip=True)
    assert np.array_equal(pixels(decode(save(picture, "PNG", pnginfo=info))), pixels(picture))
    # A colour profile over the limit is not text: it is named, not dropped (the colours need it).
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for text in (info, None):  # with text to drop first, and alone
        huge = save(picture, "PNG", icc_profile=profile + bytes(2_000_000), pnginfo=text)
        with pytest.raises(ImageDecodeError, match=r"^PNG whose colour profile \(iCCP\) unpacks to more than Pillow"):
            decode(huge)
    # A file that ends after its last chunk without IEND, as Pillow reads it, is walked too.
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", "<x:xmpmeta/>" * 200_000, zip=True)
    data = save(picture, "PNG", pnginfo=info)
    start = data.index(b"zTXt") - 4
    end = start + 12 + int.from_bytes(data[start:start + 4], "big")
    iend = data.index(b"IEND") - 4
    ending_in_text = data[:start] + data[end:iend] + data[start:end]
    assert np.array_equal(pixels(decode(ending_in_text)), pixels(picture))


def test_premultiplied_alpha_tiff_is_unpremultiplied():
    # (200, 100, 50) at half coverage, stored premultiplied: ExtraSamples = 1 (associated).
    data = save(Image.new("RGBA", (2, 2), (100, 50, 25, 128)), "TIFF")
    extra_samples = data.index(struct.pack("<HHIH", 338, 3, 1, 2))
    data = data[: extra_samples + 8] + struct.pack("<H", 1) + data[extra_samples + 10 :]
    image = decode(data)
    assert image.mode == "RGBA"
    assert pixels(image)[0, 0].tolist() == pytest.approx([200, 100, 50, 128], abs=2)


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_other_colour_spaces_become_rgb(mode):
    image = decode(save(Image.new("RGB", (2, 2), (200, 30, 60)).convert(mode), "TIFF"))
    assert image.mode == "RGB"
    assert pixels(image)[0, 0].tolist() == pytest.approx([200, 30, 60], abs=3)


# --- ICC profiles ----------------------------------------------------------------------------


def _s15fixed16(values) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def rgb_profile(red, green, blue) -> bytes:
    """A minimal ICC v2 matrix profile: linear curves and the given XYZ (D50) primaries."""
    xyz = lambda v: b"XYZ \0\0\0\0" + _s15fixed16(v)  # noqa: E731
    linear = b"curv\0\0\0\0" + struct.pack(">I", 0)
    d50 = (0.9642, 1.0, 0.8249)
    tags = [
        (b"wtpt", xyz(d50)), (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green)), (b"bXYZ", xyz(blue)),
        (b"rTRC", linear), (b"gTRC", linear), (b"bTRC", linear),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        table += struct.pack(">4sII", signature, offset + len(body), len(data))
        body += data
    header = struct.pack(
        ">I4sI4s4s4s12s4s", offset + len(body), b"none", 0x02100000, b"mntr", b"RGB ", b"XYZ ",
        bytes(12), b"acsp",
    )
    header += bytes(28) + _s15fixed16(d50) + bytes(48)
    return header + table + body


def test_icc_profile_is_converted_to_srgb():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile
    red, green, blue = (c[0] for c in (srgb.red_colorant, srgb.green_colorant, srgb.blue_colorant))
    swapped = rgb_profile(green, red, blue)  # what the file calls red is sRGB's green
    image = decode(save(Image.new("RGB", (2, 2), (255, 0, 0)), "PNG", icc_profile=swapped))
    assert image.getpixel((0, 0)) == (0, 255, 0)
    assert image.info == {}


def test_an_srgb_profile_is_recognised_once_and_its_pictures_are_not_transformed(monkeypatch):
    """Phones and cameras embed sRGB profiles: each picture went through a whole LittleCMS
    transform (0.18 s a 12 MP photo) that changed no pixel."""
    from image import codec

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    picture = noise(size=(48, 32))
    codec._SRGB_PROFILES.clear()
    transforms = []
    real = ImageCms.profileToProfile
    monkeypatch.setattr(ImageCms, "profileToProfile", lambda *a, **k: transforms.append(a[0].size) or real(*a, **k))
    for _ in range(3):
        assert np.array_equal(pixels(decode(save(picture, "PNG", icc_profile=srgb))), pixels(picture))
    assert transforms == [(4096, 4096)]  # the profile tried once, on every colour; no picture after
    # Another profile's pictures are still converted (red and green swapped, as below).
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile
    red, green, blue = (c[0] for c in (profile.red_colorant, profile.green_colorant, profile.blue_colorant))
    assert codec._srgb_already(srgb) and not codec._srgb_already(rgb_profile(green, red, blue))


def test_icc_profile_of_a_palette_image_describes_its_colours():
    # A palette PNG with an RGB profile: its colours are converted (through RGB first), not
    # its palette indices, and not left as they were.
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile
    red, green, blue = (c[0] for c in (srgb.red_colorant, srgb.green_colorant, srgb.blue_colorant))
    swapped = rgb_profile(green, red, blue)
    source = Image.new("RGB", (4, 2), (255, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert source.mode == "P"
    image = decode(save(source, "PNG", icc_profile=swapped))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 255, 0)


def test_embedded_srgb_profile_keeps_the_colours():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = gradient().convert("RGBA")
    source.putalpha(100)
    image = decode(save(source, "PNG", icc_profile=srgb))
    assert image.mode == "RGBA"
    assert np.abs(pixels(image) - pixels(source)).max() <= 1


def grey_profile(gamma: float) -> bytes:
    """A minimal ICC v2 grey profile: a gamma curve (kTRC) and a D50 white point."""
    d50 = (0.9642, 1.0, 0.8249)
    tags = [(b"wtpt", b"XYZ \0\0\0\0" + _s15fixed16(d50)),
            (b"kTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2))]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        table += struct.pack(">4sII", signature, offset + len(body), len(data))
        body += data
    header = struct.pack(">I4sI4s4s4s12s4s", offset + len(body), b"none", 0x02100000, b"mntr", b"GRAY", b"XYZ ",
                         bytes(12), b"acsp")
    header += bytes(28) + _s15fixed16(d50) + bytes(48)
    return header + table + body


def test_a_grey_profile_applies_to_grey_with_a_transparent_value_too():
    """Grey with a tRNS key became RGBA before its profile was applied: a grey profile
    cannot take RGB pixels, the error was swallowed, and the colours stayed unconverted."""
    source = Image.fromarray(np.array([[128, 64, 255]], np.uint8))
    linear = grey_profile(1.0)
    plain = decode(save(source, "PNG", icc_profile=linear))
    keyed = decode(save(source, "PNG", icc_profile=linear, transparency=64))
    assert pixels(plain)[0, 0, 0] > 150  # linear 128 is a light sRGB grey (about 188)
    assert keyed.mode == "RGBA" and np.array_equal(pixels(keyed)[..., :3], pixels(plain))
    assert pixels(keyed)[0, :, 3].tolist() == [255, 0, 255]


@pytest.mark.parametrize(
    "profile",
    [b"not a profile", ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()],
    ids=["garbage", "another colour space"],
)
def test_unusable_icc_profile_keeps_the_pixels(profile):
    source = gradient()
    assert np.array_equal(pixels(decode(save(source, "PNG", icc_profile=profile))), pixels(source))


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_file_of_each_format(fmt):
    data = save(noise(), fmt)
    with pytest.raises(ImageDecodeError, match=f"truncated or corrupt {fmt}"):
        decode(data[: len(data) // 2])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_truncated_compressed_tiff_that_lost_its_directory():
    data = save(noise(), "TIFF", compression="tiff_deflate")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt TIFF"):
        decode(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [
        b"hello, I am a text file pretending to be image/jpeg\n",
        b"<html><body>403 Forbidden</body></html>",
        save(Image.new("RGB", (16, 16)), "ICO"),
        b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 4, 4, 8, 3) + bytes(64),  # PSD
        save(Image.new("RGB", (4, 4)), "PPM"),
    ],
    ids=["text", "html", "ico", "psd", "ppm"],
)
def test_not_a_supported_image(data):
    with pytest.raises(ImageDecodeError, match=r"not a supported image \(PNG, JPEG, WebP"):
        decode(data)


def _iso_media(major: bytes, *compatible: bytes) -> bytes:
    box = b"ftyp" + major + bytes(4) + b"".join(compatible)
    return (len(box) + 4).to_bytes(4) + box + bytes(64)


@pytest.mark.parametrize(
    "data, kind",
    [
        (save(Image.new("RGB", (16, 16)), "AVIF"), "AVIF"),
        (_iso_media(b"heic", b"mif1", b"heic"), "HEIC"),  # as an iPhone writes it
        (_iso_media(b"mif1", b"mif1", b"heic"), "HEIC"),
        (_iso_media(b"mif1", b"mif1"), "HEIF"),
        (_iso_media(b"isom", b"isom", b"mp41"), "video or other ISO media ('isom')"),
        (b"\xff\x0a" + bytes(32), "JPEG XL"),
        (b"%PDF-1.7\n" + bytes(32), "PDF"),
        (b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 4, 4, 8, 3) + bytes(64), "Photoshop (PSD)"),
    ],
    ids=["avif", "heic", "heif-heic", "heif", "mp4", "jxl", "pdf", "psd"],
)
def test_known_refused_kinds_are_named(data, kind):
    with pytest.raises(ImageDecodeError) as raised:
        decode(data)
    assert str(raised.value).startswith(f"{kind} file: not a supported image (PNG, JPEG, WebP, GIF, TIFF, BMP); "
                                        "convert it")


def test_zero_bytes():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode(b"")


def test_image_with_no_pixels():
    with pytest.raises(ImageDecodeError):
        decode(png_declaring(0, 4))


def test_oversize_bytes():
    data = save(gradient(), "PNG")
    assert decode(data, max_bytes=len(data)).size == (32, 24)
    limit = len(data) - 1
    with pytest.raises(ImageTooLarge, match=f"{len(data):,} bytes .* limit of {limit:,} bytes"):
        decode(data, max_bytes=len(data) - 1)


def test_pixel_limit_is_inclusive():
    data = save(Image.new("RGB", (100, 50)), "PNG")
    assert decode(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(DecompressionBomb, match="100x50 = 5,000 pixels, over the limit of 4,999"):
        decode(data, max_pixels=4999)


# --- decompression bombs ---------------------------------------------------------------------


@pytest.mark.parametrize("make", HUGE_BOMBS.values(), ids=HUGE_BOMBS.keys())
def test_tiny_file_with_enormous_dimensions(make):
    data = make()
    assert len(data) < 1000
    with pytest.raises(DecompressionBomb, match="pixels"):
        decode(data)


@pytest.mark.parametrize("make", MODERATE_BOMBS.values(), ids=MODERATE_BOMBS.keys())
def test_bomb_under_pillows_limit_is_caught_by_ours(make):
    message = "5000x5000 = 25,000,000 pixels, over the limit of 1,000,000 pixels"
    with pytest.raises(DecompressionBomb, match=message):
        decode(make())


def test_pillows_own_bomb_limit_is_a_decompression_bomb_too():
    # Quoting the limit that applies, not Pillow's where ours (IMAGEN_MAX_PIXELS) is lower.
    with pytest.raises(DecompressionBomb, match="^image declares 400,000,000 pixels, over the limit of 16,777,216"):
        decode(png_declaring(20_000, 20_000), max_pixels=16_777_216)  # over twice Pillow's limit
    with pytest.raises(DecompressionBomb, match="400,000,000 pixels, over the limit of 178,956,970 pixels$"):
        decode(png_declaring(20_000, 20_000), max_pixels=10**12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DecompressionBomb, match="100,000,000 pixels, over the limit of 89,478,485 pixels$"):
            decode(png_declaring(10_000, 10_000), max_pixels=10**12)  # over Pillow's limit


def test_pillows_warning_for_an_image_under_our_limit_is_no_stderr_line():
    # Between Pillow's limit and twice it, Pillow warned on stderr (plain text, no job id)
    # before our own check refused the image, or let it through where IMAGEN_MAX_PIXELS allows.
    code = ("from tests.unit.test_codec import png_declaring\n"
            "from image.codec import decode_image\n"
            "try:\n"
            "    decode_image(png_declaring(10_000, 10_000), max_bytes=10**8, max_pixels=16_777_216)\n"
            "except Exception as error:\n"
            "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout == "image declares 10000x10000 = 100,000,000 pixels, over the limit of 16,777,216 pixels\n"
    assert done.stderr == ""


def test_a_jpeg_repeating_its_scans_is_refused_before_decoding():
    """A progressive JPEG whose last scan is repeated 20,000 times (726 KB) decoded for hours:
    each scan decodes the whole image again."""
    buffer = io.BytesIO()
    Image.new("L", (256, 256), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]
    hostile = data[:-2] + last_scan * 2_000 + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match="JPEG with more than 256 scans"):
        decode(hostile)
    # A normal progressive JPEG, with an EXIF thumbnail (a JPEG with scans of its own), decodes.
    thumbnail = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(thumbnail, "JPEG", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 1
    photo = io.BytesIO()
    Image.new("RGB", (300, 200), "blue").save(photo, "JPEG", progressive=True, exif=exif.tobytes())
    assert decode(photo.getvalue()).size == (300, 200)
    from image.codec import _jpeg_scans

    assert 2 <= _jpeg_scans(photo.getvalue(), 1000) <= 20
    assert _jpeg_scans(hostile, 1000) == 1000  # stops counting at the limit
    # Restart markers and fill bytes: one scan each way, and a baseline JPEG one.
    restarts = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(restarts, "JPEG", restart_marker_blocks=1)
    baseline = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(baseline, "JPEG")
    filled = baseline.getvalue().replace(b"\xff\xda", b"\xff\xff\xff\xda", 1)  # fill bytes before SOS
    assert [_jpeg_scans(data, 1000) for data in (restarts.getvalue(), baseline.getvalue(), filled)] == [1, 1, 1]
    assert decode(filled).size == (64, 64)


def test_a_large_jpeg_may_repeat_fewer_scans():
    # 256 scans of 64 MP (the default pixel limit) took 16 s to decode on one core; of 16.8 MP 5 s.
    from image.codec import MAX_JPEG_SCANS, MIN_JPEG_SCANS, max_jpeg_scans

    assert max_jpeg_scans((4096, 4096)) == max_jpeg_scans((10, 10)) == MAX_JPEG_SCANS
    assert max_jpeg_scans((8192, 8192)) == 64 and max_jpeg_scans((20_000, 20_000)) == MIN_JPEG_SCANS
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]
    repeated = data[:-2] + last_scan * 90 + b"\xff\xd9"  # under 256 scans: a small image decodes
    assert decode(repeated).size == (64, 64)
    frame = repeated.index(b"\xff\xc2") + 5  # the progressive frame header's height and width
    large = repeated[:frame] + struct.pack(">HH", 8192, 8192) + repeated[frame + 4:]
    with pytest.raises(ImageDecodeError, match=r"^JPEG with more than 64 scans at 8192x8192 \(9\d\): refused"):
        decode(large, max_pixels=10**8)


def test_counting_the_scans_of_hostile_bytes_is_linear():
    """A run of FF bytes made the marker search start again from each of them: 80 KB took
    78 s, holding the GIL (health checks and lease renewals stalled), and 1 MB hours. Each case
    here took far longer than the suite's timeout before."""
    from image.codec import _jpeg_scans

    for data in (b"\xff\xd8" + b"\xff" * 2_000_000 + b"\x00", b"\xff\xd8" + b"\xff\xd0" * 1_000_000):
        assert _jpeg_scans(data, 257) == 0
        with pytest.raises(ImageDecodeError):
            decode(data)
    # Millions of empty segments (FF C4 00 02): 50 MB of them took ~20 s of Python.
    with pytest.raises(ImageDecodeError, match="JPEG with more than 10000 segments"):
        decode(b"\xff\xd8" + b"\xff\xc4\x00\x02" * 1_000_000)


def test_png_takes_run_length_deflate_for_photos_and_the_default_for_graphics(monkeypatch):
    """Level 6's default strategy spent 2-5 times as long (billed GPU-instance time) on photos
    and diffusion outputs searching for distant repeats their filtered rows hardly hold; but
    run-length deflate made text, line art and patterns 2 to 80 times larger. A sample of the
    picture chooses; either way lossless and about as small as the default."""
    import zlib

    from PIL import ImageDraw

    seen = []
    original = Image.Image.save

    def spy(self, fp, format=None, **params):
        if self.size == picture.size and "compress_type" in params:  # the output's own save, not the sample's
            seen.append(params["compress_type"])
        return original(self, fp, format, **params)

    x = np.linspace(0, 255, 256)[None, :, None].repeat(192, 0).repeat(3, 2)
    photo = Image.fromarray(np.clip(x + np.random.default_rng(1).normal(0, 3, x.shape), 0, 255).astype(np.uint8))
    text = Image.new("RGB", (256, 192), "white")
    for row in range(0, 192, 12):
        ImageDraw.Draw(text).text((2, row), "imagen 0123456789 imagen", fill=(0, 0, 0))
    tile = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pattern = Image.fromarray(np.tile(tile, (12, 16, 1)))
    monkeypatch.setattr(Image.Image, "save", spy)
    for picture, strategy in ((photo, zlib.Z_RLE), (text, zlib.Z_DEFAULT_STRATEGY),
                              (pattern, zlib.Z_DEFAULT_STRATEGY)):
        data = encode_image(picture, "png")
        assert seen.pop() == strategy
        assert np.array_equal(pixels(decode(data)), pixels(picture))
        assert len(data) <= 1.1 * len(save(picture, "PNG", compress_level=6))


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_floods_of_png_chunks_or_gif_blocks_are_refused_before_pillow_reads_them():
    """Pillow reads each PNG chunk and GIF extension block in Python and keeps the unknown
    ones: a 1x1 picture under the byte limit with millions of empty ones took 17 s and 0.5 GB
    (PNG), 10 s and 2 GB (GIF) to open, on every delivery."""
    png = save(Image.new("RGB", (1, 1)), "PNG")
    flood = png[:33] + _png_chunk(b"prVt") * 200_000 + png[33:]  # after IHDR
    with pytest.raises(ImageDecodeError, match="PNG with more than 12,343 chunks for its 2,400,069 bytes"):
        decode(flood)
    gif = save(Image.new("P", (1, 1)), "GIF")
    start = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)  # after the global colour table
    comment = b"\x21\xfe" + b"\x01x" * 200_000 + b"\x00"
    with pytest.raises(ImageDecodeError, match="GIF with more than 100,000 extension blocks"):
        decode(gif[:start] + comment + gif[start:])
    # Image data in 1 KiB chunks (encoders write 8 to 64 KiB), a comment of a few blocks: read.
    picture = noise(size=(256, 256))
    whole = save(picture, "PNG", compress_level=0)
    first, end = whole.index(b"IDAT") - 4, whole.index(b"IEND") - 4
    idat = b"".join(whole[p + 8:p + 8 + int.from_bytes(whole[p:p + 4], "big")]
                    for p in _chunk_positions(whole, first, end))
    small = whole[:first] + b"".join(_png_chunk(b"IDAT", idat[i:i + 1024]) for i in range(0, len(idat), 1024)) + \
        whole[end:]
    assert small.count(b"IDAT") > 190
    assert np.array_equal(pixels(decode(small)), pixels(picture))
    assert pixels(decode(gif[:start] + b"\x21\xfe" + b"\x05hello" * 40 + b"\x00" + gif[start:])).shape == (1, 1, 3)


def _chunk_positions(data: bytes, start: int, end: int):
    while start < end:
        yield start
        start += 12 + int.from_bytes(data[start:start + 4], "big")


def test_a_corrupt_tag_in_a_high_depth_tiff_is_read_as_absent_not_a_crash():
    # A float TIFF whose Photometric entry points past the file: KeyError from deep in Pillow,
    # retried as an unexpected fault for 30 minutes instead of reported.
    import struct

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48), 0.5, np.float32), "F").save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack_from("<H", data, entry)[0] == 262:
            struct.pack_into("<II", data, entry + 4, 50, 1)
    image = decode(bytes(data))
    assert image.size == (48, 32) and image.getpixel((0, 0)) == (128, 128, 128)


def test_bombs_allocate_little_python_memory():
    # tracemalloc sees Python's allocations (copies of the bytes, arrays) but not Pillow's
    # or libwebp's pixel buffers: those are checked in a child process below.
    bombs = [make() for make in (*HUGE_BOMBS.values(), *MODERATE_BOMBS.values())]
    tracemalloc.start()
    try:
        for data in bombs:
            with pytest.raises(DecompressionBomb):
                decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from PIL import Image
    from image.codec import decode_image
    from image.errors import DecompressionBomb

    Image.MAX_IMAGE_PIXELS = None  # leave decode_image's own checks as the only guard
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # any large allocation fails
    max_pixels = int(sys.argv[1])
    for path in sys.argv[2:]:
        try:
            decode_image(Path(path).read_bytes(), max_bytes=10**7, max_pixels=max_pixels)
            print("decoded", flush=True)
        except DecompressionBomb:
            print("bomb", flush=True)
        except BaseException as error:  # MemoryError, or a decoder that could not allocate
            print("failed", type(error).__name__, flush=True)
    """
)


def _decode_in_child(tmp_path: Path, bombs: dict, max_pixels: int) -> list[str]:
    paths = []
    for index, make in enumerate(bombs.values()):
        paths.append(tmp_path / f"bomb{index}")
        paths[-1].write_bytes(make())
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(max_pixels), *map(str, paths)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_bombs_are_refused_before_any_large_allocation(tmp_path):
    """With Pillow's limit off and 1 GiB of address space, every bomb is still a clean refusal."""
    assert _decode_in_child(tmp_path, HUGE_BOMBS, MAX_PIXELS) == ["bomb"] * len(HUGE_BOMBS)


def test_the_child_would_notice_a_large_allocation(tmp_path):
    # Two of the bombs with the limit lifted, proving the address-space cap above has teeth.
    # These two allocate while Pillow opens them, so only the header check can stop them.
    names = ("gif frame 65535x65535 on a 4x4 screen", "webp canvas 16383x16383")
    lines = _decode_in_child(tmp_path, {name: HUGE_BOMBS[name] for name in names}, 10**12)
    assert len(lines) == 2 and all(line.startswith("failed") for line in lines)


# --- encoding --------------------------------------------------------------------------------


def test_output_formats_and_content_types():
    assert OUTPUT_FORMATS == ("png", "webp", "jpeg")
    assert set(CONTENT_TYPES) == set(OUTPUT_FORMATS)
    assert CONTENT_TYPES["jpeg"] == "image/jpeg"


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_encode_each_format(fmt, mode):
    source = gradient().convert(mode)
    if mode == "RGBA":
        source.putalpha(128)  # libwebp writes an opaque alpha as RGB
    data = encode_image(source, fmt)
    written = Image.open(io.BytesIO(data))
    assert written.format == fmt.upper()
    assert written.size == source.size
    assert written.mode == ("RGB" if fmt == "jpeg" else mode)
    assert data == encode_image(source, fmt)  # deterministic


def test_png_is_lossless_and_ignores_quality():
    source = noise("RGBA")
    data = encode_image(source, "png", quality=5)
    assert data == encode_image(source, "png", quality=100)
    assert np.array_equal(pixels(Image.open(io.BytesIO(data))), pixels(source))


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_quality_changes_size(fmt):
    source = noise()
    assert len(encode_image(source, fmt, quality=10)) < len(encode_image(source, fmt, quality=95))


@pytest.mark.parametrize(("fmt", "side"), [("webp", 16383), ("jpeg", 65500)])
def test_a_format_refuses_more_than_its_largest_side_as_an_input_error(fmt, side):
    """Pillow's encoders fail with ValueError / OSError past these; that is the user's
    parameter, not a transient fault, so it is ImageTooLarge naming the formats that fit."""
    assert encode_image(Image.new("RGB", (side, 1)), fmt)
    with pytest.raises(ImageTooLarge, match=f"{fmt} image is at most {side} pixels.*choose format png"):
        encode_image(Image.new("RGB", (1, side + 1)), fmt)


def test_jpeg_composites_alpha_over_white():
    source = Image.new("RGBA", (16, 8), (255, 0, 0, 255))
    source.paste((0, 0, 255, 0), (8, 0, 16, 8))
    written = pixels(Image.open(io.BytesIO(encode_image(source, "jpeg", quality=95))))
    assert written[4, 2].tolist() == pytest.approx([255, 0, 0], abs=8)
    assert written[4, 13].tolist() == pytest.approx([255, 255, 255], abs=8)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_gps_exif_does_not_survive_decode_and_encode(fmt):
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Phone"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 12.0)
    data = save(gradient(), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)

    written = Image.open(io.BytesIO(encode_image(decode(data), fmt)))
    assert len(written.getexif()) == 0
    assert not {"exif", "icc_profile", "xmp", "comment"} & set(written.info)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encode_ignores_metadata_left_on_the_image(fmt):
    source = gradient()
    source.info.update(
        exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00",
        icc_profile=rgb_profile((1, 0, 0), (0, 1, 0), (0, 0, 1)),
        transparency=(0, 0, 0),
        comment=b"secret",
        xmp=b"<x:xmpmeta/>",
    )
    written = Image.open(io.BytesIO(encode_image(source, fmt)))
    assert written.mode == "RGB"
    assert not {"exif", "icc_profile", "transparency", "comment", "xmp"} & set(written.info)


def test_encode_keeps_a_colour_key_as_alpha():
    source = Image.new("RGB", (2, 1), (9, 9, 9))
    source.putpixel((1, 0), (1, 2, 3))
    source.info["transparency"] = (1, 2, 3)
    written = Image.open(io.BytesIO(encode_image(source, "png")))
    assert written.mode == "RGBA"
    assert (written.getpixel((1, 0))[3], written.getpixel((0, 0))[3]) == (0, 255)


@pytest.mark.parametrize(
    "source, mode",
    [
        (Image.new("L", (4, 4), 9), "L"),
        (Image.new("LA", (4, 4), (9, 100)), "LA"),
        (Image.fromarray(np.full((4, 4), 65535, np.uint16)), "RGB"),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "RGB"),
    ],
    ids=["L", "LA", "I;16", "CMYK"],
)
def test_encode_png_from_other_modes(source, mode):
    written = Image.open(io.BytesIO(encode_image(source, "png")))
    assert written.mode == mode
    assert np.asarray(written).flat[0] in (9, 255)


@pytest.mark.parametrize(
    "kwargs",
    [{"format": "gif"}, {"format": "PNG"}, {"quality": 0}, {"quality": 101}, {"quality": True},
     {"quality": "90"}, {"quality": 90.0}],
)
def test_encode_rejects_bad_parameters(kwargs):
    with pytest.raises(InvalidParameter):
        encode_image(gradient(), **kwargs)


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "GIF")
    return buffer.getvalue()


def test_a_reader_missing_from_pillow_is_this_installations_fault_not_the_files(monkeypatch):
    # A Pillow without libwebp: Image.open raised KeyError('WEBP') for any file it had not
    # matched before WebP (a GIF), and that read as "truncated or corrupt GIF": a permanent
    # report. Now only a WebP fails, as the process's fault; the other kinds still decode.
    from image import codec

    codec._available_readers.cache_clear()
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != "WEBP"})
    try:
        assert decode_image(_gif(), max_bytes=10**6, max_pixels=10**6).size == (8, 8)
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, "WEBP")
        with pytest.raises(RuntimeError, match=r"^Pillow here has no reader for WEBP .*not the image$"):
            decode_image(buffer.getvalue(), max_bytes=10**6, max_pixels=10**6)
    finally:
        monkeypatch.undo()
        codec._available_readers.cache_clear()


def test_an_import_failing_inside_a_reader_is_not_blamed_on_the_file(monkeypatch):
    from PIL import GifImagePlugin

    def broken(self):
        raise ModuleNotFoundError("No module named 'PIL._imaging_gif'")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", broken)
    with pytest.raises(ModuleNotFoundError):
        decode_image(_gif(), max_bytes=10**6, max_pixels=10**6)
