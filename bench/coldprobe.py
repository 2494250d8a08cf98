"""Where a cold start's seconds go on this machine: `python -m bench.coldprobe OPERATION`.

Needs root (it empties the whole page cache before each figure) and the bench's full-size
models (any `python -m bench` run on the GPU builds them). Prints one JSON line per figure as
it is taken (a run cut short keeps what it measured):

- `disk_*`: the largest weight file read by one sequential stream, then in 32 MiB chunks by
  16 threads, in MB/s;
- `import_all_s`: a fresh process importing torch, diffusers and transformers;
- `stock_cold_s`: the stock cold start (bench/cold.py's child), then how much of each
  package's files and of the weights it left in the page cache (what a cold start reads);
- `imagen_cold_s`, `imagen_no_read_ahead_cold_s`: imagen's cold start (bench/cold.py's child,
  `Engine.setup` to ready, warm-up included) with its defaults and without `read_ahead`.

`python -m bench.coldprobe --imports` takes only the import, under `python -X importtime`, with
the page cache dropped and then warm: the seconds, how many modules, and where the time goes by
package and by module (a module's own time includes loading its C extension's libraries). Is
a cold start's import its disk (cold much slower than warm) or the work itself (both slow)?

Every figure is a child's, timed from a parent that never imports torch (pages a process maps
stay cached whatever is dropped, so the bench's own cold figures, taken from a parent that
built the models, are warmer than a fresh machine): a cold start until its ready line (the
moment `/readyz` would say 200; before session 8 of bench/README.md, until the child's exit),
the import until it exits.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.child import ROOT, child_env, time_child
from image.models.readahead import weight_files

PACKAGES = ("torch", "nvidia", "diffusers", "transformers", "safetensors", "tokenizers", "huggingface_hub",
            "numpy", "PIL")
_IMPORTS = "import torch, diffusers, transformers; diffusers.StableDiffusionImg2ImgPipeline"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(path: Path) -> tuple[int, int]:
    """(bytes of `path` in the page cache, its size), by mincore on a shared read-only map."""
    try:
        size = path.stat().st_size
        if size == 0:
            return 0, 0
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0, 0
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return 0, size
        pages = (size + _PAGE - 1) // _PAGE
        vector = ctypes.create_string_buffer(pages)
        _libc.mincore(address, size, vector)
        _libc.munmap(address, size)
        return sum(byte & 1 for byte in vector.raw) * _PAGE, size
    finally:
        os.close(fd)


def drop_all() -> str:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return "dropped"


def timed(code: str) -> float:
    """Seconds a fresh `python -c code` takes from start to exit (it must succeed): for the
    import alone; a cold start is timed until its ready line (`time_child`), not its exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_ENV,
                   stdout=subprocess.DEVNULL, timeout=300)
    return round(time.perf_counter() - started, 2)


_ENV = child_env()


def _children(operation: str, cache: Path) -> dict:
    """The cold bench's child programs and the snapshot, from a helper process (which builds
    the model first if this machine has none): this one must not import torch (pages it maps
    stay in the page cache whatever is dropped)."""
    code = ("import json, sys; from pathlib import Path; from bench.cold import stock_code, imagen_code;"
            "from bench.configs import FULL, prepare_models, snapshot_of;"
            "from image.operations.switches import Tuning;"
            f"op, cache = {operation!r}, Path({str(cache)!r});"
            "prepare_models([op], cache, kind=FULL, device='cuda');"
            "off = Tuning.for_device('cuda', op).replace(read_ahead=False);"
            "print(json.dumps({'snapshot': str(snapshot_of(op, cache)), 'stock': stock_code(op, cache, 'cuda', 'float16'),"
            "'imagen': imagen_code(op, cache, 'cuda', None), 'imagen_no_read_ahead': imagen_code(op, cache, 'cuda', off)}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_ENV, capture_output=True,
                         text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_alone(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(16 << 20)
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - started


def read_in_threads(path: Path, threads: int = 16, chunk: int = 32 << 20) -> float:
    """Seconds to read `path` in `chunk`-sized pieces from `threads` threads."""
    def read(offset):
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            handle.read(chunk)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, range(0, path.stat().st_size, chunk)))
    return time.perf_counter() - started


