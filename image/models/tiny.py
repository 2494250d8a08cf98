"""Tiny models: seeded random weights, the real classes and file names, a fraction of the size.

`build_tiny` writes, for each spec, a snapshot in the same cache layout and under the same
repo id as the real model, so the production loader runs unchanged on them, offline and in
seconds. Widths are tiny; what the pipelines check is mirrored from the real
configs (see ANCHOR-CONFIGS.md): the upscaler's 7 input channels, class embeddings, ×4 VAE
and max_noise_level; the refiner's text_time embedding sized for the aesthetic score and
its second text encoder only; SD1.5's ×8 VAE and PNDM scheduler for Ghibli-Diffusion.
The outputs are noise: these models test plumbing, not pictures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from image.errors import ModelError
from image.models._quiet import quiet_libraries
from image.models.lock import Lock
from image.models.registry import ModelSpec
from image.models.store import TINY_MARKER, add_snapshot, find_snapshot, is_tiny, repo_dir
from image.models.tokenizer import BOS, EOS, vocab_size, write_clip_tokenizer

TINY_SEED = 0
_TINY_VERSION = 2  # bump when an architecture below changes: fake commits change with it
_TEXT_WIDTH = 32  # text encoder hidden size = UNet cross-attention width


def fake_commit(spec: ModelSpec) -> str:
    """A stable 40-hex commit for a tiny snapshot when the lock pins none."""
    return hashlib.sha1(f"imagen-tiny/{_TINY_VERSION}/{spec.repo_id}".encode()).hexdigest()


def build_tiny(specs, cache_dir: Path, *, lock: Lock) -> dict[str, str]:
    """Build each spec's tiny model into `cache_dir`; returns repo id -> snapshot commit.

    The snapshot takes the lock's commit when there is one (so the loader, which follows
    the lock, finds it), else `fake_commit`. A real model already at that commit is never
    overwritten.
    """
    cache_dir = Path(cache_dir)
    specs = list(specs)
    commits = {spec.repo_id: lock.revision(spec.repo_id) or fake_commit(spec) for spec in specs}
    # Every refusal before any model is built: a cache half real and half random (served as
    # it is) is worse than either.
    for spec in specs:
        if spec.operation not in _BUILDERS:
            raise ModelError(f"no tiny model for operation {spec.operation!r}")
        commit = commits[spec.repo_id]
        # The real model at that commit, or the one the cache's refs run where nothing is locked
        # (a first-use download): the tiny model would take its place.
        for existing in (repo_dir(spec, cache_dir) / "snapshots" / commit, find_snapshot(spec, cache_dir, lock)[1]):
            if existing is not None and existing.is_dir() and not is_tiny(existing):
                raise ModelError(
                    f"{existing} holds the real {spec.repo_id}; build tiny models in another MODEL_CACHE_DIR"
                )
    cache_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        builder, commit = _BUILDERS[spec.operation], commits[spec.repo_id]
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".tiny-") as tmp:
            staging = Path(tmp)
            with quiet_libraries(warnings=False):
                builder(spec, staging)
            files = {
                p.relative_to(staging).as_posix(): p.stat().st_size
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            marker = {"tiny": True, "seed": TINY_SEED, "version": _TINY_VERSION, "files": files}
            (staging / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            add_snapshot(spec, cache_dir, commit, staging)
    return commits


# --- diffusers pipelines -------------------------------------------------------------------


def _text_encoder(*, with_projection: bool, hidden_act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=_TEXT_WIDTH,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(TINY_SEED)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _vae(widths: tuple[int, ...], scaling_factor: float):
    """An AutoencoderKL that downsamples by 2**(len(widths)-1), like the real one.

    Without the mid-block self-attention: it is quadratic in latent pixels, and the
    upscaler's latents are as large as its input.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(TINY_SEED)
    return AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(widths) // 2,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,
    )


