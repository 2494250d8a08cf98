"""The VAE's self-attention as chunked matrix products (the `vae_matmul_attention` switch).

A Stable Diffusion VAE has one attention layer in its encoder's and decoder's middle block:
one head, 512 channels wide, over every latent position. The x4 upscaler's latent is the
input image itself, so a 512 x 512 tile attends over 262,144 positions: about 140 TFLOP,
as much as four of its UNet steps. PyTorch's fast attention kernels (flash, cuDNN) take
heads up to 256 wide, so a 512-wide head runs on the memory-efficient kernel, which is
slower at that width. Here the same attention is written as matrix products over chunks of
queries, which cuBLAS runs at its full rate:

    scores = (q / sqrt(d)) @ k^T       # a chunk of query rows against every key, float32
    out    = softmax(scores) @ v       # probabilities in the model's dtype, as flash rounds them

A chunk's scores and probabilities are held at once (`chunk_bytes`, 512 MiB by default,
bounds them); the chunks are independent, so the result is the attention itself, not an
approximation, rounded where PyTorch's own kernels round (q is scaled in the model's dtype,
as its math path does). On an H200 (`python -m bench.attnprobe`, bfloat16) the 512 tile's
attention takes 0.69 s this way against 1.53 s in `scaled_dot_product_attention` (203 and 92
TFLOP/s), and upscale 512 -> 2048 3.54 s against 4.36 s end to end: on by default for upscale.
What is left of those 0.69 s is memory traffic: the float32 scores are written, read by the
softmax, and its float32 output converted (bench/results/profile-20261127-110927).

    use_matmul_attention(pipe.vae)      # what the switch does (image/operations/tuning.py)

Attention calls it was not written for (a mask, cross-attention, a spatial norm) go to the
processor it replaced.
"""

from __future__ import annotations

import functools

import torch

CHUNK_BYTES = 512 * 2**20


class MatmulAttention:
    """A diffusers attention processor for the VAE's single-head self-attention; see the
    module docstring. `fallback` is the processor it replaces, called for anything else."""

    def __init__(self, fallback, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.fallback = fallback
        self.chunk_bytes = chunk_bytes

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None or hidden_states.ndim != 4 or args or kwargs):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = attention(query, key, value, self.chunk_bytes)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@torch.compiler.disable
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (batch, heads, positions, d) tensors, as
    `torch.nn.functional.scaled_dot_product_attention` computes it by default. The scores are
    float32 (as a fused kernel keeps them); a chunk's scores and probabilities (10 bytes a
    score: float32 scores and softmax, the probabilities in the model's dtype) take at most
    `chunk_bytes`. Never traced by torch.compile (`compile_vae`): a 512 tile's loop has over a
    thousand chunks, which Dynamo would unroll into one graph."""
    *lead, length, width = query.shape
    positions = key.shape[-2]
    queries = (query * width**-0.5).reshape(-1, length, width)  # in q's dtype, as PyTorch's math path
    keys = key.reshape(-1, positions, width).transpose(1, 2)
    values = value.reshape(-1, positions, value.shape[-1])
    rows = max(1, chunk_bytes // (queries.shape[0] * positions * 10))
    half = has_float32_products(queries)
    if not half:
        queries, keys = queries.float(), keys.float()  # the CPU, or a PyTorch without it
    out = torch.empty(queries.shape[0], length, values.shape[-1], dtype=value.dtype, device=value.device)
    for start in range(0, length, rows):
        chunk = queries[:, start:start + rows]
        scores = torch.bmm(chunk, keys, out_dtype=torch.float32) if half else torch.bmm(chunk, keys)
        probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
        del scores
        out[:, start:start + rows] = torch.bmm(probabilities, values)
    return out.view(*lead, length, values.shape[-1])


def has_float32_products(a: torch.Tensor) -> bool:
    """Whether bmm multiplies `a`'s half-precision dtype into float32 here (CUDA, in recent
    PyTorch: tensor-core speed, float32 accumulation and result)."""
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _float32_output(a.device, a.dtype)


@functools.cache
def _float32_output(device: torch.device, dtype: torch.dtype) -> bool:
    probe = torch.ones(1, 1, 1, dtype=dtype, device=device)
    try:
        return torch.bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, NotImplementedError):  # no out_dtype argument, or no kernel for it
        return False


def use_matmul_attention(vae, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """Give `vae`'s attention layers (the middle blocks') MatmulAttention; False when it has
    none (a VAE built without them)."""
    from diffusers.models.attention_processor import Attention

    layers = [module for module in vae.modules() if isinstance(module, Attention)]
    for layer in layers:
        layer.set_processor(MatmulAttention(layer.processor, chunk_bytes))
    return bool(layers)
