"""`imagen run IN [-o OUT] --operation OP [--param k=v ...]`: one local file, no cloud.

The same decoding limits, parameter rules, models and encoder as the service; the output
goes next to the input as `<stem>.<operation>.<format>` unless `-o` says otherwise.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import click

from handlers.cli.options import expand_home, param_options
from handlers.settings import DEVICES


@click.command("run")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output file (its extension .png, .webp, .jpg picks the format; --format must agree "
              "with it), or a folder (an existing one, or a name ending in /) for the default name; default: "
              "<input stem>.<operation>.<format> next to the input.")
@click.option("--operation", metavar="OP[,OP...]",
              help="upscale, enhance, comic, remove-background, or a chain such as "
              "remove-background,upscale [default: IMAGEN_OPERATIONS, where it names one: an operation's image].")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="An operation parameter (repeatable), e.g. --param steps=20.")
@click.option("--format", "format_given", type=click.Choice(["png", "webp", "jpeg", "jpg"]),
              help="Output format (the same as --param format=...); default png.")
@click.option("--device", type=click.Choice(DEVICES),
              help="Where the models run (IMAGEN_DEVICE); default auto.")
@click.option("--model-cache-dir", type=click.Path(file_okay=False, path_type=Path), callback=expand_home,
              help="Where the models are (MODEL_CACHE_DIR).")
@click.pass_obj
def run(settings, source, output, operation, params, format_given, device, model_cache_dir):
    """Run OPERATION on the local image SOURCE and write the result."""
    from PIL import Image

    from image.codec import decode_image, encode_image
    from image.errors import ImageTooLarge, InvalidParameter
    from image.params import output_format, parse_chain, resolve_common, validate_params

    # 1. Check inputs: chain, parameters and image, before any model loads (--device and
    # --model-cache-dir are in `settings` already: handlers/cli/__init__.py)
    if operation is None:
        if len(settings.operations) != 1:
            raise click.UsageError("give --operation (IMAGEN_OPERATIONS names no single operation to default to)")
        operation = settings.operations[0]
    chain = parse_chain(operation)
    raw = param_options(params)
    if format_given:
        if "format" in raw:
            raise InvalidParameter("give the format once: --format or --param format=...")
        raw["format"] = format_given
    if not source.is_file():  # /dev/zero would be read until memory ran out, a pipe waited on
        raise click.BadParameter(f"{source} is not a regular file", param_hint="SOURCE")
    params = validate_params(chain, raw)
    folder = source.parent
    if output == "":
        raise click.BadParameter("is empty: give a file or folder", param_hint="-o")
    if output is not None:
        given, output = output, Path(output).expanduser()
        if given.endswith(("/", os.sep)) or output.is_dir():  # Path() drops the trailing slash
            folder, output = output, None
    # -o cut.jpg: a JPEG, as a job message's output name says too (-o out.gif, or -o q.png
    # with --format webp, refused)
    if output is not None and (named := output_format(output.name, params.get("format"))):
        params["format"] = named
    with source.open("rb") as file:  # no more than the limit and one byte: enough to refuse it
        data = file.read(settings.max_bytes + 1)
    if len(data) > settings.max_bytes:  # the file's own size, as the service reports an object's
        raise ImageTooLarge(f"{source} is {source.stat().st_size:,} bytes; the limit (IMAGEN_MAX_BYTES) is "
                            f"{settings.max_bytes:,}")
    image = decode_image(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
    common = resolve_common(params, data)
    if output is None:
        output = folder / f"{source.stem}.{'+'.join(chain)}.{common['format']}"
    if output.resolve() == source.resolve() or (output.exists() and output.samefile(source)):  # a hard link too
        raise click.BadParameter(f"{output} is the input itself: give another name", param_hint="-o")
    # Where the result goes must take it before the models load and run (minutes, on real ones).
    output.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(output.parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise click.BadParameter(f"{output} cannot be written", param_hint="-o")

    # 2. Load only the chain's models
    from handlers.service import build_engine  # keeps the image package off `imagen --help`

    started = time.perf_counter()
    engine = build_engine(settings, operations=chain, one_shot=True)
    engine.setup()
    setup_seconds = time.perf_counter() - started

    # 3. Run, encode, write
    started = time.perf_counter()
    result = engine.run(chain, image, params, common["seed"])
    encoded = encode_image(result, common["format"], common["quality"])
    run_seconds = time.perf_counter() - started
    output.write_bytes(encoded)
    tiny = "  [tiny models]" if engine.is_tiny() else ""
    mode = _written_mode(encoded)
    click.echo(
        f"{output}  {result.width}x{result.height} {mode}  "
        f"{','.join(chain)} seed={common['seed']}  "
        f"{run_seconds:.2f} s (models {setup_seconds:.2f} s){tiny}"
    )


command = run


def _written_mode(encoded: bytes) -> str:
    """The mode the written file's header says (JPEG lays transparency on white, WebP has no
    grey). Only the header is read, so Pillow's decompression-bomb limit is lifted for it: an
    upscale's result has 16 times its input's pixels (a 12 MP photo's is over the limit)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(encoded)) as written:
            return written.mode
    finally:
        Image.MAX_IMAGE_PIXELS = limit
