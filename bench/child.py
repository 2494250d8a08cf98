"""A fresh Python process timed until it says it is ready. Imports no torch, so that
bench/coldprobe.py (whose pages must not hold torch's) can use it as bench/cold.py does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

READY = "BENCH-READY "
ROOT = Path(__file__).resolve().parent.parent


def child_env(env: dict | None = None) -> dict:
    """A child's environment: this process's, `env` on top, and this repository importable."""
    return {**os.environ, **(env or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def time_child(code: str, *, timeout: float = 600, env: dict | None = None) -> tuple[float, dict]:
    """Seconds from starting `python -c code` until it prints its ready line (READY and a JSON
    object: its phases), and that object; the child is killed there, so its exit (interpreter
    shutdown, CUDA teardown, a background compile) is not counted, and after `timeout` seconds
    without it (RuntimeError). `env`: variables for the child on top of this process's."""
    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errors,
                                 text=True, env=child_env(env), cwd=ROOT)
        deadline = threading.Timer(timeout, child.kill)  # ends the read below: stdout closes
        deadline.start()
        try:
            for line in child.stdout:
                if line.startswith(READY):
                    seconds = time.perf_counter() - started
                    return seconds, json.loads(line[len(READY):])
            child.wait()
            errors.seek(0)
            tail = errors.read()[-2000:]
            if not deadline.is_alive():
                raise RuntimeError(f"the child was not ready after {timeout:g} s:\n{tail}")
            raise RuntimeError(f"the child exited ({child.returncode}) before it was ready:\n{tail}")
        finally:
            deadline.cancel()
            child.kill()
            child.wait()


def stop_children_on_sigterm() -> None:
    """Make SIGTERM (gpu_session.sh's step limit) an exception in this process, so the
    child it is timing is killed on the way out instead of running on into the next step."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
