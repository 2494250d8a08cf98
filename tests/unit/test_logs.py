"""The JSON log lines Cloud Logging reads: one object per line, jobs grouped, any text safe."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading

import pytest

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


def test_text_a_message_made_up_is_clipped_so_the_line_stays_under_cloud_loggings_limit():
    # A job message's operation, a name, an error listing 20,000 keys: each field is clipped,
    # the line stays far below the 256 KB Cloud Logging refuses.
    huge = "x" * 300_000
    try:
        raise ValueError(huge)
    except ValueError:
        import sys

        line = _line("job %s", huge, exc_info=sys.exc_info(),
                     fields={"operation": huge, "error": {"type": "EventError", "message": huge}, "ids": [huge]})
    entry = json.loads(line)
    assert len(line) < 100_000
    assert entry["message"].startswith("job xxx") and entry["message"].endswith("(296004 more characters)")
    assert entry["operation"].endswith("(296000 more characters)") and entry["ids"][0].endswith("more characters)")
    assert entry["error"]["message"].endswith("(296000 more characters)")
    # Clipped in the middle: Error Reporting recognises a Python trace by its first line.
    assert entry["stack_trace"].startswith("Traceback (most recent call last):\n...\n")
    assert entry["stack_trace"].rstrip().endswith("xxx")


def test_error_reporting_takes_why_a_process_stopped_by_its_trace_or_its_type():
    def entry(level, exc_info=None):
        record = logging.LogRecord("imagen.test", level, __file__, 1, "it broke", (), exc_info)
        return json.loads(JsonFormatter().format(record))

    event = "type.googleapis.com/google.devtools.clouderrorreporting.v1beta1.ReportedErrorEvent"
    assert entry(logging.CRITICAL)["@type"] == event
    assert all("@type" not in entry(level) for level in (logging.ERROR, logging.WARNING, logging.INFO))
    try:
        raise ValueError("boom")
    except ValueError:
        traced = entry(logging.CRITICAL, sys.exc_info())
    assert "@type" not in traced and "ValueError: boom" in traced["stack_trace"]  # found by its trace


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


@pytest.fixture
def json_logging():
    """configure_logging() for one test (called in the test: pytest gives each phase its own
    stdout), the logging set-up as it was afterwards."""
    from handlers.logs import configure_logging

    root, imagen = logging.getLogger(), logging.getLogger("imagen")
    saved = root.handlers[:], root.level, imagen.level
    yield configure_logging
    root.handlers[:], levels = saved[0], saved[1:]
    root.setLevel(levels[0])
    imagen.setLevel(levels[1])
    logging.captureWarnings(False)


def test_every_line_logged_during_a_job_carries_its_id(capsys, json_logging):
    # The engine's lines (the GPU's traceback) and the libraries' warnings in a job's thread
    # are grouped with the job's own in Cloud Logging; lines outside a job are not.
    from handlers.logs import job_context

    json_logging()
    with job_context({"job_id": "m-1", "message_id": "m-1", "source": "gs://b/incoming/upscale/a.png"}):
        logging.getLogger("imagen.engine").critical("the GPU failed")
        logging.getLogger("diffusers.pipelines").warning("a library warns")
        logging.getLogger("imagen.processor").warning("job failed", extra={"fields": {"job_id": "own"}})
        elsewhere = threading.Thread(target=lambda: logging.getLogger("imagen.compile").warning("compiled"))
        elsewhere.start()
        elsewhere.join()
    logging.getLogger("imagen.engine").warning("after the job")
    engine, library, own, compiled, after = _json_lines(capsys.readouterr().out)
    for entry in (engine, library):
        assert entry["job_id"] == "m-1" and entry["source"] == "gs://b/incoming/upscale/a.png"
        assert entry["logging.googleapis.com/operation"] == {"id": "m-1", "producer": "imagen"}
    assert own["job_id"] == "own" and own["logging.googleapis.com/operation"]["id"] == "own"
    assert "job_id" not in compiled and "job_id" not in after  # another thread; after the job


def test_hugging_face_hub_lines_come_once_as_json(capfd, json_logging):
    # huggingface_hub has a plain-text stderr handler of its own and propagates too: each of
    # its lines came out twice, once without a severity.
    from image.models._quiet import quiet_libraries

    json_logging()
    with quiet_libraries(("transformers",)):
        pass
    logging.getLogger("huggingface_hub.file_download").warning("the cache is read-only")
    out, err = capfd.readouterr()
    assert err == ""
    assert [entry["message"] for entry in _json_lines(out)] == ["the cache is read-only"]


def test_an_exception_python_can_only_report_is_a_json_line():
    # In __del__ or a library's shutdown: "Exception ignored in ..." on stderr otherwise.
    done = _run_python(
        "from handlers.logs import configure_logging\nconfigure_logging(service=True)\n"
        "class Channel:\n    def __del__(self): raise OSError('socket closed')\n"
        "Channel()\n")
    assert done.returncode == 0 and done.stderr == ""
    [entry] = _json_lines(done.stdout)
    assert entry["severity"] == "WARNING" and entry["message"].startswith("Exception ignored")
    assert "Channel" in entry["message"] and "OSError: socket closed" in entry["stack_trace"]


def test_torch_loggers_reach_the_json_handler_once_a_model_library_loads(caplog):
    # torch gives torch._dynamo, torch._inductor and others their own plain-text stderr
    # handler: a background compile's warnings would reach Cloud Logging without a severity.
    import torch._inductor  # noqa: F401  (its loggers exist once imported)

    from image.models._quiet import quiet_libraries

    with quiet_libraries(("transformers",)):
        pass
    for name in ("torch", "torch._dynamo", "torch._inductor"):
        logger = logging.getLogger(name)
        assert logger.propagate and not [h for h in logger.handlers if type(h) is logging.StreamHandler]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torch._dynamo.convert_frame").warning("recompile limit reached")
        logging.getLogger("torch._inductor.utils").info("below the level")
    assert [record.getMessage() for record in caplog.records] == ["recompile limit reached"]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_service_that_cannot_start_says_why_in_one_json_line():
    # Cloud Logging takes a plain-text line as an entry without severity: the reason a
    # worker or service stopped must be as findable as its other lines.
    done = _run_python("import os; os.environ.pop('IMAGEN_SUBSCRIPTION', None); from handlers.cli import main; "
                       "main(['worker'])")
    assert done.returncode == 2 and done.stderr == ""
    [entry] = _json_lines(done.stdout)
    assert entry["severity"] == "CRITICAL" and entry["error"]["type"] == "ConfigError"
    assert entry["message"].startswith("imagen stopped: ConfigError: IMAGEN_SUBSCRIPTION")
    assert "stack_trace" not in entry
    # Without a trace, Error Reporting takes it as an error event by its type.
    assert entry["@type"] == "type.googleapis.com/google.devtools.clouderrorreporting.v1beta1.ReportedErrorEvent"


def test_an_unexpected_crash_of_a_service_is_a_json_line_with_its_trace():
    done = _run_python(
        "import os, handlers.clients as clients, handlers.service as service, types\n"
        "os.environ['GOOGLE_CLOUD_PROJECT'] = 'p'\n"
        "def broken(settings): raise RuntimeError('CUDA driver gone')\n"
        "service.build_engine = broken\n"
        "# A subscription that exists, without credentials: the set-up is what fails.\n"
        "clients.subscriber_client = lambda settings: types.SimpleNamespace(get_subscription=lambda **kw: None)\n"
        "from handlers.cli import main\n"
        "main(['worker', '--subscription', 's', '--metrics-port', '0'])\n")
    assert done.returncode == 1 and done.stderr == ""
    entry = _json_lines(done.stdout)[-1]
    assert entry["severity"] == "CRITICAL" and entry["message"] == "imagen stopped: RuntimeError: CUDA driver gone"
    assert "in broken" in entry["stack_trace"]


def test_an_exception_no_one_caught_in_a_thread_is_a_json_line():
    done = _run_python(
        "import threading\nfrom handlers.logs import configure_logging\nconfigure_logging(service=True)\n"
        "def fail(): raise ValueError('lost in a thread')\n"
        "thread = threading.Thread(target=fail, name='imagen-compile'); thread.start(); thread.join()\n"
        "raise KeyError('and in the main one')\n")
    assert done.returncode == 1 and done.stderr == ""
    thread, main = _json_lines(done.stdout)
    assert thread["severity"] == "CRITICAL"
    assert thread["message"] == "uncaught ValueError in imagen-compile: lost in a thread"
    assert "ValueError: lost in a thread" in thread["stack_trace"]
    assert main["message"] == "uncaught KeyError: 'and in the main one'" and "KeyError" in main["stack_trace"]


def test_gunicorn_errors_are_json_lines_too(caplog):
    # "Worker (pid:7) was sent SIGKILL! Perhaps out of memory?" is how an out-of-RAM service
    # shows: gunicorn writes it with a plain-text handler of its own.
    from handlers.cli.serve import _server

    server = _server(lambda environ, start: [], "127.0.0.1", 0, 1, post_worker_init=lambda worker: None)
    logger = server.cfg.logger_class(server.cfg)
    error_log = logging.getLogger("gunicorn.error")
    assert error_log.propagate and not error_log.handlers
    with caplog.at_level(logging.INFO):
        logger.error("Worker (pid:%s) was sent SIGKILL! Perhaps out of memory?", 7)
        # Its own lines when imagen stops it on purpose (exit 3, after a CRITICAL line saying
        # why) are INFO: as errors, each was one more notification of the errors alert.
        for line in ("Worker (pid:7) exited with code 3.", "Shutting down: Master", "Reason: Worker failed to boot.",
                     "Reason: the worker died"):
            logger.error(line)
        logger.error("Worker (pid:%s) exited with code %s.", 8, 1)
    levels = {record.getMessage(): record.levelname for record in caplog.records if record.name == "gunicorn.error"}
    assert levels == {"Worker (pid:7) was sent SIGKILL! Perhaps out of memory?": "ERROR",
                      "Worker (pid:7) exited with code 3.": "INFO", "Shutting down: Master": "INFO",
                      "Reason: Worker failed to boot.": "INFO", "Reason: the worker died": "INFO",
                      "Worker (pid:8) exited with code 1.": "ERROR"}


def test_a_command_run_by_hand_keeps_pythons_own_tracebacks():
    # imagen process and imagen models log JSON too, but a crash at a terminal stays readable.
    done = _run_python("from handlers.logs import configure_logging\nconfigure_logging()\nraise KeyError('by hand')\n")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Traceback") and "KeyError: 'by hand'" in done.stderr


@pytest.mark.parametrize("clients_first", [False, True])
def test_google_client_library_lines_stay_json_once_a_pubsub_client_exists(clients_first):
    """Creating a Pub/Sub client runs google-api-core's logging set-up, which stopped the
    "google" logger propagating: a streaming pull's callback error came as bare text on
    stderr, google.auth's warnings not at all."""
    code = (
        "import logging\n"
        "from google.api_core import client_logging\n"
        "from google.auth.credentials import AnonymousCredentials\n"
        "from google.cloud import pubsub_v1\n"
        "from handlers.logs import configure_logging\n"
        f"if {clients_first}: client_logging.initialize_logging()\n"
        "configure_logging(service=True)\n"
        "pubsub_v1.PublisherClient(credentials=AnonymousCredentials())\n"
        "logging.getLogger('google.cloud.pubsub_v1.subscriber._protocol').error('Top-level exception in callback')\n"
        "logging.getLogger('google.auth.transport.requests').warning('refreshing credentials failed')\n"
        "logging.getLogger('google.cloud.pubsub_v1').info('not shown: below WARNING')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(entry["severity"], entry["message"]) for entry in entries] == [
        ("ERROR", "Top-level exception in callback"), ("WARNING", "refreshing credentials failed")]
    assert out.stderr == ""


