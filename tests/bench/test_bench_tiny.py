"""The bench harness on one tiny case: table, JSON, cost table; and its small parts.

`make bench BENCH_ARGS=--tiny` runs every tiny case; this keeps the harness working in CI
with the cheapest one (the 64 -> 256 upscale: one tile, so imagen and stock give the same
pixels).
"""

from __future__ import annotations

import ast
import json

import pytest

from bench import cold, cost
from bench.child import READY, time_child
from bench.cases import FULL_CASES, TINY_CASES, cases_named
from bench.cli import main, parse_switches, parse_variants
from bench.configs import FULL_CONFIGS, UNET_PARAMETERS, build_full_pipeline
from image.operations.tuning import Tuning

pytestmark = pytest.mark.models


def test_tiny_bench_prints_the_table_and_writes_json(tiny_cache, tmp_path, capsys):
    results_dir = tmp_path / "results"
    argv = ["--tiny", "--cases", "upscale-64", "--repeats", "1",
            "--cache", str(tiny_cache), "--results-dir", str(results_dir),  # read only
            "--variant", "batched: upscale_tile_batch=2 channels_last=on", "--profile"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| case | input → output |" in out and "| upscale-64 | 64² → 256² |" in out

    [path] = results_dir.glob("*.json")
    assert path.name.startswith("cpu-") and "-tiny-" in path.name
    assert path.with_suffix(".md").read_text().startswith("cpu")
    results = json.loads(path.read_text())
    assert results["environment"]["kind"] == "tiny"
    assert results["switches_on"] == {"upscale": ["read_ahead", "prompt_cache"]}
    [row] = results["cases"]
    assert row["stock"]["seconds"] > 0 and row["imagen"]["seconds"] > 0
    assert row["ratio"] == pytest.approx(row["imagen"]["seconds"] / row["stock"]["seconds"], rel=0.01)
    assert row["max_diff"] == 0  # one tile, CPU defaults: stock's pixels
    assert row["unet_tflop"] > 0  # counted on the meta device from the snapshot's config
    variant = row["variants"]["batched"]
    assert variant["seconds"] > 0 and variant["switches_on"] == ["channels_last", "read_ahead", "prompt_cache"]
    assert variant["max_diff"] <= 1 and "ratio" in variant
    assert results["variants"]["batched"]["upscale"]["upscale_tile_batch"] == 2
    [profiles] = results_dir.glob("profile-*")
    assert sorted(p.name for p in profiles.iterdir()) == [
        "imagen-batched-upscale-64.txt", "imagen-upscale-64.txt", "stock-upscale-64.txt"]
    assert "aten::" in (profiles / "imagen-upscale-64.txt").read_text()
    assert row["imagen"]["profile"] == "imagen-upscale-64.txt"
    assert "| upscale-64 [batched] |" in out and "- [batched]: channels_last=True, upscale_tile_batch=2" in out

    assert main(["--cost", str(path)]) == 0
    table = capsys.readouterr().out
    assert "$ / 1000 at Cloud Run L4" in table and "| upscale-64 | imagen |" in table
    assert "list prices" in table


def test_cost_reads_the_newest_run_by_its_name_never_a_probes_file(tmp_path):
    """By modification time (the same for every file of a clone) it took any run, and a probe's
    file written after a session's runs (no environment) ended in a KeyError."""
    from bench import report

    run = {"environment": {"card": "NVIDIA H200"}, "cases": []}
    for name in ("nvidia-h200-full-20261128-011557.json", "nvidia-h200-full-20261127-111438.json",
                 "cpu-x86-64-tiny-20261126-121734.json"):
        (tmp_path / name).write_text(json.dumps({**run, "name": name}))
    (tmp_path / "nvidia-h200-compileprobe-20261129-000000.json").write_text(json.dumps({"rows": []}))
    results, path = report.read_results(folder=tmp_path)
    assert path.name == "nvidia-h200-full-20261128-011557.json" == results["name"]
    with pytest.raises(SystemExit, match="is not a bench run's results"):
        report.read_results(tmp_path / "nvidia-h200-compileprobe-20261129-000000.json")


def test_cost_per_thousand_images():
    results = {"environment": {"card": "NVIDIA H100 80GB HBM3", "device": "cuda:0"},
               "cases": [{"case": "comic", "operation": "comic", "stock": {"seconds": 1.0},
                          "imagen": {"seconds": 0.5}}]}
    rows = cost.cost_rows(results)
    h100 = next(p for p in cost.PRICES if p.card == "H100")
    assert [r["path"] for r in rows] == ["stock", "imagen"]
    assert rows[1]["dollars_per_1000"][h100.name] == pytest.approx(500 * h100.dollars_per_second)
    assert rows[1]["same_card"] == {"Cloud Run L4": False, "GCE H100 on-demand": True}
    assert "(other card)" in cost.format_cost(results)
    # A card is priced by its whole name: an L40S is not an L4.
    assert cost.same_card("L4", "NVIDIA L4") and cost.same_card("h100", "NVIDIA H100 80GB HBM3")
    assert not cost.same_card("L4", "NVIDIA L40S") and not cost.same_card("H100", "NVIDIA H1000")


def test_variants_parse():
    def tuning_for(operation):
        return Tuning.for_device("cuda", operation)

    [(name, variant)] = parse_variants(["big: upscale_tile=256 vae_bf16=off"], tuning_for)
    assert name == "big"
    assert variant("comic") == tuning_for("comic").replace(upscale_tile=256, vae_bf16=False)
    assert variant("comic").channels_last and not variant("remove-background").channels_last
    for bad in (["x"], ["x:"], [": vae_bf16=on"], ["a: vae_bf16=on", "a: compile=on"], ["a: nope=1"]):
        with pytest.raises(SystemExit):
            parse_variants(bad, tuning_for)


def test_switches_parse():
    base = Tuning.for_device("cuda")
    tuned = parse_switches(["compile=on", "channels_last=off", "upscale_tile=512",
                            "compile_mode=max-autotune"], base)
    assert tuned.compile and not tuned.channels_last and tuned.upscale_tile == 512
    assert tuned.compile_mode == "max-autotune" and tuned.fuse_qkv
    assert parse_switches(["upscale_tile=512,256"], base).upscale_tile == (512, 256)
    for bad in (["compile"], ["warp=on"], ["compile=maybe"], ["upscale_tile=big"]):
        with pytest.raises(SystemExit):
            parse_switches(bad, base)


def test_cases():
    assert [c.name for c in cases_named("full", ["upscale"])] == [
        "upscale-256", "upscale-512", "upscale-1024"]
    assert [c.name for c in cases_named("tiny", ["comic", "upscale-64"])] == ["comic", "upscale-64"]
    with pytest.raises(SystemExit, match="unknown case"):
        cases_named("tiny", ["sharpen"])
    assert {c.operation for c in FULL_CASES} == {c.operation for c in TINY_CASES}
    assert FULL_CASES[0].params()["steps"] == 50 and FULL_CASES[0].params()["strength"] == 0.75


@pytest.mark.parametrize("operation", list(FULL_CONFIGS))
def test_full_configs_are_the_anchor_architectures(operation):
    pipe = build_full_pipeline(operation, device="meta")  # no memory, no init
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    assert parameters == pytest.approx(UNET_PARAMETERS[operation], abs=0.1e6)


def test_cold_start_children(tmp_path):
    code = cold.imagen_code("upscale", tmp_path, "cpu", Tuning.for_device("cpu"))
    ast.parse(code)
    assert "tuning=None" in code  # the defaults: as imagen serve passes them
    # Other switches go as a Tuning from the torch-free switches module: nothing imports
    # torch before Engine.setup reads ahead.
    code = cold.imagen_code("upscale", tmp_path, "cpu", Tuning.for_device("cpu").replace(read_ahead=False))
    ast.parse(code)
    assert "read_ahead=False" in code and "image.operations.tuning" not in code
    assert "from image.operations.switches import Tuning" in code
    seconds, phases = time_child(f"print({READY!r} + '{{\"x\": 1}}')")
    assert seconds > 0 and phases == {"x": 1}
    with pytest.raises(RuntimeError, match="before it was ready"):
        time_child("import sys; sys.exit(3)")
    # Timed to its ready line, not its exit (a child that goes on after it is killed there).
    seconds, _ = time_child(f"import time; print({READY!r} + '{{}}', flush=True); time.sleep(600)")
    assert seconds < 300
    # And one that never gets ready is killed at the timeout, not waited for.
    with pytest.raises(RuntimeError, match="not ready after 2 s"):
        time_child("import time; time.sleep(600)", timeout=2)


def test_cold_start_children_report_their_phases_and_memory(tiny_cache):
    # The children's code is a template: run both for real (tiny upscale, CPU, warm cache).
    from bench.report import format_cold

    rows = cold.run_cold(["upscale"], tiny_cache, device="cpu", dtype="float32", tuning=None, drop_caches="none")
    row = rows[0]
    for label in ("stock", "imagen"):
        assert row[f"{label}_seconds"] > 0, row
        assert 0.1 < row[f"{label}_phases"]["peak_rss_gib"] < 16  # GiB of the child, not KiB
    assert {"load_seconds", "warmup_seconds"} <= set(row["imagen_phases"])
    assert "peak RSS GiB stock / imagen" in format_cold(rows)


def test_unet_arithmetic_matches_the_anchor_architectures(tmp_path, monkeypatch):
    # Counted from a config on the meta device: the full-size comic UNet (SD1.5) does about
    # 0.8 TFLOP per 512-pixel image per step, twice that with guidance (batch 2).
    import json

    from bench import flops
    from bench.configs import FULL_CONFIGS

    snapshot = tmp_path / "snap"
    for component, config in (("unet", FULL_CONFIGS["comic"]["unet"]), ("vae", FULL_CONFIGS["comic"]["vae"])):
        (snapshot / component).mkdir(parents=True)
        (snapshot / component / "config.json").write_text(json.dumps(config))
    build_full_pipeline("comic", device="meta").scheduler.save_config(snapshot / "scheduler")
    case = next(c for c in FULL_CASES if c.name == "comic")
    monkeypatch.setattr(flops, "snapshot_of", lambda operation, cache_dir: snapshot)
    # 50 steps x 0.75 strength: PNDM's schedule has 51 timesteps, of which the last 38 run
    assert flops.unet_calls(case, snapshot) == 38
    tflop = flops.unet_tflop(case, tmp_path)
    assert tflop == pytest.approx(38 * 1.61, rel=0.02)


def test_unet_calls_are_the_pipelines_own(tiny_cache):
    # What the flops count multiplies by is what stock diffusers really calls (tiny models on
    # the CPU carry each repository's scheduler: comic's PNDM, enhance's Euler, upscale's DDIM).
    import torch

    from bench import flops
    from bench.cases import StockRunner, input_image
    from bench.configs import snapshot_of

    for case in (c for c in TINY_CASES if c.stock):
        runner = StockRunner(case.operation, tiny_cache, torch.device("cpu"), torch.float32)
        calls = []
        runner.pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
        runner(case, input_image(case.size))
        assert flops.unet_calls(case, snapshot_of(case.operation, tiny_cache)) == len(calls), case.name


def test_compile_probe_shows_the_second_process_compiling_nothing(tiny_cache, tmp_path):
    # bench/compileprobe.py's two fresh processes on the CPU (a real Inductor compile of the
    # tiny remove-background net, in the warm-up): the second takes every graph from the
    # artefact the first stored. On a GPU, tests/bench/test_cuda_graphs.py does the same
    # through the background compile.
    from bench.compileprobe import probe

    scratch, cached = probe("remove-background", tiny_cache, "cpu", tmp_path)
    assert scratch["artefact"] == cached["artefact"] and (tmp_path / "store" / scratch["artefact"]).is_file()
    assert (scratch["graphs_compiled"], scratch["graphs_from_cache"]) == (1, 0), scratch
    assert (cached["graphs_compiled"], cached["graphs_from_cache"]) == (0, 1), cached
    assert scratch["compiled_s"] >= scratch["ready_s"] > 0


def test_import_profile_reads_python_importtime():
    # bench/coldprobe.py --imports: a real `python -X importtime` child, summarised.
    from bench.coldprobe import import_profile

    profile = import_profile("import json, email.mime.text", top=1000)  # every module
    names = [name for name, _ in profile["by_module_s"]]
    packages = dict(profile["by_package_s"])
    assert "json" in packages and "email" in packages and "email.mime.text" in names
    assert profile["modules"] >= 5 and 0 < profile["own_s"] <= profile["wall_s"]
    assert [s for _, s in profile["by_module_s"]] == sorted((s for _, s in profile["by_module_s"]), reverse=True)
    assert len(import_profile("import json", top=3)["by_module_s"]) == 3  # the largest three


def test_the_table_shows_reserved_memory_and_judges_the_peak_by_it():
    # A replayed CUDA graph's activations are reserved, not allocated: the target is judged by
    # what the process holds where that was measured (results before it: allocated alone).
    from bench.report import format_table

    row = {"case": "upscale-512", "input": [512, 512], "output": [2048, 2048], "steps": 20,
           "target_peak_gib": 12.0, "stock": {"seconds": 8.0, "peak_gib": 20.8, "reserved_gib": 21.5},
           "imagen": {"seconds": 3.1, "peak_gib": 7.5, "reserved_gib": 12.5}}
    line = format_table([row]).splitlines()[-1]
    assert "| 20.80 / 21.50 | 7.50 / 12.50 |" in line and "≤ 12.0 GiB ✗" in line
    # The graphs' pool, where measured, is shown beside it (part of reserved, not of allocated).
    pooled = {**row, "imagen": {**row["imagen"], "pool_gib": 4.25}, "stock": {**row["stock"], "pool_gib": 0.0}}
    line = format_table([pooled]).splitlines()[-1]
    assert "| 20.80 / 21.50 | 7.50 / 12.50 (graphs 4.25) |" in line and "≤ 12.0 GiB ✗" in line
    older = {**row, "stock": {"seconds": 8.0, "peak_gib": 20.8}, "imagen": {"seconds": 3.1, "peak_gib": 7.5}}
    line = format_table([older]).splitlines()[-1]
    assert "| 20.80 | 7.50 |" in line and "≤ 12.0 GiB ✓" in line
