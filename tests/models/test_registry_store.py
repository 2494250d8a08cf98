"""Registry, lock and local store: what is fetched, what is pinned, what counts as complete."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from handlers.cli import models as models_cli
from handlers.settings import Settings
from handlers.errors import ConfigError
from image.errors import ModelError, ModelMissing, UnknownOperation
from image.models import store
from image.models.lock import Lock, packaged_lock_path
from image.models.registry import REGISTRY, specs_for
from image.operations import OPERATION_NAMES

pytestmark = pytest.mark.models

ALL = list(REGISTRY.values())
# The smallest whole safetensors file: an 8-byte header length and a header of no tensors (10
# bytes; verify reads every weight file's header).
EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"


# --- registry ------------------------------------------------------------------------------


def test_registry_covers_every_operation_under_its_own_name():
    assert tuple(REGISTRY) == OPERATION_NAMES
    assert all(spec.operation == name for name, spec in REGISTRY.items())


@pytest.mark.parametrize("spec", ALL, ids=lambda spec: spec.operation)
def test_specs_fetch_only_safetensors_and_small_files(spec):
    for pattern in spec.files:
        assert not pattern.endswith((".ckpt", ".bin", ".onnx", ".pth")), pattern
        assert "*" not in pattern, f"{pattern}: name files, so nothing unexpected is fetched"
    for preferred, alternatives in spec.fallbacks.items():
        assert preferred in spec.files and alternatives


def test_fp16_variants_where_the_repos_have_them():
    assert REGISTRY["upscale"].variant == REGISTRY["enhance"].variant == "fp16"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in REGISTRY["upscale"].files
    assert "text_encoder_2/model.fp16.safetensors" in REGISTRY["enhance"].files
    assert REGISTRY["comic"].variant is None


def test_refiner_fetches_only_its_second_text_encoder():
    files = REGISTRY["enhance"].files
    assert not [f for f in files if f.startswith(("text_encoder/", "tokenizer/"))]
    assert "tokenizer_2/vocab.json" in files and "tokenizer_2/merges.txt" in files


def test_comic_leaves_out_the_safety_checker():
    spec = REGISTRY["comic"]
    assert {"safety_checker", "feature_extractor"} <= set(spec.disabled)
    assert not [f for f in spec.files if f.startswith(("safety_checker/", "feature_extractor/"))]


def test_rmbg_fetches_its_code_config_and_safetensors():
    spec = REGISTRY["remove-background"]
    assert set(spec.files) == {"briarmbg.py", "MyConfig.py", "config.json", "model.safetensors"}
    assert spec.loader == "rmbg"


def test_specs_for_unknown_operation_names_it():
    with pytest.raises(UnknownOperation, match="sharpen"):
        specs_for(["upscale", "sharpen"])
    assert [s.operation for s in specs_for(["comic", "comic", "upscale"])] == ["comic", "upscale"]


def test_select_files_prefers_the_spec_and_falls_back_per_file(caplog):
    spec = REGISTRY["upscale"]
    repo = [
        "model_index.json", "x4-upscaler-ema.ckpt", "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
        "text_encoder/config.json", "text_encoder/pytorch_model.bin",
    ]
    with caplog.at_level(logging.WARNING, logger="imagen.models"):
        chosen = store.select_files(spec, repo)
    assert chosen == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/pytorch_model.bin",
    ])
    assert "has no vae/diffusion_pytorch_model.fp16.safetensors" in caplog.text


# --- lock ----------------------------------------------------------------------------------


def test_packaged_lock_is_valid():
    lock = Lock.read(packaged_lock_path())
    for repo, entry in lock.entries.items():
        assert repo in {spec.repo_id for spec in ALL}
        assert len(entry.revision) == 40 and entry.files


def test_lock_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "models.lock.json"
    assert Lock.read(path).entries == {}
    lock = Lock().recorded("org/name", "a" * 40, {"b.json": 2, "a.json": 1})
    lock.write(path)
    again = Lock.read(path)
    assert again.revision("org/name") == "a" * 40
    assert dict(again.files("org/name")) == {"a.json": 1, "b.json": 2}
    assert again.revision("other/repo") is None
    assert list(json.loads(path.read_text())["org/name"]["files"]) == ["a.json", "b.json"]


@pytest.mark.parametrize("entry", [
    {"revision": "abc"},  # no files
    {"revision": None, "files": {}},  # read as the commit "None"
    {"revision": "../../../elsewhere", "files": {}},  # a snapshot path is built from it
    {"revision": "main", "files": {}},  # a lock holds commits, not branches
])
def test_malformed_lock_is_a_clear_error(tmp_path, entry):
    path = tmp_path / "lock.json"
    path.write_text(json.dumps({"org/name": entry}))
    with pytest.raises(ModelError, match="malformed"):
        Lock.read(path)


# --- pull (the Hub replaced by a stand-in: no network here) --------------------------------


class FakeHub:
    """Stands in for `snapshot_download`: serves one commit of a repo from memory."""

    def __init__(self, files: dict[str, bytes], commit: str = "c" * 40):
        self.files, self.commit, self.calls = files, commit, []

    def __call__(self, repo_id, *, revision, cache_dir, token=None, allow_patterns=None, dry_run=False, **_):
        import fnmatch

        self.calls.append({"revision": revision, "dry_run": dry_run, "token": token})
        names = [n for n in self.files if any(fnmatch.fnmatch(n, p) for p in allow_patterns)]
        if dry_run:
            return [SimpleNamespace(commit_hash=self.commit, filename=n, file_size=len(self.files[n])) for n in names]
        snapshot = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / self.commit
        for name in names:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(self.files[name])
        return str(snapshot)


def test_pull_records_the_commit_and_sizes_then_reuses_the_lock(tmp_path, monkeypatch):
    spec = REGISTRY["remove-background"]
    hub = FakeHub({"briarmbg.py": b"code", "MyConfig.py": b"cfg", "config.json": b"{}",
                   "model.safetensors": EMPTY_SAFETENSORS,
                   "model.pth": b"not this", "onnx/model.onnx": b"nor this"})
    monkeypatch.setattr(store, "snapshot_download", hub)
    lock_path = tmp_path / "lock.json"
    cache = tmp_path / "cache"

    assert store.pull([spec], cache, lock_path=lock_path, token="hf_x", progress=False) == {spec.repo_id: hub.commit}

    lock = Lock.read(lock_path)
    assert lock.revision(spec.repo_id) == hub.commit
    assert dict(lock.files(spec.repo_id)) == {"briarmbg.py": 4, "MyConfig.py": 3, "config.json": 2, "model.safetensors": 10}
    assert (cache / spec.cache_name / "refs" / "main").read_text() == hub.commit
    assert [c["revision"] for c in hub.calls] == ["main", hub.commit]
    assert hub.calls[0]["token"] == "hf_x"

    hub.calls.clear()
    store.pull([spec], cache, lock_path=lock_path, progress=False)
    assert hub.calls[0]["revision"] == hub.commit, "a locked repo is pulled at its locked commit"


def test_a_pull_keeps_what_another_pull_recorded_meanwhile(tmp_path, monkeypatch):
    # Two `imagen models pull` at once into one lock: each read it before its download (minutes)
    # and wrote it back after, dropping the other's model.
    spec = REGISTRY["remove-background"]
    hub = FakeHub({name: b"x" for name in spec.files})
    lock_path = tmp_path / "lock.json"

    def download_while_another_pull_records(*args, **kwargs):
        if not kwargs.get("dry_run"):
            Lock.read(lock_path).recorded("other/model", "d" * 40, {"weights": 1}).write(lock_path)
        return hub(*args, **kwargs)

    monkeypatch.setattr(store, "snapshot_download", download_while_another_pull_records)
    store.pull([spec], tmp_path / "cache", lock_path=lock_path, progress=False)
    lock = Lock.read(lock_path)
    assert lock.revision(spec.repo_id) == hub.commit and lock.revision("other/model") == "d" * 40


def test_pull_into_a_volume_with_a_lock_it_cannot_write(tmp_path, monkeypatch, caplog):
    """The GKE model-pull Job runs read-only: the image's lock cannot take the commits. Each
    model is still pulled (not only the first), and the loader finds it by the cache's ref."""
    specs = [REGISTRY["remove-background"], REGISTRY["upscale"]]
    hub = FakeHub({name: b"x" for spec in specs for name in spec.files} | {"model_index.json": b"{}"})
    monkeypatch.setattr(store, "snapshot_download", hub)
    read_only = tmp_path / "site-packages" / "image"
    read_only.mkdir(parents=True)
    lock_path = read_only / "models.lock.json"
    lock_path.write_text("{}")

    def refuse(self, path):
        raise OSError(30, "Read-only file system", str(path))  # EROFS, as the container's root

    monkeypatch.setattr(Lock, "write", refuse)
    cache = tmp_path / "models"
    assert store.pull(specs, cache, lock_path=lock_path, progress=False) == {s.repo_id: hub.commit for s in specs}
    assert lock_path.read_text() == "{}"
    assert sum("not recorded in the model lock" in r.getMessage() for r in caplog.records) == 2
    for spec in specs:
        assert store.find_snapshot(spec, cache, Lock.read(lock_path)) == (hub.commit, cache / spec.cache_name / "snapshots" / hub.commit)
    # A lock that already holds the commits (a pinned image's) is not written at all.
    monkeypatch.undo()
    monkeypatch.setattr(store, "snapshot_download", hub)
    pinned = tmp_path / "pinned.json"
    store.pull(specs, cache, lock_path=pinned, progress=False)
    monkeypatch.setattr(Lock, "write", lambda self, path: pytest.fail("rewrote an unchanged lock"))
    store.pull(specs, tmp_path / "again", lock_path=pinned, progress=False)


