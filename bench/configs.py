"""The models the bench runs: full-size architectures (random weights) or the tiny ones.

Full-size configs are the architecture facts (layer counts, widths, schedulers) of the team's
ANCHOR-CONFIGS.md (outside this repository), the ones the stock anchor figures were measured with, so a bench run
compares like with like. Tiny models are exactly those of `imagen models pull --tiny`
(image/models/tiny.py). Either way the models are written once into a Hugging Face cache
layout under one cache folder, so both paths read the same files:

- stock: `<Pipeline>.from_pretrained(snapshot, torch_dtype=...)` as a user writes it;
- imagen: the operation's `setup`, through the production loader (`image.models.loading`).

    cache = prepare_models(["comic"], cache_dir, kind="full", device=torch.device("cuda"))
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from bench.timing import free
from image.models import store
from image.models.lock import Lock
from image.models.registry import REGISTRY, ModelSpec
from image.models.tokenizer import BOS, EOS

logger = logging.getLogger("bench")

FULL, TINY = "full", "tiny"
BENCH_LOCK = Lock()
"""The bench loads by `refs/main`, never by the packaged lock (which pins the real models)."""

_MARKER = "bench-build.json"  # in a full-size repo folder, beside snapshots/: built from what

# -- full-size architectures (ANCHOR-CONFIGS.md) -------------------------------------------

_SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_UPSCALER_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
_SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
}

FULL_CONFIGS = {
    "comic": {
        "unet": {
            "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768, "attention_head_dim": 8,
        },
        "vae": {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": {
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "hidden_act": "quick_gelu", "projection_dim": 768,
        },
    },
    "enhance": {
        "unet": {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (384, 768, 1536, 1536),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (6, 12, 24, 24), "transformer_layers_per_block": 4,
            "cross_attention_dim": 1280, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2560,
        },
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
        "text_encoder_2": {
            "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
            "intermediate_size": 5120, "hidden_act": "gelu", "projection_dim": 1280,
        },
    },
    "upscale": {
        "unet": {
            "sample_size": 128, "in_channels": 7, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (256, 512, 512, 1024),
            "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            "up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            "only_cross_attention": (True, True, True, False), "num_class_embeds": 1000,
            "cross_attention_dim": 1024, "attention_head_dim": 8, "use_linear_projection": True,
        },
        "vae": {
            "block_out_channels": (128, 256, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "latent_channels": 4, "layers_per_block": 2, "sample_size": 256, "scaling_factor": 0.08333,
        },
        "text_encoder": {
            "hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16,
            "intermediate_size": 4096, "hidden_act": "gelu", "projection_dim": 512,
        },
    },
}
"""Per operation, per component: the constructor arguments of the full-size architecture."""

UNET_PARAMETERS = {"comic": 859.5e6, "enhance": 2259.5e6, "upscale": 473.4e6}
"""The UNet sizes ANCHOR-CONFIGS.md states; tests check the configs against them."""


def _clip(config: dict, *, with_projection: bool, device, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=EOS, **config,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device(device):
        return model_class(clip_config).eval()


def build_full_pipeline(operation: str, *, device: torch.device | str = "cpu", seed: int = 0):
    """The full-size pipeline of `operation` with seeded random weights, in float32 on `device`."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = FULL_CONFIGS[operation]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
    if operation == "comic":
        return diffusers.StableDiffusionImg2ImgPipeline(
            vae=vae, unet=unet, tokenizer=None, safety_checker=None, feature_extractor=None,
            text_encoder=_clip(config["text_encoder"], with_projection=False, device=device, seed=seed),
            scheduler=diffusers.PNDMScheduler(
                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **_SD_BETAS
            ),
            requires_safety_checker=False,
        )
    if operation == "enhance":
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, unet=unet, text_encoder=None, tokenizer=None, tokenizer_2=None,
            text_encoder_2=_clip(config["text_encoder_2"], with_projection=True, device=device, seed=seed),
            scheduler=diffusers.EulerDiscreteScheduler(
                timestep_spacing="leading", steps_offset=1, **_SD_BETAS
            ),
            requires_aesthetics_score=True,
        )
    if operation == "upscale":
        return diffusers.StableDiffusionUpscalePipeline(
            vae=vae, unet=unet, tokenizer=None,
            text_encoder=_clip(config["text_encoder"], with_projection=False, device=device, seed=seed),
            low_res_scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000, **_UPSCALER_BETAS),
            scheduler=diffusers.DDIMScheduler(
                prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                steps_offset=1, **_UPSCALER_BETAS,
            ),
            max_noise_level=350,
        )
    raise ValueError(f"no full-size architecture for {operation!r}; choose from {', '.join(FULL_CONFIGS)}")


_TOKENIZERS = {"comic": {"tokenizer": "<|endoftext|>"}, "enhance": {"tokenizer_2": "!"},
               "upscale": {"tokenizer": "!"}}


def _config_digest(operation: str) -> str:
    text = json.dumps(FULL_CONFIGS[operation], sort_keys=True, default=list)
    return hashlib.sha1(f"imagen-bench/full/{text}".encode()).hexdigest()


def _build_full(spec: ModelSpec, cache_dir: Path, *, device: torch.device) -> None:
    """Write the full-size model of `spec` as a snapshot in `cache_dir`, fp16 safetensors."""
    from image.models.tiny import (
        _save as save_like_the_repo,  # same file names as the real repo
    )

    commit = _config_digest(spec.operation)
    snapshot = store.repo_dir(spec, cache_dir) / "snapshots" / commit
    staging = snapshot.with_name(f".{commit}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    pipe = build_full_pipeline(spec.operation, device=device)
    # Saved in fp16 whatever the spec's variant: the anchor loads fp16 safetensors.
    pipe.to(torch.float16)
    save_like_the_repo(pipe, spec, staging, tokenizers=_TOKENIZERS[spec.operation])
    del pipe
    shutil.rmtree(snapshot, ignore_errors=True)
    staging.rename(snapshot)
    store.write_ref(spec, cache_dir, spec.revision, commit)
    logger.info("built full-size %s in %.1f s", spec.repo_id, time.perf_counter() - started)


def prepare_models(
    operations: Iterable[str], cache_dir: Path, *, kind: str, device: torch.device | str = "cpu"
) -> Path:
    """Make sure `cache_dir` holds the models of `operations` (built once, then reused).

    Tiny models are built on the CPU; full-size ones on `device` (fast random init on a GPU).
    """
    from image.models.tiny import build_tiny

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for operation in dict.fromkeys(operations):
        spec = REGISTRY[operation]
        problems = store.spec_problems(spec, cache_dir, BENCH_LOCK)
        _, found = store.find_snapshot(spec, cache_dir, BENCH_LOCK)
        if kind == TINY:
            # Any complete tiny snapshot will do (the tests' shared one too); build_tiny
            # refuses to overwrite a real model.
            if problems or found is None or not store.is_tiny(found):
                build_tiny([spec], cache_dir, lock=BENCH_LOCK)
            continue
        if kind != FULL:
            raise ValueError(f"kind must be {FULL!r} or {TINY!r}, got {kind!r}")
        repo = store.repo_dir(spec, cache_dir)
        marker = repo / _MARKER
        wanted = {"kind": kind, "digest": _config_digest(operation)}
        if marker.is_file():
            if not problems and json.loads(marker.read_text()) == wanted:
                continue
        elif repo.exists():
            raise SystemExit(f"{repo} holds a model the bench did not build; give the bench its own --cache")
        shutil.rmtree(repo, ignore_errors=True)
        _build_full(spec, cache_dir, device=torch.device(device))
        marker.write_text(json.dumps(wanted) + "\n")
        # The built pipeline (a reference cycle) and the allocator's blocks it used: gone before
        # the next build, and before the first path's peaks, which would count them.
        free(torch.device(device))
    return cache_dir


def snapshot_of(operation: str, cache_dir: Path) -> Path:
    """The snapshot folder the bench reads `operation`'s model from."""
    return store.resolve_snapshot(REGISTRY[operation], Path(cache_dir), lock=BENCH_LOCK)
