"""The four operations and chains on tiny models, through the real loader, offline.

Steps are kept at 2 (img2img: strength 0.5, one denoising step) so each run stays well
under two seconds on a CPU; what is checked is plumbing: sizes, modes, alpha, determinism
and errors. The pixels of tiny random-weight models mean nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from image.codec import encode_image
from image.device import device_failure, out_of_memory, resolve_device
from image.engine import DEVICE_FAILED, READY, SETUP_FAILED, STARTING, Engine
from image.errors import (
    DeviceFailed,
    ImageTooLarge,
    InvalidParameter,
    ModelError,
    OutOfDeviceMemory,
    UnknownOperation,
    Withdrawn,
)
from image.operations import OPERATION_NAMES, get_operation
from image.operations._img2img import _round_to, working_scale
from image.params import resolve, validate_params
from image.tiling import plan_tiles

pytestmark = pytest.mark.models

FAST = {"upscale": {"steps": 2}, "enhance": {"steps": 2, "strength": 0.5},
        "comic": {"steps": 2, "strength": 0.5}, "remove-background": {}}


def _fast(chain):
    params = {}
    for name in chain:
        params.update(FAST[name])
    return validate_params(tuple(chain), params)


def _image(width=64, height=64, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                     np.full_like(x, 128)], axis=-1)
    noise = rng.integers(-20, 20, size=base.shape)
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = np.where((x - width / 2) ** 2 + (y - height / 2) ** 2 < (width / 3) ** 2, 255, 0)
        alpha[0, 0] = 77  # one half-transparent pixel
        image.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    return image


@pytest.fixture(scope="module")
def engine(tiny_cache):
    engine = Engine(OPERATION_NAMES, tiny_cache, device="cpu", allow_download=False)
    assert engine.state == STARTING
    engine.setup()
    return engine


def _run(engine, chain, image, seed=1, **extra):
    chain = tuple(chain)
    params = _fast(chain)
    params.update(validate_params(chain, extra))
    return engine.run(chain, image, params, seed)


# -- set-up ---------------------------------------------------------------------------------


def test_engine_is_ready_with_tiny_models(engine):
    assert engine.state == READY
    assert engine.is_tiny()
    assert set(engine.setup_seconds) == set(OPERATION_NAMES)
    engine.setup()  # idempotent
    assert engine.state == READY


def test_model_ids(engine):
    one = engine.model_id(["upscale"])
    repo, _, commit = one.partition("@")
    assert repo == "stabilityai/stable-diffusion-x4-upscaler" and commit.endswith("+tiny") and len(commit) == 45
    chain = engine.model_id(("remove-background", "upscale"))
    assert chain == f"{engine.model_id(['remove-background'])},{one}"
    assert engine.model_id("remove-background,upscale") == chain


def test_setup_offline_and_only_the_named_operations(tiny_cache, offline):
    engine = Engine(["remove-background"], tiny_cache, device="cpu")
    engine.setup()
    assert engine.model_id("remove-background").startswith("briaai/RMBG-1.4@")
    out = engine.run(("remove-background",), _image(), {}, seed=0)
    assert out.mode == "RGBA"
    with pytest.raises(UnknownOperation, match="not served by this process"):
        engine.run(("remove-background", "upscale"), _image(), {}, seed=0)


def test_missing_models_fail_setup_clearly(tmp_path):
    engine = Engine(["comic"], tmp_path / "empty", device="cpu")
    with pytest.raises(ModelError, match="imagen models pull"):
        engine.setup()
    assert engine.state == SETUP_FAILED
    with pytest.raises(ModelError, match="failed to set up"):
        engine.run(("comic",), _image(), {}, seed=0)


def test_a_failed_setup_lets_go_of_the_operation_it_was_setting_up(tiny_cache, offline, monkeypatch):
    """Its model stayed on the device, held by the error's traceback, so a setup tried again
    (out of memory at warm-up) loaded a second copy beside it."""
    import gc
    import weakref

    from image.operations._img2img import Img2ImgOperation

    seen = []

    def failing(self, *args, **kwargs):
        seen.append(weakref.ref(self))
        raise torch.OutOfMemoryError("CUDA out of memory (a warm-up that did not fit)")

    monkeypatch.setattr(Img2ImgOperation, "warm_up", failing)
    engine = Engine(["remove-background", "comic"], tiny_cache, device="cpu")
    with pytest.raises(torch.OutOfMemoryError, match="did not fit") as raised:
        engine.setup()
    assert engine.state == SETUP_FAILED and engine.error is raised.value
    del raised
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None
    monkeypatch.undo()
    engine.setup()  # tried again: the loaded remove-background kept, comic loaded once
    assert engine.state == READY and engine.run(("comic",), _image(), {"steps": 2}, seed=0).size == _image().size


def test_unknown_operation_at_construction(tiny_cache):
    with pytest.raises(UnknownOperation, match="sharpen"):
        Engine(["sharpen"], tiny_cache)
    with pytest.raises(UnknownOperation, match="no operation"):
        Engine([], tiny_cache)
    with pytest.raises(UnknownOperation, match="choose from"):
        get_operation("sharpen")


def test_building_an_engine_or_a_service_imports_no_torch(tiny_cache):
    """Setup reads the weights ahead before torch and the model libraries are imported (the
    longest part of a cold start), and gunicorn forks the serving process: an Engine built by
    `imagen serve` imported every operation's module (torch with it) before either, in the
    main thread, ~2.5 s of this machine's start-up before the server even listened."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from handlers.service import build_engine, build_processor\n"
            "from handlers.settings import Settings\n"
            f"settings = Settings.from_env({{'MODEL_CACHE_DIR': {str(tiny_cache)!r}, 'IMAGEN_DEVICE': 'cpu', "
            "'GOOGLE_CLOUD_PROJECT': 'p', 'STORAGE_EMULATOR_HOST': 'http://127.0.0.1:1'})\n"
            "engine = build_engine(settings)\n"
            "build_processor(settings, engine)\n"
            "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_run_checks_the_chain(engine):
    with pytest.raises(InvalidParameter, match="twice"):
        engine.run(["upscale", "upscale"], _image(), {}, seed=0)
    with pytest.raises(UnknownOperation, match="no operation"):
        engine.run([], _image(), {}, seed=0)
    with pytest.raises(UnknownOperation, match="'sharpen'"):
        engine.run("sharpen", _image(), {}, seed=0)


