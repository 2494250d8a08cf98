"""The models imagen runs: one `ModelSpec` per operation, looked up in `REGISTRY`.

A spec names the Hugging Face repository, the revision to pull until the lock pins a
commit, exactly the files the loader needs (so container images stay small) and how to
load them. File names follow the repositories' own layout; `fallbacks` says what to fetch
instead where a repository may lack the preferred file (resolved once, at pull time, and
then fixed by the lock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from image.errors import UnknownOperation

DIFFUSERS = "diffusers"
RMBG = "rmbg"

_CLIP_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One operation's model.

    `files` are `snapshot_download` allow_patterns; `fallbacks` maps a pattern to the
    patterns fetched instead when the repository has no file matching it. `disabled` are
    pipeline components deliberately loaded as None. `approx_bytes` is the download size.
    """

    operation: str
    repo_id: str
    revision: str
    loader: str
    pipeline: str | None
    files: tuple[str, ...]
    variant: str | None = None
    fallbacks: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    disabled: tuple[str, ...] = ()
    licence: str = ""
    approx_bytes: int = 0

    @property
    def cache_name(self) -> str:
        """The repository's folder name in a Hugging Face cache."""
        return "models--" + self.repo_id.replace("/", "--")


def _component(name: str, weights: str, variant: str | None) -> tuple[str, ...]:
    """A model component's config and its weights file (`weights` without extension)."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return (f"{name}/config.json", f"{name}/{weights}{suffix}")


def _tokenizer(name: str) -> tuple[str, ...]:
    return tuple(f"{name}/{file}" for file in _CLIP_TOKENIZER)


def _variant_fallbacks(files: tuple[str, ...], variant: str | None) -> dict[str, tuple[str, ...]]:
    """Per weight file: the plain safetensors, then the pickle, where the preferred one is absent.

    diffusers loads a component without the variant file from its plain weights, so a
    missing fp16 file costs size, not correctness.
    """
    fallbacks = {}
    for file in files:
        if not file.endswith(".safetensors"):
            continue
        stem = file.removesuffix(".safetensors").removesuffix(f".{variant}" if variant else "")
        pickle = stem.replace("/model", "/pytorch_model") + ".bin"
        plain = (f"{stem}.safetensors",) if variant else ()
        fallbacks[file] = (*plain, pickle)
    return fallbacks


def _diffusers_spec(
    operation: str,
    repo_id: str,
    pipeline: str,
    *,
    variant: str | None,
    models: Mapping[str, str],
    tokenizers: tuple[str, ...],
    schedulers: tuple[str, ...],
    disabled: tuple[str, ...] = (),
    licence: str,
    approx_bytes: int,
) -> ModelSpec:
    files = ["model_index.json"]
    for name, weights in models.items():
        files += _component(name, weights, variant)
    for name in tokenizers:
        files += _tokenizer(name)
    files += [f"{name}/scheduler_config.json" for name in schedulers]
    return ModelSpec(
        operation=operation,
        repo_id=repo_id,
        revision="main",
        loader=DIFFUSERS,
        pipeline=pipeline,
        files=tuple(files),
        variant=variant,
        fallbacks=MappingProxyType(_variant_fallbacks(tuple(files), variant)),
        disabled=disabled,
        licence=licence,
        approx_bytes=approx_bytes,
    )


_DIFFUSION_WEIGHTS = "diffusion_pytorch_model"
_TRANSFORMERS_WEIGHTS = "model"

REGISTRY: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "upscale": _diffusers_spec(
            "upscale",
            "stabilityai/stable-diffusion-x4-upscaler",
            "StableDiffusionUpscalePipeline",
            variant="fp16",
            models={
                "unet": _DIFFUSION_WEIGHTS,
                "vae": _DIFFUSION_WEIGHTS,
                "text_encoder": _TRANSFORMERS_WEIGHTS,
            },
            tokenizers=("tokenizer",),
            schedulers=("scheduler", "low_res_scheduler"),
            disabled=("safety_checker", "feature_extractor", "watermarker"),
            licence="CreativeML Open RAIL++-M (openrail++)",
            approx_bytes=1_700_000_000,
        ),
        "enhance": _diffusers_spec(
            "enhance",
            "stabilityai/stable-diffusion-xl-refiner-1.0",
            "StableDiffusionXLImg2ImgPipeline",
            variant="fp16",
            # The refiner conditions on the second (OpenCLIP bigG) text encoder only.
            models={
                "unet": _DIFFUSION_WEIGHTS,
                "vae": _DIFFUSION_WEIGHTS,
                "text_encoder_2": _TRANSFORMERS_WEIGHTS,
            },
            tokenizers=("tokenizer_2",),
            schedulers=("scheduler",),
            licence="CreativeML Open RAIL++-M (openrail++)",
            approx_bytes=6_100_000_000,
        ),
        "comic": _diffusers_spec(
            "comic",
            "nitrosocke/Ghibli-Diffusion",
            "StableDiffusionImg2ImgPipeline",
            variant=None,
            models={
                "unet": _DIFFUSION_WEIGHTS,
                "vae": _DIFFUSION_WEIGHTS,
                "text_encoder": _TRANSFORMERS_WEIGHTS,
            },
            tokenizers=("tokenizer",),
            schedulers=("scheduler",),
            # Style transfer of the user's own image: the NSFW checker adds 1.2 GB and a
            # second model to warm, and blacks out false positives.
            disabled=("safety_checker", "feature_extractor"),
            licence="CreativeML OpenRAIL-M",
            approx_bytes=4_300_000_000,
        ),
        "remove-background": ModelSpec(
            operation="remove-background",
            repo_id="briaai/RMBG-1.4",
            revision="main",
            loader=RMBG,
            pipeline=None,
            files=("briarmbg.py", "MyConfig.py", "config.json", "model.safetensors"),
            licence="bria-rmbg-1.4: non-commercial use; commercial use needs an agreement with BRIA AI",
            approx_bytes=176_000_000,
        ),
    }
)


def specs_for(operations: list[str] | tuple[str, ...]) -> list[ModelSpec]:
    """The specs of the named operations, in the order given (duplicates dropped)."""
    unknown = [name for name in operations if name not in REGISTRY]
    if unknown:
        raise UnknownOperation(
            f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}"
        )
    return [REGISTRY[name] for name in dict.fromkeys(operations)]
