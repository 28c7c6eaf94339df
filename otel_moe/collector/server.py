"""``otel-moe collector``: OTLP/gRPC and OTLP/HTTP receivers feeding one file exporter.

Receivers only parse and validate; the exporter (``files.RotatingFile``) only
writes. Every request is admitted against a memory budget before it is built
(``admission``): too large alone -> HTTP 413 / gRPC RESOURCE_EXHAUSTED, budget
taken by requests in flight -> 429 / UNAVAILABLE (retry). Garbage gets 400 /
INVALID_ARGUMENT, other content types 415, and the collector keeps serving. It
listens on loopback unless told otherwise and writes only under ``--out``; on
SIGTERM it stops taking requests, lets those in flight finish (or answers them
503 / UNAVAILABLE), then closes its file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from concurrent import futures

# gRPC's C core would print its own lines (a taken port...) past the collector's one-line errors.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc  # noqa: E402
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse  # noqa: E402

from otel_moe.collector import admission  # noqa: E402
from otel_moe.collector.admission import Busy, MemoryBudget, Reservation, TooLarge  # noqa: E402
from otel_moe.collector.files import Closed, RotatingFile  # noqa: E402
from otel_moe.collector.http_receiver import (  # noqa: E402
    BoundedHTTPServer,
    BoundedHTTPServer6,
    Unavailable,
    make_handler,
    make_prometheus_handler,
)
from otel_moe.collector.otlp_json import BadRequest, parse_protobuf, to_json_line  # noqa: E402
from otel_moe.collector.prometheus import PrometheusState  # noqa: E402
from otel_moe.scheduling import never_preempt_on_wakeup  # noqa: E402

GRPC_CONCURRENCY = (4, 64)  # concurrent gRPC exports, at least and at most


def grpc_concurrency(memory_bytes: int, max_request_bytes: int) -> int:
    """gRPC reads a whole message before the handler (and admission) sees it, so what bounds
    the messages of the exports in flight is how many it lets in at once: as many as the
    memory budget holds at the largest size accepted. One more gets RESOURCE_EXHAUSTED from
    gRPC itself (OpenTelemetry's exporters retry it); admission then answers UNAVAILABLE
    (retry) when the conversions in flight would pass the budget."""
    low, high = GRPC_CONCURRENCY
    return max(low, min(high, memory_bytes // max(1, max_request_bytes)))


class StartError(RuntimeError):
    """The collector cannot start as asked (a port taken, a bad folder): one line says why."""


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Collector:
    def __init__(self, out_dir: str, host: str, grpc_port: int, http_port: int, max_request_bytes: int,
                 rotate_bytes: int | None, memory_bytes: int = 512 << 20, timeout_s: float = 10.0,
                 max_connections: int = 64, prometheus_port: int | None = None) -> None:
        self.files = RotatingFile(out_dir, rotate_bytes)
        self.metric_files = RotatingFile(out_dir, rotate_bytes, "metrics")
        self.prometheus = PrometheusState() if prometheus_port is not None else None
        self.max_request_bytes = max_request_bytes
        self.budget = MemoryBudget(memory_bytes)
        self._inflight = 0
        self._idle = threading.Condition()
        self.stopping = False
        concurrency = grpc_concurrency(memory_bytes, max_request_bytes)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=concurrency), maximum_concurrent_rpcs=concurrency,
            # no SO_REUSEPORT: a second collector on a taken port must fail, not split the data
            options=[("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0)],
        )
        # Raw bytes in: parsing here lets garbage get INVALID_ARGUMENT, not INTERNAL.
        for service, message, response in (
                ("opentelemetry.proto.collector.trace.v1.TraceService", ExportTraceServiceRequest, ExportTraceServiceResponse),
                ("opentelemetry.proto.collector.metrics.v1.MetricsService", ExportMetricsServiceRequest,
                 ExportMetricsServiceResponse)):
            handler = grpc.unary_unary_rpc_method_handler(
                lambda body, context, message=message, response=response: self._grpc_export(body, context, message, response),
                request_deserializer=None, response_serializer=response.SerializeToString)
            self.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
        try:
            self.grpc_port = self.grpc_server.add_insecure_port(f"{_bracketed(host)}:{grpc_port}")
        except RuntimeError:
            self.grpc_port = 0
        if not self.grpc_port:
            raise StartError(f"cannot listen for OTLP/gRPC on {_bracketed(host)}:{grpc_port} (in use, or not an address here)")
        server_class = BoundedHTTPServer6 if ":" in host else BoundedHTTPServer
        try:
            self.http_server = server_class((host, http_port), make_handler(self, timeout_s), max_connections)
        except OSError as err:
            self.grpc_server.stop(0)
            raise StartError(f"cannot listen for OTLP/HTTP on {_bracketed(host)}:{http_port}: {err.strerror or err}") from None
        self.http_port = self.http_server.server_address[1]
        self.prometheus_server = None
        if self.prometheus is not None:
            try:
                self.prometheus_server = server_class((host, prometheus_port), make_prometheus_handler(self.prometheus, timeout_s),
                                                      max_connections)
            except OSError as err:
                self.grpc_server.stop(0)
                self.http_server.server_close()
                raise StartError(f"cannot serve Prometheus on {_bracketed(host)}:{prometheus_port}: {err.strerror or err}") from None
        self.host = host

    @contextlib.contextmanager
    def request(self):
        """Around one request, from its first byte: none starts once the collector
        is stopping (Unavailable), and stop() waits for those in flight."""
        with self._idle:
            if self.stopping:
                raise Unavailable()
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def accept(self, request) -> None:
        """Write one parsed request (traces or metrics); Unavailable if the file is already closed."""
        traces = isinstance(request, ExportTraceServiceRequest)
        if not (request.resource_spans if traces else request.resource_metrics):
            return
        try:
            (self.files if traces else self.metric_files).write_line(to_json_line(request))
        except Closed:
            raise Unavailable() from None
        if not traces and self.prometheus is not None:
            self.prometheus.update(request)

    def _grpc_export(self, body: bytes, context: grpc.ServicerContext, message, response):
        try:
            with self.request(), Reservation(self.budget) as held:
                held.add(len(body))  # gRPC has read it already; its size is bounded by max_receive_message_length
                held.add(admission.protobuf_cost(body, self.budget.total, message.DESCRIPTOR))
                self.accept(parse_protobuf(body, message))
        except (BadRequest, admission.Malformed) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except TooLarge as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request too large: {err}")
        except (Busy, Unavailable):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the collector is busy or stopping: retry")
        return response()

    def start(self) -> None:
        self.grpc_server.start()
        threading.Thread(target=self.http_server.serve_forever, name="otlp-http", daemon=True).start()
        if self.prometheus_server is not None:
            threading.Thread(target=self.prometheus_server.serve_forever, name="prometheus", daemon=True).start()

    def stop(self, grace_s: float = 5.0) -> None:
        """No new requests; those in flight get ``grace_s`` to finish, then the file closes
        (a request still running answers 503 / UNAVAILABLE, nothing is written after)."""
        with self._idle:
            self.stopping = True
        for server in (self.http_server, self.prometheus_server):
            if server is not None:
                server.shutdown()
                server.server_close()
        self.http_server.close_idle_and_wait(grace_s)
        self.grpc_server.stop(grace_s).wait()
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=grace_s)
        self.files.close()
        self.metric_files.close()


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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535; 0 picks a free one)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for traces.json (and rotated files)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback; ::1 for IPv6)")
    parser.add_argument("--grpc-port", type=_port, default=4317, help="OTLP/gRPC port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--http-port", type=_port, default=4318, help="OTLP/HTTP port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--rotate-mb", type=_positive, default=None, help="rotate traces.json past this size")
    parser.add_argument("--max-request-mb", type=_positive, default=8.0,
                        help="largest request accepted, compressed or not (default: %(default)s; the OpenTelemetry "
                             "Collector's gRPC receiver takes 4, otel-moe's exporter sends at most 3). gRPC takes "
                             "--memory-mb / this many exports at once (4 to 64)")
    parser.add_argument("--memory-mb", type=_positive, default=512.0,
                        help="memory budget for requests in flight, their conversion included; a request that would "
                             "pass it waits its turn (HTTP 429 / gRPC UNAVAILABLE) or is refused if too large alone "
                             "(default: %(default)s)")
    parser.add_argument("--timeout-s", type=_positive, default=10.0,
                        help="HTTP: an idle connection, or a request's headers, may take this long; its body "
                             "six times as long (default: %(default)s)")
    parser.add_argument("--prometheus-port", type=_port, default=None,
                        help="serve the OTLP metrics received as Prometheus text on this port, at /metrics "
                             "(default: off; 0 picks a free port)")
    parser.add_argument("--max-connections", type=_positive_int, default=64,
                        help="HTTP connections served at once; one more gets 503 (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    never_preempt_on_wakeup()  # an export arriving must not take a core from vLLM beside us
    stopped, _wakeup = _stop_signals()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"otel-moe collector: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        collector = Collector(
            args.out, args.host, args.grpc_port, args.http_port,
            max_request_bytes=int(args.max_request_mb * (1 << 20)),
            rotate_bytes=int(args.rotate_mb * (1 << 20)) if args.rotate_mb else None,
            memory_bytes=int(args.memory_mb * (1 << 20)), timeout_s=args.timeout_s, max_connections=args.max_connections,
            prometheus_port=args.prometheus_port,
        )
    except (StartError, OSError) as err:
        print(f"otel-moe collector: {err}", file=sys.stderr)
        return 2
    collector.start()
    # Tests and `make demo` wait for this line rather than sleeping.
    host = _bracketed(collector.host)
    prometheus = (f" Prometheus {host}:{collector.prometheus_server.server_address[1]}"
                  if collector.prometheus_server is not None else "")
    print(f"otel-moe collector: OTLP/gRPC {host}:{collector.grpc_port} "
          f"OTLP/HTTP {host}:{collector.http_port} writing {collector.files.path}{prometheus}", flush=True)
    stopped.recv(1)
    collector.stop()
    print(f"otel-moe collector: stopped after {collector.files.lines} lines", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
