"""Tiny models through the production loader, offline: the path the real models take."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from handlers.cli import models as models_cli
from handlers.settings import Settings
from image.errors import ModelError, ModelMissing
from image.models import loading, store
from image.models.loading import load_model
from image.models.lock import Lock
from image.models.registry import REGISTRY
from image.models.tiny import build_tiny, fake_commit

pytestmark = pytest.mark.models

CPU = torch.device("cpu")


def _load(operation, cache, **kwargs):
    return load_model(REGISTRY[operation], cache, device=CPU, dtype=torch.float32, allow_download=False, **kwargs)


# --- the files on disk ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda spec: spec.operation)
def test_tiny_snapshot_has_the_real_layout(tiny_cache, spec):
    repo = tiny_cache / spec.cache_name
    commit = (repo / "refs" / "main").read_text()
    snapshot = repo / "snapshots" / commit
    assert commit == (Lock.packaged().revision(spec.repo_id) or fake_commit(spec))
    marker = json.loads((snapshot / store.TINY_MARKER).read_text())
    assert marker["tiny"] is True
    present = set(store.snapshot_files(snapshot)) - {store.TINY_MARKER}
    # Exactly the files imagen fetches from the real repo, under the same names: no
    # tokenizer.json, no pickles, nothing the production loader would not see.
    assert present == set(spec.files), sorted(present ^ set(spec.files))
    assert all((snapshot / name).is_symlink() for name in present), "snapshot files link into blobs/"


def test_fp16_variant_files_hold_fp16_weights(tiny_cache):
    snapshot = tiny_cache / REGISTRY["enhance"].cache_name / "snapshots"
    (weights,) = snapshot.glob("*/unet/diffusion_pytorch_model.fp16.safetensors")
    with safe_open(weights, "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float16}


def test_model_index_mirrors_the_real_repos(tiny_cache):
    def index(operation):
        snapshot = store.resolve_snapshot(REGISTRY[operation], tiny_cache, lock=Lock.packaged())
        return json.loads((snapshot / "model_index.json").read_text())

    assert index("enhance")["text_encoder"] == [None, None]
    assert index("enhance")["requires_aesthetics_score"] is True
    assert index("upscale")["max_noise_level"] == 350
    assert index("comic")["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert {index(op)["tokenizer" if op != "enhance" else "tokenizer_2"][1] for op in ("upscale", "enhance", "comic")} == {
        "CLIPTokenizer"
    }


def test_tiny_tokenizer_knows_the_trigger_words(tiny_cache):
    from transformers import CLIPTokenizer

    snapshot = store.resolve_snapshot(REGISTRY["comic"], tiny_cache, lock=Lock.packaged())
    tokenizer = CLIPTokenizer.from_pretrained(snapshot / "tokenizer")
    assert tokenizer.model_max_length == 77
    ids = tokenizer("Ghibli style").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "ghibli</w>", "style</w>", "<|endoftext|>"]
    assert len(tokenizer("ünïcode 日本 ✓").input_ids) > 2  # any text tokenizes (byte level)


def test_build_is_deterministic(tmp_path):
    specs = [REGISTRY["comic"], REGISTRY["remove-background"]]
    build_tiny(specs, tmp_path / "a", lock=Lock())
    build_tiny(specs, tmp_path / "b", lock=Lock())
    for spec in specs:
        blobs = lambda root: sorted(p.name for p in (root / spec.cache_name / "blobs").iterdir())  # noqa: E731
        assert blobs(tmp_path / "a") == blobs(tmp_path / "b")


def test_build_uses_the_locked_commit_and_never_replaces_a_real_model(tmp_path):
    spec = REGISTRY["remove-background"]
    lock = Lock().recorded(spec.repo_id, "b" * 40, {"model.safetensors": 1})
    assert build_tiny([spec], tmp_path, lock=lock) == {spec.repo_id: "b" * 40}
    # The real model's commit, and marked: its outputs and compile artefacts are not the real one's.
    assert _load("remove-background", tmp_path, lock=lock).model_id == f"{spec.repo_id}@{'b' * 40}+tiny"
    assert build_tiny([spec], tmp_path, lock=lock)  # rebuilding a tiny model is fine

    (tmp_path / spec.cache_name / "snapshots" / ("b" * 40) / store.TINY_MARKER).unlink()
    with pytest.raises(ModelError, match="holds the real briaai/RMBG-1.4"):
        build_tiny([spec], tmp_path, lock=lock)
    # Nothing locked: the real model the cache's refs/main runs (a first-use download) stays too.
    assert (tmp_path / spec.cache_name / "refs" / "main").read_text() == "b" * 40
    with pytest.raises(ModelError, match="holds the real briaai/RMBG-1.4"):
        build_tiny([spec], tmp_path, lock=Lock())


def test_loading_reads_no_file_whose_size_is_recorded(tiny_cache, monkeypatch):
    """The start-up's check is on the cold start's path: it compares recorded sizes and leaves
    reading the files' formats (tokenizers, headers: megabytes of JSON) to `imagen models
    verify`, which a damaged file's load error names."""
    read = []
    content_problem = store.content_problem
    monkeypatch.setattr(store, "content_problem",
                        lambda path, size: read.append(path.name) or content_problem(path, size))
    _load("comic", tiny_cache)
    assert set(read) <= {store.TINY_MARKER}  # the marker itself: no size recorded for it
    read.clear()
    assert store.verify([REGISTRY["comic"]], tiny_cache, Lock.packaged()) == []
    assert len(read) > 10  # verify reads them all


def test_a_real_model_anywhere_stops_the_build_before_any_tiny_one(tmp_path):
    """The refusal came at the real model's turn, after the operations before it were built
    into the real cache: a worker on it served noise for those."""
    specs = [REGISTRY["comic"], REGISTRY["remove-background"]]
    build_tiny([REGISTRY["remove-background"]], tmp_path, lock=Lock())
    real = tmp_path / REGISTRY["remove-background"].cache_name / "snapshots"
    (next(real.iterdir()) / store.TINY_MARKER).unlink()  # the real one, as far as anyone can tell
    with pytest.raises(ModelError, match="holds the real briaai/RMBG-1.4"):
        build_tiny(specs, tmp_path, lock=Lock())
    assert not (tmp_path / REGISTRY["comic"].cache_name).exists()


def test_a_local_stack_uses_complete_models_or_builds_tiny_ones(tiny_cache, tmp_path, capsys):
    """`make demo` and `make dev` on a fresh checkout: no models anywhere, so tiny ones are
    built once (and said so); complete models in MODEL_CACHE_DIR are used as they are."""
    from handlers.localstack import choose_models

    assert choose_models(tiny_cache, tmp_path / "unused") == (tiny_cache, True)
    assert not (tmp_path / "unused").exists()
    assert choose_models(tmp_path / "empty", tmp_path / "tiny") == (tmp_path / "tiny", True)
    assert "building tiny ones" in capsys.readouterr().out
    assert choose_models(tmp_path / "empty", tmp_path / "tiny") == (tmp_path / "tiny", True)
    assert "building" not in capsys.readouterr().out  # built once


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", list(REGISTRY))
def test_load_each_model_offline(tiny_cache, offline, operation):
    loaded = _load(operation, tiny_cache)
    spec = REGISTRY[operation]
    assert re.fullmatch(re.escape(spec.repo_id) + r"@[0-9a-f]{40}\+tiny", loaded.model_id)
    assert loaded.model_id.endswith("@" + loaded.revision + "+tiny")
    assert loaded.tiny is True and loaded.seconds > 0
    if spec.loader == "diffusers":
        assert type(loaded.model).__name__ == spec.pipeline
        assert loaded.model.unet.dtype == torch.float32  # fp16 files, loaded in the dtype asked for
        assert all(loaded.model.components.get(name) is None for name in spec.disabled)


def test_rmbg_comes_from_the_snapshot_code_and_keeps_its_contract(tiny_cache, offline):
    model = _load("remove-background", tiny_cache).model
    assert type(model).__module__.startswith("transformers_modules."), "loaded as remote code, not our package"
    assert not model.training
    with torch.no_grad():
        mask = model(torch.randn(1, 3, 1024, 1024))[0][0]
    assert mask.shape == (1, 1, 1024, 1024)
    assert 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0


def test_a_remove_background_start_does_not_import_diffusers(tiny_cache, offline):
    # Importing it is part of a cold start (0.3-0.7 s on a 2-core machine) that RMBG never uses.
    code = (
        "import sys; from pathlib import Path; from image.engine import Engine\n"
        f"Engine(['remove-background'], Path({str(tiny_cache)!r}), device='cpu').setup()\n"
        "print('diffusers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("operation", ["upscale", "enhance", "comic"])
def test_tiny_pipelines_run(tiny_cache, offline, operation):
    """The tiny configs satisfy each pipeline's own checks (channels, time ids, scales)."""
    pipe = _load(operation, tiny_cache).model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "pil"}
    if operation != "upscale":
        kwargs["strength"] = 0.5 if operation == "comic" else 1.0
    output = pipe(prompt="ghibli style", image=image, **kwargs).images[0]
    assert output.size == ((256, 256) if operation == "upscale" else (64, 64))


def test_missing_model_is_a_clear_error(tmp_path, offline):
    with pytest.raises(ModelMissing) as caught:
        _load("comic", tmp_path)
    assert "imagen models pull --operations comic" in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_incomplete_model_is_a_clear_error_not_a_library_trace(copy_cache, offline):
    snapshot = store.resolve_snapshot(REGISTRY["upscale"], copy_cache, lock=Lock.packaged())
    shutil.rmtree(snapshot / "text_encoder")
    fix = "imagen models pull --tiny --operations upscale"  # a tiny model is built again, not downloaded
    with pytest.raises(ModelMissing, match=f"component text_encoder has no config.json.*{fix}"):
        _load("upscale", copy_cache)


def test_tiny_weights_are_readable_by_every_user(tiny_cache):
    # A container copies the cache in as root and runs as another user; safetensors writes 0600.
    blobs = [path for path in tiny_cache.glob("models--*/blobs/*")]
    assert blobs and all(path.stat().st_mode & 0o444 == 0o444 for path in blobs)


def test_pull_tiny_repairs_a_damaged_tiny_model(copy_cache, offline):
    spec, lock = REGISTRY["remove-background"], Lock.packaged()
    weights = store.resolve_snapshot(spec, copy_cache, lock=lock) / "model.safetensors"
    os.truncate(weights.resolve(), 20_000)
    assert store.spec_problems(spec, copy_cache, lock)
    build_tiny([spec], copy_cache, lock=lock)  # what `imagen models pull --tiny` runs
    assert store.spec_problems(spec, copy_cache, lock) == []


def _as_downloaded(cache, operation):
    """The tiny snapshot as an unpinned download leaves a model: no marker (and no lock) to
    give the files' sizes."""
    spec = REGISTRY[operation]
    snapshot = store.resolve_snapshot(spec, cache, lock=Lock())
    (snapshot / store.TINY_MARKER).unlink()
    assert store.spec_problems(spec, cache, Lock()) == []
    return spec, snapshot


def test_a_repo_without_fp16_files_loads_from_the_fallbacks_it_was_pulled_with(copy_cache, offline):
    """The registry falls back per file where a repo has no fp16 variant; with none at all
    (an older pinned commit, a fork), pull and verify said complete but every load failed:
    diffusers refuses a variant no file has, and its error pointed back to verify."""
    spec, snapshot = _as_downloaded(copy_cache, "enhance")
    for weights in list(snapshot.rglob("*.fp16.safetensors")):
        weights.rename(weights.with_name(weights.name.replace(".fp16.", ".")))
    assert not list(snapshot.rglob("*.fp16.*"))
    loaded = load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())
    assert type(loaded.model).__name__ == spec.pipeline


def test_verify_finds_a_cut_download_and_missing_files_without_a_lock(copy_cache, offline):
    spec, snapshot = _as_downloaded(copy_cache, "comic")
    weights = (snapshot / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    os.truncate(weights, weights.stat().st_size - 1000)
    (snapshot / "tokenizer" / "tokenizer_config.json").unlink()  # the pipeline fails far from here without it
    problems = store.spec_problems(spec, copy_cache, Lock())
    assert any("unet/diffusion_pytorch_model.safetensors is" in p and "cut short" in p for p in problems), problems
    assert any(p.endswith("tokenizer/tokenizer_config.json is missing") for p in problems), problems
    with pytest.raises(ModelMissing, match="cut short"):
        load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())


def test_a_damaged_safetensors_header_is_a_model_error(copy_cache, offline, monkeypatch):
    spec, snapshot = _as_downloaded(copy_cache, "remove-background")
    weights = (snapshot / "model.safetensors").resolve()
    with weights.open("r+b") as handle:
        handle.write(b"\xff" * 8)  # a header length past the file's end
    assert any("is not a safetensors file" in p for p in store.spec_problems(spec, copy_cache, Lock()))
    monkeypatch.setattr(store, "spec_problems", lambda *args, **kwargs: [])  # past verify, the loader says it too
    with pytest.raises(ModelError, match="imagen models verify"):
        load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())


@pytest.mark.parametrize("ref", ["", "not a commit\n", "../../.."])
def test_a_damaged_ref_is_a_missing_model_not_missing_files(copy_cache, offline, ref):
    # An empty refs/main made the snapshots/ folder itself the snapshot: "briarmbg.py is
    # missing" for every file, all of them present.
    spec, snapshot = _as_downloaded(copy_cache, "remove-background")
    (store.repo_dir(spec, copy_cache) / "refs" / spec.revision).write_text(ref)
    problems = store.spec_problems(spec, copy_cache, Lock())
    assert len(problems) == 1 and "is not in the model cache" in problems[0], problems
    with pytest.raises(ModelMissing, match="imagen models pull --operations remove-background"):
        load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())


def test_a_tokenizer_file_cut_mid_line_is_a_model_error(copy_cache, offline):
    """verify cannot tell a cut merges.txt (plain text, no size pinned); the tokenizers library
    then raises a plain Exception, which must still be the one-line start-up error."""
    spec, snapshot = _as_downloaded(copy_cache, "comic")
    merges = (snapshot / "tokenizer" / "merges.txt").resolve()
    merges.write_text("#version: 0.2\ng h\ngh")  # cut inside its second merge
    with pytest.raises(ModelError, match=r"loading .* failed: Exception: .*; check it with `imagen models verify`"):
        load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())


def test_rmbg_imports_only_its_snapshot_code(copy_cache, offline):
    """config.json's auto_map may name code of another repository ("org/repo--module.Class"),
    which transformers would import from that repository's cache: the loader takes only a
    module file of the snapshot itself."""
    spec, snapshot = _as_downloaded(copy_cache, "remove-background")
    config_path = (snapshot / "config.json").resolve()
    config = json.loads(config_path.read_text())
    config["auto_map"]["AutoModelForImageSegmentation"] = "evil/repo--briarmbg.BriaRMBG"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="auto_map.AutoModelForImageSegmentation is 'evil/repo--briarmbg.BriaRMBG', "
                                         "not a class of the snapshot's own code"):
        load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())


def test_loading_lets_what_is_no_model_fault_through(copy_cache, offline, monkeypatch):
    # Out of host or GPU memory, a failed GPU, or a bug: not "check it with imagen models
    # verify", which would pass.
    spec, _ = _as_downloaded(copy_cache, "remove-background")
    for error in (MemoryError(), NameError("name 'x' is not defined"), torch.OutOfMemoryError("CUDA out of memory"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setitem(loading._LOADERS, spec.loader, fail)
        with pytest.raises(type(error)):
            load_model(spec, copy_cache, device=CPU, dtype=torch.float32, allow_download=False, lock=Lock())


def test_missing_model_is_pulled_when_downloads_are_allowed(tmp_path, monkeypatch):
    """The zero-config path: a missing model is fetched first, then loaded from disk."""
    spec = REGISTRY["remove-background"]
    fetched = []

    def fake_fetch(spec_, cache_dir, *, lock, token=None, progress=True):
        fetched.append(spec_.repo_id)
        build_tiny([spec_], cache_dir, lock=lock)  # what a download would leave behind

    monkeypatch.setattr(store, "fetch", fake_fetch)
    loaded = load_model(spec, tmp_path, device=CPU, dtype=torch.float32, allow_download=True, lock=Lock())
    assert fetched == [spec.repo_id] and loaded.tiny


# --- CLI -----------------------------------------------------------------------------------


def test_cli_pull_tiny_then_verify(tmp_path, offline):
    settings = Settings(model_cache_dir=tmp_path)
    runner = CliRunner()
    before = runner.invoke(models_cli.command, ["verify", "--operations", "remove-background"], obj=settings)
    assert before.exit_code == 1
    assert "model briaai/RMBG-1.4 is not in the model cache" in before.output  # which, and the fix
    assert "run `imagen models pull --operations remove-background`" in before.output
    # With --cache-dir, the fix names it too: without, the pull would fill MODEL_CACHE_DIR instead.
    other = runner.invoke(models_cli.command, ["verify", "--operations", "remove-background",
                                               "--cache-dir", str(tmp_path / "other dir")], obj=settings)
    assert other.exit_code == 1 and (f"fix: run `imagen models pull --operations remove-background --cache-dir "
                                     f"'{tmp_path / 'other dir'}'`") in other.output
    # And --lock: pulled at the packaged lock's commits, the cache would still fail this verify.
    lock = tmp_path / "my lock.json"
    lock.write_text(json.dumps({"briaai/RMBG-1.4": {"revision": "1" * 40, "files": {}}}))
    locked = runner.invoke(models_cli.command, ["verify", "--operations", "remove-background", "--lock", str(lock)],
                           obj=settings)
    assert locked.exit_code == 1 and f"remove-background --lock '{lock}'`" in locked.output
    # each model's own line too (the one a log shows when a worker cannot load it)
    [line] = [line for line in locked.output.splitlines() if "is not in the model cache" in line]
    assert line.endswith(f"run `imagen models pull --operations remove-background --cache-dir {tmp_path} "
                         f"--lock '{lock}'`")
    pulled = runner.invoke(models_cli.command, ["pull", "--tiny", "--operations", "remove-background"], obj=settings)
    assert pulled.exit_code == 0, pulled.output
    assert "built tiny briaai/RMBG-1.4@" in pulled.output
    after = runner.invoke(models_cli.command, ["verify", "--operations", "remove-background"], obj=settings)
    assert after.exit_code == 0, after.output


def test_a_file_system_refusal_is_one_line_not_a_traceback(tmp_path, offline):
    from handlers.cli import main

    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(main, ["models", "pull", "--tiny", "--operations", "remove-background",
                                       "--cache-dir", str(tmp_path / "a-file" / "cache")])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError)
    cache = tmp_path / "a-file" / "cache"
    assert result.output.strip().splitlines() == [f"imagen: [Errno 20] Not a directory: '{cache}'"]
