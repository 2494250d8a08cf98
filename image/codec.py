"""Decoding untrusted image bytes with hard limits, and encoding results.

`decode_image` turns bytes from a bucket into a fully loaded 8-bit "RGB" or "RGBA" image in
sRGB, upright, with no metadata; every way the bytes can be bad is an `InputError`.
`encode_image` writes PNG, WebP or JPEG without any of the input's metadata (EXIF, GPS, XMP,
ICC, comments).

Limits are arguments, not globals: Pillow's `Image.MAX_IMAGE_PIXELS` is process-wide, so it is
neither relied on nor changed here. It still applies on top of `max_pixels`: Pillow refuses to
open an image over twice its value (about 179 MP by default), and that refusal is reported as
a `DecompressionBomb` like ours. Over its value alone Pillow only warns; importing this module
silences that warning process-wide (it went to stderr as plain text, and the size is checked
here against `max_pixels`), so the image is accepted if `max_pixels` allows it. A filter added
later (`warnings.simplefilter("error", Image.DecompressionBombWarning)`) takes precedence: the
image is then a bomb too.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageCms, ImageOps

from image.errors import DecompressionBomb, ImageDecodeError, ImageTooLarge, InvalidParameter

OUTPUT_FORMATS: tuple[str, ...] = ("png", "webp", "jpeg")
CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}

# Pillow plugin names; nothing else is ever tried, which also keeps the many rarely used
# plugins (ICO, PSD, EPS, ...) away from untrusted bytes.
_INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")
_NOT_THE_FILES = (MemoryError, ImportError)  # raised while decoding, yet the process's fault: passed on
_UNSUPPORTED = "not a supported image (PNG, JPEG, WebP, GIF, TIFF, BMP)"

# Kinds people upload that are refused, named in the error so the fix is plain (a phone's
# HEIC photo is the common one). ISO media files are told apart by the brands of their
# "ftyp" box; other kinds by their first bytes.
_ISO_MEDIA_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC",
                     b"heis": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}
_REFUSED_SIGNATURES = (
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"%PDF-", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"),
)

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)

_PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}
_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_ICC_MODES = {"L", "RGB", "CMYK"}  # the colour modes ImageCms transforms
_JPEG_BACKGROUND = (255, 255, 255)

# Passed on every save: some Pillow encoders copy these from `image.info` otherwise.
_NO_METADATA = {"exif": b"", "icc_profile": None, "xmp": b"", "comment": None}

MAX_JPEG_SCANS = 256
"""Scans a JPEG may hold: each progressive scan decodes the whole image again, so a file of a
few hundred kilobytes repeating one scan thousands of times took hours to decode (libjpeg's
own tools cap them for that reason). Real progressive JPEGs hold about ten. Above 16.8 MP
fewer (`max_jpeg_scans`): 256 scans of 16.8 MP decode in about 5 s on one core, and 256 of
64 MP (the default IMAGEN_MAX_PIXELS) took 16 s."""
MIN_JPEG_SCANS = 32


def max_jpeg_scans(size: tuple[int, int]) -> int:
    """The scans a JPEG of `size` may hold: MAX_JPEG_SCANS up to 16.8 MP, then as many as
    decode in the same time, but never fewer than MIN_JPEG_SCANS."""
    pixels = max(1, size[0] * size[1])
    return min(MAX_JPEG_SCANS, max(MIN_JPEG_SCANS, MAX_JPEG_SCANS * 4096 * 4096 // pixels))

MAX_JPEG_SEGMENTS = 10_000
"""Marker segments a JPEG may hold (real ones hold tens: tables, headers, scans, metadata)."""
MAX_PNG_CHUNKS = 10_000
"""Chunks a PNG may hold besides one per KiB of the file (its image data comes in chunks of 8
to 64 KiB as encoders write it; the rest are tens): Pillow reads each in Python and keeps every
chunk it does not know, so 50 MB of empty ones took 17 s and 0.5 GB to open."""
MAX_GIF_SUB_BLOCKS = 100_000
"""Sub-blocks the extensions before a GIF's first frame may hold (a comment, an ICC profile or
XMP takes tens to hundreds): Pillow reads and keeps each, so 50 MB of one-byte ones took 10 s and
2 GB to open."""

# Pillow's warning for an image over its own limit went to stderr as plain text: the size is
# checked here against `max_pixels` (and over twice Pillow's limit it refuses to open).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode `data` into a detached 8-bit "RGB" or "RGBA" sRGB image, EXIF orientation applied.

    `max_bytes` bounds the encoded size (bytes) and `max_pixels` the declared width x height
    (pixels), checked from the header before any pixel is decoded. Only the first frame of an
    animation or multi-page file is used. An alpha channel that is fully opaque is dropped, so
    the result is "RGB": it carries nothing and would cost the operations an alpha pass.

    Raises ImageTooLarge, DecompressionBomb or ImageDecodeError.
    """
    try:
        return _decode(data, max_bytes, max_pixels)
    except _PngTextTooLarge as error:  # out of the first try, its pixels released
        bare = _without_png_text(data)
        if bare is None:  # its chunks cannot be walked: as Pillow said
            raise ImageDecodeError(str(error)) from None
        if bare is data:  # no text: the colour profile is what is over the limit
            raise ImageDecodeError(_PNG_PROFILE_TOO_LARGE) from None
    try:
        return _decode(bare, max_bytes, max_pixels)
    except _PngTextTooLarge:  # its colour profile is over the limit too
        raise ImageDecodeError(_PNG_PROFILE_TOO_LARGE) from None


