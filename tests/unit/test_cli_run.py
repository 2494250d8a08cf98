"""`imagen run` on tiny models: every operation and a chain write correctly sized files;
bad input exits non-zero with one readable line naming the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from handlers.cli import main

pytestmark = pytest.mark.models

FAST = {
    "upscale": ["--param", "steps=2"],
    "enhance": ["--param", "steps=2", "--param", "strength=0.5"],
    "comic": ["--param", "steps=2", "--param", "strength=0.5"],
    "remove-background": [],
    "remove-background,upscale": ["--param", "steps=2"],
}


@pytest.fixture
def cli(tiny_cache):  # noqa: F811
    runner = CliRunner()
    env = {"MODEL_CACHE_DIR": str(tiny_cache), "HF_HUB_OFFLINE": "1", "IMAGEN_DEVICE": "cpu"}

    def invoke(*args):
        return runner.invoke(main, ["run", *args], env=env, catch_exceptions=False)

    return invoke


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_the_model_cache_option_expands_the_home_folder_as_models_pull_does(tiny_cache, photo, tmp_path):
    """`--model-cache-dir=~/m` (the shell leaves a `~` after `=` alone) looked in a folder named
    `~`, where `imagen models pull --cache-dir=~/m` had put the models in the home folder."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "m").symlink_to(tiny_cache)
    result = CliRunner().invoke(main, ["run", str(photo), "--operation", "remove-background",
                                       "--model-cache-dir=~/m", "-o", str(tmp_path / "out.png")],
                                env={"HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "IMAGEN_DEVICE": "cpu",
                                     "MODEL_CACHE_DIR": ""})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.png").is_file()