def test_pull_fetches_again_what_verify_finds_damaged(tmp_path, monkeypatch):
    """verify names `imagen models pull` as the fix for a file cut short, but the Hub keeps a
    file whose link exists, whatever its size: the pull repaired nothing, and verify named it
    again. (The stand-in keeps existing files, as the Hub does.)"""
    spec = REGISTRY["remove-background"]
    files = {"briarmbg.py": b"code = 1\n", "MyConfig.py": b"cfg = 2\n", "config.json": b"{}",
             "model.safetensors": EMPTY_SAFETENSORS}

    class KeepingHub(FakeHub):
        def __call__(self, repo_id, *, revision, cache_dir, allow_patterns=None, dry_run=False, **kwargs):
            if not dry_run:
                snapshot = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / self.commit
                kept = {n: (snapshot / n).read_bytes() for n in self.files if (snapshot / n).exists()}
                folder = super().__call__(repo_id, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=allow_patterns, dry_run=False, **kwargs)
                for name, data in kept.items():
                    (snapshot / name).write_bytes(data)
                return folder
            return super().__call__(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                                    dry_run=True, **kwargs)

    monkeypatch.setattr(store, "snapshot_download", KeepingHub(files))
    lock_path, cache = tmp_path / "lock.json", tmp_path / "cache"
    store.pull([spec], cache, lock_path=lock_path, progress=False)
    snapshot = store.resolve_snapshot(spec, cache, lock=Lock.read(lock_path))
    (snapshot / "model.safetensors").write_bytes(b"w" * 4)  # cut short
    (snapshot / "config.json").write_bytes(b"")  # emptied
    assert len(store.verify([spec], cache, Lock.read(lock_path))) == 2
    store.pull([spec], cache, lock_path=lock_path, progress=False)
    assert store.verify([spec], cache, Lock.read(lock_path)) == []
    assert (snapshot / "model.safetensors").read_bytes() == EMPTY_SAFETENSORS and (snapshot / "briarmbg.py").exists()


