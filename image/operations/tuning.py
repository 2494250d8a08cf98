"""Speed switches for the operations, one named field each; `Tuning.for_device` picks defaults.

    tuning = Tuning.for_device("cuda", "comic")      # the defaults for comic on a GPU
    tuning = tuning.replace(compile=True)            # one switch changed
    op.setup(cache_dir, device, dtype, tuning=tuning)

Every switch but `vae_tiling` and `vae_bf16` keeps the function the model computes to within
fp16 rounding (tests/bench/test_equivalence.py and tests/bench/test_cuda_graphs.py check each
on tiny models; the bench's diff column on full-size ones). On the CPU the defaults are all
off except `read_ahead` (it only reads files early) and `prompt_cache` (it keeps tensors the
pipeline would compute again), so CPU results are stock diffusers' to the bit. On CUDA a
switch is on by default only where an H200 run of `make bench` showed it pays
(bench/README.md has the figures; `prompt_cache` only drops repeated work, not yet measured):

| switch | what it does | CUDA default, and why |
|---|---|---|
| `cuda_graphs` | the UNet's launches recorded once per shape and replayed (graphs.py) | on for the diffusion operations: comic 1.22 -> 0.46 s |
| `channels_last` | UNet and VAE in NHWC memory format | comic, and whatever compiles: comic 0.52 -> 0.45 s with graphs; uncompiled enhance 0.89 -> 0.93 s |
| `fuse_qkv` | one matmul for Q, K, V (self-attention), K, V (cross-attention) | on: standard; not measured alone |
| `vae_bf16` | a bfloat16 VAE where the pipeline would upcast it to float32 (SDXL, x4 upscaler) | on: upscale 512 -> 2048 peak 20.8 -> 11.4 GiB; enhance -7 %; a few 8-bit levels |
| `upscale_tile` | upscale's tile side in input pixels; several sizes are buckets (upscale.py) | (256, 512): a 512 input in one tile, 9.8 -> 5.3 s |
| `read_ahead` | read the weight files in threads while the libraries import and CUDA starts | on; cold start not yet faster than stock (see bench/README.md) |
| `direct_to_device` | safetensors copied straight onto the GPU (`device_map`), no CPU copy | on; as read_ahead |
| `cudnn_benchmark` | cuDNN times its conv algorithms once per shape | off: under 1 % faster, 0.7-4.5 s more warm-up |
| `vae_tiling` | the VAE decodes big latents in blended tiles (bounded memory) | off: not stock's pixels; the buckets bound memory |
| `vae_matmul_attention` | the VAE's one-head, 512-wide attention as chunked matrix products (vae_attention.py) | upscale: 512 -> 2048 4.36 -> 3.54 s (its 512 tile's decode attention 1.53 -> 0.69 s) |
| `compile_vae` | `torch.compile` (Inductor) of the VAE's decoder and encoder for the warm-up's shapes (upscale's tile buckets, img2img's native size; shape_compile.py), other shapes eager; compiled with the UNet (after ready, or in the warm-up) | upscale: 512 -> 2048 3.57 -> 3.12 s and 9.0 -> 7.5 GiB, 256 -> 1024 2.03 -> 1.95 s (the eager decoder's group norms copy NHWC to NCHW and back) |
| `compile` | `torch.compile` (Inductor) of the UNet (`compile_mode`), fixed shapes | comic, enhance, upscale: 0.454 -> 0.309 s, 0.898 -> 0.792 s, 3.62 -> 2.03 s (256 -> 1024) under graphs |
| `background_compile` | with graphs: ready at once uncompiled, compiled after (below) | on: a cold start does not wait 50-190 s for Inductor |
| `upscale_tile_batch` | upscale tiles per UNet call | 1 |
| `host_timesteps` | DDIM's and PNDM's step (upscale, comic) read each timestep from a CPU copy of the schedule instead of the device (host_timesteps.py): no wait on the GPU at each step (the per-step deadline check then runs up to one pipeline call ahead of the GPU) | upscale: 256 -> 1024 1.948 -> 1.917 s, 512 -> 2048 3.142 -> 3.085 s (its DDIM step read the device six times per step, each a wait for the UNet call before it); comic's PNDM not measured |
| `prompt_cache` | the pipelines are given prompt embeddings, each distinct (prompt, negative prompt) encoded once by the pipeline's own `encode_prompt` and kept (prompts.py), instead of the strings: no tokenizer or text encoder in a request's path, or a tile's | on: the same tensors (stock's pixels to the bit on the CPU); not yet measured on a GPU (session 8: ~0.12 s of upscale 256 -> 1024's 1.92 s was outside the UNet and VAE, the prompts' encoding part of it) |

`compile` with `background_compile` (the CUDA default where compile is on): the operation warms
up and is ready on the uncompiled CUDA graphs; once every operation is (`Engine.setup`), a
daemon thread compiles each UNet for its captured shapes (the warm-up's native size) while
jobs keep running, and swaps the compiled graphs in between two jobs (`GraphedForward.adopt`,
`compile_in_background`, holding the engine's run lock); with `compile_vae`, the VAE's decoder
and encoder after it, for the shapes the warm-up gave them (`ShapeCompiled.adopt`). Compiles
run one at a time per process; a failure is logged and the uncompiled forwards stay. Shapes
first seen later are captured uncompiled (no compile in a request's path). Without graphs, or
on the CPU, `compile` and `compile_vae` compile in the warm-up instead. `imagen run` and
`imagen process` (one job, then exit) turn both off unless IMAGEN_TUNING turns them on.

With a compile cache (`Engine(..., compile_cache=...)`, IMAGEN_COMPILE_CACHE in production;
image/operations/compile_cache.py), the compile first loads the artefact an earlier instance
on the same kind of GPU stored, and stores its own when there is none: later instances reach
the compiled speed sooner.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from image.operations import compile_cache
from image.operations.graphs import GraphedForward, graph_module
from image.operations.host_timesteps import host_timesteps
from image.operations.shape_compile import ShapeCompiled
from image.operations.switches import (  # noqa: F401  (the data half, re-exported)
    CHANNELS_LAST_PAYS,
    COMPILE_PAYS,
    COMPILE_VAE_PAYS,
    DIFFUSION,
    INDUCTOR_GRAPH_MODES,
    MATMUL_ATTENTION_PAYS,
    SWITCHES,
    Tuning,
    parse_changes,
)
from image.operations.vae_attention import use_matmul_attention

logger = logging.getLogger("imagen.operations")

# -- applying the switches to a loaded diffusers pipeline --------------------------------------


def tune_pipeline(pipe, tuning: Tuning, device: torch.device) -> list[str]:
    """Apply `tuning` to a loaded pipeline in place; returns what was done, for the log."""
    done = _cudnn(tuning, device)
    if tuning.fuse_qkv and _can_fuse(pipe):
        # Before channels_last: fusing builds new Linear layers (memory format does not apply).
        try:
            pipe.fuse_qkv_projections(unet=True, vae=True)
            done.append("fuse_qkv")
        except (ValueError, AttributeError, RuntimeError) as error:  # diffusers calls it experimental
            logger.warning("fused QKV projections are not available here (%s); running unfused", error)
    if tuning.channels_last:
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if tuning.vae_bf16 and _upcasts_vae(pipe):
        vae_in_bfloat16(pipe.vae)
        done.append("vae_bf16")
    if tuning.vae_tiling:
        pipe.vae.enable_tiling()
        done.append("vae_tiling")
    if tuning.vae_matmul_attention and use_matmul_attention(pipe.vae):
        done.append("vae_matmul_attention")
    if tuning.compile_vae:
        done += compile_vae(pipe.vae)
    if tuning.host_timesteps:
        done += host_timesteps(pipe)
    if tuning.prompt_cache:  # applied by the operations' prompt_arguments; listed for the log
        done.append("prompt_cache")
    return done + _compile_and_graph(pipe.unet, tuning, device)


def tune_network(model: torch.nn.Module, tuning: Tuning, device: torch.device) -> list[str]:
    """Apply the switches that make sense for a plain CNN (remove-background)."""
    done = _cudnn(tuning, device)
    if tuning.channels_last:
        model.to(memory_format=torch.channels_last)
        done.append("channels_last")
    return done + _compile_and_graph(model, tuning, device)


def _cudnn(tuning: Tuning, device: torch.device) -> list[str]:
    if device.type != "cuda":
        return []
    # Process-wide, so set either way: the last model set up decides (one per process here).
    torch.backends.cudnn.benchmark = tuning.cudnn_benchmark
    return ["cudnn_benchmark"] if tuning.cudnn_benchmark else []


def _compile_and_graph(module: torch.nn.Module, tuning: Tuning, device: torch.device) -> list[str]:
    """`compile`, then `cuda_graphs` (last: the graphs capture the compiled kernels). With
    `background_compile` under the graphs, compiling is left to `compile_in_background`."""
    done = []
    background = compiles_in_background(tuning, device)
    if tuning.compile and not background:
        _inductor_options()
        module.forward = torch.compile(module.forward, mode=tuning.compile_mode, dynamic=False)
        done.append(f"compile({tuning.compile_mode or 'default'})")
    if tuning.cuda_graphs and device.type == "cuda":
        if tuning.compile and tuning.compile_mode in INDUCTOR_GRAPH_MODES:
            logger.info("cuda_graphs left to torch.compile's %s mode", tuning.compile_mode)
        else:
            graph_module(module)
            done.append("cuda_graphs")
    if background and tuning.compile:
        done.append("compile(background)")
    return done


def compiles_in_background(tuning: Tuning, device: torch.device) -> bool:
    """Whether `tuning` compiles after the warm-up, under CUDA graphs it captures again: the
    UNet (`compile`), the VAE (`compile_vae`) or both, so neither holds up ready."""
    return ((tuning.compile or tuning.compile_vae) and tuning.background_compile and tuning.cuda_graphs
            and device.type == "cuda" and tuning.compile_mode not in INDUCTOR_GRAPH_MODES)


def compile_vae(vae) -> list[str]:
    """`compile_vae`: the VAE's decoder and encoder forwards behind `ShapeCompiled`, which
    records the warm-up's signatures; `compile_parts` (in the warm-up) or the background
    compile then compiles those, and any other shape keeps running eagerly. The matrix-
    product attention stays out of the graphs (vae_attention.attention is not traced)."""
    for name in ("decoder", "encoder"):
        part = getattr(vae, name, None)
        if part is not None and not isinstance(part.forward, ShapeCompiled):
            part.forward = ShapeCompiled(part.forward)
    return ["compile_vae"]


def shape_compiled_parts(model) -> list[tuple[str, ShapeCompiled]]:
    """The ("decoder", forward) and ("encoder", forward) `compile_vae` wrapped in `model`."""
    vae = getattr(model, "vae", None)
    parts = [(name, getattr(getattr(vae, name, None), "forward", None)) for name in ("decoder", "encoder")]
    return [(name, forward) for name, forward in parts if isinstance(forward, ShapeCompiled)]


def compile_parts(parts, lock=None, session=None) -> list[str]:
    """Compile each (name, ShapeCompiled) for the signatures it recorded (`ShapeCompiled.adopt`);
    returns "name (N shapes)" for each that had any. A part that fails to compile is logged
    and stays eager, the others go on, and `session` (a compile_cache.CompileSession) stores
    nothing."""
    _inductor_options()
    done = []
    for name, part in parts:
        try:
            count = part.adopt(torch.compile(part.forward, dynamic=False), lock)
        except Exception as error:  # noqa: BLE001 - the eager forward keeps serving
            logger.warning("VAE %s: compiling failed, staying eager: %s: %s", name, type(error).__name__, str(error))
            if session is not None:
                session.discard()
            continue
        if count:
            done.append(f"{name} ({count} shape{'' if count == 1 else 's'})")
    return done


def _inductor_options() -> None:
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True  # 1x1 convolutions as matrix products (diffusers' advice)
    # Code shared by every model of a process (diffusers' ResnetBlock2D.forward, compiled on
    # its own around compile_vae's graph break) holds one entry per shape and model: more than
    # Dynamo's default 8 in a process serving several operations, after which it runs eagerly.
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)


_one_at_a_time = threading.Lock()  # background compiles run one after another


def compile_in_background(name: str, module: torch.nn.Module, tuning: Tuning, lock, cache=None,
                          artefact: str = "", parts=()) -> threading.Thread:
    """Compile `module`'s graphed forward in a daemon thread and swap it into the graphs
    (`GraphedForward.adopt`), then each of `parts` (`shape_compiled_parts`: compile_vae's VAE
    decoder and encoder) for its warm-up shapes; the model serves uncompiled meanwhile. `lock`
    is held around every call of the model (the engine's run lock: every operation idle).
    `cache` (a compile_cache.CompileCache) gives the artefact named `artefact` first and takes
    it after. A failure is logged and changes nothing: the uncompiled forwards stay."""
    graphed = module.forward

    def work():
        started = time.perf_counter()
        with _one_at_a_time:
            try:
                with compile_cache.CompileSession(cache, artefact, name) as session:
                    _inductor_options()
                    try:
                        if tuning.compile:  # else compile_vae's parts alone
                            _compile_graphed(name, graphed, tuning, lock, session, started)
                    except Exception as error:  # noqa: BLE001 - the uncompiled graphs keep serving
                        logger.warning("%s: compiling in the background failed, staying uncompiled: %s: %s",
                                       name, type(error).__name__, str(error))
                        session.discard()
                    done = compile_parts(parts, lock, session)  # each part's failure is its own
                    if done:
                        logger.info("%s: compiled VAE in use after %.1f s: %s", name,
                                    time.perf_counter() - started, ", ".join(done))
            except Exception as error:  # noqa: BLE001 - storing the artefact failed; what compiled serves
                logger.warning("%s: the compile cache failed: %s: %s", name, type(error).__name__, str(error))

    thread = threading.Thread(target=work, daemon=True, name=f"compile-{name}")
    thread.start()
    return thread


def _compile_graphed(name, graphed, tuning: Tuning, lock, session, started: float) -> None:
    """The UNet's part of `compile_in_background`: compile its graphed forward, swap it in."""
    if not isinstance(graphed, GraphedForward) or not graphed.graphs:
        logger.warning("%s: nothing captured to compile; staying uncompiled", name)
        return
    compiled = torch.compile(graphed.forward, mode=tuning.compile_mode, dynamic=False)
    count = graphed.adopt(compiled, lock)
    logger.info("%s: compiled model in use after %.1f s (%d graph%s captured again; %s)",
                name, time.perf_counter() - started, count, "" if count == 1 else "s", session.describe())


def _can_fuse(pipe) -> bool:
    """Fusing needs the pipeline method and attention without added K/V projections."""
    if not hasattr(pipe, "fuse_qkv_projections"):
        return False
    names = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    return not any("Added" in name for name in names)


_UPCASTING_PIPELINES = frozenset({
    "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline", "StableDiffusionUpscalePipeline",
})


def _upcasts_vae(pipe) -> bool:
    """Whether the pipeline runs a float16 VAE in float32 (SDXL, the x4 upscaler): only there
    does a bfloat16 VAE save anything. SD1.5's runs in float16 and hands its latents to the
    UNet as they come, so a bfloat16 VAE would only change the dtype the UNet gets. By class
    (diffusers deprecates the `upcast_vae` method these pipelines have), or that method."""
    upcasting = type(pipe).__name__ in _UPCASTING_PIPELINES or hasattr(pipe, "upcast_vae")
    return upcasting and bool(getattr(pipe.vae.config, "force_upcast", False))


def vae_in_bfloat16(vae) -> None:
    """Run `vae` in bfloat16: fp32's range (no fp16 overflow, so no upcast) at half the cost.

    The pipelines upcast a float16 VAE with `force_upcast` to float32 around every encode
    and decode; a bfloat16 VAE is left alone once `force_upcast` is off. Inputs arrive in
    the pipeline's dtype, so each entry module casts them to bfloat16 on the way in.
    Numerically: bfloat16 rounding (8 mantissa bits) in every layer of the VAE: up to ~10
    8-bit levels on random weights, under one on average. On by default on CUDA (it halves
    the 2048-pixel upscale's peak memory); off on the CPU.
    """
    vae.to(torch.bfloat16)
    vae.register_to_config(force_upcast=False)
    for name in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
        module = getattr(vae, name, None)
        if module is not None:
            module.register_forward_pre_hook(_cast_inputs(torch.bfloat16), with_kwargs=True)
    # The encoder's output parameterises the latent distribution img2img samples from:
    # in float32 it draws the very noise stock draws (bfloat16 noise is another stream).
    last = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder
    last.register_forward_hook(lambda module, args, output: output.float())


def _cast_inputs(dtype: torch.dtype):
    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        return value

    def hook(module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook
