"""Speed switches for the operations, one named field each; `Tuning.for_device` picks defaults.

    tuning = Tuning.for_device(torch.device("cuda"))       # the defaults on a GPU
    tuning = tuning.replace(compile=True)                   # one switch changed
    op.setup(cache_dir, device, dtype, tuning=tuning)

Every switch but `vae_tiling` keeps the function the model computes: results match stock
diffusers within the rounding of the dtype (tests/bench/test_equivalence.py checks each on
tiny models). On the
CPU the defaults are all off except `read_ahead` (it only reads files early), so CPU results
are stock diffusers' to the bit. On CUDA the defaults are the standard, numerically safe
ones: channels_last and fused QKV (diffusers already runs attention through PyTorch's SDPA).
The others are off until a GPU benchmark shows they pay (`python -m bench --switch NAME=on`):

| switch | what it does | why it is off by default |
|---|---|---|
| `channels_last` | UNet and VAE in NHWC memory format (cuDNN's fast layout for fp16) | on for CUDA |
| `fuse_qkv` | one matmul for Q, K, V (self-attention), K, V (cross-attention) | on for CUDA |
| `read_ahead` | read the weight files (and start CUDA) in threads while the classes are built | on |
| `direct_to_device` | safetensors copied straight onto the GPU (`device_map`), no CPU copy | on for CUDA |
| `cudnn_benchmark` | cuDNN times its conv algorithms once per shape | each new image size pays the search |
| `vae_tiling` | VAE decodes big latents in tiles (bounded memory) | tiles are blended: not bit-stock |
| `vae_bf16` | the VAE runs in bfloat16 where the pipeline would upcast it to fp32 | bfloat16 rounding: a few 8-bit levels |
| `compile` | `torch.compile` of the UNet (`compile_mode`), fixed shapes | first call compiles (minutes) |
| `cuda_graphs` | the UNet's launches recorded once per shape and replayed (image/operations/graphs.py) | on for CUDA |
| `upscale_tile` | upscale's tile side in input pixels, or several (buckets; see upscale.py) | None: 2 x the UNet's sample_size |
| `upscale_tile_batch` | upscale tiles per UNet call | |

`compile_cache` names a file for PyTorch's compile caches (`torch.compiler.save_cache_artifacts`):
loaded before the warm-up when it exists, written after it otherwise, so an image built with a
warm cache does not compile from scratch at start-up.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from image.operations.graphs import graph_module

logger = logging.getLogger("imagen.operations")

SWITCHES = (
    "channels_last",
    "fuse_qkv",
    "read_ahead",
    "direct_to_device",
    "cudnn_benchmark",
    "vae_tiling",
    "vae_bf16",
    "compile",
    "cuda_graphs",
)
"""The on/off switches, in the order reports list them."""


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How an operation is set up for speed; see the module docstring for each field."""

    channels_last: bool = False
    fuse_qkv: bool = False
    read_ahead: bool = False
    direct_to_device: bool = False
    cudnn_benchmark: bool = False
    vae_tiling: bool = False
    vae_bf16: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    compile_mode: str | None = None  # torch.compile mode: None (default), "max-autotune", ...
    compile_cache: str | None = None  # a file path; see the module docstring
    upscale_tile: int | tuple[int, ...] | None = None  # input pixels; several: buckets
    upscale_tile_batch: int = 1

    @classmethod
    def stock(cls) -> Tuning:
        """Everything off: what stock diffusers does."""
        return cls()

    @classmethod
    def for_device(cls, device: torch.device | str) -> Tuning:
        """The defaults on `device`: the safe, standard switches on CUDA; stock on the CPU."""
        if torch.device(device).type == "cuda":
            return cls(fuse_qkv=True, read_ahead=True, direct_to_device=True, cudnn_benchmark=True,
                       vae_bf16=True, cuda_graphs=True, upscale_tile=(256, 512))
        return cls(read_ahead=True)

    def replace(self, **changes) -> Tuning:
        """A copy with `changes`; unknown names raise TypeError."""
        return dataclasses.replace(self, **changes)

    def enabled(self) -> list[str]:
        """Names of the switches that are on."""
        return [name for name in SWITCHES if getattr(self, name)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- applying the switches to a loaded diffusers pipeline --------------------------------------


def tune_pipeline(pipe, tuning: Tuning, device: torch.device) -> list[str]:
    """Apply `tuning` to a loaded pipeline in place; returns what was done, for the log."""
    done = []
    if device.type == "cuda":
        # Process-wide, so set either way: the last model set up decides (one per process here).
        torch.backends.cudnn.benchmark = tuning.cudnn_benchmark
        if tuning.cudnn_benchmark:
            done.append("cudnn_benchmark")
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
    if tuning.compile:
        # The forward itself, so that CUDA graphs (applied last) capture the compiled kernels.
        pipe.unet.forward = torch.compile(pipe.unet.forward, mode=tuning.compile_mode, dynamic=False)
        done.append(f"compile({tuning.compile_mode or 'default'})")
    if tuning.cuda_graphs and device.type == "cuda":
        graph_module(pipe.unet)
        done.append("cuda_graphs")
    return done


def tune_network(model: torch.nn.Module, tuning: Tuning, device: torch.device) -> list[str]:
    """Apply the switches that make sense for a plain CNN (remove-background)."""
    done = []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = tuning.cudnn_benchmark
        if tuning.cudnn_benchmark:
            done.append("cudnn_benchmark")
    if tuning.channels_last:
        model.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if tuning.compile:
        model.forward = torch.compile(model.forward, mode=tuning.compile_mode, dynamic=False)
        done.append(f"compile({tuning.compile_mode or 'default'})")
    if tuning.cuda_graphs and device.type == "cuda":
        graph_module(model)
        done.append("cuda_graphs")
    return done


def _can_fuse(pipe) -> bool:
    """Fusing needs the pipeline method and attention without added K/V projections."""
    if not hasattr(pipe, "fuse_qkv_projections"):
        return False
    names = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    return not any("Added" in name for name in names)


def _upcasts_vae(pipe) -> bool:
    """Whether the pipeline runs a float16 VAE in float32 (SDXL, the x4 upscaler): only there
    does a bfloat16 VAE save anything. SD1.5's runs in float16 and hands its latents to the
    UNet as they come, so a bfloat16 VAE would only change the dtype the UNet gets."""
    return hasattr(pipe, "upcast_vae") and bool(getattr(pipe.vae.config, "force_upcast", False))


def vae_in_bfloat16(vae) -> None:
    """Run `vae` in bfloat16: fp32's range (no fp16 overflow, so no upcast) at half the cost.

    The pipelines upcast a float16 VAE with `force_upcast` to float32 around every encode
    and decode; a bfloat16 VAE is left alone once `force_upcast` is off. Inputs arrive in
    the pipeline's dtype, so each entry module casts them to bfloat16 on the way in.
    Numerically: bfloat16 rounding (8 mantissa bits) in every layer of the VAE, a few
    8-bit levels at most; hence off by default until a GPU run shows it pays.
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


# -- compile caches -------------------------------------------------------------------------


def load_compile_cache(path: str | Path | None) -> bool:
    """Load PyTorch's compile caches from `path` if it exists; True when loaded."""
    if not path or not Path(path).is_file():
        return False
    torch.compiler.load_cache_artifacts(Path(path).read_bytes())
    logger.info("compile cache loaded from %s", path)
    return True


def save_compile_cache(path: str | Path | None) -> bool:
    """Write what this process compiled to `path` (once: an existing file is kept)."""
    if not path or Path(path).exists():
        return False
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(saved[0])
    logger.info("compile cache written to %s", path)
    return True