def package_files(packages=PACKAGES) -> list[Path]:
    """Every file of the installed `packages`, found without importing them."""
    files = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            files += [Path(folder, file) for folder, _, names in os.walk(root) for file in names]
    return files


def main(operation: str = "comic") -> dict:
    report = _Report()
    cache = Path(os.environ.get("BENCH_CACHE", Path(__file__).parent / ".cache" / "full"))
    children = _children(operation, cache)
    weights = weight_files(Path(children["snapshot"]))
    report["operation"], report["page_cache"] = operation, drop_all()
    biggest = weights[0]
    megabytes = biggest.stat().st_size / 1e6
    report["disk_file_mb"] = round(megabytes)
    report["disk_one_stream_mb_s"] = round(megabytes / read_alone(biggest))
    drop_all()
    report["disk_16_threads_mb_s"] = round(megabytes / read_in_threads(biggest))
    drop_all()
    report["import_all_s"] = timed(_IMPORTS)
    drop_all()
    report["stock_cold_s"] = round(time_child(children["stock"], timeout=300)[0], 2)
    packages: dict[str, list[int]] = {}
    top = []
    for path in package_files() + weights:
        resident, size = resident_bytes(path)
        key = "weights" if path in weights else path.relative_to(_site_of(path)).parts[0]
        totals = packages.setdefault(key, [0, 0])
        totals[0] += resident
        totals[1] += size
        top.append((resident, size, str(path.relative_to(_site_of(path))) if key != "weights" else path.name))
    report["stock_cold_resident_mb"] = {k: [round(r / 1e6), round(s / 1e6)] for k, (r, s) in packages.items()}
    report["stock_cold_top_files_mb"] = [[round(r / 1e6), round(s / 1e6), name]
                                         for r, s, name in sorted(top, reverse=True)[:25]]
    for name in ("imagen", "imagen_no_read_ahead"):
        drop_all()
        report[f"{name}_cold_s"] = round(time_child(children[name], timeout=300)[0], 2)
    return report


def import_profile(code: str = _IMPORTS, top: int = 15) -> dict:
    """A fresh `python -X importtime -c code`: its seconds and `summarise_imports` of its log."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, cwd=ROOT, env=_ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    return {"wall_s": round(time.perf_counter() - started, 2), **summarise_imports(done.stderr, top)}


def summarise_imports(log: str, top: int = 15) -> dict:
    """From `-X importtime`'s lines (`import time: self [us] | cumulative | name`): how many
    modules, their own seconds together, and the largest by top-level package and by module."""
    own: dict[str, int] = {}
    for line in log.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header, or a warning printed between the lines
        name = fields[2].strip()
        own[name] = own.get(name, 0) + int(fields[0])
    packages: dict[str, int] = {}
    for name, micros in own.items():
        package = name.split(".")[0]
        packages[package] = packages.get(package, 0) + micros

    def largest(table):
        return [[name, round(micros / 1e6, 3)] for name, micros in sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    return {"modules": len(own), "own_s": round(sum(own.values()) / 1e6, 2),
            "by_package_s": largest(packages), "by_module_s": largest(own)}


def imports() -> dict:
    """The import alone, page cache dropped then warm (`--imports`)."""
    report = _Report()
    report["page_cache"] = drop_all()
    report["imports_cold"] = import_profile()
    report["imports_warm"] = import_profile()
    return report


def _site_of(path: Path) -> Path:
    """The sys.path entry `path` was found under (site-packages, or the wheels' target)."""
    roots = [Path(entry).resolve() for entry in sys.path if entry and Path(entry).is_dir()]
    return max((root for root in roots if path.is_relative_to(root)), key=lambda root: len(root.parts),
               default=path.parent)


class _Report(dict):
    """A dict that prints each figure as it is set (a step cut short keeps what it measured)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(json.dumps({key: value}), flush=True)


if __name__ == "__main__":
    import signal

    # A step limit's SIGTERM as an exception: subprocess.run then kills the child it waits on
    # (bench.cold has the same helper, but importing it would import torch here).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    imports() if sys.argv[1:] == ["--imports"] else main(*sys.argv[1:])
