"""The VAE's one-head, 512-wide self-attention alone: PyTorch's scaled_dot_product_attention
against imagen's chunked matrix products (image/operations/vae_attention.py, the
`vae_matmul_attention` switch), at the sizes the operations decode:
`python -m bench.attnprobe [--tiny]`.

Per size it prints and writes (bench/results/<card>-attnprobe-<time>.json) the median
milliseconds of each (device events, after a warm-up), the TFLOP/s that makes (4 N^2 d), the
memory each allocates at its peak, and each one's largest difference from PyTorch's float32
attention on the same inputs. In bfloat16, as
imagen's VAE runs (vae_bf16). `--tiny` is a dry run on the CPU with small sizes.
"""

from __future__ import annotations

import argparse
import json

import torch

# latent positions -> what decodes them
SIZES = {
    16384: "enhance 1024 (128^2 latent)",
    65536: "upscale 256 tile (256^2 latent)",
    262144: "upscale 512 tile (512^2 latent)",
}
TINY_SIZES = {1024: "tiny", 4096: "tiny"}
WIDTH = 512


def _reference(q, k, v, rows: int = 4096) -> torch.Tensor:
    """Float32 scaled_dot_product_attention, a chunk of queries at a time (independent of
    vae_attention's code; whole, the math kernel's score matrix would not fit)."""
    keys, values = k.float(), v.float()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(q[..., i:i + rows, :].float(), keys, values)
                      for i in range(0, q.shape[-2], rows)], dim=-2)


def probe_size(positions: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    from bench.timing import measure
    from image.operations.vae_attention import attention, has_float32_products

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 1, positions, WIDTH, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    reference = _reference(q, k, v)
    flop = 4 * positions**2 * WIDTH
    row = {"positions": positions, "case": (TINY_SIZES | SIZES)[positions], "dtype": str(dtype).removeprefix("torch."),
           "half_inputs_float32_scores": has_float32_products(q)}
    paths = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "matmul": lambda: attention(q, k, v),
    }
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for name, fn in paths.items():
        try:
            with torch.inference_mode():
                timing, out = measure(fn, device, warmup=1, repeats=repeats)
        except (RuntimeError, torch.OutOfMemoryError) as error:  # a kernel that does not take it
            row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        row[f"{name}_ms"] = round(timing.seconds * 1000, 2)
        row[f"{name}_tflops"] = round(flop / timing.seconds / 1e12, 1)
        row[f"{name}_max_diff"] = float((out.float() - reference).abs().max())
        # What the call itself allocated at its peak, beyond the inputs and the reference.
        row[f"{name}_peak_gib"] = None if timing.peak_bytes is None else round((timing.peak_bytes - baseline) / 2**30, 2)
        del out
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.attnprobe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes on the CPU (a dry run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from bench.report import probe_results
    from image.device import resolve_device

    device, _ = resolve_device("cpu" if args.tiny else "auto")
    dtype = torch.bfloat16
    sizes = TINY_SIZES if args.tiny else SIZES
    card, out = probe_results(device, "attnprobe")
    rows = []
    for positions in sizes:
        row = probe_size(positions, device, dtype, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"written: {out}")
    return rows


if __name__ == "__main__":
    main()
