"""The watchdog of imagen serve and imagen worker: a job stuck on the GPU ends the process
(engine.overdue itself: tests/models/test_deadline.py)."""

from __future__ import annotations

import json
import logging
import threading

from handlers.watchdog import watch


class Engine:
    """engine.overdue's answers in turn: nothing twice, then a stuck job."""

    def __init__(self, answers):
        self.answers, self.asked = list(answers), []

    def busy_context(self):  # no job's context: the line is the watchdog's own
        return None

    def overdue(self, grace):
        self.asked.append(grace)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_stuck_job_is_logged_and_ends_the_process(caplog):
    engine = Engine([None, None, "upscale has held the device for 900 s, more than 300 s past its budget of 510 s"])
    hung = threading.Event()
    with caplog.at_level(logging.CRITICAL, logger="imagen.watchdog"):
        thread = watch(engine, on_hung=hung.set, interval=0.01)
        assert hung.wait(10)
        thread.join(10)
    assert not thread.is_alive() and thread.daemon  # asked no more once stopping
    assert engine.asked == [300, 300, 300]
    [record] = caplog.records
    assert record.getMessage() == (
        "a job is stuck on the GPU: upscale has held the device for 900 s, more than 300 s past its budget of "
        "510 s; stopping, so that a new process takes over and Pub/Sub redelivers its messages")


def test_the_stuck_line_names_the_job(capsys):
    """The watchdog's thread has no job context of its own: the line said only the chain, and
    could not be tied to the object that hung the GPU."""
    import contextvars

    from handlers.logs import JsonFormatter, job_context

    with job_context({"job_id": "m-9", "message_id": "m-9", "source": "gs://b/incoming/upscale/hang.png"}):
        context = contextvars.copy_context()  # as the engine keeps it for the job on the device
    engine = Engine(["upscale has held the device for 900 s"])
    engine.busy_context = lambda: context
    lines, hung = [], threading.Event()
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(json.loads(JsonFormatter().format(record)))
    logger = logging.getLogger("imagen.watchdog")
    logger.addHandler(handler)
    try:
        thread = watch(engine, on_hung=hung.set, interval=0.01)
        assert hung.wait(10)
        thread.join(10)
    finally:
        logger.removeHandler(handler)
    [line] = lines
    assert line["severity"] == "CRITICAL" and line["message"].startswith("a job is stuck on the GPU: upscale")
    assert (line["job_id"], line["source"]) == ("m-9", "gs://b/incoming/upscale/hang.png")
    assert line["logging.googleapis.com/operation"]["id"] == "m-9"


def test_nothing_happens_while_no_job_is_stuck():
    engine = Engine([None])
    hung = threading.Event()
    thread = watch(engine, on_hung=hung.set, grace=5, interval=0.01)
    assert not hung.wait(0.3)
    assert len(engine.asked) > 3 and set(engine.asked) == {5}
    engine.answers = ["stuck"]  # ends the thread: none left polling for the rest of the session
    thread.join(10)
    assert hung.is_set() and not thread.is_alive()