class BlobHub(FakeHub):
    """The Hub's cache as it is: blobs named by their content's etag, the snapshot's files
    links to them; a blob already there is linked, not fetched, whatever its size."""

    def __call__(self, repo_id, *, revision, cache_dir, allow_patterns=None, dry_run=False, **kwargs):
        if dry_run:
            return super().__call__(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                                    dry_run=True, **kwargs)
        import hashlib
        import os

        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / self.commit
        for name in allow_patterns:
            link = snapshot / name
            if link.exists() or link.is_symlink():
                continue
            blob = repo / "blobs" / hashlib.sha256(self.files[name]).hexdigest()
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(self.files[name])
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return str(snapshot)


def test_a_pull_after_the_branch_moved_on_fetches_again_the_blobs_verify_found_damaged(tmp_path, monkeypatch):
    # Nothing pinned: verify looks at refs/main's commit A; by the time of the pull, main is
    # commit B with the same files, which the Hub links to A's blobs, the cut one included.
    import torch
    from safetensors.torch import save

    spec = REGISTRY["remove-background"]
    weights_bytes = save({"w": torch.zeros(16)})
    files = {"briarmbg.py": b"code = 1\n", "MyConfig.py": b"cfg = 2\n", "config.json": b"{}",
             "model.safetensors": weights_bytes}
    cache = tmp_path / "cache"
    monkeypatch.setattr(store, "snapshot_download", BlobHub(files, commit="a" * 40))
    store.pull([spec], cache, lock_path=tmp_path / "lock-a.json", progress=False)
    weights = cache / spec.cache_name / "snapshots" / ("a" * 40) / "model.safetensors"
    os.truncate(weights.resolve(), len(weights_bytes) - 8)
    assert store.verify([spec], cache, Lock())  # what a user runs: no lock pins the sizes
    monkeypatch.setattr(store, "snapshot_download", BlobHub(files, commit="b" * 40))
    store.pull([spec], cache, lock_path=tmp_path / "lock-b.json", progress=False)
    assert store.verify([spec], cache, Lock()) == []
    assert (cache / spec.cache_name / "snapshots" / ("b" * 40) / "model.safetensors").read_bytes() == weights_bytes


