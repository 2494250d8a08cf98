"""A fault-injecting HTTP proxy for the storage emulator: 503s, stalls and lost answers by rule.

It sits between imagen's storage client (`STORAGE_EMULATOR_HOST` = the proxy) and
fake-gcs-server, forwards every request, and lets rules replace or delay answers:

    proxy = FaultProxy("http://127.0.0.1:4443").start()
    proxy.add(Rule(r"^GET /download/.*incoming/", status=503, times=2))  # two 503s, then fine
    proxy.add(Rule(r"^POST /upload/", stall=3.0, times=1))               # one 3 s stall
    proxy.add(Rule(r"^POST /upload/", status=503, after_forward=True))   # done, answer lost
    proxy.add(Rule(r"^GET /storage/v1/b/[^/]+/o\?", status=None,
                   query={"maxResults": "3"}))                          # listings in pages of 3
    proxy.count(r"^GET /download/")                                      # requests seen

A rule's pattern is searched in "METHOD /path?query" with the path and query percent-decoded,
so object names read as they are (`incoming/upscale/a.png`, not `incoming%2Fupscale%2Fa.png`);
`body` (bytes regex) also searches the first 64 KiB of the request body, where multipart
uploads carry the object's name. The first matching rule that still has `times` left applies.

fake-gcs-server answers a listing in one page whatever its length (Cloud Storage cuts pages at
1000 objects); `query` forwards a request with query parameters set, so a listing of a few
objects comes in pages, and a rule on its `pageToken=` request fails it mid-way.

The emulator puts its own address in `mediaLink` and upload `Location`s; the proxy rewrites
those to its own, so downloads and resumable uploads go through it too.

Run alone: `python -m scripts.fault_proxy --upstream http://127.0.0.1:4443 --port 4444
--rule 'GET /download/=503:0.3'` (503 on 30 % of downloads).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import logging
import random
import re
import sys
import threading
import time
import urllib.parse

logger = logging.getLogger("imagen.fault_proxy")

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}
_BODY_SCAN_BYTES = 64 * 1024


@dataclasses.dataclass
class Rule:
    """What to do with requests whose "METHOD /decoded-path?query" matches `pattern`.

    `status`: answer with it (None: forward normally); `stall`: seconds to wait first;
    `after_forward`: forward, then answer `status` anyway (the change is made, the answer lost);
    `times`: how many requests it applies to (None: every one); `probability`: of applying;
    `query`: forwarded with these query parameters set (added, or replacing the client's).
    """

    pattern: str
    status: int | None = 503
    stall: float = 0.0
    times: int | None = None
    after_forward: bool = False
    probability: float = 1.0
    body: bytes | None = None
    query: dict[str, str] | None = None
    applied: int = 0

    def matches(self, line: str, body: bytes) -> bool:
        if self.times is not None and self.applied >= self.times:
            return False
        if not re.search(self.pattern, line):
            return False
        return self.body is None or re.search(self.body, body[:_BODY_SCAN_BYTES]) is not None


@dataclasses.dataclass
class Seen:
    """One request, recorded when it arrives: its line, the fault applied (None: untouched),
    and the status answered (None until answered, or when the client gave up first)."""

    line: str
    fault: str | None
    time: float
    status: int | None = None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-request (a test ending, a timeout it was told to hit) is
        # the point of a fault proxy, not an error to print on stderr.
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            logger.warning("fault proxy: request from %s failed: %r", client_address, error)


class FaultProxy:
    """A ThreadingHTTPServer on 127.0.0.1 forwarding to `upstream`; see the module docstring."""

    def __init__(self, upstream: str, *, port: int = 0, seed: int = 0):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = upstream.rstrip("/")
        self._upstream_host = parsed.hostname
        self._upstream_port = parsed.port or 80
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.seen: list[Seen] = []
        self._server = _Server(("127.0.0.1", port), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        # Polled for `stop` every 50 ms (serve_forever's default, 0.5 s, is each stop's wait).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule and forget what was seen."""
        with self._lock:
            self._rules.clear()
            self.seen.clear()

    def count(self, pattern: str = "", *, faults_only: bool = False) -> int:
        """How many requests matching `pattern` arrived (only those given a fault, if asked)."""
        with self._lock:
            return sum(
                1
                for s in self.seen
                if re.search(pattern, s.line) and (s.fault is not None or not faults_only)
            )

    # -- request handling ------------------------------------------------------------------

    def _choose(self, line: str, body: bytes) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(line, body) and self._random.random() < rule.probability:
                    rule.applied += 1
                    return rule
        return None

    def _arrived(self, line: str, rule: Rule | None) -> Seen:
        fault = None
        if rule is not None:
            parts = [f"stall {rule.stall} s"] if rule.stall else []
            if rule.query:
                parts.append(f"query {urllib.parse.urlencode(rule.query)}")
            if rule.status is not None:
                parts.append(
                    f"{rule.status} after forward" if rule.after_forward else str(rule.status)
                )
            fault = ", ".join(parts)
        seen = Seen(line, fault, time.time())
        with self._lock:
            self.seen.append(seen)
        return seen

    def _forward(self, method: str, target: str, headers, body: bytes):
        connection = http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=60
        )
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            forwarded["Host"] = f"{self._upstream_host}:{self._upstream_port}"
            forwarded["Content-Length"] = str(len(body))
            connection.request(method, target, body=body, headers=forwarded)
            response = connection.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            connection.close()

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream.encode(), self.url.encode())

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out without a delayed-ACK wait

            def log_message(self, *args) -> None:  # quiet: `seen` is the log
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                line = f"{self.command} {urllib.parse.unquote(self.path)}"
                rule = proxy._choose(line, body)
                seen = proxy._arrived(line, rule)
                if rule is not None and rule.stall:
                    time.sleep(rule.stall)
                if rule is not None and rule.status is not None and not rule.after_forward:
                    self._reply(seen, rule.status, "Injected fault", [], _error_body(rule.status))
                    return
                target = self.path
                if rule is not None and rule.query:
                    target = _with_query(target, rule.query)
                try:
                    status, reason, headers, data = proxy._forward(
                        self.command, target, self.headers, body
                    )
                except OSError:
                    self._reply(seen, 502, "Bad Gateway", [], _error_body(502))
                    return
                if rule is not None and rule.status is not None:  # after_forward: answer lost
                    self._reply(seen, rule.status, "Injected fault", [], _error_body(rule.status))
                    return
                self._reply(seen, status, reason, headers, proxy._rewrite(data))

            def _reply(self, seen: Seen, status: int, reason: str, headers, data: bytes) -> None:
                try:
                    self.send_response(status, reason)
                    for key, value in headers:
                        if key.lower() in _HOP_BY_HOP:
                            continue
                        if key.lower() == "location":
                            value = value.replace(proxy.upstream, proxy.url)
                        self.send_header(key, value)
                    if not any(k.lower() == "content-type" for k, _ in headers):
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    seen.status = status
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout during a stall): nothing to answer

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        return Handler


