"""Keep diffusers' and transformers' progress bars (and, if asked, warnings) out of our output.

Loading happens once per process and is logged by imagen itself with its duration; per-file
progress bars from the libraries would only fill the service's logs. The warnings the
libraries do give go to the process's own logging (a service writes them as the same JSON
lines as its own), not to the plain-text stderr handler each library installs for itself;
less transformers' advice to install torchvision for image processors imagen never loads
(the pipelines' feature extractors are left out), which read as something missing. torch's
own loggers (Dynamo's and Inductor's warnings from a compile) and huggingface_hub's go the
same way.
"""

from __future__ import annotations

import contextlib
import importlib
import logging


def _no_torchvision_advice(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" not in record.getMessage()


def library_logs_to_root() -> None:
    """torch gives `torch`, `torch._dynamo`, `torch._inductor` and others a plain-text stderr
    handler of their own and stops them propagating; huggingface_hub's has one too, and
    propagates as well (each of its lines came out twice, once as plain text): hand their
    records to the root logger only. torch's artefact loggers (no handler: off unless
    TORCH_LOGS asks) stay as they are."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] in ("torch", "huggingface_hub") and isinstance(logger, logging.Logger):
            streams = [h for h in logger.handlers if type(h) is logging.StreamHandler]
            for handler in streams:
                logger.removeHandler(handler)
            if streams:
                logger.propagate = True


@contextlib.contextmanager
def quiet_libraries(libraries: tuple[str, ...] = ("diffusers", "transformers"), *, warnings: bool = True):
    """Disable `libraries`' progress bars (and their warnings unless `warnings`) inside, and
    send their log records to the root logger for good. Only those are imported: importing
    diffusers takes 2 s of a start that does not use it."""
    saved = []
    for library in libraries:
        module = importlib.import_module(f"{library}.utils.logging")
        module.disable_default_handler()
        module.enable_propagation()
        saved.append((module, module.get_verbosity(), module.is_progress_bar_enabled()))
    library_logs_to_root()
    advice = logging.getLogger("transformers.utils.import_utils")  # a filter sees its own logger's records
    if _no_torchvision_advice not in advice.filters:
        advice.addFilter(_no_torchvision_advice)
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