def _unet(widths: tuple[int, int] = (32, 64), **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(TINY_SEED)
    return UNet2DConditionModel(
        sample_size=32,
        layers_per_block=1,
        block_out_channels=widths,
        norm_num_groups=min(widths) // 2,
        cross_attention_dim=_TEXT_WIDTH,
        **config,
    )


def _upscaler(spec: ModelSpec, staging: Path) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    # Narrower than the others: the upscaler works at the input's full resolution.
    unet = _unet(
        (16, 32),
        in_channels=7,  # 4 latent + 3 low-resolution image channels
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # Like the real one at these resolutions: no self-attention over the full-size latents.
        only_cross_attention=True,
        attention_head_dim=8,
        num_class_embeds=1000,  # the noise level added to the low-resolution image
        use_linear_projection=True,
    )
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
    pipe = StableDiffusionUpscalePipeline(
        vae=_vae((8, 16, 16), scaling_factor=0.08333),
        text_encoder=_text_encoder(with_projection=False, hidden_act="gelu"),
        tokenizer=None,
        unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, **betas),
        scheduler=DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1, **betas,
        ),
        max_noise_level=350,
    )
    _save(pipe, spec, staging, tokenizers={"tokenizer": "!"})


def _refiner(spec: ModelSpec, staging: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    time_embed = 8
    unet = _unet(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        # 5 time ids (original size, crop corner, aesthetic score), then the pooled text.
        projection_class_embeddings_input_dim=5 * time_embed + _TEXT_WIDTH,
    )
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae((16, 32, 32, 32), scaling_factor=0.13025),
        text_encoder=None,
        text_encoder_2=_text_encoder(with_projection=True, hidden_act="gelu"),
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            timestep_spacing="leading", steps_offset=1,
        ),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    _save(pipe, spec, staging, tokenizers={"tokenizer_2": "!"})


def _ghibli(spec: ModelSpec, staging: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline

    unet = _unet(
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=_vae((16, 32, 32, 32), scaling_factor=0.18215),
        text_encoder=_text_encoder(with_projection=False, hidden_act="quick_gelu"),
        tokenizer=None,
        unet=unet,
        scheduler=PNDMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, spec, staging, tokenizers={"tokenizer": "<|endoftext|>"})
    # The real repo lists its safety checker without imagen fetching it: keep that shape,
    # so the loader's way of leaving it out is what the tests exercise.
    index_path = staging / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPFeatureExtractor"]
    index["requires_safety_checker"] = True
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save(pipe, spec: ModelSpec, staging: Path, *, tokenizers: dict[str, str]) -> None:
    """Save like the real repo: variant weight names (in that dtype), slow-tokenizer files."""
    if spec.variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(staging, safe_serialization=True, variant=spec.variant)
    index_path = staging / "model_index.json"
    index = json.loads(index_path.read_text())
    for name, pad_token in tokenizers.items():
        folder = staging / name
        shutil.rmtree(folder, ignore_errors=True)
        write_clip_tokenizer(folder, pad_token=pad_token)
        index[name] = ["transformers", "CLIPTokenizer"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --- RMBG ---------------------------------------------------------------------------------


def _rmbg(spec: ModelSpec, staging: Path) -> None:
    from safetensors.torch import save_file

    from image.models.remote_code.briarmbg import BriaRMBG
    from image.models.remote_code.MyConfig import RMBGConfig

    code = resources.files("image.models.remote_code")
    for name in ("briarmbg.py", "MyConfig.py"):
        (staging / name).write_text(code.joinpath(name).read_text())
    torch.manual_seed(TINY_SEED)
    model = BriaRMBG(RMBGConfig(in_ch=3, out_ch=1)).eval()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    config = {
        "_name_or_path": spec.repo_id,
        "architectures": ["BriaRMBG"],
        "auto_map": {
            "AutoConfig": "MyConfig.RMBGConfig",
            "AutoModelForImageSegmentation": "briarmbg.BriaRMBG",
        },
        "in_ch": 3,
        "model_type": "SegformerForSemanticSegmentation",
        "out_ch": 1,
        "torch_dtype": "float32",
    }
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


_BUILDERS = {
    "upscale": _upscaler,
    "enhance": _refiner,
    "comic": _ghibli,
    "remove-background": _rmbg,
}