def _decode(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """`decode_image`, raising _PngTextTooLarge where a PNG's text or colour profile unpacks to
    more than Pillow reads."""
    # 1. Check the size of the bytes and, where Pillow allocates while opening, the header.
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data):,} bytes ({len(data) / 1e6:.1f} MB), over the limit of "
            f"{max_bytes:,} bytes ({max_bytes / 1e6:.1f} MB)"
        )
    if not data:
        raise ImageDecodeError(f"empty file: {_UNSUPPORTED}")
    kind = _sniff_format(data)
    if kind in ("GIF", "WEBP") and (declared := _declared_size(kind, data)):
        _check_pixels(declared, max_pixels)
    # Before Pillow reads the header: a JPEG of millions of segments took it seconds (counting
    # refuses it); the scans allowed depend on the size, checked once it is known.
    scans = _jpeg_scans(data, MAX_JPEG_SCANS + 1) if kind == "JPEG" else 0
    if kind == "PNG" and (limit := MAX_PNG_CHUNKS + len(data) // 1024) < _png_chunks(data, limit + 1):
        raise ImageDecodeError(f"PNG with more than {limit:,} chunks for its {len(data):,} bytes: refused, reading "
                               "them would take seconds of a worker; re-encode it")

    # 2. Open (reads the header only) and check the declared size before decoding.
    readers = _readers(kind)
    try:
        opened = Image.open(io.BytesIO(data), formats=readers)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own limit (twice its MAX_IMAGE_PIXELS) is not the one to quote: ours is.
        said = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(error))
        if said is None:
            raise DecompressionBomb(f"decompression bomb refused by Pillow: {error}") from None
        raise DecompressionBomb(f"image declares {int(said[1]):,} pixels, over the limit of "
                                f"{min(max_pixels, int(said[2])):,} pixels") from None
    except Image.UnidentifiedImageError:
        if kind:
            raise ImageDecodeError(f"truncated or corrupt {kind}, or a kind of {kind} Pillow cannot read: "
                                   "unreadable header") from None
        if refused := _refused_kind(data):
            raise ImageDecodeError(f"{refused} file: {_UNSUPPORTED}; convert it to one of these "
                                   "(JPEG for a photo) and upload it again") from None
        raise ImageDecodeError(_UNSUPPORTED) from None
    except _NOT_THE_FILES:
        raise
    except Exception as error:  # hostile bytes can make a plugin fail in any way
        raise _corrupt(kind or "image", error) from None

    # 3. Decode in full, so truncation surfaces here, then apply EXIF orientation.
    with opened:
        _check_pixels(opened.size, max_pixels)
        if scans > (limit := max_jpeg_scans(opened.size)):
            counted = f"{scans} or more" if scans > MAX_JPEG_SCANS else scans
            raise ImageDecodeError(f"JPEG with more than {limit} scans at {_dims(opened.size)} ({counted}): refused, "
                                   "decoding each scan again would take minutes; re-encode it")
        key = _colour_key(opened)  # while the tile still says 16-bit (or 2- or 4-bit grey)
        if key is None:
            key = _grey_key(opened)
        if key is not None:
            opened.info["transparency"] = key
        try:
            opened.load()
        except _NOT_THE_FILES:
            raise
        except Exception as error:
            raise _corrupt(opened.format, error) from None
        try:
            ImageOps.exif_transpose(opened, in_place=True)
        except _NOT_THE_FILES:
            raise
        except Exception:
            pass  # unreadable EXIF is bad metadata, not a bad image: keep it as stored
        # A plugin may learn the real size only while loading: check again.
        _check_pixels(opened.size, max_pixels)
        if 0 in opened.size:
            raise ImageDecodeError(f"{opened.format} image has no pixels ({_dims(opened.size)})")

        # 4. Normalise to 8-bit sRGB, detached from the file and without metadata.
        try:
            image = to_srgb_8bit(opened)
        except _NOT_THE_FILES:
            raise
        except Exception as error:  # a mode Pillow cannot convert; a corrupt tag read only now
            raise ImageDecodeError(
                f"unsupported or corrupt {opened.format} colour mode {opened.mode}: {type(error).__name__}: {error}"
            ) from None
    image.info = {}
    return image


