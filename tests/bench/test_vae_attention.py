"""The `vae_matmul_attention` switch computes the VAE's attention, not an approximation of it.

The tiny models' VAEs leave the middle block's attention out (it is quadratic in latent
pixels), so these build small VAEs with it, as the real ones have it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from image.operations.tuning import Tuning, tune_pipeline
from image.operations.vae_attention import (
    MatmulAttention,
    attention,
    use_matmul_attention,
)

pytestmark = pytest.mark.models


def _vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         **config).eval()


@pytest.mark.parametrize("chunk_bytes", [2**30, 7 * 300 * 4])  # whole, and chunks that do not divide it
@pytest.mark.parametrize("shape", [(1, 1, 300, 64), (2, 3, 130, 16)])
def test_attention_equals_scaled_dot_product_attention(chunk_bytes, shape):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) * 2 for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v, chunk_bytes), expected, atol=1e-5, rtol=1e-5)


def test_attention_in_bfloat16_rounds_no_more_than_the_fused_kernel():
    # Peaky scores (std ~ 9): rounding them to bfloat16 before the softmax would cost ~0.7
    # here; float32 scores keep the error to the inputs' and the probabilities' rounding.
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 2048, 64, generator=generator) * 3 for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    low = [t.bfloat16() for t in (q, k, v)]
    fused = (F.scaled_dot_product_attention(*low).float() - exact).abs().max()
    ours = (attention(*low, 2**16).float() - exact).abs().max()
    assert ours <= 2 * fused + 0.02, (float(ours), float(fused))


@pytest.mark.parametrize("layout", ["plain", "fused_qkv", "channels_last"])
def test_vae_decodes_and_encodes_the_same_with_it(layout):
    vae = _vae()
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(2))
    image = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(4))
    if layout == "fused_qkv":
        vae.fuse_qkv_projections()
    if layout == "channels_last":
        vae.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        decoded, encoded = vae.decode(latents).sample, vae.encode(image).latent_dist.mean
        assert use_matmul_attention(vae, chunk_bytes=4096)  # many chunks
        processors = {type(p) for p in vae.attn_processors.values()}
        assert processors == {MatmulAttention}
        assert torch.allclose(vae.decode(latents).sample, decoded, atol=1e-5)
        assert torch.allclose(vae.encode(image).latent_dist.mean, encoded, atol=1e-5)


def test_calls_it_was_not_written_for_go_to_the_processor_it_replaced():
    vae = _vae()
    layer = vae.decoder.mid_block.attentions[0]
    hidden = torch.randn(1, 64, 6, 5)
    mask = torch.zeros(1, 1, 30)
    mask[..., :12] = -1e4  # hides 12 of the 30 positions: ignoring it would change the result
    with torch.inference_mode():
        expected = layer(hidden, attention_mask=mask)
        use_matmul_attention(vae)
        assert torch.equal(layer(hidden, attention_mask=mask), expected)  # the original's result, exactly


def test_the_switch_applies_where_a_vae_has_attention(tiny_cache):
    from tests.bench.test_equivalence import _pipe

    pipe = _pipe("upscale", tiny_cache)
    switch = Tuning.stock().replace(vae_matmul_attention=True)
    assert tune_pipeline(pipe, switch, torch.device("cpu")) == []  # the tiny VAE has none
    pipe.vae = _vae()
    assert tune_pipeline(pipe, switch, torch.device("cpu")) == ["vae_matmul_attention"]
    assert not use_matmul_attention(_vae(mid_block_add_attention=False))
    assert "vae_matmul_attention" in Tuning.for_device("cuda", "upscale").enabled()  # measured: it pays
    assert "vae_matmul_attention" not in Tuning.for_device("cuda", "enhance").enabled()  # not measured there


def test_a_compiled_decoder_leaves_the_attention_loop_eager(captured_compile):
    # compile_vae with this switch: Dynamo captures the decoder around the attention (a graph
    # break) instead of unrolling its chunks (over a thousand for an upscale 512 tile).
    from types import SimpleNamespace

    from image.operations.tuning import compile_parts, compile_vae, shape_compiled_parts

    vae = _vae()
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vae.decode(latents).sample
    graphs = captured_compile.graphs
    assert use_matmul_attention(vae, chunk_bytes=4096)  # many chunks
    assert compile_vae(vae) == ["compile_vae"]
    with torch.inference_mode():
        vae.decode(latents)  # the warm-up: records the decoder's shape
    parts = shape_compiled_parts(SimpleNamespace(vae=vae))
    assert [name for name, _ in parts] == ["decoder", "encoder"]
    assert compile_parts(parts) == ["decoder (1 shape)"]  # the encoder saw nothing
    with torch.inference_mode():
        out = vae.decode(latents).sample
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    code = "".join(graph.code for graph in graphs)
    assert len(graphs) >= 2 and "conv2d" in code  # the decoder, in pieces around the attention
    assert "bmm" not in code and "softmax" not in code