# -- each operation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op, size, mode",
    [("upscale", (256, 256), "RGB"), ("enhance", (64, 64), "RGB"), ("comic", (64, 64), "RGB"),
     ("remove-background", (64, 64), "RGBA")],
)
def test_each_operation_size_and_mode(engine, op, size, mode):
    out = _run(engine, [op], _image())
    assert out.size == size and out.mode == mode


def test_chain_remove_background_then_upscale(engine):
    out = _run(engine, ["remove-background", "upscale"], _image(48, 40))
    assert out.size == (192, 160) and out.mode == "RGBA"
    # What the processor budgets encode and upload time by, before running anything.
    assert engine.output_size(["remove-background", "upscale"], (48, 40), "png") == (192, 160)
    assert engine.output_size("comic", (48, 40), "jpeg") == (48, 40)
    with pytest.raises(UnknownOperation, match="'sharpen'"):
        engine.output_size("sharpen", (48, 40), "png")
    with pytest.raises(ImageTooLarge, match="webp image is at most 16383"):
        engine.output_size("upscale", (4096, 4096), "webp")


@pytest.mark.parametrize("op", OPERATION_NAMES)
def test_same_seed_same_bytes(engine, op):
    first = encode_image(_run(engine, [op], _image(), seed=42))
    again = encode_image(_run(engine, [op], _image(), seed=42))
    assert first == again


@pytest.mark.parametrize("op", ["upscale", "enhance", "comic"])
def test_different_seed_differs(engine, op):
    a = np.asarray(_run(engine, [op], _image(), seed=1))
    b = np.asarray(_run(engine, [op], _image(), seed=2))
    assert not np.array_equal(a, b)


def test_large_upscale_goes_through_tiles(engine):
    upscale = engine._ops["upscale"]
    image = _image(150, 100)
    plan = plan_tiles(150, 100, upscale.tile_size, upscale.tile_overlap)
    assert len(plan.boxes) > 1  # really tiled
    out = _run(engine, ["upscale"], image, steps=1)
    assert out.size == (600, 400) and out.mode == "RGB"