MAX_SIDE = {"png": 2**31 - 1, "webp": 16383, "jpeg": 65500}
"""The widest and tallest image each output format can hold (WebP's and libjpeg's limits)."""


def check_encodable(size: tuple[int, int], format: str) -> None:
    """Raise ImageTooLarge if an image of `size` (width, height) cannot be written as `format`."""
    limit = MAX_SIDE.get(format)
    if limit is not None and max(size) > limit:
        others = [name for name, side in MAX_SIDE.items() if max(size) <= side]
        raise ImageTooLarge(
            f"a {format} image is at most {limit} pixels on a side; this result would be "
            f"{size[0]}x{size[1]}: choose format {' or '.join(others) or '(none fits)'}, or a smaller image"
        )


def encode_image(image: Image.Image, format: str = "png", quality: int = 90) -> bytes:
    """Encode `image` as `format` (png, webp or jpeg), with none of its metadata.

    `quality` (1..100) applies to webp and jpeg; png is lossless and ignores it. JPEG has no
    alpha, so a transparent image is composited over white. The same image always gives the
    same bytes.

    Raises InvalidParameter for an unknown format or a quality out of range, ImageTooLarge for
    an image wider or taller than the format holds.
    """
    if format not in OUTPUT_FORMATS:
        raise InvalidParameter(
            f"unknown output format {format!r}: expected one of {', '.join(OUTPUT_FORMATS)}"
        )
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidParameter(f"quality must be an integer from 1 to 100, not {quality!r}")
    check_encodable(image.size, format)

    if image.mode not in ("L", "LA", "RGB", "RGBA") or "transparency" in image.info:
        image = to_srgb_8bit(image)  # a colour key becomes alpha rather than being dropped
    if format == "jpeg" and image.mode in ("LA", "RGBA"):
        image = _flatten(image, _JPEG_BACKGROUND)

    buffer = io.BytesIO()
    if format == "png":
        image.save(
            buffer, "PNG", optimize=False, compress_level=6, compress_type=_png_strategy(image), transparency=None,
            **_NO_METADATA,
        )
    elif format == "webp":
        image.save(buffer, "WEBP", quality=quality, **_NO_METADATA)
    else:
        image.save(buffer, "JPEG", quality=quality, **_NO_METADATA)
    return buffer.getvalue()


