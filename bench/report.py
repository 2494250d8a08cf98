"""The bench's outputs: a Markdown table on stdout and JSON (plus the same table) in a folder.

    path = write_results(results, Path("bench/results"))   # <card>-<kind>-<UTC time>.json
    print(format_table(results))
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def environment(device: torch.device, dtype: torch.dtype, kind: str) -> dict:
    """What the figures were measured on and with."""
    import diffusers
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": card,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "kind": kind,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": _cpu_count(),
        "commit": _git_commit(),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _git_commit() -> str | None:
    try:
        # "-dirty" where the code measured differs from the commit (a device machine runs the
        # working tree copied to it).
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
                             capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def probe_results(device: torch.device, probe: str, folder: Path = RESULTS_DIR) -> tuple[str, Path]:
    """(the card's name, the JSON file a probe writes its rows to): bench/results/<card>-<probe>-<UTC time>.json."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return card, Path(folder) / f"{slug}-{probe}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"


def write_results(results: dict, folder: Path = RESULTS_DIR) -> Path:
    """Write `results` as JSON and the table as Markdown beside it; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = results["environment"]
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-")[:40]
    stamp = env["created"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    path = folder / f"{card}-{env['kind']}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    path.with_suffix(".md").write_text(format_report(results) + "\n")
    return path


# What `write_results` names a bench run's file: <card>-<full|tiny>-<UTC time>.json (the probes
# write <card>-<probe>-<time>.json, rows of their own).
_RESULTS_NAME = re.compile(r"-(full|tiny)-(\d{8}-\d{6})\.json$")


def read_results(path: Path | None = None, folder: Path = RESULTS_DIR) -> tuple[dict, Path]:
    """A bench run's results JSON: `path`, else the newest in `folder` by the time in its name
    (a clone gives every file the same modification time; a probe's file is no run's)."""
    if path is None:
        runs = {match[2]: p for p in Path(folder).glob("*.json") if (match := _RESULTS_NAME.search(p.name))}
        if not runs:
            raise SystemExit(f"no results in {folder}; run `python -m bench` first")
        path = runs[max(runs)]
    results = json.loads(Path(path).read_text())
    if not isinstance(results, dict) or not {"environment", "cases"} <= results.keys():
        raise SystemExit(f"{path} is not a bench run's results (python -m bench writes "
                         f"<card>-<full|tiny>-<time>.json; a probe's file holds rows of its own)")
    return results, Path(path)


def _s(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _path(row: dict, label: str, key: str, digits: int = 3) -> str:
    entry = row.get(label)
    if entry is None:
        return "-"
    if "error" in entry:
        return "error"
    return _s(entry.get(key), digits)


def _peaks(row: dict, label: str) -> str:
    """Peak GiB allocated / reserved, then the CUDA graphs' pool where there is one (results
    before the reserved figure: allocated alone)."""
    allocated = _path(row, label, "peak_gib", 2)
    entry = row.get(label) or {}
    if allocated in ("-", "error") or entry.get("reserved_gib") is None:
        return allocated
    pool = f" (graphs {entry['pool_gib']:.2f})" if entry.get("pool_gib") else ""
    return f"{allocated} / {_path(row, label, 'reserved_gib', 2)}{pool}"


def _target(row: dict) -> str:
    parts = []
    imagen = row.get("imagen") or {}
    if row.get("target_seconds") is not None:
        ok = imagen.get("seconds") is not None and imagen["seconds"] <= row["target_seconds"]
        parts.append(f"≤ {row['target_seconds']} s {'✓' if ok else '✗'}")
    if row.get("target_peak_gib") is not None:
        # What the process holds where measured (a CUDA graph's pool is in it), else allocated.
        peak = imagen.get("reserved_gib") or imagen.get("peak_gib")
        ok = peak is not None and peak <= row["target_peak_gib"]
        parts.append(f"≤ {row['target_peak_gib']} GiB {'✓' if ok else '✗'}")
    return ", ".join(parts) or "-"


def format_table(rows: list[dict]) -> str:
    """The stock-vs-imagen table, one line per case (Markdown)."""
    header = (
        "| case | input → output | steps | stock s | imagen s | imagen/stock | stock peak GiB alloc / reserved "
        "| imagen peak GiB alloc / reserved (graph pool) | max / mean diff | UNet TFLOP/s stock / imagen | imagen setup s "
        "| target |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in _with_variants(rows):
        size = f"{row['input'][0]}² → {row['output'][0]}²"
        steps = str(row["steps"]) + (f" × {row['strength']}" if row.get("strength") else "")
        diff = "-" if row.get("max_diff") is None else f"{row['max_diff']} / {row['mean_diff']}"
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}"
        lines.append(
            f"| {row['case']} | {size} | {steps} | {_path(row, 'stock', 'seconds')} "
            f"| {_path(row, 'imagen', 'seconds')} | {ratio} | {_peaks(row, 'stock')} "
            f"| {_peaks(row, 'imagen')} | {diff} | {_rates(row)} "
            f"| {_path(row, 'imagen', 'setup_seconds', 1)} "
            f"| {_target(row)} |"
        )
    return "\n".join(lines)


def _rates(row: dict) -> str:
    """UNet TFLOP per second of each path: the stock pipeline's UNet work / seconds."""
    tflop = row.get("unet_tflop")
    if not tflop:
        return "-"
    rates = []
    for label in ("stock", "imagen"):
        seconds = (row.get(label) or {}).get("seconds")
        rates.append("-" if not seconds else f"{tflop / seconds:.0f}")
    return " / ".join(rates)


