"""The compile cache's own rules (image/operations/compile_cache.py), on the CPU.

The round trip through a real compile and a real store (a fresh process loading what another
stored) is tests/integration/test_compile_cache.py; the background compile's on a GPU is
tests/bench/test_cuda_graphs.py.
"""

from __future__ import annotations

import logging
import stat

import pytest
import torch

from image.engine import Engine
from image.models.lock import Lock
from image.operations import compile_cache
from image.operations.compile_cache import DirectoryCache, artefact_name
from image.operations.switches import Tuning

pytestmark = pytest.mark.models

CPU = torch.device("cpu")
MODEL = "org/model@0123456789abcdef"


def test_a_directory_keeps_the_first_artefact_whole_and_readable_by_others(tmp_path):
    store = DirectoryCache(tmp_path / "cache")
    assert store.get("comic/a.bin") is None and not store.has("comic/a.bin")
    assert store.put("comic/a.bin", b"first") and store.has("comic/a.bin")
    assert not store.put("comic/a.bin", b"second")  # the first writer wins
    assert store.get("comic/a.bin") == b"first"
    assert [p.name for p in (tmp_path / "cache" / "comic").iterdir()] == ["a.bin"]  # no partial file left
    assert stat.S_IMODE((tmp_path / "cache" / "comic" / "a.bin").stat().st_mode) == 0o644
    assert str(store) == str(tmp_path / "cache")


def test_the_name_follows_what_the_kernels_depend_on_and_nothing_else():
    tuning = Tuning.for_device("cuda", "comic")
    name = artefact_name("comic", MODEL, torch.float16, tuning, CPU)
    assert name.startswith(f"comic/torch-{torch.__version__}/cpu/") and name.endswith(".bin")
    assert artefact_name("comic", MODEL, torch.float16, tuning, CPU) == name  # stable
    # Loading and timing switches compile the same graph: one artefact serves both.
    for same in (tuning.replace(read_ahead=False), tuning.replace(direct_to_device=False),
                 tuning.replace(background_compile=False)):
        assert artefact_name("comic", MODEL, torch.float16, same, CPU) == name
    others = {
        artefact_name("comic", "org/model@fedcba9876543210", torch.float16, tuning, CPU),  # new revision
        artefact_name("comic", MODEL, torch.float32, tuning, CPU),
        artefact_name("comic", MODEL, torch.float16, tuning.replace(channels_last=False), CPU),
        artefact_name("comic", MODEL, torch.float16, tuning.replace(compile_mode="max-autotune"), CPU),
        artefact_name("enhance", MODEL, torch.float16, tuning, CPU),
    }
    assert name not in others and len(others) == 5


def test_the_name_follows_the_library_versions_and_imagens_operations_code(monkeypatch):
    tuning = Tuning.for_device("cuda", "comic")
    name = artefact_name("comic", MODEL, torch.float16, tuning, CPU)
    assert set(compile_cache._versions()) == {"diffusers", "triton", "imagen-operations"}
    for changed in ({"diffusers": "0.99.0"}, {"triton": "9.9.9"}, {"imagen-operations": "another release"}):
        versions = {**compile_cache._versions(), **changed}
        monkeypatch.setattr(compile_cache, "_versions", lambda versions=versions: versions)
        assert artefact_name("comic", MODEL, torch.float16, tuning, CPU) != name


class _Unreachable:
    """A store whose backend is down."""

    def __str__(self):
        return "gs://down/"

    def get(self, name):
        raise OSError("connection refused")

    def put(self, name, data):
        raise OSError("connection refused")


def test_a_failing_store_is_a_warning_and_the_compile_goes_on(caplog):
    with caplog.at_level(logging.WARNING, logger="imagen.operations"):
        assert not compile_cache.load(_Unreachable(), "comic/a.bin", "comic")
        assert not compile_cache.load(None, "comic/a.bin", "comic")
    assert "comic: loading the compiled artefact comic/a.bin from gs://down/ failed, compiling from scratch: " \
           "OSError: connection refused" in caplog.text


def test_an_artefact_from_another_build_is_a_warning(tmp_path, caplog):
    store = DirectoryCache(tmp_path)
    store.put("comic/a.bin", b"not an artefact")
    with caplog.at_level(logging.WARNING, logger="imagen.operations"):
        assert not compile_cache.load(store, "comic/a.bin", "comic")
    assert "comic: the compiled artefact comic/a.bin in " in caplog.text
    assert "is unreadable here, compiling from scratch" in caplog.text


class _Recording(DirectoryCache):
    """A folder store that notes what it was asked."""

    def __init__(self, root):
        super().__init__(root)
        self.asked = []

    def has(self, name):
        self.asked.append(("has", name))
        return super().has(name)

    def put(self, name, data):
        self.asked.append(("put", name))
        return super().put(name, data)


def test_a_session_stores_only_after_a_compile_that_ended_well(tmp_path):
    failed = _Recording(tmp_path / "failed")
    with pytest.raises(RuntimeError), compile_cache.CompileSession(failed, "comic/a.bin", "comic"):
        raise RuntimeError("the compile broke")
    assert failed.asked == []  # nothing stored from a broken compile
    # Nothing compiled inside the session: whatever this process compiled before stays out
    # (each operation's artefact holds its own kernels only), so there is nothing to store.
    store = _Recording(tmp_path / "store")
    with compile_cache.CompileSession(store, "comic/a.bin", "comic") as session:
        pass
    assert store.asked == [("has", "comic/a.bin")] and not store.has("comic/a.bin")
    assert session.describe() == "Inductor graphs: 0 from the cache, 0 compiled"


def test_operations_that_do_not_compile_touch_no_store(tiny_cache, tmp_path):
    store = DirectoryCache(tmp_path / "store")
    engine = Engine(["remove-background"], tiny_cache, device="cpu", lock=Lock(), compile_cache=store)
    engine.setup()  # the CPU defaults: no compile
    assert engine.compiled_artefacts() == {} and not (tmp_path / "store").exists()
    assert engine.wait_background(0)