def _png_strategy(image: Image.Image) -> int:
    """zlib's strategy for `image` as PNG (Pillow hands `compress_type` to zlib). Run-length
    where it packs a sample of the picture about as well as the default: photos and diffusion
    outputs, whose filtered rows hold runs, not distant repeats, so the default's long match
    searches found little, in two to five times the time (2-8 MP/s against 12-13 here, time a
    GPU instance is billed for), for the same size. The default where it finds repeats that
    run-length cannot (text, line art, patterns: 2 to 80 times smaller, and fast anyway)."""
    width = min(image.width, _PNG_SAMPLE_WIDTH)
    rows = min(image.height, _PNG_SAMPLE_ROWS)
    sample = Image.new(image.mode, (width, rows * 4))
    for band in range(4):  # rows across the picture, from its middle columns
        top = (image.height - rows) * band // 3
        left = (image.width - width) // 2
        sample.paste(image.crop((left, top, left + width, top + rows)), (0, rows * band))
    sizes = {}
    for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_RLE):
        packed = io.BytesIO()
        sample.save(packed, "PNG", optimize=False, compress_level=6, compress_type=strategy)
        sizes[strategy] = len(packed.getvalue())
    return zlib.Z_RLE if sizes[zlib.Z_RLE] <= 1.1 * sizes[zlib.Z_DEFAULT_STRATEGY] else zlib.Z_DEFAULT_STRATEGY


_PNG_SAMPLE_WIDTH, _PNG_SAMPLE_ROWS = 1024, 16  # four bands: at most 64K pixels, milliseconds


