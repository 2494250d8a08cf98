"""Hostile and odd image files, built byte by byte: declared sizes, truncation, odd modes.

`sample(kind)` is a small valid file of one kind; `declare_size(kind, data, w, h)` rewrites
the size its header declares (pixels) without touching the pixel data, which is how
decompression bombs and "tiny file, enormous dimensions" inputs are made.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# kind -> the largest width and height its header can declare (pixels)
MAX_DECLARED = {
    "PNG": (2**31 - 1, 2**31 - 1),
    "GIF": (65535, 65535),
    "JPEG": (65535, 65535),
    "BMP": (2**31 - 1, 2**31 - 1),
    "TIFF": (2**32 - 1, 2**32 - 1),
    "WEBP-VP8": (16383, 16383),
    "WEBP-VP8L": (16384, 16384),
    "WEBP-VP8X": (2**24, 2**24),
}
KINDS = tuple(MAX_DECLARED)
# WebP's lossless and extended headers store "size minus one": they cannot declare zero.
MIN_DECLARED = {kind: 1 if kind in ("WEBP-VP8L", "WEBP-VP8X") else 0 for kind in KINDS}


def picture(size=(12, 8), mode="RGB") -> Image.Image:
    """A small image with a gradient, so every encoder has something to encode."""
    image = Image.linear_gradient("L").resize(size)
    if mode == "L":
        return image
    rgb = Image.merge("RGB", (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image))
    return rgb.convert(mode) if mode != "RGB" else rgb


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sample(kind: str, size=(12, 8)) -> bytes:
    """A small valid file of `kind` (one of KINDS)."""
    image = picture(size)
    if kind == "WEBP-VP8":
        return encode(image, "WEBP", quality=80)
    if kind == "WEBP-VP8L":
        return encode(image, "WEBP", lossless=True)
    if kind == "WEBP-VP8X":
        return encode(image, "WEBP", quality=80, exif=Image.Exif().tobytes() or b"Exif\x00\x00")
    return encode(image, kind)


def declare_size(kind: str, data: bytes, width: int, height: int) -> bytes:
    """`data` (a file of `kind`) with its header declaring width x height pixels."""
    out = bytearray(data)
    if kind == "PNG":
        struct.pack_into(">II", out, 16, width, height)
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    elif kind == "GIF":
        struct.pack_into("<HH", out, 6, width, height)
        position = _gif_descriptor(out)
        struct.pack_into("<HHHH", out, position + 1, 0, 0, width, height)
    elif kind == "JPEG":
        position = _jpeg_sof(out)
        struct.pack_into(">HH", out, position + 5, height, width)
    elif kind == "BMP":
        struct.pack_into("<ii", out, 18, width, height)
    elif kind == "TIFF":
        _tiff_size(out, width, height)
    elif kind == "WEBP-VP8":
        assert out[12:16] == b"VP8 " and out[23:26] == b"\x9d\x01\x2a"
        struct.pack_into("<HH", out, 26, width & 0x3FFF, height & 0x3FFF)
    elif kind == "WEBP-VP8L":
        assert out[12:16] == b"VP8L" and out[20] == 0x2F
        bits = int.from_bytes(out[21:25], "little")
        bits = (bits & ~0xFFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        out[21:25] = bits.to_bytes(4, "little")
    elif kind == "WEBP-VP8X":
        assert out[12:16] == b"VP8X"
        out[24:27] = (width - 1).to_bytes(3, "little")
        out[27:30] = (height - 1).to_bytes(3, "little")
    else:
        raise ValueError(kind)
    return bytes(out)


def png(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    raw: bytes,
    chunks: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A PNG from raw scanlines (each starting with its filter byte), for modes Pillow cannot
    write (16-bit RGB(A), for one)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    extra = b"".join(chunk(kind, body) for kind, body in chunks)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_16bit_rgb(width=10, height=6, alpha=False) -> bytes:
    channels = 4 if alpha else 3
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")
        for x in range(width):
            values = (x * 6000, y * 10000, 40000, 30000)[:channels]
            row += b"".join(struct.pack(">H", v) for v in values)
        rows.append(bytes(row))
    return png(width, height, 16, 6 if alpha else 2, b"".join(rows))


def zlib_bomb_png(width=5000, height=5000) -> bytes:
    """A real compression bomb: a grey PNG of zeros, a few kilobytes for width x height pixels."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def animated_gif(frames=3, size=(16, 12)) -> bytes:
    images = [picture(size).rotate(90 * i) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buffer.getvalue()


def with_orientation(orientation: int, size=(40, 20)) -> bytes:
    """A JPEG whose EXIF says `orientation` (1..8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture(size), "JPEG", exif=exif.tobytes())


def _gif_descriptor(data: bytearray) -> int:
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[position] == 0x21:
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    assert data[position] == 0x2C, "no image descriptor"
    return position


def _jpeg_sof(data: bytearray) -> int:
    position = 2
    while position < len(data):
        assert data[position] == 0xFF
        marker = data[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return position  # the marker: +4 is the precision, +5 the height, +7 the width
        position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    raise AssertionError("no SOF marker")


def _tiff_size(data: bytearray, width: int, height: int) -> None:
    endian = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack_from(endian + "I", data, 4)[0]
    count = struct.unpack_from(endian + "H", data, offset)[0]
    for i in range(count):
        entry = offset + 2 + 12 * i
        tag = struct.unpack_from(endian + "H", data, entry)[0]
        if tag in (256, 257):
            struct.pack_into(
                endian + "HHII", data, entry, tag, 4, 1, width if tag == 256 else height
            )


# -- the decoder's limit property, shared by the in-process test and the memory-capped run ----


def declared_sizes(max_pixels_up_to: int = 20_000_000):
    """Hypothesis strategy: (kind, width, height, max_pixels) for `check_declared_size`."""
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw):
        kind = draw(st.sampled_from(KINDS))
        (max_width, max_height), low = MAX_DECLARED[kind], MIN_DECLARED[kind]
        # Half near the limit's scale (small), half anywhere the header allows (mostly bombs).
        width = draw(st.integers(low, 5000) | st.integers(low, max_width))
        height = draw(st.integers(low, 5000) | st.integers(low, max_height))
        return kind, width, height, draw(st.integers(1, max_pixels_up_to))

    return strategy()


_SAMPLES: dict[str, bytes] = {}


def check_declared_size(kind: str, width: int, height: int, max_pixels: int) -> str:
    """Decode a `kind` file declaring width x height: over `max_pixels` it must be refused as a
    DecompressionBomb (before any pixel is decoded); otherwise it is decoded or refused as
    corrupt, and a decoded image never has more than `max_pixels` pixels. Returns the outcome."""
    from image.codec import decode_image
    from image.errors import DecompressionBomb, ImageDecodeError

    sample_bytes = _SAMPLES.setdefault(kind, sample(kind))
    data = declare_size(kind, sample_bytes, width, height)
    try:
        image = decode_image(data, max_bytes=10**8, max_pixels=max_pixels)
    except DecompressionBomb:
        assert width * height > max_pixels, f"{kind} {width}x{height} refused under {max_pixels}"
        return "bomb"
    except ImageDecodeError:
        assert width * height <= max_pixels, f"{kind} {width}x{height} not refused as a bomb"
        return "corrupt"
    assert width * height <= max_pixels, f"{kind} {width}x{height} decoded over {max_pixels}"
    assert image.width * image.height <= max_pixels
    return "decoded"
