"""Optimised and stock compute the same function: each speed switch against stock diffusers.

Tiny models on the CPU, the same input, steps and seed. With the CPU defaults imagen's
operations give stock diffusers' pixels exactly; each switch is then turned on alone and its
output compared with stock's (float32 outputs in 0..1, so the tolerances are fractions of
one 8-bit level unless said otherwise). Cold-start switches are checked on the weights they
load. Two steps keep each run to a fraction of a second.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bench.cases import Case, ImagenRunner, StockRunner, input_image
from image.engine import READY, Engine
from image.errors import InvalidParameter
from image.models import loading, readahead
from image.models.lock import Lock
from image.models.registry import REGISTRY
from image.operations.compile_cache import DirectoryCache
from image.operations.tuning import (
    Tuning,
    compiles_in_background,
    tune_pipeline,
)

pytestmark = pytest.mark.models

CPU = torch.device("cpu")
# At the tiny models' native sizes: img2img runs the image as it is, upscale in one tile.
CASES = {
    "comic": Case("comic", "comic", 256, steps=2, strength=0.5, guidance=7.5),
    "enhance": Case("enhance", "enhance", 256, steps=2, strength=0.5, guidance=5.0),
    "upscale": Case("upscale", "upscale", 64, steps=2, guidance=9.0),
}
OPERATIONS = tuple(CASES)


def _pipe(op, cache):
    """A fresh pipeline through imagen's loader, everything off."""
    return loading.load_model(
        REGISTRY[op], cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock()
    ).model


def _call(pipe, op, steps=None, **extra):
    """The pipeline on the case's input, float32 output in 0..1."""
    case = CASES[op]
    kwargs = {
        "prompt": "a photo",
        "negative_prompt": "blurry",
        "image": input_image(case.size),
        "num_inference_steps": steps or case.steps,
        "guidance_scale": case.guidance,
        "generator": torch.Generator(device=CPU).manual_seed(7),
        "output_type": "np",
    }
    if case.strength is not None:
        kwargs["strength"] = case.strength
    kwargs.update(extra)
    with torch.inference_mode():
        return pipe(**kwargs).images[0]


@pytest.fixture(scope="module")
def stock_np(tiny_cache):
    """Stock outputs per operation (pipeline level), computed once."""
    return {op: _call(_pipe(op, tiny_cache), op) for op in OPERATIONS}


# -- imagen's operation is stock diffusers -------------------------------------------------


def test_cpu_defaults_are_stock():
    # reads files early and keeps prompts' embeddings (the same tensors), nothing else
    assert Tuning.for_device(CPU).enabled() == ["read_ahead", "prompt_cache"]
    assert Tuning.for_device(CPU, "remove-background").enabled() == ["read_ahead"]  # no prompt there
    cuda = ["fuse_qkv", "read_ahead", "direct_to_device", "vae_bf16"]
    assert Tuning.for_device("cuda").enabled() == [*cuda, "cuda_graphs", "prompt_cache"]
    # Measured to pay there: compiled (after ready) in NHWC under the graphs.
    for op in ("comic", "enhance", "upscale"):
        # upscale's 512 tile's decode: its attention as products, its decoder compiled too
        vae = ["vae_matmul_attention", "compile_vae"] if op == "upscale" else []
        # upscale's DDIM step given CPU timesteps (no wait on the GPU in the loop)
        steps = ["host_timesteps"] if op == "upscale" else []
        assert Tuning.for_device("cuda", op).enabled() == ["channels_last", *cuda, *vae, "compile", "cuda_graphs",
                                                           *steps, "prompt_cache"]
        assert Tuning.for_device("cuda", op).background_compile
    assert Tuning.for_device("cuda").upscale_tile == (256, 512)
    assert not Tuning.for_device("cuda", "remove-background").cuda_graphs  # not measured there
    assert Tuning.stock().enabled() == []
    assert Tuning(compile=True, compile_mode="max-autotune-no-cudagraphs").enabled() == [
        "compile(max-autotune-no-cudagraphs)"]  # the reports name the mode measured


