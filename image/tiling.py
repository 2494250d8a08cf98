"""Tiling for models that scale images: fixed-size overlapping tiles, blended without seams.

Pure numpy, no model: an image of any size is cut into tiles of exactly `tile` x `tile`
pixels (the image is reflect-padded when it is smaller than a tile), each tile goes through
`process` (which returns it `scale` times larger), and the results are blended back with
cosine ramps across the overlaps, so the step between neighbouring tiles fades out instead of
showing as a seam. One tile shape means one compiled graph and a GPU memory bound that does
not depend on the input size.

Layout along one axis of length L > tile: n = ceil((L - overlap) / (tile - overlap)) tiles,
spread evenly from 0 to L - tile, so neighbours overlap by at least `overlap` pixels. Each
tile's weight ramps from ~0 to 1 over the first `overlap * scale` output pixels of a side that
has a neighbour (and back down on the far side); sides on the image border keep weight 1.
Weights are separable (x ramp times y ramp) and the grid is a product of the two axes, so the
normalising sum is the product of two 1-D sums: no full-size weight canvas is kept. Tiles go
in row-major order, and output rows no later tile reaches are written out as each row of tiles
ends: besides the result, only one band of `tile * scale` rows is held in float32.

    out = upscale_tiled(array, process, scale=4, tile=256, overlap=32, levels=255.0)  # uint8
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Box:
    """A rectangle in pixels: left/top inclusive, right/bottom exclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def scaled(self, factor: int) -> Box:
        return Box(self.left * factor, self.top * factor, self.right * factor, self.bottom * factor)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Where the tiles of an image lie, on the canvas (the image padded up to one tile)."""

    width: int  # the image's own size, pixels
    height: int
    tile: int
    overlap: int
    xs: tuple[int, ...]  # left edges of the tile columns
    ys: tuple[int, ...]  # top edges of the tile rows

    @property
    def canvas_width(self) -> int:
        return max(self.width, self.tile)

    @property
    def canvas_height(self) -> int:
        return max(self.height, self.tile)

    @property
    def boxes(self) -> list[Box]:
        """Tiles in row-major order; every one exactly tile x tile."""
        return [Box(x, y, x + self.tile, y + self.tile) for y in self.ys for x in self.xs]


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> tuple[int, ...]:
    """Start offsets of fixed-size tiles covering `length` pixels, overlapping >= `overlap`,
    each a multiple of `align` (then `length - tile` must be one too)."""
    _check_geometry(tile, overlap)
    if length <= tile:
        return (0,)
    span = length - tile
    if span % align:
        raise ValueError(f"{length} - {tile} is not a multiple of {align}")
    # The widest step that keeps the overlap, on the grid: evenly spread starts rounded to the
    # grid then step by at most that (a multiple of `align` below it plus `align`).
    step = align * ((tile - overlap) // align)
    if step < 1:
        raise ValueError(f"tiles of {tile} overlapping by {overlap} leave no step on a grid of {align}")
    count = math.ceil(span / step) + 1
    return tuple(align * round(i * span / (count - 1) / align) for i in range(count))


def plan_tiles(width: int, height: int, tile: int, overlap: int, align: int = 1) -> TilePlan:
    """The tile grid for a `width` x `height` image (pixels); tiles start at multiples of
    `align` (a latent grid's: the image padded to one first)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return TilePlan(
        width=width,
        height=height,
        tile=tile,
        overlap=overlap,
        xs=tile_starts(width, tile, overlap, align),
        ys=tile_starts(height, tile, overlap, align),
    )


def pad_to(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Reflect-pad an (H, W, ...) array on the right and bottom up to `width` x `height`."""
    pad_h = max(0, height - array.shape[0])
    pad_w = max(0, width - array.shape[1])
    if not pad_h and not pad_w:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode="reflect")


def pad_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad an (H, W, ...) array on the right and bottom to multiples of `multiple`."""
    height, width = array.shape[:2]
    return pad_to(array, _ceil_to(width, multiple), _ceil_to(height, multiple))


def axis_weights(starts: tuple[int, ...], tile: int, ramp: int) -> list[np.ndarray]:
    """Per-tile 1-D blend weights along one axis (output pixels), in (0, 1].

    A cosine ramp of `ramp` pixels on each side that has a neighbour, 1 elsewhere; the
    ramp never reaches 0, so the normalising sum is positive everywhere.
    """
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp, dtype=np.float64) + 0.5) / ramp)
    weights = []
    for i in range(len(starts)):
        w = np.ones(tile, dtype=np.float64)
        if i > 0 and ramp:
            w[:ramp] = rise
        if i < len(starts) - 1 and ramp:
            w[tile - ramp :] = np.minimum(w[tile - ramp :], rise[::-1])
        weights.append(w.astype(np.float32))
    return weights


