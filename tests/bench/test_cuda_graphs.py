"""CUDA graphs (image/operations/graphs.py) replay the function the eager UNet computes.

The signature rules and the eager path run everywhere; the capture and replay tests need a
GPU and are skipped without one (bench/gpu_session.sh runs them on the device machine, on the
tiny models through the production loader).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bench.cases import input_image
from image.models import loading
from image.models.lock import Lock
from image.models.registry import REGISTRY
from image.operations.graphs import GraphedForward, graph_module, signature
from image.operations.tuning import Tuning, tune_pipeline
from torch.utils._pytree import tree_flatten

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _key(*args, **kwargs):
    return signature(*tree_flatten((args, kwargs)))


def test_signature_tells_shapes_and_values_apart_and_refuses_what_cannot_replay():
    # A tensor off CUDA cannot feed a graph: eager.
    assert _key(torch.zeros(2, 4)) is None
    assert _key(torch.empty(2, 4, device="meta")) is None
    assert _key(torch.zeros(1), object()) is None
    if torch.cuda.is_available():
        a = torch.zeros(2, 4, 8, 8, device="cuda")
        assert _key(a, 5, return_dict=False) == _key(a.clone(), 5, return_dict=False)
        assert _key(a, 5, return_dict=False) != _key(a[:1], 5, return_dict=False)
        assert _key(a, 5, return_dict=False) != _key(a, 6, return_dict=False)
        assert _key(a, added={"x": a}) != _key(a, added=None)
        assert _key(a.requires_grad_()) is None


def test_off_cuda_the_wrapper_is_the_eager_forward():
    calls = []

    def forward(x, scale=1.0):
        calls.append(x.shape)
        return (x * scale,)

    graphed = GraphedForward(forward)
    out = graphed(torch.ones(3), scale=2.0)
    assert torch.equal(out[0], torch.full((3,), 2.0)) and calls == [(3,)] and not graphed.graphs


def test_a_capture_that_runs_out_of_memory_runs_that_shape_eagerly_and_breaks_nothing(monkeypatch):
    """The CPU stands in for CUDA (the signature is forced): a capture that fails, out of
    memory among others, leaves that shape eager and the call answered eagerly after the
    failed capture is gone; an out-of-memory probe afterwards does not switch graphs off."""
    from image.operations import graphs

    released = []

    class Held:  # what the failed capture's frames hold
        def __del__(self):
            released.append(1)

    def capture(self, key, leaves, spec, forward):
        held = Held()  # noqa: F841 - alive in this frame until the error's traceback is dropped
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def forward(x):
        assert released, "the eager run started while the failed capture still held its memory"
        return x * 2

    monkeypatch.setattr(graphs, "signature", lambda leaves, spec: ("a shape",))
    monkeypatch.setattr(graphs.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(GraphedForward, "_capture", capture)
    graphed = GraphedForward(forward)
    with torch.inference_mode():
        assert torch.equal(graphed(torch.ones(2)), torch.full((2,), 2.0))
    assert graphed.eager_signatures == {("a shape",)} and not graphed.graphs

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(graphs.torch, "empty", full)
    graphs._check_after_failed_capture()
    assert not graphs._broken


def test_the_switch_is_applied_on_cuda_only(tiny_cache):
    pipe = loading.load_model(REGISTRY["comic"], tiny_cache, device=torch.device("cpu"),
                              dtype=torch.float32, allow_download=False, lock=Lock()).model
    assert tune_pipeline(pipe, Tuning.stock().replace(cuda_graphs=True), torch.device("cpu")) == []
    assert not isinstance(pipe.unet.forward, GraphedForward)


# -- on a GPU ------------------------------------------------------------------------------


def _cuda_pipe(op, cache):
    return loading.load_model(REGISTRY[op], cache, device=torch.device("cuda"), dtype=torch.float16,
                              allow_download=False, lock=Lock()).model


def _call(pipe, op, size, seed=7):
    kwargs = {"prompt": "a photo", "negative_prompt": "blurry", "image": input_image(size),
              "num_inference_steps": 3, "guidance_scale": 7.5, "output_type": "np",
              "generator": torch.Generator(device="cuda").manual_seed(seed)}
    if op != "upscale":
        kwargs["strength"] = 0.7
    with torch.inference_mode():
        return pipe(**kwargs).images[0]


@cuda
@pytest.mark.parametrize("op", ["comic", "enhance", "upscale"])
def test_graphed_unet_gives_the_eager_pixels(tiny_cache, op):
    pipe = _cuda_pipe(op, tiny_cache)
    size = 64 if op == "upscale" else 256
    eager = [_call(pipe, op, size, seed) for seed in (1, 2)]
    assert tune_pipeline(pipe, Tuning.stock().replace(cuda_graphs=True), torch.device("cuda")) == ["cuda_graphs"]
    graphed = [_call(pipe, op, size, seed) for seed in (1, 2)]
    # The same kernels in the same order: equal up to fp16 rounding of reused workspaces.
    for a, b in zip(eager, graphed, strict=True):
        assert np.abs(a - b).max() <= 2e-3
    assert len(pipe.unet.forward.graphs) == 1  # one shape, one graph, replayed every step


@cuda
def test_each_shape_gets_its_graph_and_outputs_are_not_overwritten(tiny_cache):
    pipe = _cuda_pipe("comic", tiny_cache)
    graphed = graph_module(pipe.unet, max_graphs=2)
    first = _call(pipe, "comic", 256)
    _call(pipe, "comic", 192)
    assert len(graphed.graphs) == 2
    _call(pipe, "comic", 128)  # beyond max_graphs: eager, still right
    assert len(graphed.graphs) == 2
    assert np.abs(_call(pipe, "comic", 256) - first).max() <= 2e-3

    # Two replays in a row: the first result is a copy, not the graph's output buffer.
    sample = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    states = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    t = torch.tensor(10, device="cuda")
    with torch.inference_mode():
        one = pipe.unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]
        kept = one.clone()
        pipe.unet(sample * 2, t, encoder_hidden_states=states, return_dict=False)
        assert torch.equal(one, kept)
    count = len(graphed.graphs)
    with torch.no_grad():  # outside inference mode: eager, no graph, no error
        eager = pipe.unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]
    assert len(graphed.graphs) == count and torch.allclose(eager, kept, atol=2e-3)


@cuda
def test_graphs_of_a_dropped_model_leave_a_pool_the_next_model_can_capture_into():
    # PyTorch retires a pool whose graphs all died; capturing into it again fails an internal
    # assertion and leaves the CUDA generator mid-capture. The bench drops each model in turn.
    import gc

    def capture_one():
        layer = torch.nn.Linear(64, 64, device="cuda", dtype=torch.float16)
        graphed = graph_module(layer)
        x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            out = layer(x)
            assert len(graphed.graphs) == 1 and torch.allclose(out, graphed.forward(x), atol=1e-3)
        return out

    kept = capture_one()  # an output the caller keeps, beyond the graph's life
    gc.collect()
    capture_one()
    torch.randn(4, device="cuda")  # the generator is not left mid-capture
    assert kept.isfinite().all()


def _pools(old=()) -> dict:
    """Bytes per private (CUDA graph) pool on the current device, by pool id; not `old`'s."""
    sizes: dict = {}
    for segment in torch.cuda.memory_snapshot():
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        if pool != (0, 0) and pool not in old:
            sizes[pool] = sizes.get(pool, 0) + segment["total_size"]
    return sizes