def test_compiling_waits_for_ready_only_under_cuda_graphs():
    cuda, comic = torch.device("cuda"), Tuning.for_device("cuda", "comic")
    assert compiles_in_background(comic, cuda)
    assert not compiles_in_background(comic, CPU)  # no graphs on a CPU: compiled in the warm-up
    assert not compiles_in_background(comic.replace(cuda_graphs=False), cuda)
    assert not compiles_in_background(comic.replace(background_compile=False), cuda)
    assert not compiles_in_background(comic.replace(compile_mode="reduce-overhead"), cuda)  # its own graphs
    assert compiles_in_background(Tuning.for_device("cuda", "upscale"), cuda)  # both tile buckets
    assert Tuning.for_device("cuda", "upscale").channels_last  # compiled upscale was measured in NHWC
    assert not compiles_in_background(Tuning.for_device("cuda", "remove-background"), cuda)  # not measured
    # compile=off leaves upscale's compiled decoder: after ready too, never in the warm-up
    assert compiles_in_background(Tuning.for_device("cuda", "upscale").replace(compile=False), cuda)
    assert not compiles_in_background(Tuning.for_device("cuda", "upscale").replace(compile=False, compile_vae=False),
                                      cuda)


def test_one_job_processes_do_not_compile_unless_told(monkeypatch):
    from handlers.service import build_engine
    from handlers.settings import Settings

    settings = Settings.from_env({"IMAGEN_TUNING": "cuda_graphs=off"})
    assert build_engine(settings).tuning_changes == ("cuda_graphs=off",)
    assert build_engine(settings, one_shot=True).tuning_changes == ("compile=off", "compile_vae=off", "cuda_graphs=off")
    told = Settings.from_env({"IMAGEN_TUNING": "compile=on"})
    engine = build_engine(told, ["comic"], one_shot=True)
    assert engine._tuning_for("comic", "cuda").compile  # IMAGEN_TUNING comes last and wins


def test_the_engine_starts_background_compiles_once_every_operation_is_ready(tiny_cache, monkeypatch, tmp_path):
    from image.operations import tuning as tuning_module

    started = []

    def start(name, module, tuning, lock, cache, artefact, parts=()):
        started.append((name, engine.state, set(engine._ops), lock))
        assert cache is store and artefact == engine._ops[name].artefact_name

    # On a CPU nothing compiles in the background (no graphs); the wiring is what is checked.
    monkeypatch.setattr(tuning_module, "compiles_in_background", lambda tuning, device: True)
    monkeypatch.setattr(tuning_module, "compile_in_background", start)
    store = DirectoryCache(tmp_path)
    engine = Engine(["comic", "remove-background"], tiny_cache, device="cpu", lock=Lock(), compile_cache=store)
    engine.setup()
    assert [name for name, *_ in started] == ["comic", "remove-background"]
    for _, state, loaded, hold in started:
        assert state == READY and loaded == {"comic", "remove-background"}
        with hold:  # the engine's run lock: no job runs while a compiled model is swapped in
            assert engine._run_lock.locked()
        assert not engine._run_lock.locked()


@pytest.mark.parametrize("op", OPERATIONS)
def test_operation_with_cpu_defaults_gives_stock_pixels(tiny_cache, op):
    case = CASES[op]
    image = input_image(case.size)
    stock = StockRunner(op, tiny_cache, CPU, torch.float32)
    imagen = ImagenRunner(op, tiny_cache, CPU, torch.float32, tuning=Tuning.for_device(CPU))
    expected = np.asarray(stock(case, image))
    got = np.asarray(imagen(case, image))
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_rounded_on_the_device_are_diffusers_own(dtype):
    """The operations round a pipeline's "pt" output where it is (base.to_bytes): the same
    bytes as diffusers' "np" then "pil" path and as the tiles' blend (tiling.to_uint8),
    halfway values (k + 0.5) / 255 included."""
    from diffusers.image_processor import VaeImageProcessor

    from image.operations.base import to_bytes
    from image.tiling import to_uint8

    halves = (torch.arange(255, dtype=torch.float64) + 0.5) / 255  # within 0..1, as the pipelines clamp
    values = torch.cat([torch.rand(3 * 64 * 64 - 257, dtype=torch.float64), halves, torch.tensor([0.0, 1.0])])
    images = values.reshape(1, 3, 64, 64).to(dtype)
    floats = VaeImageProcessor.pt_to_numpy(images)  # diffusers' "np" output
    expected = np.asarray(VaeImageProcessor.numpy_to_pil(floats)[0])  # and its "pil"
    got = to_bytes(images)
    assert got.dtype == np.uint8 and got.shape == (1, 64, 64, 3) and got.flags.c_contiguous  # PIL takes it as is
    assert np.array_equal(got[0], expected)
    assert np.array_equal(got[0], to_uint8(floats[0].copy()))
    assert np.array_equal(to_bytes(images.contiguous(memory_format=torch.channels_last)), got)


