"""The speed switches as data: `Tuning`, its defaults per device and operation, and the
NAME=VALUE changes IMAGEN_TUNING and the bench take. Torch-free, so settings validate it at
start-up and the engine builds it before torch is imported; image/operations/tuning.py
applies it to a loaded model and documents each switch and the figures behind its default.
"""

from __future__ import annotations

import dataclasses

SWITCHES = (
    "channels_last",
    "fuse_qkv",
    "read_ahead",
    "direct_to_device",
    "cudnn_benchmark",
    "vae_tiling",
    "vae_bf16",
    "vae_matmul_attention",
    "compile_vae",
    "compile",
    "cuda_graphs",
    "host_timesteps",
    "prompt_cache",
)
"""The on/off switches, in the order reports list them."""


INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that capture CUDA graphs themselves: `cuda_graphs` stands aside."""

DIFFUSION = frozenset({"comic", "enhance", "upscale"})
"""Operations with a diffusion UNet, run dozens of times per image: where CUDA graphs pay.
remove-background runs its network once per image and was not measured with them."""

COMPILE_PAYS = frozenset({"comic", "enhance", "upscale"})
"""Operations whose UNet ran faster compiled (Inductor, NHWC) under the CUDA graphs on an H200:
comic 0.454 -> 0.309 s, enhance 0.898 -> 0.792 s, upscale 256 -> 1024 3.62 -> 2.03 s and
512 -> 2048 5.34 -> 4.33 s (both tile buckets compiled, 133 s on 16 CPUs); remove-background:
not measured."""

MATMUL_ATTENTION_PAYS = frozenset({"upscale"})
"""Operations whose VAE attention ran faster as chunked matrix products on an H200: upscale
512 -> 2048 4.36 -> 3.54 s (the 512 tile's decode attends over 262,144 positions: 1.53 s in
PyTorch's kernel, 0.69 s as products), 256 -> 1024 2.05 -> 2.01 s, +0.16 GiB. The SDXL
refiner's 128^2 latent: 3.7 -> 2.3 ms per call, not measured end to end; SD1.5's is smaller."""

COMPILE_VAE_PAYS = frozenset({"upscale"})
"""Operations whose VAE decoder ran faster compiled too (Inductor's group norms take NHWC as it
is and fuse with their activations; eager ones copy to NCHW and back) on an H200: upscale
512 -> 2048 3.57 -> 3.12 s and 9.0 -> 7.5 GiB, 256 -> 1024 2.03 -> 1.95 s. comic and enhance:
not measured (one small decode per image against 50 UNet steps)."""

HOST_TIMESTEPS_PAYS = frozenset({"upscale"})
"""Operations whose scheduler step ran faster given CPU timesteps (no wait on the GPU six times
a DDIM step) on an H200, same pixels: upscale 256 -> 1024 1.948 -> 1.917 s, 512 -> 2048
3.142 -> 3.085 s (session 8). comic's PNDM step reads the device too: not measured."""

CHANNELS_LAST_PAYS = frozenset({"comic"})
"""Operations whose CUDA-graphed UNet ran faster in NHWC on an H200 (comic 12 %); uncompiled
enhance ran 4 % slower. Compiled operations run in NHWC whatever this says (the variant
measured: compiled upscale in NHWC 2.03 / 4.33 s and 3.8 / 9.0 GiB, in NCHW 2.12 / 4.18 s and
4.4 / 11.5 GiB); remove-background was not measured with it."""


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How an operation is set up for speed; image/operations/tuning.py describes each field."""

    channels_last: bool = False
    fuse_qkv: bool = False
    read_ahead: bool = False
    direct_to_device: bool = False
    cudnn_benchmark: bool = False
    vae_tiling: bool = False
    vae_bf16: bool = False
    vae_matmul_attention: bool = False
    compile_vae: bool = False
    compile: bool = False
    background_compile: bool = False  # how `compile` and `compile_vae` run: after ready, under the graphs
    cuda_graphs: bool = False
    host_timesteps: bool = False
    prompt_cache: bool = False
    compile_mode: str | None = None  # torch.compile mode: None (default), "max-autotune", ...
    upscale_tile: int | tuple[int, ...] | None = None  # input pixels; several: buckets
    upscale_tile_batch: int = 1

    @classmethod
    def stock(cls) -> Tuning:
        """Everything off: what stock diffusers does."""
        return cls()

    @classmethod
    def for_device(cls, device, operation: str | None = None) -> Tuning:
        """The defaults for `operation` on `device`: on CUDA the switches the bench showed to
        pay (see the module docstring); stock diffusers' pixels on the CPU (what is on there
        only reads files early or keeps work already done)."""
        prompted = operation is None or operation in DIFFUSION  # remove-background has no prompt
        if str(device).split(":")[0] == "cuda":  # a torch.device or its name
            compiled = operation in COMPILE_PAYS
            return cls(channels_last=operation in CHANNELS_LAST_PAYS or compiled, fuse_qkv=True, read_ahead=True,
                       direct_to_device=True, vae_bf16=True,
                       vae_matmul_attention=operation in MATMUL_ATTENTION_PAYS,
                       compile_vae=operation in COMPILE_VAE_PAYS, compile=compiled, background_compile=True,
                       cuda_graphs=operation is None or operation in DIFFUSION,
                       host_timesteps=operation in HOST_TIMESTEPS_PAYS, prompt_cache=prompted,
                       upscale_tile=(256, 512))
        return cls(read_ahead=True, prompt_cache=prompted)

    def replace(self, **changes) -> Tuning:
        """A copy with `changes`; unknown names raise TypeError."""
        return dataclasses.replace(self, **changes)

    def enabled(self) -> list[str]:
        """Names of the switches that are on; compile names its mode where one is set."""
        return [f"compile({self.compile_mode})" if name == "compile" and self.compile_mode else name
                for name in SWITCHES if getattr(self, name)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_changes(base: Tuning, items) -> Tuning:
    """`base` with NAME=VALUE changes (IMAGEN_TUNING, `python -m bench --switch`): on/off for
    the switches, whole numbers for `upscale_tile` (several: buckets) and
    `upscale_tile_batch`, text for `compile_mode` (none: unset).
    Raises ValueError naming what is wrong."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        current = getattr(base, name)
        text = value.strip().lower()
        if isinstance(current, bool):
            if text not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{item!r}: {name} takes on or off")
            changes[name] = text in ("on", "true", "1", "yes")
        elif name in ("upscale_tile", "upscale_tile_batch"):
            try:
                numbers = tuple(int(part) for part in text.split(",")) if text not in ("", "none", "default") else None
            except ValueError:
                raise ValueError(f"{item!r}: {name} takes whole numbers") from None
            if numbers is not None and any(n < 1 for n in numbers):
                raise ValueError(f"{item!r}: {name} takes positive numbers")
            if numbers is not None and (len(numbers) == 1 or name == "upscale_tile_batch"):
                numbers = numbers[0]
            if name == "upscale_tile_batch" and numbers is None:
                numbers = 1
            changes[name] = numbers
        else:
            changes[name] = None if text in ("", "none", "default") else value.strip()
    return base.replace(**changes)