def _drop_other_graphs() -> dict:
    """Let earlier tests' models (and Dynamo's references to them) die with their graphs;
    returns the pools left (a dead graph's pool keeps what cuBLAS's workspace holds there)."""
    import gc

    from image.operations import graphs

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    assert not list(graphs._live), "an earlier test's CUDA graphs are still alive"
    return _pools()


def _wide_layer():
    """A forward whose graph holds 64 MiB of intermediates and a 32 MiB output."""
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
    return layer.to("cuda", torch.float16), torch.randn(16384, 1024, device="cuda", dtype=torch.float16)


@cuda
def test_adopt_gives_the_old_graphs_memory_back_when_they_were_the_only_ones():
    # A pool never shrinks while one of its graphs lives: captured into the old pool, the
    # adopted graphs would hold the old ones' outputs and intermediates beside their own for
    # the process's life (upscale held ~7.8 GiB beyond its tensors at 256 -> 1024).
    from image.operations import graphs

    old = _drop_other_graphs()
    layer, x = _wide_layer()
    graphed = graph_module(layer)
    with torch.inference_mode():
        expected = layer(x)
        before = _pools(old)
        assert len(before) == 1
        assert graphed.adopt(lambda *a, **k: graphed.forward(*a, **k), threading.Lock()) == 1
        after = _pools(old)
        assert graphs._pool not in before  # a pool of its own...
        # ...and the old one given back (but for cuBLAS's workspace, if its first capture
        # allocated it there: kept for the handle and stream, 32 MiB on Hopper): captured
        # into the old pool, the new graph would add its 32 MiB output at least.
        assert sum(after.values()) <= sum(before.values())
        assert after.get(next(iter(before)), 0) <= 64 << 20
        assert torch.allclose(layer(x), expected, atol=1e-3)  # the new graph replays the same function
        other = graph_module(_wide_layer()[0])  # a later capture shares the new pool
        other(x)
        assert _pools(old).keys() == after.keys() and len(other.graphs) == 1