# -- each switch alone -----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize(
    "switch, tolerance",
    [
        ("channels_last", 1e-4),  # another conv kernel, the same sums in another order
        ("fuse_qkv", 1e-5),  # one matmul over concatenated weights
        # bfloat16 keeps 8 mantissa bits, rounded in every VAE layer (encode and decode):
        # up to ~12 8-bit levels on a few pixels of these random models, under one on average.
        ("vae_bf16", 0.05),
    ],
)
def test_switch_computes_the_same_function(tiny_cache, stock_np, op, switch, tolerance):
    pipe = _pipe(op, tiny_cache)
    done = tune_pipeline(pipe, Tuning.stock().replace(**{switch: True}), CPU)
    if switch == "vae_bf16" and op == "comic":
        # SD1.5 runs its VAE in the pipeline's dtype (no float32 upcast to save): left alone.
        assert done == [] and np.array_equal(_call(pipe, op), stock_np[op])
        return
    assert done == [switch]
    out = _call(pipe, op)
    diff = np.abs(out - stock_np[op])
    assert diff.max() <= tolerance, f"{switch}: max difference {diff.max():.2e}"
    if switch == "vae_bf16":
        assert diff.mean() <= 0.004
        assert pipe.vae.dtype == torch.bfloat16 and not pipe.vae.config.force_upcast


@pytest.mark.parametrize("op", OPERATIONS)
def test_host_timesteps_steps_with_the_same_timesteps_from_the_cpu(tiny_cache, op):
    # Six steps (three past img2img's strength): a timestep taken from the wrong place in the
    # schedule would change the pixels. eta > 0: DDIM draws noise from the generator, which the
    # pipeline passes only to a step whose signature names it (and eta too).
    extra = {"eta": 0.5} if op == "upscale" else {}
    stock = _call(_pipe(op, tiny_cache), op, steps=6, **extra)
    pipe = _pipe(op, tiny_cache)
    done = tune_pipeline(pipe, Tuning.stock().replace(host_timesteps=True), CPU)
    if op == "enhance":  # Euler steps by its own index over CPU sigmas: left alone
        assert done == [] and np.array_equal(_call(pipe, op, steps=6), stock)
        return
    assert done == ["host_timesteps"]
    wrapper = pipe.scheduler.step.host_timesteps
    given = []
    wrapper.step = lambda output, timestep, *a, step=wrapper.step, **k: given.append(timestep) or step(
        output, timestep, *a, **k)
    assert np.array_equal(_call(pipe, op, steps=6, **extra), stock)
    schedule, on_host = wrapper.copy
    assert given and all(t.untyped_storage().data_ptr() == on_host.untyped_storage().data_ptr() for t in given)
    assert [int(t) for t in given] == schedule[-len(given):].tolist()
    # A timestep that is not a view of the schedule goes through as it came
    assert wrapper.host_timestep(torch.tensor(int(given[0]))) is None
    assert tune_pipeline(pipe, Tuning.stock().replace(host_timesteps=True), CPU) == []  # wrapped once


def test_vae_tiling_changes_nothing_below_its_tile_and_stays_close_above(tiny_cache, stock_np):
    # Above the tile the decode is blended from tiles (GroupNorm sees each tile alone): not
    # bit-stock, which is why the switch is off by default.
    pipe = _pipe("upscale", tiny_cache)
    assert tune_pipeline(pipe, Tuning.stock().replace(vae_tiling=True), CPU) == ["vae_tiling"]
    tiled = _call(pipe, "upscale")
    assert tiled.shape == stock_np["upscale"].shape and np.isfinite(tiled).all()
    # Close: 0.048 here; a flat grey picture is 0.14 from stock, and passed the bound this had.
    flat = np.abs(0.5 - stock_np["upscale"]).mean()
    assert np.abs(tiled - stock_np["upscale"]).mean() < min(0.08, flat / 2)
    pipe.vae.tile_latent_min_size, pipe.vae.tile_sample_min_size = 4096, 16384
    assert np.array_equal(_call(pipe, "upscale"), stock_np["upscale"])


def test_compile_computes_the_same_function(tiny_cache, stock_np, captured_compile):
    # Inductor takes minutes on a CPU; the captured graphs run as captured.
    pipe = _pipe("upscale", tiny_cache)
    assert tune_pipeline(pipe, Tuning.stock().replace(compile=True), CPU) == ["compile(default)"]
    assert np.abs(_call(pipe, "upscale") - stock_np["upscale"]).max() <= 1e-5