def _sniff_format(data: bytes) -> str | None:
    """The Pillow format name `data` starts like, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    return None


def _refused_kind(data: bytes) -> str | None:
    """The name of a known kind of file that is not accepted that `data` starts like, or None."""
    if data[4:8] == b"ftyp":  # ISO media: the major brand, then (after a version) compatible ones
        end = min(len(data), int.from_bytes(data[:4]), 64)
        kinds = {_ISO_MEDIA_BRANDS.get(data[i:i + 4]) for i in (8, *range(16, end, 4))}
        for kind in ("AVIF", "HEIC", "HEIF"):  # the most specific a brand names
            if kind in kinds:
                return kind
        return f"video or other ISO media ({data[8:12].decode('latin-1')!r})"
    for signature, kind in _REFUSED_SIGNATURES:
        if data.startswith(signature):
            return kind
    return None


# A marker with a length: FF then its code (fill bytes before it match from their last FF). FF 00
# is a stuffed byte, FF D0-D7 a restart, FF 01 and FF D8 have no length: none is matched, so the
# search runs in C over entropy-coded data and runs of FF (a search from each FF of a run was
# quadratic: 80 KB of FF took 78 s).
_JPEG_MARKER = re.compile(rb"\xff([^\x00\x01\xd0-\xd8\xff])")


def _jpeg_scans(data: bytes, limit: int) -> int:
    """How many scans (SOS segments) the JPEG `data` holds, counting no further than `limit`.

    Segments are skipped by their length (an EXIF thumbnail's scans are not the image's);
    after a scan's header its entropy-coded data runs to the next marker other than a
    restart."""
    scans, segments, position = 0, 0, 2
    while scans < limit and (found := _JPEG_MARKER.search(data, position)):
        marker, position = found[1][0], found.end()
        if marker == 0xD9 or position + 2 > len(data):  # end of image
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:  # millions of empty segments: seconds of this loop alone
            raise ImageDecodeError(f"JPEG with more than {MAX_JPEG_SEGMENTS} segments: refused; re-encode it")
        length = int.from_bytes(data[position:position + 2], "big")
        scans += marker == 0xDA
        position += max(length, 2)
    return scans


def _png_chunks(data: bytes, limit: int) -> int:
    """How many chunks the PNG `data` holds up to IEND or its end, counting no further than
    `limit` (each is skipped by its length, not read)."""
    chunks, position = 0, 8
    while chunks < limit and position + 12 <= len(data):
        chunks += 1
        if data[position + 4:position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position:position + 4], "big")
    return chunks


def _declared_size(kind: str, data: bytes) -> tuple[int, int] | None:
    """Width and height (pixels) a GIF or WebP header declares, or None if unreadable.

    Pillow's plugins for these two allocate while opening (the WebP canvas, the GIF first
    frame's disposal area), before `Image.open` returns a size to check.
    """
    try:
        if kind == "WEBP":
            return _webp_size(data)
        return _gif_size(data)
    except (struct.error, IndexError):
        return None  # too short to declare anything: Pillow will reject it


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended format: 24-bit canvas size minus one
        width, height = (int.from_bytes(data[24 + i : 27 + i], "little") + 1 for i in (0, 3))
        return width, height
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _gif_size(data: bytes) -> tuple[int, int]:
    """The logical screen grown to cover the first frame, as Pillow does."""
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while data[position] == 0x21:  # extension: label, then sub-blocks up to a zero length
        position += 2
        while data[position]:
            position += data[position] + 1
            blocks += 1
            if blocks > MAX_GIF_SUB_BLOCKS:
                raise ImageDecodeError(f"GIF with more than {MAX_GIF_SUB_BLOCKS:,} extension blocks before its "
                                       "first frame: refused, reading them would take seconds of a worker; "
                                       "re-encode it")
        position += 1
    if data[position] == 0x2C:  # image descriptor: left, top, width, height
        left, top, frame_width, frame_height = struct.unpack_from("<4H", data, position + 1)
        width, height = max(width, left + frame_width), max(height, top + frame_height)
    return width, height


def _colour_key(image: Image.Image) -> tuple[int, int, int] | None:
    """An RGB image's tRNS colour key as its pixels hold colours. A 16-bit RGB PNG is read as
    8-bit (each sample's high byte) but its key stays 16-bit, so it would mark the wrong
    pixels: its high bytes instead (they also take colours within 1/256 of it). 16-bit shows in
    the tile before loading, or in a key above 255 (an image loaded by its caller with a key
    of 255 or less cannot be told from an 8-bit one)."""
    key = image.info.get("transparency")
    if image.mode != "RGB" or not isinstance(key, tuple) or len(key) != 3:
        return None
    tiles = getattr(image, "tile", None) or ()
    if any(value > 255 for value in key) or any(getattr(tile, "args", None) == "RGB;16B" for tile in tiles):
        return tuple(value >> 8 for value in key)
    return key


def _grey_key(image: Image.Image) -> int | None:
    """A 2- or 4-bit grey PNG's tRNS value as its pixels hold it: Pillow reads the pixels
    scaled to 8 bits (x85, x17) but keeps the key as stored, which then matches no pixel."""
    key = image.info.get("transparency")
    if image.mode != "L" or not isinstance(key, int):
        return None
    for tile in getattr(image, "tile", None) or ():
        bits = {"L;2": 2, "L;4": 4}.get(getattr(tile, "args", None))
        if bits:
            return key * 255 // (2**bits - 1)
    return None


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise DecompressionBomb(
            f"image declares {_dims(size)} = {size[0] * size[1]:,} pixels, over the limit of "
            f"{max_pixels:,} pixels"
        )


# Pillow inflates a compressed PNG text chunk (XMP, EXIF as "Raw profile" text) only up to
# PngImagePlugin.MAX_TEXT_CHUNK (1 MB; the colour profile too), and all of them only up to
# MAX_TEXT_MEMORY (64 MB), and refuses the file beyond. Photoshop's XMP can grow past that
# (a long DocumentAncestors list); imagen drops the input's text anyway, so such a PNG is
# decoded again without its text chunks.
_PNG_TEXT_LIMITS = ("MAX_TEXT_CHUNK", "MAX_TEXT_MEMORY")
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PNG_PROFILE_TOO_LARGE = ("PNG whose colour profile (iCCP) unpacks to more than Pillow reads (1 MB): re-save it "
                          "with a smaller profile, or none (sRGB)")


class _PngTextTooLarge(ImageDecodeError):
    """A PNG's text chunks or colour profile unpack to more than Pillow reads."""


@functools.cache
def _available_readers() -> tuple[str, ...]:
    Image.init()
    return tuple(kind for kind in _INPUT_FORMATS if kind in Image.OPEN)


def _readers(kind: str | None) -> tuple[str, ...]:
    """The accepted kinds Pillow has a reader for, to open with. RuntimeError (this process's
    fault, retried elsewhere, not the file's) where `kind`'s own did not load (a Pillow built
    without libwebp, a broken install): passed to Image.open, a missing reader raised a
    KeyError for every file it was tried on, reported as a corrupt file, never retried."""
    available = _available_readers()
    if kind is not None and kind not in available:
        raise RuntimeError(f"Pillow here has no reader for {kind} (its plugin did not load): this installation is "
                           "broken, not the image")
    return available


def _corrupt(kind: str, error: Exception) -> ImageDecodeError:
    """The error for a file Pillow failed to read: _PngTextTooLarge where that was a PNG's text
    limits (decode_image tries again without the text)."""
    too_large = kind == "PNG" and any(limit in str(error) for limit in _PNG_TEXT_LIMITS)
    return (_PngTextTooLarge if too_large else ImageDecodeError)(f"truncated or corrupt {kind}: {error}")


def _without_png_text(data: bytes) -> bytes | None:
    """`data`, a PNG, without its text chunks up to IEND or its end (the same object where it
    has none); None where its chunks cannot be walked."""
    dropped, position = [], 8
    while position + 12 <= len(data):
        chunk = data[position + 4:position + 8]
        end = position + 12 + int.from_bytes(data[position:position + 4], "big")
        if end > len(data):
            return None
        if chunk in _PNG_TEXT_CHUNKS:
            dropped.append((position, end))
        position = end
        if chunk == b"IEND" or position == len(data):  # Pillow reads a file that ends without IEND
            if not dropped:
                return data
            view, kept, start = memoryview(data), [], 0
            for first, last in dropped:  # the bytes between the chunks dropped, copied once
                kept.append(view[start:first])
                start = last
            kept.append(view[start:])
            return b"".join(kept)
    return None


def _dims(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def to_srgb_8bit(image: Image.Image) -> Image.Image:
    """A new "RGB" or "RGBA" sRGB image from any Pillow mode; a fully opaque alpha is dropped,
    and a BMP's alpha that is 0 everywhere: many Windows programs write 32-bit BMPs with an
    alpha mask they never fill, and browsers show those as opaque (taken at its word, every
    operation would return an invisible image)."""
    icc = image.info.get("icc_profile")
    unused_alpha = (0, 0) if image.format == "BMP" else None
    if image.mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[image.mode])
    alpha = None
    if image.mode in _HIGH_DEPTH:
        image, alpha = _high_depth_to_8bit(image)
    elif (key := _colour_key(image)) is not None:  # the caller's image keeps its info
        alpha = Image.fromarray(np.where((np.asarray(image) == key).all(axis=-1), 0, 255).astype(np.uint8))
    elif image.has_transparency_data:
        if image.mode not in ("LA", "RGBA"):
            # A palette's or tRNS colour key becomes a channel; grey stays grey, so that a grey
            # ICC profile still applies to it.
            image = image.convert("LA" if image.mode in ("1", "L") else "RGBA")
        alpha = image.getchannel("A")
        image = image.convert(image.mode[:-1])
    colour = _to_srgb(image, icc)
    if alpha is not None and alpha.getextrema() not in ((255, 255), unused_alpha):
        colour.putalpha(alpha)
    return colour


_BITS_PER_SAMPLE, _PHOTOMETRIC, _SAMPLE_FORMAT = 258, 262, 339  # TIFF tags


def _high_depth_to_8bit(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Scale 16-bit or 32-bit grey to "L", 65535 (or 1.0 for float) becoming 255.

    Pillow's own conversion clips at 255 instead of scaling. Integer modes are read as
    0..65535 (what 16-bit files hold; a signed 16-bit TIFF's -32768..32767 is shifted there;
    32-bit values above it are white);
    float as 0.0..1.0, the convention of float TIFFs; a WhiteIsZero TIFF is inverted.
    """
    values = np.asarray(image)
    tags = {}  # a TIFF's: how its samples read (per sample: the first's)
    for number in (_BITS_PER_SAMPLE, _PHOTOMETRIC, _SAMPLE_FORMAT):
        try:
            value = (getattr(image, "tag_v2", None) or {}).get(number)
        except Exception:  # a corrupt entry (a count past the file): read as absent, as Pillow decoded it
            continue
        if value is not None:
            tags[number] = value[0] if isinstance(value, tuple) and value else value
    if image.mode == "F":
        scaled = np.rint(np.nan_to_num(values, nan=0.0).clip(0.0, 1.0) * 255)
    else:
        if tags.get(_SAMPLE_FORMAT) == 2 and tags.get(_BITS_PER_SAMPLE) == 16:  # signed: -32768 is black
            values = values.astype(np.int32) + 32768
        elif tags.get(_SAMPLE_FORMAT, 1) == 1 and tags.get(_BITS_PER_SAMPLE) == 32:  # unsigned, held in int32:
            values = values.astype(np.int64) & 0xFFFFFFFF  # 2**31 and up would read as negative, black
        if values.dtype == np.uint16:  # the usual case: a table, not 4-byte temporaries (a 64 MP
            scaled = _SCALE_16_TO_8[values]  # grey PNG peaked at 0.5 GB more than its result)
        else:
            scaled = (values.clip(0, 65535).astype(np.uint32) * 255 + 32767) // 65535
    if tags.get(_PHOTOMETRIC) == 0:  # WhiteIsZero (Pillow inverts only 8-bit and 1-bit grey)
        scaled = 255 - scaled
    alpha = None
    key = image.info.get("transparency")  # a 16-bit grey PNG's tRNS: one transparent value
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.fromarray(scaled.astype(np.uint8, copy=False)), alpha


# 0..65535 to 0..255, rounded to nearest: _high_depth_to_8bit's sums, for each 16-bit value.
_SCALE_16_TO_8 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """A new "RGB" image, converted from the embedded ICC profile to sRGB when there is one
    (CIELAB always: Pillow's plain conversion would read L, a, b as R, G, B)."""
    if image.mode == "LAB":
        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, lab_to_srgb)
    if icc and image.mode not in _ICC_MODES:
        image = image.convert("RGB")  # palette, 1-bit, YCbCr: the profile describes RGB
    if icc and not (image.mode == "RGB" and _srgb_already(icc)):
        # A fresh sRGB profile each call: LittleCMS profiles are not safe to share between
        # threads, and creating one costs microseconds.
        try:
            return ImageCms.profileToProfile(
                image, io.BytesIO(icc), ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a broken profile, or one for another colour space: keep the pixels as they are
    return image.convert("RGB")


def _srgb_already(icc: bytes) -> bool:
    """Whether converting RGB from the profile `icc` to sRGB changes no colour at all (an sRGB
    profile, as phones and cameras embed): tried once per profile and process on all 2**24
    colours (0.3 s), so a picture carrying one skips the transform (0.18 s a 12 MP photo).
    Remembered by the profile's digest (a JPEG's profile may be megabytes), 64 at most."""
    key = hashlib.sha256(icc).digest()
    known = _SRGB_PROFILES.get(key)
    if known is None:
        known = _changes_no_colour(icc)
        if len(_SRGB_PROFILES) >= 64:
            _SRGB_PROFILES.clear()
        _SRGB_PROFILES[key] = known
    return known


_SRGB_PROFILES: dict[bytes, bool] = {}  # a profile's sha256 -> _srgb_already's answer


def _changes_no_colour(icc: bytes) -> bool:
    levels = np.arange(256, dtype=np.uint8)
    every = np.empty((2**24, 3), np.uint8)  # 48 MB, each colour once
    every[:, 0] = levels.repeat(65536)
    every[:, 1] = np.tile(levels.repeat(256), 256)
    every[:, 2] = np.tile(levels, 65536)
    every = every.reshape(4096, 4096, 3)
    try:
        converted = ImageCms.profileToProfile(
            Image.fromarray(every), io.BytesIO(icc), ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False  # _to_srgb says what becomes of it
    return np.array_equal(np.asarray(converted), every)


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """`image` ("LA" or "RGBA") composited over an opaque `background` colour."""
    mode = image.mode[:-1]
    flat = Image.new(mode, image.size, background if mode == "RGB" else background[0])
    flat.paste(image.convert(mode), mask=image.getchannel("A"))
    return flat