def _with_variants(rows: list[dict]):
    """Each case's row, then one row per variant (imagen with other switches; same stock)."""
    for row in rows:
        yield row
        for name, entry in (row.get("variants") or {}).items():
            yield {**row, "case": f"{row['case']} [{name}]", "imagen": entry,
                   "ratio": entry.get("ratio"), "max_diff": entry.get("max_diff"),
                   "mean_diff": entry.get("mean_diff")}


def format_variants(results: dict) -> str:
    """What each variant changed, relative to the imagen column's switches."""
    base = results.get("tuning") or {}
    lines = []
    for name, per_operation in (results.get("variants") or {}).items():
        changed: dict[str, list] = {}
        for operation, tuning in per_operation.items():
            for key, value in tuning.items():
                if (base.get(operation) or {}).get(key) != value and value not in changed.setdefault(key, []):
                    changed[key].append(value)
        text = ", ".join(f"{k}={'/'.join(map(str, v))}" for k, v in changed.items() if v)
        lines.append(f"- [{name}]: {text or 'same switches'}")
    return "\n".join(lines)


def _switches_on(results: dict) -> str:
    on = results.get("switches_on") or {}
    if isinstance(on, list):  # results written before switches were per operation
        return ", ".join(on) or "none (stock)"
    return "; ".join(f"{op}: {', '.join(names) or 'none (stock)'}" for op, names in on.items()) or "-"


def format_cold(rows: list[dict]) -> str:
    """The cold-start table: a fresh process until ready, stock vs imagen."""
    lines = [
        "| operation | page cache | stock s | imagen s | imagen/stock | imagen: import / setup s "
        "| peak RSS GiB stock / imagen | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-" if not row.get("stock_seconds") or not row.get("imagen_seconds") else (
            f"{row['imagen_seconds'] / row['stock_seconds']:.2f}")
        phases = row.get("imagen_phases") or {}
        split = f"{_s(phases.get('import_seconds'), 2)} / {_s(phases.get('setup_seconds'), 2)}"
        rss = (f"{_s((row.get('stock_phases') or {}).get('peak_rss_gib'), 2)} / "
               f"{_s(phases.get('peak_rss_gib'), 2)}")
        target = "-"
        if row.get("target_seconds") is not None and row.get("imagen_seconds") is not None:
            ok = row["imagen_seconds"] <= row["target_seconds"]
            target = f"≤ {row['target_seconds']} s {'✓' if ok else '✗'}"
        lines.append(
            f"| {row['operation']} | {row['page_cache']} | {_s(row.get('stock_seconds'), 2)} "
            f"| {_s(row.get('imagen_seconds'), 2)} | {ratio} | {split} | {rss} | {target} |"
        )
    return "\n".join(lines)


def format_report(results: dict) -> str:
    """Everything in a results dict, as the Markdown printed and written beside the JSON."""
    env = results["environment"]
    head = (
        f"{env['card']}, {env['dtype']}, {env['kind']} models; torch {env['torch']}, "
        f"diffusers {env['diffusers']}; {env['created']}\n"
        f"imagen switches on: {_switches_on(results)}"
    )
    parts: list[str] = [head]
    if results.get("cases"):
        parts.append(format_table(results["cases"]))
    if results.get("variants"):
        parts.append("Variants (imagen with other switches, same process, same stock run):\n\n"
                     + format_variants(results))
    if results.get("cold"):
        parts.append("Cold start (fresh process until ready):\n\n" + format_cold(results["cold"]))
    return "\n\n".join(parts)