@pytest.mark.parametrize("op", ["upscale", "comic"])
def test_compile_vae_compiles_the_warm_up_shapes_and_runs_others_eagerly(tiny_cache, captured_compile, op):
    # compile_vae: the VAE's graphs as Dynamo captures them, run as captured (Inductor takes
    # minutes on a CPU), for the shapes the warm-up saw (upscale: its tile; comic: 64^2 on a
    # CPU); another size runs eagerly and compiles nothing. Same pixels as without it.
    # tests/bench/test_vae_attention.py: with the matrix-product attention.
    from image.operations.shape_compile import ShapeCompiled

    graphs, calls = captured_compile.graphs, captured_compile.calls
    plain = Engine([op], tiny_cache, device="cpu", lock=Lock(), tuning=Tuning.for_device(CPU))
    engine = Engine([op], tiny_cache, device="cpu", lock=Lock(),
                    tuning=Tuning.for_device(CPU).replace(compile_vae=True))
    plain.setup()
    engine.setup()
    vae = engine._ops[op].model.vae
    assert isinstance(vae.decoder.forward, ShapeCompiled) and vae.decoder.forward.compiled_shapes == 1
    assert vae.encoder.forward.compiled_shapes == (1 if op == "comic" else 0)  # img2img encodes
    assert graphs and "group_norm" in "".join(graph.code for graph in graphs)
    params = {**CASES[op].params(), "steps": 2}
    compiled = len(graphs)
    for size, expect_compiled in (((64, 64), True), ((64, 128), op == "upscale")):  # upscale: 64² tiles
        before = len(calls)
        image = input_image(128).crop((0, 0, *size))
        got = np.asarray(engine.run([op], image, params, seed=5))
        assert np.abs(got.astype(int) - np.asarray(plain.run([op], image, params, seed=5), dtype=int)).max() <= 1
        assert (len(calls) > before) == expect_compiled, size
    assert len(graphs) == compiled  # nothing compiled in a job


@pytest.mark.parametrize("unet", [True, False])
def test_the_background_compile_compiles_the_vae_after_ready(tiny_cache, monkeypatch, caplog, captured_compile, unet):
    # With the background compile (CUDA's default), compile_vae's shapes compile in its thread
    # after ready, swapped in under the run lock; the job path stays eager until then. With
    # compile off (IMAGEN_TUNING=compile=off), the VAE alone: the UNet is left as it is.
    from image.operations import tuning as tuning_module

    monkeypatch.setattr(tuning_module, "compiles_in_background", lambda tuning, device: True)
    engine = Engine(["upscale"], tiny_cache, device="cpu", lock=Lock(),
                    tuning=Tuning.for_device(CPU).replace(compile=unet, compile_vae=True))
    with caplog.at_level(logging.INFO, logger="imagen.operations"):
        engine.setup()
        op = engine._ops["upscale"]
        assert op.wait_background(timeout=120)
    assert op.model.vae.decoder.forward.compiled_shapes == 1
    assert "upscale: compiled VAE in use after" in caplog.text and "decoder (1 shape)" in caplog.text
    assert "compiled VAE in the warm-up" not in caplog.text
    assert ("nothing captured to compile" in caplog.text) == unet  # the CPU has no graphs to compile
    assert list(engine.compiled_artefacts()) == ["upscale"]  # what `imagen models compile` stores


def test_compile_vae_alone_has_an_artefact_where_there_is_a_vae(tiny_cache, captured_compile):
    # `imagen models compile` stores what compiles: compile_vae without compile counts, for an
    # operation with a VAE only.
    engine = Engine(["upscale", "remove-background"], tiny_cache, device="cpu", lock=Lock(),
                    tuning=Tuning.for_device(CPU).replace(compile_vae=True))
    engine.setup()
    assert list(engine.compiled_artefacts()) == ["upscale"]


def test_upscale_tile_switches_and_batches_give_the_same_pixels(tiny_cache):
    engine = Engine(["upscale"], tiny_cache, device="cpu", lock=Lock(),
                    tuning=Tuning.for_device(CPU).replace(upscale_tile_batch=4))
    engine.setup()
    op = engine._ops["upscale"]
    assert (op.tile_size, op.tile_batch) == (64, 4)  # 2 x the tiny UNet's sample_size
    image, params = input_image(96), {**CASES["upscale"].params(), "steps": 1}  # 2 x 2 tiles
    batched = np.asarray(engine.run(["upscale"], image, params, seed=3), dtype=int)
    op.tile_batch = 1  # each tile has its own seeded generator: batching changes no noise
    single = np.asarray(engine.run(["upscale"], image, params, seed=3), dtype=int)
    assert np.abs(batched - single).max() <= 1
    op.tuning, op.tile_size, op.tile_overlap = Tuning(upscale_tile=128), None, None
    op.prepare()
    assert (op.tile_size, op.tile_overlap, op.tile_sizes) == (128, 16, (128,))
    # Buckets: the fewest tile pixels for each image, the larger tile on a tie.
    op.tuning, op.tile_size = Tuning(upscale_tile=(128, 64)), None
    op.prepare()
    assert op.tile_sizes == (64, 128) and op.tile_size == 64
    assert op.tile_for((64, 64)) == (64, 8)
    assert op.tile_for((96, 96)) == (128, 16)  # 4 x 64² = 1 x 128²
    assert op.tile_for((40, 200)) == (64, 8)  # 4 tiles of 64² beat 2 of 128²