class Stitcher:
    """Blends the scaled tiles of a plan, added in row-major order, into the (H*s, W*s, C)
    output. Only the band of output rows the current row of tiles covers is held in float32;
    rows no later tile reaches are normalised and written out as soon as the row of tiles
    above them is done, so besides the output the memory is one band (out_tile rows).
    `levels`: None, a float32 output; a number, uint8 (value x levels, rounded, clipped)."""

    def __init__(self, plan: TilePlan, scale: int, channels: int, levels: float | None = None):
        self.plan = plan
        self.scale = scale
        self.levels = levels
        out_tile, ramp = plan.tile * scale, plan.overlap * scale
        self._out_tile = out_tile
        self._wx = axis_weights(plan.xs, out_tile, ramp)
        self._wy = axis_weights(plan.ys, out_tile, ramp)
        width, height = plan.canvas_width * scale, plan.canvas_height * scale
        self._norm_x = np.zeros(width, dtype=np.float32)
        self._norm_y = np.zeros(height, dtype=np.float32)
        for x, w in zip(plan.xs, self._wx):
            self._norm_x[x * scale : x * scale + out_tile] += w
        for y, w in zip(plan.ys, self._wy):
            self._norm_y[y * scale : y * scale + out_tile] += w
        self._band = np.zeros((out_tile, width, channels), dtype=np.float32)
        self._top = 0  # the output row band[0] holds
        self._row = 0  # the row of tiles being added
        dtype = np.float32 if levels is None else np.uint8
        self.output = np.empty((plan.height * scale, plan.width * scale, channels), dtype=dtype)

    def add(self, index: int, tile: np.ndarray) -> None:
        """Blend in the output of tile `index` (row-major, as `plan.boxes`)."""
        columns = len(self.plan.xs)
        row, col = divmod(index, columns)
        out_tile = self._out_tile
        if tile.shape[:2] != (out_tile, out_tile):
            raise ValueError(f"tile {index} is {tile.shape[:2]}, expected {out_tile}x{out_tile}")
        if row < self._row:
            raise ValueError(f"tile {index} came after a tile of row {self._row}: tiles go in row-major order")
        while self._row < row:
            self._row += 1
            self._advance(self.plan.ys[self._row] * self.scale)
        x = self.plan.xs[col] * self.scale
        weight = self._wy[row][:, None, None] * self._wx[col][None, :, None]
        self._band[:, x : x + out_tile] += weight * tile

    def result(self) -> np.ndarray:
        """The blended image, cropped to the unpadded size: (H*scale, W*scale, C), float32
        or (with `levels`) uint8. Call it once every tile is in."""
        self._advance(self._top + self._out_tile)
        return self.output

    def _advance(self, top: int) -> None:
        """Write out the band's rows above output row `top` and move the band down to it."""
        count = top - self._top
        self._write(self._band[:count], self._top)
        keep = self._out_tile - count
        for start in range(0, keep, count):  # chunks that do not overlap: no band-sized temporary
            end = min(start + count, keep)
            self._band[start:end] = self._band[start + count : end + count]
        self._band[keep:] = 0
        self._top = top

    def _write(self, rows: np.ndarray, top: int) -> None:
        height, width = self.output.shape[:2]
        end = min(top + len(rows), height)
        if end <= top:
            return  # padding below the image
        done = rows[: end - top, :width]
        done /= self._norm_y[top:end, None, None]
        done /= self._norm_x[None, :width, None]
        self.output[top:end] = done if self.levels is None else to_uint8(done, self.levels)


def upscale_tiled(
    array: np.ndarray,
    process: Callable[[np.ndarray], np.ndarray],
    *,
    scale: int,
    tile: int,
    overlap: int,
    batch_size: int = 1,
    on_tile: Callable[[int, int], None] | None = None,
    levels: float | None = None,
    align: int = 1,
) -> np.ndarray:
    """Run `process` over fixed-size tiles of an (H, W, C) array and blend the results.

    `process` takes a batch (N, tile, tile, C) and returns (N, tile*scale, tile*scale, C);
    N is at most `batch_size`. `on_tile(done, total)` is called after each batch. Returns
    (H*scale, W*scale, C): float32, or uint8 with `levels` (each value x `levels`, rounded and
    clipped to 0..255: 255 for values in 0..1). Memory besides the input and the output: one
    band of tile*scale output rows in float32 (Stitcher). `align`: as `plan_tiles`.
    """
    _check_geometry(tile, overlap)
    if array.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {array.shape}")
    height, width, channels = array.shape
    plan = plan_tiles(width, height, tile, overlap, align)
    canvas = pad_to(array, plan.canvas_width, plan.canvas_height)
    stitcher = Stitcher(plan, scale, channels, levels)
    boxes = plan.boxes
    for first in range(0, len(boxes), batch_size):
        batch_boxes = boxes[first : first + batch_size]
        batch = np.stack([canvas[b.top : b.bottom, b.left : b.right] for b in batch_boxes])
        outputs = process(batch)
        if len(outputs) != len(batch_boxes):
            raise ValueError(f"process returned {len(outputs)} tiles for {len(batch_boxes)}")
        for offset, output in enumerate(outputs):
            stitcher.add(first + offset, np.asarray(output, dtype=np.float32))
        if on_tile is not None:
            on_tile(first + len(batch_boxes), len(boxes))
    return stitcher.result()


def to_uint8(array: np.ndarray, levels: float = 255.0) -> np.ndarray:
    """`array` x `levels` (255: floats 0..1), rounded and clipped, as uint8; works in place."""
    array *= levels
    np.rint(array, out=array)
    np.clip(array, 0, 255, out=array)
    return array.astype(np.uint8)


def _check_geometry(tile: int, overlap: int) -> None:
    if tile < 1 or overlap < 0 or 2 * overlap > tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap <= tile/2, got {tile}, {overlap}")


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
