"""``otel-moe collector``: OTLP/gRPC and OTLP/HTTP receivers feeding one file exporter.

Receivers only parse and validate; the exporter (``files.RotatingFile``) only
writes. Garbage gets HTTP 400 / gRPC INVALID_ARGUMENT, oversize bodies 413 /
RESOURCE_EXHAUSTED, other content types 415, and the collector keeps serving.
It listens on loopback unless told otherwise and writes only under ``--out``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import signal
import socket
import sys
import threading
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# gRPC's C core would print its own lines (a taken port...) past the collector's one-line errors.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from otel_moe.collector.files import RotatingFile
from otel_moe.collector.otlp_json import BadRequest, parse_json, parse_protobuf, to_json_line

TRACE_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
HTTP_TRACES_PATH = "/v1/traces"
PROTOBUF, JSON = "application/x-protobuf", "application/json"


class StartError(RuntimeError):
    """The collector cannot start as asked (a port taken, a bad folder): one line says why."""


class _IPv6HTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Collector:
    def __init__(self, out_dir: str, host: str, grpc_port: int, http_port: int,
                 max_request_bytes: int, rotate_bytes: int | None) -> None:
        self.files = RotatingFile(out_dir, rotate_bytes)
        self.max_request_bytes = max_request_bytes
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            # no SO_REUSEPORT: a second collector on a taken port must fail, not split the data
            options=[("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0)],
        )
        # Raw bytes in: parsing here lets garbage get INVALID_ARGUMENT, not INTERNAL.
        handler = grpc.unary_unary_rpc_method_handler(
            self._grpc_export, request_deserializer=None,
            response_serializer=ExportTraceServiceResponse.SerializeToString)
        self.grpc_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler}),))
        try:
            self.grpc_port = self.grpc_server.add_insecure_port(f"{_bracketed(host)}:{grpc_port}")
        except RuntimeError:
            self.grpc_port = 0
        if not self.grpc_port:
            raise StartError(f"cannot listen for OTLP/gRPC on {_bracketed(host)}:{grpc_port} (in use, or not an address here)")
        server_class = _IPv6HTTPServer if ":" in host else ThreadingHTTPServer
        try:
            self.http_server = server_class((host, http_port), _make_http_handler(self))
        except OSError as err:
            self.grpc_server.stop(0)
            raise StartError(f"cannot listen for OTLP/HTTP on {_bracketed(host)}:{http_port}: {err.strerror or err}") from None
        self.http_server.daemon_threads = True
        self.http_port = self.http_server.server_address[1]
        self.host = host

    def accept(self, request) -> None:
        if request.resource_spans:
            self.files.write_line(to_json_line(request))

    def _grpc_export(self, body: bytes, context: grpc.ServicerContext):
        try:
            self.accept(parse_protobuf(body))
        except BadRequest as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return ExportTraceServiceResponse()

    def start(self) -> None:
        self.grpc_server.start()
        threading.Thread(target=self.http_server.serve_forever, name="otlp-http", daemon=True).start()

    def stop(self, grace_s: float = 2.0) -> None:
        self.http_server.shutdown()
        self.grpc_server.stop(grace_s).wait()
        self.files.close()


def _make_http_handler(collector: Collector):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep stderr for real problems
            pass

        def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            if self.path.split("?")[0] != HTTP_TRACES_PATH:
                return self._reply(404, b"only /v1/traces is served\n")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type not in (PROTOBUF, JSON):
                self.close_connection = True
                return self._reply(415, f"Content-Type must be {PROTOBUF} or {JSON}\n".encode())
            length = int(self.headers.get("Content-Length") or -1)
            if length < 0:
                self.close_connection = True
                return self._reply(411, b"Content-Length required\n")
            if length > collector.max_request_bytes:
                self.close_connection = True  # the body is not read
                return self._reply(413, b"request too large\n")
            body = self.rfile.read(length)
            try:
                body = _decompress(body, self.headers.get("Content-Encoding"), collector.max_request_bytes)
                request = parse_json(body) if content_type == JSON else parse_protobuf(body)
            except BadRequest as err:
                return self._reply(400, f"{err}\n".encode())
            except _TooLarge:
                return self._reply(413, b"request too large once decompressed\n")
            collector.accept(request)
            response = ExportTraceServiceResponse()
            if content_type == JSON:
                return self._reply(200, b"{}", JSON)
            return self._reply(200, response.SerializeToString(), PROTOBUF)

    return Handler


class _TooLarge(Exception):
    pass


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        out = d.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as err:
        raise BadRequest(f"invalid {encoding} body: {err}") from None
    if len(out) > limit:
        raise _TooLarge()
    return out


def _stop_signals() -> tuple[socket.socket, socket.socket]:
    """A socket pair whose first end becomes readable on SIGTERM or SIGINT
    (keep both alive: a closed write end's fd number would be reused by the
    next file opened, and the signal byte written into it).

    The interpreter's C-level handler writes the signal number to the wakeup fd
    from whichever thread the OS picked, so the main thread's blocking read
    always wakes. (A Python handler setting a threading.Event could deadlock on
    the Event's own lock, and one waking only the main thread could miss a
    signal delivered to a gRPC thread.)
    """
    readable, writable = socket.socketpair()
    writable.setblocking(False)
    signal.set_wakeup_fd(writable.fileno())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the wakeup fd does the work
    return readable, writable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-moe collector", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535; 0 picks a free one)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for traces.json (and rotated files)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback; ::1 for IPv6)")
    parser.add_argument("--grpc-port", type=_port, default=4317, help="0 picks a free port")
    parser.add_argument("--http-port", type=_port, default=4318, help="0 picks a free port")
    parser.add_argument("--rotate-mb", type=_positive, default=None, help="rotate traces.json past this size")
    parser.add_argument("--max-request-mb", type=_positive, default=64.0, help="largest request accepted")


def run(args: argparse.Namespace) -> int:
    stopped, _wakeup = _stop_signals()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"otel-moe collector: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        collector = Collector(
            args.out, args.host, args.grpc_port, args.http_port,
            max_request_bytes=int(args.max_request_mb * (1 << 20)),
            rotate_bytes=int(args.rotate_mb * (1 << 20)) if args.rotate_mb else None,
        )
    except (StartError, OSError) as err:
        print(f"otel-moe collector: {err}", file=sys.stderr)
        return 2
    collector.start()
    # Tests and `make demo` wait for this line rather than sleeping.
    host = _bracketed(collector.host)
    print(f"otel-moe collector: OTLP/gRPC {host}:{collector.grpc_port} "
          f"OTLP/HTTP {host}:{collector.http_port} writing {collector.files.path}", flush=True)
    stopped.recv(1)
    collector.stop()
    print(f"otel-moe collector: stopped after {collector.files.lines} lines", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