# -- cold-start switches: the same weights -----------------------------------------------------


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name in ("unet", "vae", "text_encoder")
            if getattr(pipe, name, None) is not None
            for key, value in getattr(pipe, name).state_dict().items()}


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_read_ahead_reads_every_weight_file_and_loads_the_same_weights(tiny_cache, monkeypatch):
    monkeypatch.setattr(readahead, "_started", set())  # earlier tests' engines read ahead too
    spec = REGISTRY["upscale"]
    snapshot = loading.store.resolve_snapshot(spec, tiny_cache, lock=Lock())
    threads = loading.start_read_ahead(snapshot, CPU)
    assert len(threads) == len([p for p in snapshot.rglob("*.safetensors")])
    assert loading.start_read_ahead(snapshot, CPU) == []  # each file once per process
    for thread in threads:
        thread.join(30)
    ahead = loading.load_model(spec, tiny_cache, device=CPU, dtype=torch.float32,
                               allow_download=False, lock=Lock(), read_ahead=True).model
    _assert_same_weights(ahead, _pipe("upscale", tiny_cache))


def test_engine_takes_a_tuning_and_reads_ahead_only_when_asked(tiny_cache, monkeypatch):
    started = []
    monkeypatch.setattr(readahead, "read_ahead", lambda paths: started.append(list(paths)) or [])
    tuning = Tuning.for_device(CPU).replace(read_ahead=False, upscale_tile_batch=2, upscale_tile=(64,))
    engine = Engine(["upscale"], tiny_cache, device="cpu", lock=Lock(), tuning=tuning)
    engine.setup()
    assert started == []  # read_ahead off: no early read
    op = engine._ops["upscale"]
    assert op.tuning == tuning and op.tile_batch == 2
    Engine(["upscale"], tiny_cache, device="cpu", lock=Lock())._read_weights_ahead()
    assert len(started) == 1 and started[0]  # the defaults read ahead, before any import


def test_engine_applies_tuning_changes_on_each_operations_defaults(tiny_cache, monkeypatch):
    started = []
    monkeypatch.setattr(readahead, "read_ahead", lambda paths: started.append(list(paths)) or [])
    engine = Engine(["upscale"], tiny_cache, device="cpu", lock=Lock(),
                    tuning_changes=("upscale_tile_batch=2", "read_ahead=off"))
    engine.setup()
    op = engine._ops["upscale"]
    assert op.tuning == Tuning.for_device(CPU, "upscale").replace(upscale_tile_batch=2, read_ahead=False)
    assert op.tile_batch == 2 and started == []  # read_ahead=off: not even the early read
    with pytest.raises(InvalidParameter, match="NAME one of"):
        Engine(["upscale"], tiny_cache, device="cpu", tuning_changes=("graphs=on",))


def test_direct_to_device_loads_the_same_weights(tiny_cache, monkeypatch, caplog):
    # On a GPU the map is {"": "cuda"}; here the CPU stands in to run the same code path.
    spec = REGISTRY["upscale"]
    assert loading._device_map(CPU) is None
    monkeypatch.setattr(loading, "_device_map", lambda device: "cpu")
    direct = loading.load_model(spec, tiny_cache, device=CPU, dtype=torch.float32,
                                allow_download=False, lock=Lock(), direct_to_device=True).model
    _assert_same_weights(direct, _pipe("upscale", tiny_cache))
    # A device_map diffusers refuses is a warning and the plain load, never a failed start.
    monkeypatch.setattr(loading, "_device_map", lambda device: "tpu-of-the-future")
    with caplog.at_level(logging.WARNING, logger="imagen.models"):
        plain = loading.load_model(spec, tiny_cache, device=CPU, dtype=torch.float32,
                                   allow_download=False, lock=Lock(), direct_to_device=True).model
    assert "loading to the CPU first" in caplog.text
    _assert_same_weights(plain, direct)