def test_a_result_over_pillows_pixel_limit_is_written_and_said(cli, photo, monkeypatch):
    """The command read its own output back to print its mode: an upscale of a 12 MP photo
    (192 MP) is over Pillow's limit, so it died with DecompressionBombError, exit 1, after
    writing the file. Here the limit is lowered below this upscale's result instead."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 224 * 160 // 3)  # opens up to twice that: 23,892
    monkeypatch.setenv("IMAGEN_MAX_PIXELS", "20000")  # within it (settings refuse more)
    result = cli(str(photo), "--operation", "upscale", *FAST["upscale"])
    assert result.exit_code == 0 and "224x160 RGB" in result.output, result.output
    assert Image.MAX_IMAGE_PIXELS == 224 * 160 // 3  # put back


@pytest.mark.parametrize(
    "operation, size, mode",
    [("upscale", (224, 160), "RGB"), ("enhance", (56, 40), "RGB"), ("comic", (56, 40), "RGB"),
     ("remove-background", (56, 40), "RGBA"), ("remove-background,upscale", (224, 160), "RGBA")],
)
def test_each_operation_writes_a_correctly_sized_file(cli, photo, operation, size, mode):
    result = cli(str(photo), "--operation", operation, *FAST[operation])
    assert result.exit_code == 0, result.output
    expected = photo.with_name(f"photo.{operation.replace(',', '+')}.png")
    assert expected.is_file()
    with Image.open(expected) as out:
        assert out.format == "PNG" and out.size == size and out.mode == mode
    # One line: the path, the size, the seed and seconds.
    assert str(expected) in result.output
    assert f"{size[0]}x{size[1]}" in result.output
    assert re.search(r"\d+\.\d\d s", result.output)


def test_output_option_format_and_params(cli, photo, tmp_path):
    target = tmp_path / "sub" / "mask.webp"
    result = cli(str(photo), "-o", str(target), "--operation", "remove-background",
                 "--format", "webp", "--param", "mask_only=true")
    assert result.exit_code == 0, result.output
    with Image.open(target) as out:
        assert out.format == "WEBP" and out.size == (56, 40)


def test_the_output_name_picks_the_format_unless_one_is_given(cli, photo, tmp_path):
    # -o cut.jpg wrote a PNG named .jpg.
    for name, given, expected in (("cut.jpg", [], "JPEG"), ("cut.WEBP", [], "WEBP"), ("cut.out", [], "PNG"),
                                  ("cut.jfif", [], "JPEG"), ("cut2.jpg", ["--format", "jpg"], "JPEG"),
                                  ("cut2.out", ["--format", "webp"], "WEBP")):
        result = cli(str(photo), "-o", str(tmp_path / name), "--operation", "remove-background", *given)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as out:
            assert out.format == expected, name


def test_jpeg_default_name_and_seed_param(cli, photo):
    args = [str(photo), "--operation", "remove-background", "--param", "background=white",
            "--param", "format=jpg", "--param", "seed=7"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "seed=7" in result.output
    with Image.open(photo.with_name("photo.remove-background.jpeg")) as out:
        assert out.format == "JPEG" and out.mode == "RGB"


def test_the_line_says_the_mode_the_file_holds(cli, photo, tmp_path):
    # A cut-out written as JPEG is laid on white: the line said RGBA of an RGB file.
    result = cli(str(photo), "-o", str(tmp_path / "cut.jpg"), "--operation", "remove-background")
    assert result.exit_code == 0 and " 56x40 RGB " in result.output, result.output
    with Image.open(tmp_path / "cut.jpg") as out:
        assert out.mode == "RGB"
    result = cli(str(photo), "-o", str(tmp_path / "cut.png"), "--operation", "remove-background")
    assert result.exit_code == 0 and " 56x40 RGBA " in result.output, result.output


def test_a_text_parameter_keeps_what_looks_like_a_number(cli, photo, tmp_path):
    # --param values were read as JSON first: prompt=1984 became an int and was refused.
    result = cli(str(photo), "-o", str(tmp_path / "c.png"), "--operation", "comic", *FAST["comic"],
                 "--param", "prompt=1984", "--param", "negative_prompt=null")
    assert result.exit_code == 0, result.output


def test_same_input_same_bytes(cli, photo, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for target in (a, b):
        assert cli(str(photo), "-o", str(target), "--operation", "comic", *FAST["comic"]).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--operation", "sharpen"], "UnknownOperation: unknown operation 'sharpen'"),
        (["--operation", "remove-background,sharpen"], "'sharpen'"),
        (["--operation", "upscale", "--param", "steps=0"], "InvalidParameter: parameter 'steps'"),
        (["--operation", "upscale", "--param", "colour=red"], "unknown parameter 'colour'"),
        (["--operation", "comic", "--param", "strength=2"], "parameter 'strength'"),
        (["--operation", "remove-background", "--param", "background=nocolour"], "'background'"),
        (["--operation", "upscale", "--format", "png", "--param", "format=png"], "format once"),
        # -o out.gif wrote PNG data under .gif (nothing else in the name says what it holds).
        (["--operation", "upscale", "-o", "{dir}/out.GIF"], "InvalidParameter: output 'out.GIF' names a .gif file, "
                                                      "which imagen does not write: name it .png, .webp or .jpg"),
        (["--operation", "upscale", "--param", "steps=3", "--param", "steps=4"], "'steps' is given twice"),
        (["--operation", "comic", "--param", "guidance=1e308"], "parameter 'guidance': 1e+308 is out of range"),
        # -o q.png --format webp wrote WebP data under .png.
        (["--operation", "upscale", "-o", "{dir}/out.png", "--format", "webp"],
         "InvalidParameter: output 'out.png' names a png file but the format parameter is webp: make them agree"),
    ],
)
def test_bad_input_exits_non_zero_naming_it(cli, photo, args, message):
    args = [arg.format(dir=photo.parent) for arg in args]
    result = CliRunner().invoke(main, ["run", str(photo), *args], env={"IMAGEN_DEVICE": "cpu"})
    assert result.exit_code == (2 if "given twice" in message else 1)  # 2: a usage error, as click gives
    assert message in result.output
    assert "Traceback" not in result.output
    assert not list(photo.parent.glob("photo.*.*")) and not list(photo.parent.glob("out.*"))


def test_the_operation_defaults_to_the_one_the_image_serves(tiny_cache, photo):
    # DESIGN.md's `imagen run local.png`: in an operation's image, IMAGEN_OPERATIONS names it.
    env = {"MODEL_CACHE_DIR": str(tiny_cache), "HF_HUB_OFFLINE": "1", "IMAGEN_DEVICE": "cpu"}
    result = CliRunner().invoke(main, ["run", str(photo)], env={**env, "IMAGEN_OPERATIONS": "remove-background"})
    assert result.exit_code == 0, result.output
    assert photo.with_name("photo.remove-background.png").exists()
    result = CliRunner().invoke(main, ["run", str(photo)], env={**env, "IMAGEN_OPERATIONS": ""})
    assert result.exit_code == 2 and "give --operation" in result.output


def test_a_device_or_pipe_is_refused_not_read_forever(tmp_path):
    # /dev/zero was read until memory ran out; a named pipe waited for a writer.
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for source in ("/dev/zero", str(fifo)):
        result = CliRunner().invoke(main, ["run", source, "--operation", "upscale"], env={"IMAGEN_DEVICE": "cpu"})
        assert result.exit_code == 2 and "is not a regular file" in result.output, result.output


def test_a_file_over_the_byte_limit_is_named_with_its_own_size(photo):
    # Only the limit and one byte are read: the message gave that count as the file's size.
    size = photo.stat().st_size
    result = CliRunner().invoke(main, ["run", str(photo), "--operation", "upscale"],
                                env={"IMAGEN_DEVICE": "cpu", "IMAGEN_MAX_BYTES": "1000"})
    assert result.exit_code == 1 and "ImageTooLarge" in result.output, result.output
    assert f"is {size:,} bytes; the limit (IMAGEN_MAX_BYTES) is 1,000" in result.output


def test_not_an_image(cli, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"hello, not an image")
    result = cli(str(path), "--operation", "upscale")
    assert result.exit_code == 1
    assert "ImageDecodeError" in result.output


def test_missing_models_name_the_fix(photo, tmp_path):
    env = {"MODEL_CACHE_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "IMAGEN_DEVICE": "cpu"}
    result = CliRunner().invoke(main, ["run", str(photo), "--operation", "comic"], env=env)
    assert result.exit_code == 1
    assert "imagen models pull" in result.output


def test_the_fix_for_missing_models_names_the_cache_given(photo, tmp_path):
    # `imagen models pull` alone would fill MODEL_CACHE_DIR, not the folder given.
    empty = tmp_path / "other cache"
    result = CliRunner().invoke(main, ["run", str(photo), "--operation", "comic", "--model-cache-dir", str(empty)],
                                env={"HF_HUB_OFFLINE": "1", "IMAGEN_DEVICE": "cpu"})
    assert result.exit_code == 1
    assert f"run `imagen models pull --operations comic --cache-dir '{empty}'`" in result.output


def test_the_output_is_checked_before_any_model_loads(photo, tmp_path):
    # Each was found after the models had loaded and run (minutes, on real ones); -o photo.png
    # replaced the input. The cache is empty: reaching the models would fail differently.
    env = {"MODEL_CACHE_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "IMAGEN_DEVICE": "cpu"}
    original = photo.read_bytes()
    (tmp_path / "linked.png").hardlink_to(photo)
    for same in (photo, tmp_path / "linked.png"):
        itself = CliRunner().invoke(main, ["run", str(photo), "--operation", "comic", "-o", str(same)], env=env)
        assert itself.exit_code == 2 and "is the input itself" in itself.output, itself.output
    assert photo.read_bytes() == original
    empty = CliRunner().invoke(main, ["run", str(photo), "--operation", "comic", "-o", ""], env=env)
    assert empty.exit_code == 2 and "is empty" in empty.output, empty.output
    under_a_file = CliRunner().invoke(main, ["run", str(photo), "--operation", "comic", "-o", f"{photo}/out.png"],
                                      env=env)
    assert under_a_file.exit_code == 1 and "File exists" in under_a_file.output, under_a_file.output
    assert "models pull" not in itself.output + under_a_file.output


@pytest.mark.parametrize("folder", ["new/", "existing"])
def test_an_output_folder_gets_the_default_name(cli, photo, tmp_path, folder):
    (tmp_path / "existing").mkdir()
    given = str(tmp_path / folder) + ("/" if folder.endswith("/") else "")  # Path() would drop the slash
    result = cli(str(photo), "--operation", "remove-background", "-o", given)
    assert result.exit_code == 0, result.output
    assert (tmp_path / folder.rstrip("/") / "photo.remove-background.png").is_file()
