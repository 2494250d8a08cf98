"""Keep diffusers' and transformers' progress bars (and, if asked, warnings) out of our output.

Loading happens once per process and is logged by imagen itself with its duration; per-file
progress bars from the libraries would only fill the service's logs.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_libraries(*, warnings: bool = True):
    """Disable the libraries' progress bars (and their warnings unless `warnings`) inside."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (module, module.get_verbosity(), module.is_progress_bar_enabled())
        for module in (diffusers_logging, transformers_logging)
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