def _with_query(target: str, values: dict[str, str]) -> str:
    """A request target ("/path?query") with `values` set in its query."""
    path, _, query = target.partition("?")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    kept = [(key, value) for key, value in pairs if key not in values]
    return f"{path}?{urllib.parse.urlencode(kept + list(values.items()))}"


def _error_body(status: int) -> bytes:
    """A JSON API error body, as Cloud Storage sends it."""
    message = (
        http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "fault"
    )
    return (
        f'{{"error": {{"code": {status}, "message": "{message} (injected by fault_proxy)", '
        f'"errors": [{{"message": "{message}", "reason": "injected"}}]}}}}'
    ).encode()


def _parse_rule(text: str) -> Rule:
    """'PATTERN=STATUS[:PROBABILITY]' or 'PATTERN=stall:SECONDS[:PROBABILITY]'."""
    pattern, _, action = text.rpartition("=")
    parts = action.split(":")
    if parts[0] == "stall":
        return Rule(
            pattern,
            status=None,
            stall=float(parts[1]),
            probability=float(parts[2]) if len(parts) > 2 else 1.0,
        )
    return Rule(
        pattern, status=int(parts[0]), probability=float(parts[1]) if len(parts) > 1 else 1.0
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="fake-gcs-server URL")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--rule", action="append", default=[], help="PATTERN=503[:P] or PATTERN=stall:S[:P]"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    proxy = FaultProxy(args.upstream, port=args.port, seed=args.seed)
    for text in args.rule:
        proxy.add(_parse_rule(text))
    proxy.start()
    print(f"fault proxy on {proxy.url} -> {proxy.upstream}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
