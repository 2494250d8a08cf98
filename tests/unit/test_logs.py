"""The JSON log lines Cloud Logging reads: one object per line, jobs grouped, any text safe."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from handlers.logs import JsonFormatter


def _line(message, *args, fields=None, exc_info=None) -> str:
    record = logging.LogRecord("imagen.test", logging.WARNING, __file__, 1, message, args, exc_info)
    if fields is not None:
        record.fields = fields
    return JsonFormatter().format(record)


def test_a_job_line_carries_severity_fields_and_the_operation_grouping():
    entry = json.loads(_line("job %s", "done", fields={"job_id": "b/o#1", "seconds": 1.5}))
    assert entry["severity"] == "WARNING" and entry["message"] == "job done"
    assert entry["logging.googleapis.com/operation"] == {"id": "b/o#1", "producer": "imagen"}
    assert entry["seconds"] == 1.5 and entry["logger"] == "imagen.test" and entry["time"]


def test_any_text_gives_one_writable_line():
    # A lone surrogate is what an object name that was not valid UTF-8 decodes to.
    line = _line("object %s", "bad\udcff name", fields={"object": "\udcffé/ü.png"})
    assert "\n" not in line
    line.encode("ascii")  # writable to any stream
    entry = json.loads(line)
    assert entry["object"] == "\udcffé/ü.png" and entry["message"] == "object bad\udcff name"
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.emit(logging.LogRecord("imagen", logging.INFO, __file__, 1, "\udcff", (), None))
    stream.flush()
    assert json.loads(stream.buffer.getvalue())["message"] == "\udcff"


def test_an_exception_comes_with_its_stack_trace():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        entry = json.loads(_line("failed", exc_info=sys.exc_info()))
    assert "ValueError: boom" in entry["stack_trace"]


def test_the_model_libraries_log_through_the_process_handlers(caplog):
    # Their own handlers write plain text to stderr: Cloud Logging would get lines without a
    # severity in a service whose every other line is JSON.
    from image.models._quiet import quiet_libraries

    with quiet_libraries():
        pass
    for library in ("diffusers", "transformers"):
        logger = logging.getLogger(library)
        assert logger.propagate and not logger.handlers
        with caplog.at_level(logging.WARNING):
            logging.getLogger(f"{library}.pipelines").warning("from %s", library)
        assert caplog.records[-1].getMessage() == f"from {library}"
    # Less the advice to install torchvision for image processors imagen never loads.
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("transformers.utils.import_utils").warning("anything else")
    assert [record.getMessage() for record in caplog.records[-1:]] == ["anything else"]
    assert not any("torchvision" in record.getMessage() for record in caplog.records)


def test_python_warnings_are_json_lines_too():
    # torch, diffusers and Pillow warn through `warnings`, which writes plain text to stderr.
    code = ("import warnings; from handlers.logs import configure_logging; configure_logging(); "
            "warnings.warn('a library warns')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    entry = json.loads(done.stdout)
    assert entry["severity"] == "WARNING" and "a library warns" in entry["message"]
