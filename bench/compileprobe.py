"""How soon a new instance runs compiled, with and without the compile cache:
`python -m bench.compileprobe [OPERATION ...]` (default: comic enhance).

For each operation, two fresh processes set the operation up as `imagen serve` does
(`Engine.setup`, then the background compile under the CUDA graphs) with one compile cache
folder between them and each its own empty Inductor and Triton cache folders, as two
instances on two machines: the first compiles from scratch and stores the artefact
(image/operations/compile_cache.py), the second loads it. Prints one JSON line per process
(seconds to ready, seconds to compiled, Inductor graphs from the cache / compiled) and writes
them to bench/results/<card>-compileprobe-<time>.json.

On the CPU (`--tiny`) it compiles in the warm-up instead (no graphs) on the tiny models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.child import READY, ROOT, stop_children_on_sigterm, time_child

_CHILD = """
import time; started = time.perf_counter()
import json
from pathlib import Path
from image.engine import Engine
from image.models.lock import Lock
from image.operations.compile_cache import DirectoryCache, inductor_counts
engine = Engine([{operation!r}], Path({cache!r}), device={device!r}, lock=Lock(), tuning_changes={changes!r},
                compile_cache=DirectoryCache({store!r}))
engine.setup()
ready = time.perf_counter()
engine.wait_background()
compiled = time.perf_counter()
counts = inductor_counts()
print({ready_line!r} + json.dumps({{"ready_s": round(ready - started, 2), "compiled_s": round(compiled - started, 2),
      "graphs_from_cache": counts["hits"], "graphs_compiled": counts["misses"],
      "artefact": next(iter(engine.compiled_artefacts().values()), None)}}), flush=True)
"""


def probe(operation: str, cache_dir: Path, device: str, workdir: Path, on_row=None) -> list[dict]:
    """The two processes' figures for `operation`: from scratch, then from the stored artefact
    (`on_row` is called with each as it comes)."""
    changes = ("compile=on",) if device == "cpu" else ()  # on CUDA the defaults decide
    code = _CHILD.format(operation=operation, cache=str(cache_dir), device=device, changes=changes,
                         store=str(workdir / "store"), ready_line=READY)
    rows = []
    for run in ("scratch", "from_cache"):
        private = {"TORCHINDUCTOR_CACHE_DIR": str(workdir / run / "inductor"),
                   "TRITON_CACHE_DIR": str(workdir / run / "triton")}
        seconds, figures = time_child(code, timeout=900, env=private)
        row = {"operation": operation, "run": run, "process_s": round(seconds, 2), **figures}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.compileprobe", description=__doc__.split("\n\n")[0])
    parser.add_argument("operations", nargs="*", default=["comic", "enhance"])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a dry run)")
    parser.add_argument("--cache", type=Path, help="model cache (default: the bench's, as `python -m bench`)")
    args = parser.parse_args(argv)
    stop_children_on_sigterm()

    import torch

    from bench.cli import DEFAULT_CACHE
    from bench.configs import FULL, TINY, prepare_models
    from bench.report import probe_results
    from image.device import resolve_device

    kind = TINY if args.tiny else FULL
    device, _ = resolve_device("cpu" if args.tiny else "auto")
    cache = args.cache or DEFAULT_CACHE / kind
    prepare_models(args.operations, cache, kind=kind, device=device)
    card, out = probe_results(device, "compileprobe")
    rows = []

    def save(row):  # after each process: a run cut short keeps what it measured
        rows.append(row)
        out.write_text(json.dumps({"card": card, "torch": torch.__version__, "kind": kind, "rows": rows},
                                  indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="compileprobe-") as workdir:
        for operation in args.operations:
            probe(operation, cache, device.type, Path(workdir) / operation, on_row=save)
    print(f"written: {out.relative_to(ROOT)}")
    return rows


if __name__ == "__main__":
    main()
