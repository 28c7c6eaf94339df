"""The OTLP/HTTP receiver: bounded connections, deadlines, strict bodies.

- At most ``max_connections`` connections are served at once; one more gets
  503 with Retry-After and is closed (no thread is started for it).
- A connection must send a request's headers within ``timeout_s`` of being
  idle (keep-alive included) and its body within ``BODY_TIMEOUT_FACTOR`` times
  that; past a deadline the socket is shut down.
- A body is exactly Content-Length bytes, or chunked; gzip and deflate
  streams must be complete; the decompressed bytes are taken from the memory
  budget as they are produced.
Every request gets a status; nothing reaches stderr but one line for a bug.
"""
from __future__ import annotations

import socket
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from otel_moe.collector import admission
from otel_moe.collector.admission import Busy, Reservation, TooLarge
from otel_moe.collector.otlp_json import BadRequest, parse_json, parse_protobuf

if TYPE_CHECKING:
    from otel_moe.collector.server import Collector

HTTP_TRACES_PATH = "/v1/traces"
SIGNALS = {HTTP_TRACES_PATH: (ExportTraceServiceRequest, ExportTraceServiceResponse),
           "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse)}
PROTOBUF, JSON = "application/x-protobuf", "application/json"
BODY_TIMEOUT_FACTOR = 6
READ_CHUNK = 1 << 20
LINGER_S, LINGER_BYTES = 1.0, 4 << 20
RETRY_AFTER_S = "1"
BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
              b"Connection: close\r\n\r\n")