def test_upscale_tiles_start_their_overlaps_from_the_same_noise(engine, monkeypatch):
    # With noise of their own, neighbouring tiles invent unrelated texture where they overlap
    # and the cross-fade averages it: a band of softer detail along every seam. They take
    # slices of one latent field instead, and of one field for the noise the pipeline adds to
    # its input (drawn per tile, it differed by 7.6 levels in the overlap at noise_level 20);
    # one tile takes the pipeline's own, as stock does.
    from diffusers import DDPMScheduler

    upscale = engine._ops["upscale"]
    pipeline = type(upscale.model)
    calls, added = [], []
    call, add_noise = pipeline.__call__, DDPMScheduler.add_noise

    def spy(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        calls.append((kwargs["latents"], result.images))
        return result

    def spy_noise(self, original, noise, timesteps):
        added.append(noise)
        return add_noise(self, original, noise, timesteps)

    monkeypatch.setattr(pipeline, "__call__", spy)
    monkeypatch.setattr(DDPMScheduler, "add_noise", spy_noise)
    tile, overlap = upscale.tile_size, upscale.tile_overlap
    width = 2 * tile - 2 * overlap  # two tiles side by side, overlapping by 2 x overlap
    _run(engine, ["upscale"], _image(width, tile, seed=3), steps=2)
    [(left, left_out), (right, right_out)] = calls
    xs = plan_tiles(width, tile, tile, overlap).xs
    shared = tile - xs[1]
    assert torch.equal(left[..., xs[1]:], right[..., :shared])  # the same noise in the overlap
    assert not torch.equal(left[..., :shared], right[..., :shared])  # and only there
    left_input, right_input = added
    assert left_input.shape == (1, 3, tile, tile)
    assert torch.equal(left_input[..., xs[1]:], right_input[..., :shared])
    assert not torch.equal(left_input[..., :shared], right_input[..., :shared])
    assert "add_noise" not in vars(upscale.model.low_res_scheduler)  # the scheduler given back as it was
    scale = upscale.scale
    disagreement = np.abs(left_out[0][:, xs[1] * scale:] - right_out[0][:, :shared * scale]).mean()
    assert disagreement < 0.5 * left_out[0].std()  # unrelated noise: about the tile's own spread
    calls.clear()
    _run(engine, ["upscale"], _image(tile // 2, tile // 2), steps=1)
    assert calls[0][0] is None


@pytest.mark.parametrize("op", ["enhance", "comic"])
@pytest.mark.parametrize("size", [(70, 45), (33, 97)])
def test_img2img_keeps_odd_sizes_exactly(engine, op, size):
    out = _run(engine, [op], _image(*size))
    assert out.size == size and out.mode == "RGB"


def test_enhance_tiles_inputs_beyond_its_range(engine, monkeypatch):
    enhance = engine._ops["enhance"]
    calls = []
    original = enhance._pipe

    def spy(image, params, generator, where, **kwargs):
        calls.append(image.size)
        return original(image, params, generator, where, **kwargs)

    monkeypatch.setattr(enhance, "_pipe", spy)
    # 2 x 1.25 native: more than (1.5 x native)**2 pixels, so tiled at native size.
    size = (enhance.native * 2 + 3, enhance.native * 5 // 4)
    out = _run(engine, ["enhance"], _image(*size))
    assert out.size == size
    assert len(calls) > 1 and set(calls) == {(enhance.native, enhance.native)}


def test_enhance_tiles_start_their_overlaps_from_the_same_noise(engine, monkeypatch):
    # As upscale's: with noise of their own, neighbouring tiles refine the strip they share
    # differently and the cross-fade averages two renderings (softer detail along each seam).
    # Tiles start on the latent grid and take slices of one noise field.
    enhance = engine._ops["enhance"]
    original = enhance._pipe
    calls = []

    def spy(image, params, generator, where, noise=None):
        out = original(image, params, generator, where, noise=noise if sharing else None)
        calls.append((noise, np.asarray(out, np.float32)))
        return out

    monkeypatch.setattr(enhance, "_pipe", spy)
    tile, factor = enhance.native, enhance.model.vae_scale_factor
    size = (tile * 2 - tile // 4 + 5, tile * 3 // 2 + 3)  # tiled (over 1.5^2 native^2 pixels), off the grid
    image = _image(*size, seed=4)
    overlap = _round_to(tile * enhance.tile_overlap_ratio, enhance.multiple // 2 or 1)
    plan = plan_tiles(size[0] + -size[0] % factor, size[1] + -size[1] % factor, tile, overlap, align=factor)
    shift = plan.xs[1]
    shared = tile - shift

    def disagreement() -> float:
        calls.clear()
        out = _run(engine, ["enhance"], image, steps=4, strength=0.5)
        assert out.size == size and len(calls) == len(plan.boxes) == 4
        (left, left_out), (right, right_out) = calls[0], calls[1]  # the first row's two tiles
        assert torch.equal(left[..., shift // factor:], right[..., :shared // factor])  # the same noise there
        assert not torch.equal(left[..., :shared // factor], right[..., :shared // factor])  # and only there
        return float(np.abs(left_out[:, shift:] - right_out[:, :shared]).mean())

    assert all(x % factor == 0 for x in plan.xs + plan.ys) and len(plan.xs) == 2
    sharing = True
    together = disagreement()
    sharing = False  # each tile's own noise, drawn by the pipeline: as before
    apart = disagreement()
    assert together < 0.7 * apart, (together, apart)


def test_working_scale():
    budget = 2.25 * 512**2
    assert working_scale((512, 512), min_side=384, max_pixels=budget) == 1.0
    assert working_scale((64, 32), min_side=384, max_pixels=budget) == 12.0
    assert working_scale((2048, 2048), min_side=384, max_pixels=budget) == pytest.approx(0.375)
    # A long strip is enlarged only up to the pixel budget.
    strip = working_scale((4000, 100), min_side=384, max_pixels=budget)
    assert strip == pytest.approx((budget / 400_000) ** 0.5)


def test_comic_prompt_gets_its_trigger_words(engine, monkeypatch):
    comic = engine._ops["comic"]
    seen = []

    pipeline = type(comic.model)
    encode = pipeline.encode_prompt

    def spy(self, *args, **kwargs):  # the prompt the pipeline's text encoder is given
        if kwargs.get("prompt_embeds") is None:
            seen.append(kwargs["prompt"] if "prompt" in kwargs else args[0])
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_prompt", spy)
    _run(engine, ["comic"], _image(), prompt="a harbour at dusk")
    _run(engine, ["comic"], _image(), prompt="Ghibli Style harbour")
    assert seen == ["ghibli style, a harbour at dusk", "Ghibli Style harbour"]


def _text_encoder_calls(pipe) -> list:
    """The text encoders' forward calls from now on (a hook on each: the real modules run)."""
    calls = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.register_forward_hook(lambda module, args, output: calls.append(module))
    return calls


@pytest.mark.parametrize("op", ["upscale", "enhance", "comic"])
def test_a_prompt_is_encoded_once_and_gives_the_pixels_of_the_strings(tiny_cache, op):
    """Jobs and tiles after the first with the same prompts run no text encoder, and the
    kept embeddings give the pixels the pipeline gives for the prompt strings itself."""
    fresh = Engine([op], tiny_cache, device="cpu", allow_download=False)
    fresh.setup()
    operation = fresh._ops[op]
    calls = _text_encoder_calls(operation.model)
    params = _fast([op])
    params["prompt"] = "a lighthouse on a cliff"
    first = fresh.run((op,), _image(), params, 1)
    assert calls, "the first job with a new prompt encodes it"
    encoded = len(calls)
    size = (160, 160) if op == "upscale" else (64, 64)  # upscale: several tiles
    again = fresh.run((op,), _image(*size), params, 1)
    assert len(calls) == encoded, "a prompt already seen is not encoded again"
    assert fresh.run((op,), _image(), params, 1).tobytes() == first.tobytes()

    # prompt_cache off: the pipeline is given the strings, as stock diffusers is, every call
    tuning = operation.tuning
    operation.tuning = tuning.replace(prompt_cache=False)
    try:
        stock = operation.run(_image(*size), resolve(op, params), seed=1)
    finally:
        operation.tuning = tuning
    assert len(calls) > encoded
    assert np.array_equal(np.asarray(stock), np.asarray(again))


def test_kept_prompts_are_bounded_least_recently_used_first(tiny_cache):
    from image.operations.prompts import PromptEmbeddings

    fresh = Engine(["comic"], tiny_cache, device="cpu", allow_download=False)
    fresh.setup()
    pipe = fresh._ops["comic"].model
    kept = PromptEmbeddings(pipe, size=2)
    calls = _text_encoder_calls(pipe)
    with torch.inference_mode():
        one = kept.arguments("one", None)
        kept.arguments("two", "")
        kept.arguments("one", None)  # used again: "two" is now the oldest
        kept.arguments("three", None)
        assert len(kept) == 2 and len(calls) == 6  # each new pair: its prompt and its negative
        kept.arguments("one", None)
        assert len(calls) == 6
        kept.arguments("two", "")
        assert len(calls) == 8
        batch = kept.arguments("one", None, count=3)
    assert set(one) == {"prompt_embeds", "negative_prompt_embeds"}
    for name, tensor in one.items():
        assert batch[name].shape == (3, *tensor.shape[1:])
        assert all(torch.equal(row, tensor[0]) for row in batch[name])


# -- alpha ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["enhance", "comic"])
def test_img2img_keeps_alpha(engine, op):
    image = _image(mode="RGBA")
    out = _run(engine, [op], image)
    assert out.mode == "RGBA"
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(image.getchannel("A")))


def test_upscale_enlarges_alpha_bicubically(engine):
    image = _image(40, 30, mode="RGBA")
    out = _run(engine, ["upscale"], image)
    assert out.mode == "RGBA" and out.size == (160, 120)
    expected = image.getchannel("A").resize((160, 120), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(expected))


def test_remove_background_combines_with_existing_alpha(engine):
    image = _image(mode="RGBA")
    out = _run(engine, ["remove-background"], image)
    alpha_in = np.asarray(image.getchannel("A"))
    alpha_out = np.asarray(out.getchannel("A"))
    assert (alpha_out[alpha_in == 0] == 0).all()
    _assert_cut_out(out, image)


def test_other_modes_are_accepted(engine):
    grey = _image().convert("L")
    assert _run(engine, ["comic"], grey).mode == "RGB"
    palette = _image(mode="RGBA").convert("P")
    assert _run(engine, ["enhance"], palette).size == (64, 64)


# -- remove-background ----------------------------------------------------------------------


def _model_card_mask(model, image: Image.Image) -> np.ndarray:
    """RMBG-1.4's model card pre- and post-processing, as published (utilities.py)."""
    im = np.asarray(image)
    im_tensor = torch.tensor(im, dtype=torch.float32).permute(2, 0, 1)
    im_tensor = F.interpolate(torch.unsqueeze(im_tensor, 0), size=[1024, 1024], mode="bilinear")
    x = torch.divide(im_tensor, 255.0)
    x = (x - 0.5) / 1.0  # torchvision normalize([0.5]*3, [1.0]*3)
    with torch.inference_mode():
        result = model(x)
    result = torch.squeeze(F.interpolate(result[0][0], size=im.shape[:2], mode="bilinear"), 0)
    ma, mi = torch.max(result), torch.min(result)
    result = (result - mi) / (ma - mi)
    return (result * 255).permute(1, 2, 0).cpu().numpy().squeeze()


def test_remove_background_follows_the_model_card(engine):
    image = _image(90, 60)
    out = _run(engine, ["remove-background"], image)
    expected = _model_card_mask(engine._ops["remove-background"].model, image)
    # The card truncates to uint8; imagen rounds: at most one level apart.
    diff = np.abs(np.asarray(out.getchannel("A")).astype(float) - expected)
    assert diff.max() <= 1.0
    _assert_cut_out(out, image)


def _assert_cut_out(out: Image.Image, image: Image.Image) -> None:
    """The input's colours where the cut-out shows anything; black under full transparency (the
    card keeps the input's colours there: the removed background stayed in the file)."""
    visible = np.asarray(out.getchannel("A")) > 0
    assert (~visible).any() and visible.any()
    colours, given = np.asarray(out.convert("RGB")), np.asarray(image.convert("RGB"))
    assert np.array_equal(colours[visible], given[visible])
    assert not colours[~visible].any()


def test_mask_only(engine):
    image = _image()
    full = _run(engine, ["remove-background"], image)
    mask = _run(engine, ["remove-background"], image, mask_only=True)
    assert mask.mode == "L" and mask.size == (64, 64)
    assert np.array_equal(np.asarray(mask), np.asarray(full.getchannel("A")))


def test_background_colour(engine):
    image = _image()
    mask = np.asarray(_run(engine, ["remove-background"], image, mask_only=True), float) / 255
    out = _run(engine, ["remove-background"], image, background="#00ff00")
    assert out.mode == "RGB" and out.size == (64, 64)
    expected = np.asarray(image, float) * mask[..., None] + np.array([0, 255, 0]) * (1 - mask[..., None])
    assert np.abs(np.asarray(out, float) - expected).max() <= 1.0


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chain, params, match",
    [(["upscale"], {"steps": 0}, "'steps'"), (["upscale"], {"strength": 0.5}, "'strength'"),
     (["comic"], {"guidance": "lots"}, "'guidance'"), (["enhance"], {"steps": 2, "strength": 0.3},
     "steps x strength"), (["remove-background"], {"mask_only": True, "background": "white"},
     "mask_only and background"), (["remove-background"], {"background": "#12"}, "'background'")],
)
def test_bad_params_raise_invalid_parameter(engine, chain, params, match):
    with pytest.raises(InvalidParameter, match=match):
        engine.run(chain, _image(), params, seed=0)


def test_operation_run_wants_resolved_params(engine):
    with pytest.raises(InvalidParameter, match="resolved parameters"):
        engine._ops["upscale"].run(_image(), {"steps": 2}, seed=0)
    with pytest.raises(InvalidParameter, match="seed"):
        engine._ops["upscale"].run(_image(), resolve("upscale", {}), seed=-1)


def test_upscale_refuses_too_large_inputs_before_any_work(engine, monkeypatch):
    upscale = engine._ops["upscale"]
    monkeypatch.setattr(type(upscale), "max_input_pixels", 50 * 50)

    def fail(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(upscale, "process", fail)
    with pytest.raises(ImageTooLarge, match="at most 2500 input pixels.*60x50"):
        engine.run(["upscale"], _image(60, 50), {}, seed=0)
    # In a chain, the limit is checked before the first operation runs.
    monkeypatch.setattr(engine._ops["remove-background"], "process", fail)
    with pytest.raises(ImageTooLarge):
        engine.run(["remove-background", "upscale"], _image(60, 50), {}, seed=0)


def test_a_result_the_format_cannot_hold_is_refused_before_any_work(engine, monkeypatch):
    """WebP holds at most 16383 pixels a side: a 4096-wide upscale (x4) as webp is refused
    before the model runs (an input error: a failure report, not a retried job)."""
    upscale = engine._ops["upscale"]

    def fail(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(upscale, "process", fail)
    with pytest.raises(ImageTooLarge, match=r"webp image is at most 16383 .* 16384x512: choose format png or jpeg"):
        engine.run(["upscale"], _image(4096, 128), {"format": "webp"}, seed=0)


@pytest.mark.parametrize("chain", [["upscale"], ["comic"], ["enhance"], ["remove-background", "upscale"]])
def test_long_thin_strips_are_refused_before_any_work(engine, monkeypatch, chain):
    """Tiles and the UNet's multiple pad the short side: a 2 x 100 strip would be worked on,
    and held in memory, as a far larger image. Refused as input, not retried as a fault."""
    for op in engine._ops.values():
        monkeypatch.setattr(op, "process", lambda *args, **kwargs: pytest.fail("the model ran"))
    with pytest.raises(ImageTooLarge, match=f"{chain[-1]} takes images at most 32 times longer on one side "
                                            "than the other; this one is 2x100"):
        engine.run(chain, _image(2, 100), {}, seed=0)


def test_a_withdrawn_job_gives_the_device_back_before_any_work(engine, monkeypatch):
    """A stopping worker hands back the jobs still waiting for the device (Withdrawn)."""
    def fail(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(engine._ops["upscale"], "process", fail)
    with pytest.raises(Withdrawn, match="handed back"):
        engine.run(["upscale"], _image(), {}, seed=0, withdrawn=lambda: True)

    # Asked while the job waits for the device, too: a job already waiting for it when the
    # worker began to stop is handed back at once, not after the job on the device (up to an
    # hour) nor run for its whole budget then (a drain takes one job's time).
    import threading

    class Watched:  # the engine's lock, saying when a job starts waiting for it
        def __init__(self, lock):
            self.lock, self.waiting = lock, threading.Event()

        def acquire(self, *args, **kwargs):
            self.waiting.set()
            return self.lock.acquire(*args, **kwargs)

        def release(self):
            self.lock.release()

    holding, release, stopping, raised = threading.Event(), threading.Event(), threading.Event(), []
    first = threading.Thread(target=engine.run, args=(["remove-background"], _image(), {}, 0),
                             kwargs={"started": lambda: (holding.set(), release.wait(60))})
    first.start()
    assert holding.wait(30)
    monkeypatch.setattr(engine, "_run_lock", Watched(engine._run_lock))

    def waiting_job():
        try:
            engine.run(["upscale"], _image(), {}, seed=0, withdrawn=stopping.is_set)
        except Exception as error:
            raised.append(error)

    second = threading.Thread(target=waiting_job)
    second.start()
    assert engine._run_lock.waiting.wait(30)
    stopping.set()
    second.join(10)
    assert not second.is_alive() and first.is_alive()  # handed back while the first job runs on
    release.set()
    first.join(60)
    assert [type(error) for error in raised] == [Withdrawn]


def test_out_of_device_memory_frees_the_cache_and_says_what_ran_out(engine, monkeypatch):
    """A GPU out of memory: the allocator's cache is given back (after the failed frames are
    gone) and the job fails with OutOfDeviceMemory, a fault of this instance (retried, then
    reported), naming the operations and the job's input size."""
    from image import engine as engine_module

    freed = []

    def process(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore lines")

    monkeypatch.setattr(engine._ops["upscale"], "process", process)
    monkeypatch.setattr(engine_module, "_release_device_memory", lambda: freed.append(1))
    with pytest.raises(OutOfDeviceMemory, match=r"^remove-background, upscale ran out of GPU memory on a 32x24 "
                                                r"input \(CUDA out of memory. Tried to allocate 9.00 GiB\): if "
                                                r"every attempt does, send a smaller image") as raised:
        engine.run(["remove-background", "upscale"], _image(32, 24), FAST["upscale"], seed=0)
    assert freed == [1] and isinstance(raised.value, ModelError)  # retried as the instance's fault
    assert not raised.value.compiling  # no background compile held memory (the processor's rule)
    assert raised.value.__context__ is None  # raised past the handler: the failed frames are released


def _wrapped_by_the_compiler(inner: Exception) -> Exception:
    """What Dynamo raises when the compiled code ran out: the failure inside, `from None`."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        raise inner
    except Exception as error:  # noqa: BLE001 - the wrapping under test
        return BackendCompilerFailed(lambda: None, error, None)


@pytest.mark.parametrize("raised, what", [
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "CUDA error: out of memory"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    (_wrapped_by_the_compiler(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
     "CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_every_form_of_running_out_of_device_memory_is_out_of_device_memory(engine, monkeypatch, raised, what):
    """The CUDA libraries, and the compiler wrapping them, say "out of memory" in their own
    ways: each is the same fault (freed, retried, then a report saying so), not an
    'unexpected RuntimeError'."""
    from image import engine as engine_module

    def process(*args, **kwargs):
        raise raised

    monkeypatch.setattr(engine._ops["upscale"], "process", process)
    monkeypatch.setattr(engine_module, "_release_device_memory", lambda: None)
    with pytest.raises(OutOfDeviceMemory) as caught:
        engine.run(["upscale"], _image(32, 24), FAST["upscale"], seed=0)
    assert f"input ({what}):" in str(caught.value)


def test_other_failures_of_the_model_are_not_taken_for_out_of_memory(engine, monkeypatch):
    failure = RuntimeError("Expected all tensors to be on the same device (out of luck)")

    def process(*args, **kwargs):
        raise failure

    monkeypatch.setattr(engine._ops["upscale"], "process", process)
    with pytest.raises(RuntimeError) as caught:
        engine.run(["upscale"], _image(32, 24), FAST["upscale"], seed=0)
    assert caught.value is failure
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory")) is None  # the host's
    assert out_of_memory(ValueError("out of memory")) is None  # not from the device's libraries
    try:  # a failure while an out-of-memory one was handled is its own (its __context__ is not read)
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise RuntimeError("operation not permitted when stream is capturing")  # noqa: B904
    except RuntimeError as later:
        assert later.__context__ is not None and out_of_memory(later) is None


def test_default_upscale_limit_gives_at_most_16384_square():
    upscale = get_operation("upscale")
    assert upscale.max_input_pixels * 16 == 16384 * 16384
    upscale().check_size((4000, 3000))  # a phone photo: a 16000 x 12000 result
    with pytest.raises(ImageTooLarge, match="at most 16777216 input pixels"):
        upscale().check_size((4097, 4096))


# -- device ---------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    device, dtype = resolve_device("auto")
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype == torch.float16
    else:
        assert device == torch.device("cpu") and dtype == torch.float32
        why = "CPU build" if torch.version.cuda is None else "CUDA did not start"
        with pytest.raises(ModelError, match=f"CUDA is not available here: .*{why}"):
            resolve_device("cuda")
    with pytest.raises(ModelError, match="not one of"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_cuda_that_does_not_start_says_why_and_that_a_restart_on_that_gpu_will_not_help(monkeypatch):
    # A CUDA build on a node whose GPU failed (an Xid): torch sees no device. The old hint
    # ("use device 'auto' or 'cpu'") read as a configuration mistake on a GPU node.
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(ModelError) as raised:
        resolve_device("cuda")
    message = str(raised.value)
    assert message.startswith("device 'cuda' was asked for but CUDA is not available here: CUDA did not start (")
    assert "cordon the node and delete the pod" in message


def test_a_cuda_error_the_process_cannot_recover_from_stops_the_engine(engine, monkeypatch):
    # CUDA's sticky errors leave the context unusable: every later job would fail, fast.
    calls = []

    def process(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    monkeypatch.setattr(engine._ops["upscale"], "process", process)
    monkeypatch.setattr(engine, "state", engine.state)  # the module's engine is READY again after
    monkeypatch.setattr(engine, "error", None)
    with pytest.raises(DeviceFailed, match=r"illegal memory access was encountered\): this process takes no more"):
        engine.run(["upscale"], _image(32, 24), FAST["upscale"], seed=0)
    assert engine.state == DEVICE_FAILED
    with pytest.raises(DeviceFailed):  # refused before any work, and no reload either
        engine.run(["upscale"], _image(32, 24), FAST["upscale"], seed=0)
    with pytest.raises(DeviceFailed):
        engine.setup()
    assert calls == [1]


def test_which_cuda_errors_are_the_devices_for_good():
    assert device_failure(RuntimeError("CUDA error: unspecified launch failure")) == \
        "CUDA error: unspecified launch failure"
    assert device_failure(RuntimeError("CUDA error: device-side assert triggered"))
    assert device_failure(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")
    assert device_failure(wrapped) == "CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"
    assert device_failure(RuntimeError("CUDA error: out of memory")) is None  # retried, not fatal
    assert device_failure(RuntimeError("CUDA error: invalid configuration argument")) is None  # the job's
    assert device_failure(ValueError("illegal memory access")) is None  # not from the device


@pytest.mark.parametrize("op", ["upscale", "enhance", "comic"])
def test_a_prompt_past_clips_77_tokens_is_cut_without_warnings(engine, op, caplog):
    """README: the models read the first 77 CLIP tokens. upscale warned twice per tile, one
    line quoting the cut text (stderr on the CLI, a WARNING per tile in the service)."""
    with caplog.at_level(logging.WARNING):
        _run(engine, [op], _image(), prompt="a harbour at dusk, " * 45)
    assert [r.getMessage()[:80] for r in caplog.records if r.name.startswith(("diffusers", "transformers"))] == []
