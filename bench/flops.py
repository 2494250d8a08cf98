"""The UNet arithmetic of a case, counted on the meta device: how close to the card's rate a
path runs.

    tflop = unet_tflop(case, cache_dir)    # TFLOP of UNet work per image, as stock does it

The UNet is built from the snapshot's own config on the meta device (no memory, no weights)
and one denoising step is run under `torch.utils.flop_counter.FlopCounterMode`, with the
shapes the stock pipeline uses: batch 2 with classifier-free guidance, latents at the
pipeline's size, the text encoder's context. Times the steps the pipeline runs (img2img:
int(steps x strength)). The text encoder and the VAE are not counted: the figure is a floor
for the work, and TFLOP per second = this / seconds per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.cases import Case
from bench.configs import snapshot_of


def unet_tflop(case: Case, cache_dir: Path) -> float | None:
    """TFLOP of UNet work for one image of `case` (None where it cannot be counted)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    snapshot = snapshot_of(case.operation, cache_dir)
    config_file = snapshot / "unet" / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    batch = 2 if case.guidance > 1 else 1
    # upscale's latents are at the input's size
    side = case.size if case.operation == "upscale" else case.size // _vae_factor(snapshot)
    steps = unet_calls(case, snapshot)
    context = config.get("cross_attention_dim") or 768
    context = context[0] if isinstance(context, list) else context
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).half()
        kwargs = {}
        if config.get("addition_embed_type") == "text_time":
            # Text embeddings and time ids are concatenated before one projection: any split
            # that adds up to its input width costs the same (the refiner's is 5 time ids).
            width, time_width = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, width - 5 * time_width, dtype=torch.half),
                "time_ids": torch.empty(batch, 5, dtype=torch.half),
            }
        if config.get("num_class_embeds"):
            kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long)
        sample = torch.empty(batch, config["in_channels"], side, side, dtype=torch.half)
        states = torch.empty(batch, 77, context, dtype=torch.half)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(sample, torch.tensor(10), encoder_hidden_states=states, return_dict=False, **kwargs)
    return counter.get_total_flops() * steps / 1e12


def unet_calls(case: Case, snapshot: Path) -> int:
    """UNet calls per image (each of batch 2 with guidance): the scheduler's timesteps as the
    pipeline takes them. img2img skips the first `steps - int(steps * strength)` steps
    (diffusers' get_timesteps); PNDM's schedule has one timestep more than `steps` (comic at 50
    x 0.75: 38 calls, not 37)."""
    import diffusers

    config = json.loads((snapshot / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(case.steps)
    start = 0
    if case.operation != "upscale":
        start = case.steps - min(int(case.steps * (case.strength or 1)), case.steps)
    return len(scheduler.timesteps[start * scheduler.order:])


def _vae_factor(snapshot: Path) -> int:
    config = json.loads((snapshot / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)
