"""Run the cases: per operation, the stock pipeline's cases, then imagen's, one model at a time.

Only one model is on the device at a time (loaded, timed, freed), so each peak memory figure
is that path's own, weights included. Outputs of the two paths are compared pixel by pixel:
with every switch off they are equal; with the GPU defaults they differ by fp16 noise.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.cases import Case, ImagenRunner, StockRunner, input_image
from bench.flops import unet_tflop
from bench.timing import free, measure, profile

logger = logging.getLogger("bench")

GIB = 1024**3


def run_cases(cases: list[Case], cache_dir: Path, device: torch.device, dtype: torch.dtype,
              *, tuning=None, stock: bool = True, repeats: int | None = None,
              variants: list[tuple[str, object]] = (), on_update=None,
              profile_dir: Path | None = None) -> list[dict]:
    """Time every case on both paths; returns one result dict per case (see bench/README.md).

    `tuning` is imagen's switches: a Tuning, or a function of the operation giving one.
    `variants` are (name, Tuning or function) pairs: imagen again with other switches, in the same
    process, each compared with the same stock run (the row's "variants"). `on_update` is
    called with the rows after each path, so a run cut short keeps what it measured. With
    `profile_dir`, each path's case runs once more under torch.profiler, its top operators
    written there (one text file per path and case).
    """
    rows = {case.name: _row(case) for case in cases}
    for case in cases:
        try:
            tflop = unet_tflop(case, cache_dir)
        except Exception as error:  # noqa: BLE001 - a figure less, not a failed run
            logger.warning("%s: UNet arithmetic not counted: %s", case.name, error)
            tflop = None
        rows[case.name]["unet_tflop"] = None if tflop is None else round(tflop, 3)

    def updated():
        if on_update is not None:
            on_update([rows[case.name] for case in cases])

    for operation in dict.fromkeys(case.operation for case in cases):
        mine = [case for case in cases if case.operation == operation]
        outputs: dict[str, np.ndarray] = {}
        if stock and any(case.stock for case in mine):
            _run_path(StockRunner, operation, [c for c in mine if c.stock], cache_dir, device, dtype,
                      rows, outputs, repeats=repeats, profile_dir=profile_dir)
            updated()
        _run_path(ImagenRunner, operation, mine, cache_dir, device, dtype, rows, outputs,
                  repeats=repeats, tuning=for_operation(tuning, operation), profile_dir=profile_dir)
        updated()
        for name, variant in variants:
            _run_path(ImagenRunner, operation, mine, cache_dir, device, dtype, rows, outputs,
                      repeats=repeats, tuning=for_operation(variant, operation), variant=name,
                      profile_dir=profile_dir)
            updated()
    return [rows[case.name] for case in cases]


def for_operation(tuning, operation: str):
    """`tuning` itself, or what it gives for `operation` when it is a function (None stays)."""
    return tuning(operation) if callable(tuning) else tuning


def _row(case: Case) -> dict:
    return {
        "case": case.name,
        "operation": case.operation,
        "input": [case.size, case.size],
        "output": [case.output_size, case.output_size],
        "steps": case.steps,
        "strength": case.strength,
        "guidance": case.guidance,
        "stock": None,
        "imagen": None,
        "ratio": None,
        "max_diff": None,
        "mean_diff": None,
        "target_seconds": case.target_seconds,
        "target_peak_gib": case.target_peak_gib,
        "anchor_seconds": case.anchor_seconds,
        "anchor_peak_gib": case.anchor_peak_gib,
        "variants": {},
    }


def _run_path(runner_class, operation, cases, cache_dir, device, dtype, rows, outputs, *, repeats,
              variant: str | None = None, profile_dir: Path | None = None, **extra):
    label = runner_class.label if variant is None else f"imagen[{variant}]"

    def put(case, entry):
        if variant is None:
            rows[case.name][label] = entry
        else:
            rows[case.name]["variants"][variant] = entry

    try:
        runner = runner_class(operation, cache_dir, device, dtype, **extra)
    except Exception as error:  # noqa: BLE001 - a path that cannot load is a finding, not a crash
        logger.error("%s %s: loading failed: %s", label, operation, error)
        for case in cases:
            put(case, {"error": f"load: {type(error).__name__}: {error}"})
        return
    try:
        for case in cases:
            image = input_image(case.size)
            logger.info("%s %s: %dx%d, %d steps", label, case.name, case.size, case.size, case.steps)
            # A path whose setup has not run its operation (stock; imagen's warm-up has) gets
            # that run as one more warm-up, or its first timed run carries its first-call costs
            # (the H200's stock comic: 1.27-1.41 s, then ~1.05 s).
            warmup = case.warmup + (0 if runner_class.warmed_by_setup or not case.warmup else 1)
            try:
                timing, output = measure(lambda case=case, image=image: runner(case, image), device,
                                         warmup=warmup, repeats=repeats or case.repeats)
            except Exception as error:  # noqa: BLE001 - out of memory, say: record it, go on
                logger.error("%s %s failed: %s", label, case.name, error)
                logger.debug("%s", traceback.format_exc())
                put(case, {"error": f"{type(error).__name__}: {str(error)[:300]}"})
                free(device)
                continue
            entry = {
                "seconds": round(timing.seconds, 4),
                "runs": [round(s, 4) for s in timing.runs],
                "peak_gib": None if timing.peak_bytes is None else round(timing.peak_bytes / GIB, 2),
                "reserved_gib": None if timing.reserved_bytes is None else round(timing.reserved_bytes / GIB, 2),
                "pool_gib": None if timing.pool_bytes is None else round(timing.pool_bytes / GIB, 2),
                "setup_seconds": round(runner.load_seconds, 2),
            }
            if variant is not None:
                entry["switches_on"] = extra["tuning"].enabled()
                entry["tuning"] = extra["tuning"].as_dict()
            if profile_dir is not None:
                path = Path(profile_dir) / f"{label}-{case.name}.txt".replace("[", "-").replace("]", "")
                try:
                    profile(lambda case=case, image=image: runner(case, image), device, path)
                    entry["profile"] = path.name
                except Exception as error:  # noqa: BLE001 - the figures stand without it
                    logger.error("%s %s: profiling failed: %s", label, case.name, error)
            put(case, entry)
            pixels = np.asarray(output.convert("RGB"), dtype=np.int16)
            if label == "stock":
                outputs[case.name] = pixels
            else:
                _compare(rows[case.name]["stock"], entry, outputs.get(case.name), pixels)
                if variant is None:
                    for key in ("ratio", "max_diff", "mean_diff"):
                        rows[case.name][key] = entry.pop(key, None)
    finally:
        runner.close()
        free(device, compiled=True)


def _compare(stock: dict | None, entry: dict, stock_pixels, imagen_pixels) -> None:
    """Ratio and pixel difference of an imagen `entry` against the stock run, into `entry`."""
    if stock and "seconds" in stock:
        entry["ratio"] = round(entry["seconds"] / stock["seconds"], 3)
    if stock_pixels is not None and stock_pixels.shape == imagen_pixels.shape:
        diff = np.abs(stock_pixels - imagen_pixels)
        entry["max_diff"], entry["mean_diff"] = int(diff.max()), round(float(diff.mean()), 3)