@cuda
def test_an_adoption_that_fails_to_capture_puts_the_uncompiled_graphs_back():
    # The old graphs are released before the new captures (never both in memory): a failed
    # capture captures the original forward again, in the memory the failure freed.
    _drop_other_graphs()
    layer, x = _wide_layer()
    graphed = graph_module(layer)

    def cannot_be_captured(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return graphed.forward(*args, **kwargs)

    with torch.inference_mode():
        expected = layer(x)
        with pytest.raises(RuntimeError, match="not capturable"):
            graphed.adopt(cannot_be_captured, threading.Lock())
        assert len(graphed.graphs) == 1 and graphed.adopted is None
        restored = next(iter(graphed.graphs.values()))
        assert torch.allclose(layer(x), expected, atol=1e-3)
        assert list(graphed.graphs.values()) == [restored]  # replayed, not captured again
        torch.randn(4, device="cuda")  # the generator is not left mid-capture


@cuda
def test_adopt_keeps_the_pool_shared_while_another_models_graphs_use_it():
    old = _drop_other_graphs()
    first, x = _wide_layer()
    second = _wide_layer()[0]
    graphed, kept = graph_module(first), graph_module(second)
    with torch.inference_mode():
        first(x), second(x)
        before = _pools(old)
        assert len(before) == 1 and len(kept.graphs) == 1
        graphed.adopt(lambda *a, **k: graphed.forward(*a, **k), threading.Lock())
        assert _pools(old).keys() == before.keys()  # the other model's graph still replays from it
        assert torch.allclose(second(x), kept.forward(x), atol=1e-3)


@cuda
def test_background_compile_swaps_in_compiled_graphs_that_give_the_same_pixels(tiny_cache, tmp_path):
    # The CUDA default for comic: ready on the uncompiled graphs, compiled ones swapped in.
    import threading

    from image.operations import get_operation
    from image.operations.compile_cache import DirectoryCache
    from image.params import resolve

    tuning = Tuning.for_device("cuda", "comic")
    assert tuning.compile and tuning.background_compile
    ops = {}
    for name, each in (("plain", tuning.replace(compile=False)), ("compiled", tuning)):
        ops[name] = get_operation("comic")()
        ops[name].setup(tiny_cache, torch.device("cuda"), torch.float16, lock=Lock(), tuning=each,
                        compile_cache=DirectoryCache(tmp_path / name))
    op = ops["compiled"]
    graphed = op.model.unet.forward
    uncompiled = dict(graphed.graphs)
    assert "compile(background)" in op.tuned and uncompiled and op.background is None
    assert op.start_background(threading.Lock()) and op.wait_background(900)
    assert graphed.adopted is not None  # the swap happened (a failure only logs)
    assert DirectoryCache(tmp_path / "compiled").get(op.artefact_name)  # and its kernels were stored
    assert not (tmp_path / "plain").exists()  # nothing compiled, nothing stored
    assert graphed.graphs.keys() == uncompiled.keys()  # the warm-up's shape, captured again...
    assert all(graphed.graphs[key] is not uncompiled[key] for key in uncompiled)  # ...compiled
    params = resolve("comic", {"steps": 4, "strength": 0.6})
    image = input_image(op.native)  # the native size: the signature the warm-up captured
    count = len(graphed.graphs)
    compiled, plain = (np.asarray(ops[n].run(image, params, seed=3), dtype=np.int16) for n in ("compiled", "plain"))
    assert len(graphed.graphs) == count  # replayed, not captured again
    assert np.abs(compiled - plain).max() <= 3  # Inductor's kernels: fp16 rounding apart
    other = input_image(op.native // 2)  # a new shape: captured with the uncompiled forward
    assert np.abs(np.asarray(op.run(other, params, seed=3), dtype=np.int16)
                  - np.asarray(ops["plain"].run(other, params, seed=3), dtype=np.int16)).max() <= 3


@cuda
def test_background_compile_takes_the_vae_too_with_compile_vae(tiny_cache):
    # compile_vae, one of upscale's defaults: the decoder compiled for the warm-up's tile
    # buckets in the background thread after the UNet, then pixels as close to a float32
    # VAE's as the eager bfloat16 decoder's are.
    import threading

    from image.operations import get_operation
    from image.params import resolve

    tuning = Tuning.for_device("cuda", "upscale")
    assert tuning.compile_vae
    ops = {}
    plain = tuning.replace(compile=False, compile_vae=False)
    for name, each in (("plain", plain), ("compiled", tuning), ("float32 VAE", plain.replace(vae_bf16=False))):
        ops[name] = get_operation("upscale")()
        ops[name].setup(tiny_cache, torch.device("cuda"), torch.float16, lock=Lock(), tuning=each)
    op = ops["compiled"]
    decoder = op.model.vae.decoder.forward
    assert decoder.compiled_shapes == 0 and len(decoder.examples) == len(op.tile_sizes)  # one per bucket
    assert op.start_background(threading.Lock()) and op.wait_background(900)
    assert decoder.compiled_shapes == len(op.tile_sizes)
    from torch._dynamo.utils import counters

    params = resolve("upscale", {"steps": 3})
    taken = []
    decoder._compiled = (lambda *a, f=decoder._compiled[0], **k: taken.append(1) or f(*a, **k), decoder._compiled[1])
    graphs_before = counters["stats"]["unique_graphs"]
    for side in op.tile_sizes:
        image = input_image(side)
        plain, compiled, wide = (np.asarray(ops[n].run(image, params, seed=3), dtype=np.int16)
                                 for n in ("plain", "compiled", "float32 VAE"))
        # bfloat16 keeps 8 bits: eager and compiled decoders round apart by up to ~10 levels
        # (Inductor keeps fused intermediates in float32; on the CPU the compiled one was closer)
        assert np.abs(compiled - wide).max() <= np.abs(plain - wide).max() + 2, side
        assert np.abs(compiled - wide).mean() <= np.abs(plain - wide).mean() * 1.25 + 0.05, side
    assert len(taken) == len(op.tile_sizes)  # each bucket's decode ran compiled...
    assert counters["stats"]["unique_graphs"] == graphs_before  # ...and nothing compiled in a job


@cuda
def test_a_fresh_process_takes_the_background_compile_from_the_compile_cache(tiny_cache, tmp_path):
    # What a second instance does: two processes set comic up as `imagen serve` does (ready,
    # then the background compile), sharing a compile cache folder, each with empty Inductor
    # and Triton caches of its own (bench/compileprobe.py). The second must take every
    # compiled graph from the artefact the first stored.
    from bench.compileprobe import probe

    scratch, cached = probe("comic", tiny_cache, "cuda", tmp_path)
    assert scratch["artefact"] == cached["artefact"] and (tmp_path / "store" / scratch["artefact"]).is_file()
    assert scratch["graphs_compiled"] >= 1 and scratch["graphs_from_cache"] == 0, scratch
    assert cached["graphs_compiled"] == 0 and cached["graphs_from_cache"] >= 1, cached


@cuda
def test_host_timesteps_takes_the_waits_out_of_the_denoising_loop(tiny_cache):
    # What the switch is for: with it, the upscaler's run waits on the GPU the same number of
    # times whatever its steps (the input's preparation, the output's copy); without it, more
    # for each step (DDIM indexing its CPU table with a device timestep).
    import warnings

    from image.operations import get_operation
    from image.params import resolve

    def waits(tuning, steps):
        if tuning not in ops:
            ops[tuning] = op = get_operation("upscale")()
            op.setup(tiny_cache, torch.device("cuda"), torch.float16, lock=Lock(), tuning=tuning)
            op.run(input_image(64), resolve("upscale", {"steps": 2}), seed=3)  # its graph captured
        op = ops[tuning]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pixels = op.run(input_image(64), resolve("upscale", {"steps": steps}), seed=3)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught), np.asarray(pixels)

    ops = {}
    plain = Tuning.for_device("cuda", "upscale").replace(compile=False, compile_vae=False, host_timesteps=False)
    host = plain.replace(host_timesteps=True)
    (plain_3, _), (plain_6, plain_pixels) = waits(plain, 3), waits(plain, 6)
    (host_3, _), (host_6, host_pixels) = waits(host, 3), waits(host, 6)
    assert plain_6 - plain_3 >= 3  # the measure sees the per-step waits
    assert host_6 == host_3 < plain_3
    assert np.abs(host_pixels.astype(np.int16) - plain_pixels).max() <= 1  # two set-ups: kernels may differ


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_rounded_on_the_gpu_are_the_hosts(dtype):
    """base.to_bytes on the GPU: the bytes the host's rounding gives (test_equivalence.py
    checks those against diffusers' own), halfway values included, any layout."""
    from image.operations.base import to_bytes

    halves = (torch.arange(255, dtype=torch.float64) + 0.5) / 255
    values = torch.cat([torch.rand(3 * 64 * 64 - 257, dtype=torch.float64), halves, torch.tensor([0.0, 1.0])])
    images = values.reshape(1, 3, 64, 64).to(dtype)
    on_host = to_bytes(images)
    for layout in (torch.contiguous_format, torch.channels_last):
        on_gpu = to_bytes(images.cuda().contiguous(memory_format=layout))
        assert on_gpu.flags.c_contiguous and np.array_equal(on_gpu, on_host)
