"""Tiling math without a model: coverage, fixed tile size, exact identity, no visible seams,
memory of one band of rows besides the result."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from image.tiling import (
    Box,
    Stitcher,
    axis_weights,
    pad_to,
    pad_to_multiple,
    plan_tiles,
    tile_starts,
    upscale_tiled,
)


def _nearest(scale: int):
    """A perfect 'upscaler': every pixel becomes a scale x scale block."""

    def process(batch):
        return batch.repeat(scale, axis=1).repeat(scale, axis=2)

    return process


@pytest.mark.parametrize("length", [1, 7, 64, 65, 100, 255, 256, 257, 300, 1000, 4097])
@pytest.mark.parametrize("tile, overlap", [(64, 8), (64, 32), (256, 32), (48, 0)])
def test_starts_cover_the_axis_with_fixed_tiles_and_minimum_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts == tuple(sorted(set(starts)))
    if length <= tile:
        assert starts == (0,)
        return
    assert starts[-1] + tile == length  # the last tile ends exactly at the edge
    for a, b in zip(starts, starts[1:]):
        assert b - a <= tile - overlap  # neighbours overlap by at least `overlap`
    # No tile more than needed.
    assert len(starts) == max(1, -(-(length - overlap) // (tile - overlap)))


def test_boxes_cover_every_pixel_and_are_all_one_size():
    plan = plan_tiles(300, 200, tile=64, overlap=8)
    covered = np.zeros((plan.canvas_height, plan.canvas_width), dtype=int)
    for box in plan.boxes:
        assert (box.width, box.height) == (64, 64)
        assert 0 <= box.left and box.right <= plan.canvas_width
        assert 0 <= box.top and box.bottom <= plan.canvas_height
        covered[box.top : box.bottom, box.left : box.right] += 1
    assert covered.min() >= 1
    assert len(plan.boxes) == len(plan.xs) * len(plan.ys)


def test_small_image_is_padded_to_one_tile():
    plan = plan_tiles(30, 10, tile=64, overlap=8)
    assert plan.boxes == [Box(0, 0, 64, 64)]
    assert (plan.canvas_width, plan.canvas_height) == (64, 64)


def test_geometry_errors():
    with pytest.raises(ValueError):
        tile_starts(100, 64, 40)  # overlap above half a tile
    with pytest.raises(ValueError):
        plan_tiles(0, 10, 64, 8)


def test_pad_helpers_reflect():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    padded = pad_to(array, 6, 5)
    assert padded.shape == (5, 6, 1)
    assert padded[3, 0, 0] == array[1, 0, 0]  # reflected, not repeated
    assert padded[0, 4, 0] == array[0, 2, 0]
    assert pad_to_multiple(array, 8).shape == (8, 8, 1)
    assert pad_to_multiple(np.zeros((1, 1, 3)), 64).shape == (64, 64, 3)
    assert pad_to(array, 2, 2) is array


def test_axis_weights_ramp_only_at_inner_edges_and_stay_positive():
    weights = axis_weights((0, 50, 100), tile=64, ramp=16)
    first, middle, last = weights
    assert first[0] == 1 and first[-1] < 0.01 and first[:48].min() == 1
    assert middle[0] < 0.01 and middle[-1] < 0.01 and middle[16:48].min() == 1
    assert last[0] < 0.01 and last[-1] == 1
    assert min(w.min() for w in weights) > 0
    # Symmetric cosine: rising and falling ramps over the same pixels sum to one.
    np.testing.assert_allclose(first[48:] + last[:16], 1.0, atol=1e-6)


@pytest.mark.parametrize("size", [(300, 200), (64, 64), (65, 300), (17, 5), (1, 1)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_upscaler_stitches_exactly(size, batch_size):
    width, height = size
    rng = np.random.default_rng(0)
    image = rng.random((height, width, 3), dtype=np.float32)
    out = upscale_tiled(image, _nearest(4), scale=4, tile=64, overlap=8, batch_size=batch_size)
    assert out.shape == (height * 4, width * 4, 3)
    expected = image.repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_scale_one_identity_is_exact():
    image = np.random.default_rng(1).random((130, 90, 4), dtype=np.float32)
    out = upscale_tiled(image, lambda batch: batch, scale=1, tile=32, overlap=8)
    np.testing.assert_allclose(out, image, atol=1e-6)


def test_process_sees_fixed_shapes_and_progress_is_reported():
    shapes, progress = [], []

    def process(batch):
        shapes.append(batch.shape)
        return _nearest(2)(batch)

    image = np.zeros((100, 150, 3), dtype=np.float32)
    upscale_tiled(image, process, scale=2, tile=48, overlap=8, batch_size=2,
                  on_tile=lambda done, total: progress.append((done, total)))
    assert {shape[1:] for shape in shapes} == {(48, 48, 3)}
    assert all(shape[0] <= 2 for shape in shapes)
    total = progress[-1][1]
    assert progress[-1] == (total, total)


def _noisy(scale: int):
    """An 'upscaler' whose tiles disagree everywhere: every output pixel is blended."""
    rng = np.random.default_rng(7)

    def process(batch):
        out = batch.repeat(scale, axis=1).repeat(scale, axis=2)
        return out + rng.normal(0, 0.2, out.shape).astype(np.float32)

    return process


@pytest.mark.parametrize(("size", "tile", "overlap", "batch_size"), [
    ((300, 200), 64, 8, 1), ((300, 200), 64, 32, 3), ((500, 70), 256, 32, 2), ((64, 64), 64, 8, 1),
    ((129, 300), 64, 0, 5), ((40, 30), 64, 8, 1)])
def test_uint8_result_is_the_float_result_rounded_once(size, tile, overlap, batch_size):
    """The rows are written out band by band as uint8; the same as blending the whole float
    image first and rounding it at the end (and the same float image either way)."""
    width, height = size
    image = np.random.default_rng(2).random((height, width, 3), dtype=np.float32)
    as_float = upscale_tiled(image, _noisy(4), scale=4, tile=tile, overlap=overlap, batch_size=batch_size)
    as_uint8 = upscale_tiled(image, _noisy(4), scale=4, tile=tile, overlap=overlap, batch_size=batch_size,
                             levels=255.0)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (height * 4, width * 4, 3)
    expected = np.clip(np.rint(as_float * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(as_uint8, expected)
    # The float path against a whole-canvas blend, computed here the plain way.
    plan = plan_tiles(width, height, tile, overlap)
    wx, wy = axis_weights(plan.xs, tile * 4, overlap * 4), axis_weights(plan.ys, tile * 4, overlap * 4)
    canvas = np.zeros((plan.canvas_height * 4, plan.canvas_width * 4, 3), np.float32)
    weights = np.zeros(canvas.shape[:2], np.float32)
    padded = pad_to(image, plan.canvas_width, plan.canvas_height)
    tiles = _noisy(4)(np.stack([padded[b.top:b.bottom, b.left:b.right] for b in plan.boxes]))
    for index, (box, out) in enumerate(zip(plan.boxes, tiles)):
        w = wy[index // len(plan.xs)][:, None] * wx[index % len(plan.xs)][None, :]
        canvas[box.top * 4:box.bottom * 4, box.left * 4:box.right * 4] += w[..., None] * out
        weights[box.top * 4:box.bottom * 4, box.left * 4:box.right * 4] += w
    whole = (canvas / weights[..., None])[: height * 4, : width * 4]
    np.testing.assert_allclose(as_float, whole, atol=1e-5)


def test_memory_is_the_result_and_one_band_of_rows():
    """Upscaling 600 x 400 by 4 in 64-pixel tiles: besides the input and the uint8 result, one
    band of 256 float rows, where a whole float canvas would be four times the result."""
    image = np.random.default_rng(3).random((400, 600, 3), dtype=np.float32)
    result_bytes = 1600 * 2400 * 3
    band_bytes = 256 * 2400 * 3 * 4
    tracemalloc.start()
    try:
        out = upscale_tiled(image, _nearest(4), scale=4, tile=64, overlap=8, levels=255.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == result_bytes
    # Besides those: a few tiles' worth of temporaries (0.8 MB each), no second band.
    assert peak < result_bytes + band_bytes + 5_000_000, (peak, result_bytes, band_bytes)
    assert peak < 4 * result_bytes  # the float canvas alone was that


def test_tiles_must_come_in_row_order():
    plan = plan_tiles(200, 200, 64, 8)
    stitcher = Stitcher(plan, 2, 3)
    stitcher.add(len(plan.xs), np.zeros((128, 128, 3), np.float32))  # the first of row 2
    with pytest.raises(ValueError, match="row-major order"):
        stitcher.add(0, np.zeros((128, 128, 3), np.float32))


def test_wrong_tile_output_size_is_an_error():
    with pytest.raises(ValueError, match="expected"):
        upscale_tiled(np.zeros((10, 10, 3)), lambda b: b, scale=2, tile=8, overlap=2)


def _smooth_upscaler_with_tile_offsets(scale):
    """Upscales smoothly (nearest, then a box blur) and shifts each tile's brightness by a
    different amount, like diffusion tiles that disagree on exposure."""
    offsets = iter([0.0, 0.08, -0.06, 0.05, -0.08, 0.07, -0.04, 0.06] * 20)
    kernel = np.ones(scale, dtype=np.float32) / scale

    def process(batch):
        out = batch.repeat(scale, axis=1).repeat(scale, axis=2)
        for axis in (1, 2):
            out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, out)
        shift = np.array([next(offsets) for _ in batch], dtype=np.float32)
        return out + shift[:, None, None, None]

    return process


def _column_steps(out, scale):
    """Largest step between horizontal neighbours per output column (borders trimmed)."""
    margin = 2 * scale
    steps = np.abs(np.diff(out[margin:-margin, :, 0], axis=1))
    return steps.max(axis=0)


@pytest.mark.parametrize("overlap", [8, 16])
def test_seams_show_no_step(overlap):
    """Across a tile boundary the blended output changes about as much as inside a tile."""
    height, width, scale, tile = 200, 300, 4, 64
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = (0.5 + 0.25 * np.sin(x / 23.0) * np.cos(y / 31.0))[..., None].repeat(3, axis=2)

    out = upscale_tiled(image, _smooth_upscaler_with_tile_offsets(scale),
                        scale=scale, tile=tile, overlap=overlap)
    plan = plan_tiles(width, height, tile, overlap)
    per_column = _column_steps(out, scale)
    in_overlap = np.zeros(per_column.shape, dtype=bool)
    for left, right in zip(plan.xs[1:], plan.xs[:-1]):
        in_overlap[left * scale : (right + tile) * scale] = True
    edge = 2 * scale  # the box blur's own edge effect at tile borders
    interior = ~in_overlap
    interior[: edge] = interior[-edge:] = False
    across = per_column[in_overlap].max()
    inside = per_column[interior].max()
    assert across <= 3 * inside, (across, inside)

    # The control: the same tiles butted together without overlap show their offsets.
    hard = upscale_tiled(image, _smooth_upscaler_with_tile_offsets(scale),
                         scale=scale, tile=tile, overlap=0)
    hard_plan = plan_tiles(width, height, tile, 0)
    hard_columns = _column_steps(hard, scale)
    cuts = [start * scale - 1 for start in hard_plan.xs[1:]]
    assert hard_columns[cuts].max() > 5 * inside


def test_to_uint8_rounds_and_clips():
    from image.tiling import to_uint8

    out = to_uint8(np.array([[-0.1, 0.0, 0.5 / 255, 1.5 / 255, 1.0, 1.2]], dtype=np.float32))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 0, 2, 255, 255]]
    assert to_uint8(np.array([-3.0, 2.5, 3.5, 254.6, 300.0]), levels=1.0).tolist() == [0, 2, 4, 255, 255]


@pytest.mark.parametrize("tile, overlap, align", [(1024, 128, 8), (256, 32, 8), (64, 8, 4)])
def test_aligned_tiles_start_on_the_grid_keep_the_overlap_and_add_no_tile(tile, overlap, align):
    # enhance's tiles start on the latent grid so their slices of one noise field line up;
    # rounding to it must neither shrink an overlap nor cost a row of tiles.
    for length in range(tile, 6 * tile, align):
        starts = tile_starts(length, tile, overlap, align)
        assert all(start % align == 0 for start in starts) and starts[0] == 0 and starts[-1] == length - tile
        assert all(b + tile - c >= overlap and c > b for b, c in zip(starts, starts[1:], strict=False))
        assert len(starts) == len(tile_starts(length, tile, overlap))
    assert tile_starts(1920, 1024, 128, 8) == (0, 896)
    with pytest.raises(ValueError):
        tile_starts(tile + 1, tile, overlap, align)  # the image is padded to the grid first