class Unavailable(Exception):
    """The collector is stopping: 503."""


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connections is not dropped (the default is 5)

    def __init__(self, address, handler, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.handlers: set = set()  # connections being served
        self.handlers_changed = threading.Condition()
        super().__init__(address, handler)

    def close_idle_and_wait(self, grace_s: float) -> None:
        """On stop: cut the connections waiting for a request, give those in a request
        ``grace_s`` to answer."""
        with self.handlers_changed:
            for handler in self.handlers:
                if not handler.busy:
                    _shut(handler.connection)
            self.handlers_changed.wait_for(lambda: not self.handlers, timeout=grace_s)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(BUSY_REPLY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class BoundedHTTPServer6(BoundedHTTPServer):
    address_family = socket.AF_INET6


class _Deadline:
    """Shuts the connection down unless cancelled in time (a blocked read then returns)."""

    def __init__(self, connection: socket.socket, seconds: float) -> None:
        self._timer = threading.Timer(seconds, self._expire, args=(connection,))
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _expire(connection: socket.socket) -> None:
        _shut(connection)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Refused(Exception):
    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.close = status, close


def make_handler(collector: "Collector", timeout_s: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = timeout_s  # each socket operation

        def log_message(self, *args) -> None:  # keep stderr for real problems
            pass

        busy = False  # inside a request (stop() waits for it) or waiting for one (stop() cuts it)

        def setup(self) -> None:
            super().setup()
            with self.server.handlers_changed:
                self.server.handlers.add(self)

        def handle_one_request(self) -> None:
            deadline = _Deadline(self.connection, timeout_s)  # idle + request line + headers
            self._deadline = deadline
            try:
                super().handle_one_request()
            except (ConnectionError, TimeoutError, OSError):
                self.close_connection = True
            finally:
                deadline.cancel()

        def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain", retry: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if retry:
                self.send_header("Retry-After", RETRY_AFTER_S)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.busy = True
            self._deadline.cancel()
            body_deadline = _Deadline(self.connection, timeout_s * BODY_TIMEOUT_FACTOR)
            try:
                with collector.request():  # held until the answer is sent: a stopping collector waits for it
                    self._answer()
            except Unavailable:
                self.close_connection = True
                self._reply(503, b"the collector is stopping\n", retry=True)
            finally:
                body_deadline.cancel()
                self.busy = self.close_connection  # kept alive: waiting for the next request again

        def _answer(self) -> None:
            try:
                self._export()
            except _Refused as err:
                self.close_connection = self.close_connection or err.close
                self._reply(err.status, f"{err}\n".encode(), retry=err.status in (429, 503))
            except Exception as err:  # a bug: answer, say it in one line, keep serving
                print(f"otel-moe collector: internal error on an HTTP request: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
                self.close_connection = True
                self._reply(500, b"internal error\n")

        def finish(self) -> None:
            try:
                super().finish()
                if self.close_connection:
                    _linger(self.connection)
            finally:
                with self.server.handlers_changed:
                    self.server.handlers.discard(self)
                    self.server.handlers_changed.notify_all()

        def _export(self) -> None:
            signal = SIGNALS.get(self.path.split("?")[0])
            if signal is None:
                self.close_connection = True  # the body is not read
                raise _Refused(404, f"only {' and '.join(SIGNALS)} are served")
            message, response = signal
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type not in (PROTOBUF, JSON):
                raise _Refused(415, f"Content-Type must be {PROTOBUF} or {JSON}", close=True)
            try:
                with Reservation(collector.budget) as held:
                    body = self._read_body(held)
                    body = _decompress(body, self.headers.get("Content-Encoding"), collector.max_request_bytes, held)
                    held.add(admission.json_cost(body) if content_type == JSON else
                             admission.protobuf_cost(body, collector.budget.total, message.DESCRIPTOR))
                    request = parse_json(body, message) if content_type == JSON else parse_protobuf(body, message)
                    del body
                    collector.accept(request)
            except admission.Malformed as err:
                raise _Refused(400, f"invalid protobuf: {err}") from None
            except BadRequest as err:
                raise _Refused(400, str(err)) from None
            except TooLarge as err:
                raise _Refused(413, f"request too large: {err}", close=True) from None
            except Busy:
                raise _Refused(429, "the collector's memory budget is taken by requests in flight: retry",
                               close=True) from None
            except Unavailable:
                raise _Refused(503, "the collector is stopping", close=True) from None
            if content_type == JSON:
                return self._reply(200, b"{}", JSON)
            return self._reply(200, response().SerializeToString(), PROTOBUF)

        def _read_body(self, held: Reservation) -> bytes:
            chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
            if chunked:
                return self._read_chunked(held)
            text = self.headers.get("Content-Length")
            if text is None:
                raise _Refused(411, "Content-Length (or chunked) required", close=True)
            if not text.strip().isdigit():
                raise _Refused(400, f"Content-Length {text[:40]!r} is not a number", close=True)
            length = int(text)
            if length > collector.max_request_bytes:
                raise _Refused(413, "request too large", close=True)  # the body is not read
            held.add(length)
            body = self._read_exactly(length)
            return body

        def _read_exactly(self, length: int) -> bytes:
            parts, left = [], length
            while left:
                part = self.rfile.read(min(left, READ_CHUNK))
                if not part:
                    raise _Refused(400, f"body ended after {length - left} of its {length} bytes", close=True)
                parts.append(part)
                left -= len(part)
            return b"".join(parts)

        def _read_chunked(self, held: Reservation) -> bytes:
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1026)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _Refused(400, "bad chunk size", close=True) from None
                if size == 0:
                    self.rfile.readline(1026)  # the empty trailer line
                    return b"".join(parts)
                total += size
                if total > collector.max_request_bytes:
                    raise _Refused(413, "request too large", close=True)
                held.add(size)
                parts.append(self._read_exactly(size))
                self.rfile.readline(3)  # CRLF after the chunk

    return Handler


def _linger(connection: socket.socket) -> None:
    """Close after an answer sent before the body was read: stop writing, then read
    away what the client still sends for a moment, so the close is not a reset that
    would destroy the answer before the client reads it."""
    try:
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(LINGER_S)
        drained = 0
        while drained < LINGER_BYTES:
            chunk = connection.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


def make_prometheus_handler(state, timeout_s: float):
    """GET /metrics: the text exposition of what the OTLP metrics said last."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = timeout_s

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                body, status = b"only /metrics is served\n", 404
            else:
                body, status = state.render(), 200
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _decompress(body: bytes, encoding: str | None, limit: int, held: Reservation) -> bytes:
    """The whole stream or BadRequest; its output is taken from the budget as it grows."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    parts, size, pending = [], 0, body
    try:
        while True:
            held.add(READ_CHUNK)
            part = d.decompress(pending, READ_CHUNK)
            parts.append(part)
            size += len(part)
            if size > limit:
                raise TooLarge(f"more than {limit >> 20} MiB once decompressed")
            pending = d.unconsumed_tail
            if d.eof or (not pending and not part):
                break
    except zlib.error as err:
        raise BadRequest(f"invalid {encoding} body: {err}") from None
    if not d.eof:
        raise BadRequest(f"incomplete {encoding} stream")
    if d.unused_data:
        raise BadRequest(f"bytes after the end of the {encoding} stream")
    return b"".join(parts)