def test_a_service_logs_at_imagen_log_level_and_a_native_crash_leaves_its_stack():
    """IMAGEN_LOG_LEVEL=DEBUG shows imagen's debug lines (read-ahead, graph capture) without a
    rebuild; a segfault in a native library (no exception Python sees) leaves the threads'
    Python stacks on stderr instead of nothing."""
    done = _run_python(
        "import ctypes, logging\n"
        "from handlers.logs import configure_logging\n"
        "from handlers.settings import Settings\n"
        "configure_logging(Settings.from_env({'IMAGEN_LOG_LEVEL': 'debug'}).log_level, service=True)\n"
        "logging.getLogger('imagen.engine').debug('captured the graphs')\n"
        "def load_the_model(): ctypes.string_at(0)\n"
        "load_the_model()\n")
    assert done.returncode != 0
    [entry] = _json_lines(done.stdout)
    assert (entry["severity"], entry["message"]) == ("DEBUG", "captured the graphs")
    assert "Fatal Python error: Segmentation fault" in done.stderr and "in load_the_model" in done.stderr



def test_each_line_says_where_it_was_written():
    # Cloud Logging's sourceLocation: the Logs Explorer shows the file, line and function.
    from handlers.logs import JsonFormatter

    record = logging.LogRecord("imagen.processor", logging.INFO, "/opt/imagen/lib/python3.12/site-packages/handlers/"
                               "processor.py", 42, "job started", None, None, func="_attempt")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["logging.googleapis.com/sourceLocation"] == {"file": "handlers/processor.py", "line": "42",
                                                               "function": "_attempt"}
