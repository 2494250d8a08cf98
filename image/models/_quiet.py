"""Keep diffusers' and transformers' progress bars (and, if asked, warnings) out of our output.

Loading happens once per process and is logged by imagen itself with its duration; per-file
progress bars from the libraries would only fill the service's logs.
"""

from __future__ import annotations

import contextlib
import importlib


@contextlib.contextmanager
def quiet_libraries(libraries: tuple[str, ...] = ("diffusers", "transformers"), *, warnings: bool = True):
    """Disable `libraries`' progress bars (and their warnings unless `warnings`) inside. Only
    those are imported: importing diffusers takes 2 s of a start that does not use it."""
    saved = [
        (module, module.get_verbosity(), module.is_progress_bar_enabled())
        for module in (importlib.import_module(f"{library}.utils.logging") for library in libraries)
    ]
    for module, _, _ in saved:
        module.disable_progress_bar()
        if not warnings:
            module.set_verbosity_error()
    try:
        yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()
