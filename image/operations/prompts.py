"""Prompt embeddings, encoded once per distinct prompt and kept.

A diffusers pipeline given prompt strings runs its tokenizer and text encoder on every call:
for every job, and for every tile of a tiled one (a 1024 -> 4096 upscale is 25 tiles, each
encoding its prompt and its negative prompt). The prompts are nearly always the operation's
defaults, so the operations pass the pipeline the embeddings instead: `PromptEmbeddings` runs
the pipeline's own `encode_prompt` once per distinct (prompt, negative prompt) and keeps its
tensors on the model's device, the least recently used given up past `size`. They are the
tensors the pipeline makes of the same strings itself (for a batch of several, one row
repeated where the pipeline would encode them as a batch: the same numbers but for kernels
that round differently at another batch size), so the pixels are unchanged; the
request path loses the tokenizer's Python work and the text encoder's kernels, during which
the GPU would otherwise wait.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

#: What `encode_prompt` returns, in order: SD's pipelines the first two, SDXL's all four.
EMBEDDING_ARGUMENTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds")


class PromptEmbeddings:
    """The embedding arguments of one pipeline for the prompts it has seen."""

    def __init__(self, pipeline, size: int = 16) -> None:
        self.pipeline = pipeline
        self.size = size
        self._kept: OrderedDict[tuple[str, str | None], dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def arguments(self, prompt: str, negative_prompt: str | None, count: int = 1) -> dict[str, torch.Tensor]:
        """Keyword arguments for the pipeline's call in place of `prompt=` and
        `negative_prompt=`, for a batch of `count` images with the same prompts. The negative
        embeddings are always there (the pipeline ignores them without guidance)."""
        key = (prompt, negative_prompt)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
        if kept is None:
            kept = self._encode(prompt, negative_prompt)
            with self._lock:
                self._kept[key] = kept
                while len(self._kept) > self.size:
                    self._kept.popitem(last=False)
        if count == 1:
            return dict(kept)
        return {name: tensor.repeat(count, *(1,) * (tensor.dim() - 1)) for name, tensor in kept.items()}

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        # Keywords: SD's encode_prompt and SDXL's (which has prompt_2 second) both take these.
        # Inference mode whoever calls: kept tensors must hold no autograd graph.
        with torch.inference_mode():
            encoded = pipe.encode_prompt(
                prompt=prompt,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt,
            )
        return dict(zip(EMBEDDING_ARGUMENTS, encoded, strict=False))
