"""`imagen serve`'s options: refused before anything loads where they could not work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from click.testing import CliRunner

from handlers.cli import main
from handlers.localstack import free_port


def test_serve_needs_a_thread_for_health_checks_beside_the_job():
    # With one thread gunicorn serves one request at a time: /healthz would go unanswered for
    # a whole job, and the liveness probe would restart the instance mid-job.
    result = CliRunner().invoke(main, ["serve", "--threads", "1"])
    assert result.exit_code == 2 and "--threads" in result.output and "1 is not in the range x>=2" in result.output


def _start(app_lines: str, port: int) -> subprocess.Popen:
    """`_server` serving the Flask app `app_lines` define, in a process of its own, once it
    accepts connections on `port`."""
    script = (f"import os, flask\nfrom handlers.cli.serve import _server\napp = flask.Flask('t')\n{app_lines}"
              f"_server(app, '127.0.0.1', {port}, 2, lambda worker: None).run()\n")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise AssertionError("the server did not start") from None
            time.sleep(0.1)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.kill()
    server.wait(timeout=30)


def test_the_server_refuses_an_overlong_request_line_before_the_app(tmp_path):
    """gunicorn read a request line without limit (an option copied from functions-framework),
    rescanning its growing buffer at each read: a few connections sending one endless line
    held the CPU and the memory, before any authentication, until the health checks failed."""
    port = free_port()
    server = _start("", port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"GET /" + b"A" * 65_536 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = connection.recv(200)
        assert answer.startswith(b"HTTP/1.1 414 "), answer  # unlimited, it reached the app: 404
    finally:
        _stop(server)


def test_a_worker_that_dies_stops_the_server_instead_of_starting_another():
    """gunicorn restarted a worker killed for memory (or crashed) in the same instance: minutes
    of model loading with /healthz answering 200 and each push a 503, a delivery attempt spent."""
    port = free_port()
    server = _start("app.get('/pid')(lambda: str(os.getpid()))\n", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=10) as answer:
            worker = int(answer.read())
        assert worker != server.pid
        os.kill(worker, signal.SIGKILL)
        assert server.wait(timeout=30) == 3
        assert b"the server's worker process" in server.stderr.read()
    finally:
        _stop(server)
    # A worker replaced on purpose (a SIGHUP's reload) goes on serving; a server stopped on
    # purpose (SIGTERM, as the platform does) still ends cleanly.
    server = _start("app.get('/pid')(lambda: str(os.getpid()))\n", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=10) as answer:
            first = int(answer.read())
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=10) as answer:
                if int(answer.read()) != first:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "no new worker after the reload"
            time.sleep(0.2)
        time.sleep(1)  # the old worker's exit reaped
        assert server.poll() is None
        server.terminate()
        assert server.wait(timeout=30) == 0
    finally:
        _stop(server)