def test_pull_replaces_a_tiny_model_at_the_same_commit(tmp_path, monkeypatch):
    from image.models.tiny import build_tiny

    spec = REGISTRY["remove-background"]
    hub = FakeHub({name: b"real " + name.encode() for name in spec.files})
    lock_path = tmp_path / "lock.json"
    Lock().recorded(spec.repo_id, hub.commit, {}).write(lock_path)
    build_tiny([spec], tmp_path, lock=Lock.read(lock_path))
    monkeypatch.setattr(store, "snapshot_download", hub)

    store.pull([spec], tmp_path, lock_path=lock_path, progress=False)

    snapshot = store.resolve_snapshot(spec, tmp_path, lock=Lock.read(lock_path))
    assert not store.is_tiny(snapshot)
    assert (snapshot / "model.safetensors").read_bytes() == b"real model.safetensors"


def test_pull_failure_is_one_readable_line(tmp_path, monkeypatch):
    def gated(*args, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url\nmore detail")

    monkeypatch.setattr(store, "snapshot_download", gated)
    with pytest.raises(ModelError) as caught:
        store.pull([REGISTRY["enhance"]], tmp_path, lock_path=tmp_path / "lock.json", progress=False)
    assert "401 Client Error" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_network_failure_the_hub_lets_through_is_one_readable_line_too(tmp_path, monkeypatch):
    # huggingface_hub re-raises its HTTP client's timeouts and connection errors, which are
    # not OSErrors: they escaped as themselves, naming neither the model nor the fix.
    class ReadTimeout(Exception):
        pass

    def times_out(*args, **kwargs):
        raise ReadTimeout("The read operation timed out")

    monkeypatch.setattr(store, "snapshot_download", times_out)
    with pytest.raises(ModelError, match="stable-diffusion-xl-refiner-1.0.*ReadTimeout: The read operation timed out"):
        store.pull([REGISTRY["enhance"]], tmp_path, lock_path=tmp_path / "lock.json", progress=False)


# --- resolve and verify --------------------------------------------------------------------


def test_resolve_on_an_empty_cache_names_the_fix(tmp_path):
    with pytest.raises(ModelMissing) as caught:
        store.resolve_snapshot(REGISTRY["comic"], tmp_path, lock=Lock())
    message = str(caught.value)
    assert "nitrosocke/Ghibli-Diffusion" in message
    assert "imagen models pull --operations comic" in message and "MODEL_CACHE_DIR" in message


def test_verify_on_an_empty_cache_fails_for_every_model(tmp_path):
    problems = store.verify(ALL, tmp_path, Lock())
    assert len(problems) == 4
    assert all("imagen models pull --operations" in problem for problem in problems)


def test_verify_passes_on_tiny_models(tiny_cache):
    assert store.verify(ALL, tiny_cache, Lock.packaged()) == []


def test_resolve_follows_the_lock_not_the_branch(copy_cache):
    spec = REGISTRY["remove-background"]
    built = store.resolve_snapshot(spec, copy_cache, lock=Lock.packaged())
    pinned = Lock().recorded(spec.repo_id, "f" * 40, {})
    with pytest.raises(ModelMissing, match="@" + "f" * 40):
        store.resolve_snapshot(spec, copy_cache, lock=pinned)
    relocked = Lock().recorded(spec.repo_id, built.name, {})
    assert store.resolve_snapshot(spec, copy_cache, lock=relocked) == built


def _snapshot(cache: Path, operation: str) -> Path:
    return store.resolve_snapshot(REGISTRY[operation], cache, lock=Lock.packaged())


def test_verify_detects_a_deleted_weight_file(copy_cache):
    (_snapshot(copy_cache, "enhance") / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    problems = store.verify(ALL, copy_cache, Lock.packaged())
    assert any("component unet has no *.safetensors or *.bin" in p for p in problems)
    assert all(p.startswith("enhance: stabilityai/stable-diffusion-xl-refiner-1.0@") for p in problems)


def test_verify_detects_a_missing_tokenizer_file(copy_cache):
    (_snapshot(copy_cache, "comic") / "tokenizer" / "merges.txt").unlink()
    assert any("component tokenizer has no tokenizer.json or merges.txt" in p
               for p in store.verify(ALL, copy_cache, Lock.packaged()))


def test_verify_detects_missing_model_index_and_rmbg_code(copy_cache):
    (_snapshot(copy_cache, "upscale") / "model_index.json").unlink()
    (_snapshot(copy_cache, "remove-background") / "briarmbg.py").unlink()
    problems = store.verify(ALL, copy_cache, Lock.packaged())
    assert any(p.startswith("upscale:") and "model_index.json is missing" in p for p in problems)
    assert any(p.startswith("remove-background:") and "briarmbg.py is missing" in p for p in problems)


def test_verify_detects_empty_files_and_broken_links(copy_cache):
    snapshot = _snapshot(copy_cache, "comic")
    (snapshot / "vae" / "config.json").resolve().write_bytes(b"")
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").resolve().unlink()
    problems = " | ".join(store.verify(ALL, copy_cache, Lock.packaged()))
    assert "vae/config.json is empty" in problems
    assert "unet/diffusion_pytorch_model.safetensors is a broken link" in problems


def test_verify_compares_sizes_with_the_lock(copy_cache):
    """A real (not tiny) snapshot is checked against the sizes its lock entry records."""
    spec = REGISTRY["remove-background"]
    snapshot = _snapshot(copy_cache, "remove-background")
    (snapshot / store.TINY_MARKER).unlink()
    lock = Lock().recorded(spec.repo_id, snapshot.name, store.snapshot_files(snapshot))
    assert store.verify([spec], copy_cache, lock) == []

    weights = (snapshot / "model.safetensors").resolve()
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    assert store.verify([spec], copy_cache, lock) == [
        f"remove-background: briaai/RMBG-1.4@{snapshot.name}: "
        f"model.safetensors is {size // 2} bytes, the lock says {size}"
    ]


def test_verify_detects_truncation_of_a_tiny_model_too(copy_cache):
    weights = (_snapshot(copy_cache, "upscale") / "vae" / "diffusion_pytorch_model.fp16.safetensors").resolve()
    os.truncate(weights, 100)
    assert any("vae/diffusion_pytorch_model.fp16.safetensors is 100 bytes" in p
               for p in store.verify(ALL, copy_cache, Lock.packaged()))


def test_verify_reads_what_a_whole_size_file_holds(copy_cache):
    """A file of the right size can still be damaged (zeros a crash left on a volume, a bad
    copy): verify compared sizes alone wherever a size was recorded, so it passed a cache the
    loader then refused with 'check it with imagen models verify'."""
    snapshot = _snapshot(copy_cache, "remove-background")
    weights, config = (snapshot / "model.safetensors").resolve(), (snapshot / "config.json").resolve()
    weights.write_bytes(bytes(weights.stat().st_size))  # zeros, whole size
    config.write_bytes(b"#" + config.read_bytes()[1:])
    problems = " | ".join(store.verify(ALL, copy_cache, Lock.packaged()))
    assert "model.safetensors is not a safetensors file" in problems
    assert "config.json cannot be parsed (JSONDecodeError)" in problems


def test_checksums_find_damage_no_header_shows(copy_cache):
    spec = REGISTRY["remove-background"]
    weights = (_snapshot(copy_cache, "remove-background") / "model.safetensors").resolve()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit among the weights: header and size still right
    weights.write_bytes(bytes(data))
    assert store.verify([spec], copy_cache, Lock.packaged()) == []
    (problem,) = store.verify([spec], copy_cache, Lock.packaged(), checksums=True)
    assert problem.endswith("model.safetensors is damaged: its content does not match its checksum (the blob's name)")
    assert store.verify(ALL, copy_cache, Lock.packaged(), checksums=True) == [problem]  # the rest is whole


def test_checksums_read_the_hubs_git_named_blobs(tmp_path):
    """The Hub names a small file's blob by its git blob sha1, not its sha256."""
    import hashlib

    data = b'{"a": 1}'
    blob = tmp_path / hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    blob.write_bytes(data)
    assert store.checksum_problem(blob) is None
    blob.write_bytes(b'{"a": 2}')
    assert "does not match its checksum" in store.checksum_problem(blob)
    other = tmp_path / "not-a-digest"
    other.write_bytes(data)
    assert store.checksum_problem(other) is None  # nothing to check it by


@pytest.mark.parametrize("marker", [b'{"tiny": tr', b"[]", b'{"files": {"a": "x"}}'])
def test_a_damaged_tiny_marker_is_a_problem_not_a_traceback(copy_cache, marker):
    snapshot = _snapshot(copy_cache, "remove-background")
    (snapshot / store.TINY_MARKER).resolve().write_bytes(marker)
    problems = store.verify([REGISTRY["remove-background"]], copy_cache, Lock.packaged())
    assert any("imagen-tiny.json is damaged" in p for p in problems)
    result = _cli(["verify", "--operations", "remove-background", "--cache-dir", str(copy_cache)], copy_cache)
    assert result.exit_code == 1 and "imagen-tiny.json is damaged" in result.output, result.output
    assert "imagen models pull --tiny --operations remove-background" in result.output


def test_list_models_rows(tiny_cache, tmp_path):
    rows = {row.operation: row for row in store.list_models(ALL, tiny_cache, Lock.packaged())}
    assert set(rows) == set(OPERATION_NAMES)
    assert all(row.complete and row.tiny and row.bytes > 0 and len(row.revision) == 40 for row in rows.values())
    (empty,) = store.list_models([REGISTRY["comic"]], tmp_path, Lock())
    assert (empty.revision, empty.bytes, empty.complete, empty.tiny) == (None, 0, False, False)


# --- CLI -----------------------------------------------------------------------------------


def _cli(args, cache: Path):
    settings = Settings(model_cache_dir=cache)
    return CliRunner().invoke(models_cli.command, args, obj=settings)


def test_cli_verify_fails_on_an_empty_cache_naming_the_fix(tmp_path):
    result = _cli(["verify", "--operations", "upscale,comic"], tmp_path)
    assert result.exit_code == 1
    assert "fix: run `imagen models pull --operations upscale,comic`" in result.output
    assert "stabilityai/stable-diffusion-x4-upscaler" in result.output


def test_cli_verify_passes_on_a_complete_cache(tiny_cache):
    result = _cli(["verify"], tiny_cache)
    assert result.exit_code == 0, result.output
    assert "4 model(s) complete" in result.output


def test_cli_verify_names_only_the_broken_operation(copy_cache):
    (_snapshot(copy_cache, "comic") / "model_index.json").unlink()
    result = _cli(["verify"], copy_cache)
    assert result.exit_code == 1
    # A tiny model is built again (the real one is a gated download): the fix says so.
    assert "fix: run `imagen models pull --tiny --operations comic` (the tiny random-weight models" in result.output


def test_cli_a_named_lock_must_exist(copy_cache, tmp_path):
    """A mistyped --lock read as an empty lock: verify passed where the right one failed."""
    result = _cli(["verify", "--lock", str(tmp_path / "othr.json")], copy_cache)
    assert result.exit_code == 2 and "othr.json does not exist" in result.output
    assert _cli(["list", "--lock", str(tmp_path / "othr.json")], copy_cache).exit_code == 2
    assert _cli(["pull", "--tiny", "--lock", str(tmp_path / "othr.json")], copy_cache).exit_code == 2
    # A pull may start a lock, in a folder that exists.
    result = _cli(["pull", "--operations", "comic", "--lock", str(tmp_path / "nodir" / "lock.json")], copy_cache)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_pull_into_a_named_lock_that_cannot_be_written_fails(tmp_path, monkeypatch):
    spec = REGISTRY["remove-background"]
    files = {"briarmbg.py": b"code = 1\n", "MyConfig.py": b"c = 2\n", "config.json": b"{}",
             "model.safetensors": EMPTY_SAFETENSORS}
    monkeypatch.setattr(store, "snapshot_download", FakeHub(files))
    monkeypatch.setattr(Lock, "write", lambda self, path: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(ModelError, match="is pulled but the model lock .* could not be written: .*No space left"):
        store.pull([spec], tmp_path / "cache", lock_path=tmp_path / "lock.json", progress=False, lock_required=True)


def test_cli_operations_must_name_one(tiny_cache):
    # "0 model(s) complete", exit 0: a build script's empty list passed an image with no models.
    result = _cli(["verify", "--operations", ","], tiny_cache)
    assert isinstance(result.exception, ConfigError) and "unknown operation(s) (none given)" in str(result.exception)


def test_cli_paths_expand_the_home_folder(tiny_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").symlink_to(tiny_cache)
    result = _cli(["list", "--operations", "comic", "--cache-dir", "~/models"], tmp_path / "elsewhere")
    assert result.exit_code == 0 and f"model cache: {tmp_path}/models" in result.output
    assert "complete (tiny)" in result.output


def test_cli_fix_offers_tiny_models_only_where_no_real_one_is_broken(copy_cache, tmp_path):
    # Nothing there: either kind.
    result = _cli(["verify", "--operations", "comic"], tmp_path)
    assert "fix: run `imagen models pull --operations comic` (or `imagen models pull --tiny --operations comic` " \
           "for test models)" in result.output
    # A real model broken: its pull only (a tiny build refuses to replace it), with --checksums
    # where that found it.
    spec = REGISTRY["remove-background"]
    snapshot = _snapshot(copy_cache, "remove-background")
    (snapshot / store.TINY_MARKER).unlink()
    weights = (snapshot / "model.safetensors").resolve()
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    result = _cli(["verify", "--operations", "remove-background", "--checksums"], copy_cache)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == \
        "fix: run `imagen models pull --operations remove-background --checksums`", result.output
    assert spec.repo_id in result.output


def test_cli_list(tiny_cache, tmp_path):
    result = _cli(["list"], tiny_cache)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:2] == ["OPERATION", "REPOSITORY"]
    assert sum("complete (tiny)" in line for line in lines) == 4
    missing = _cli(["list", "--operations", "enhance"], tmp_path)
    assert "missing" in missing.output.splitlines()[-1]


def test_cli_unknown_operation(tmp_path):
    result = _cli(["verify", "--operations", "sharpen"], tmp_path)
    assert isinstance(result.exception, ConfigError) and "--operations): unknown operation(s) sharpen" in str(
        result.exception)


@pytest.mark.parametrize("header", [
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "x"]}}',  # a string where a number goes
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, null]}}',
    b'[1, 2]',
])
def test_a_damaged_safetensors_header_is_a_problem_not_a_crash(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    assert store.safetensors_problem(path, path.stat().st_size) == (
        "is not a safetensors file (its header is cut or unreadable)")
    huge = tmp_path / "huge.safetensors"  # a length past safetensors' own limit is not read
    huge.write_bytes((2**40).to_bytes(8, "little") + bytes(16))
    assert "not a safetensors file" in store.safetensors_problem(huge, 2**41)


def test_without_recorded_sizes_a_file_cut_short_is_told_by_its_own_format(tmp_path):
    # A copy cut short (a mirror's restore, a volume's copy) where no lock pins the sizes: the
    # safetensors header said so, but a checkpoint, a config or the remote code passed.
    import torch

    whole = {"config.json": b'{"in_ch": 3, "out_ch": 1}', "briarmbg.py": b"class A:\n    x = 1\n"}
    torch.save({"w": torch.zeros(64)}, tmp_path / "whole.bin")
    whole["model.bin"] = (tmp_path / "whole.bin").read_bytes()
    for name, data in whole.items():
        (tmp_path / name).write_bytes(data)
        assert store.content_problem(tmp_path / name, len(data)) is None, name
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) // 2])
        assert "cut short or damaged" in store.content_problem(cut, cut.stat().st_size), name
    legacy = tmp_path / "legacy.bin"  # a pre-zip pickle: nothing to tell it by, so no problem
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    assert store.content_problem(legacy, legacy.stat().st_size) is None


def test_verify_reads_a_real_snapshots_config_where_the_lock_pins_no_sizes(copy_cache):
    snapshot = _snapshot(copy_cache, "comic")
    (snapshot / store.TINY_MARKER).unlink()  # as a real model's: no sizes but the lock's (none)
    config = snapshot / "unet" / "config.json"
    text = config.read_text()
    config.unlink()  # a link into the blobs, shared with the cache it was copied from
    config.write_text(text[: len(text) // 2])
    problems = store.verify([REGISTRY["comic"]], copy_cache, Lock())
    assert any(p.endswith("unet/config.json cannot be parsed (JSONDecodeError): cut short or damaged")
               for p in problems), problems
