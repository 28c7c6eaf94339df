"""Encoded OTLP trace requests through the OpenTelemetry SDK's own span exporters.

The sink encodes (``otlp_protobuf``, and the SDK's encoder for ``moe.request``
spans); sending stays the SDK's: endpoint, headers, TLS, compression, timeouts,
retries and backoff, all from the standard ``OTEL_EXPORTER_OTLP_*`` variables. The
exporters take SDK spans, so each is given the one hook it needs to take a request
already serialized instead: gRPC a stub that sends bytes as they are, HTTP the call
of its client that posts them. Both are internals of
``opentelemetry-exporter-otlp-proto-{grpc,http}`` (the floor in pyproject.toml):
:func:`make_transport` refuses, in one line, an exporter without them.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from opentelemetry.sdk.trace.export import SpanExportResult

from otel_moe.config import otlp_protocol

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Transport(Protocol):
    def send(self, body: bytes, spans: int) -> bool:
        """One serialized ExportTraceServiceRequest of ``spans`` spans; True once acknowledged."""

    def shutdown(self) -> None: ...


class _Encoded(NamedTuple):
    body: bytes
    spans: int


class UnsupportedExporter(RuntimeError):
    """The installed OTLP exporter lacks the hook a serialized request needs."""


def make_transport() -> Transport:
    if otlp_protocol() == "grpc":
        return _grpc_transport()
    return _http_transport()


def _grpc_transport() -> Transport:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    class BytesStub:
        """TraceServiceStub, less its serializer: the request is already bytes."""

        def __init__(self, channel) -> None:
            self.Export = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                              response_deserializer=ExportTraceServiceResponse.FromString)

    class GrpcTransport(OTLPSpanExporter):
        def __init__(self) -> None:
            super().__init__()
            if not (hasattr(self, "_stub") and hasattr(self, "_channel") and hasattr(self, "_export")):
                raise UnsupportedExporter("opentelemetry-exporter-otlp-proto-grpc too old for otel-moe (needs 1.45+)")
            self._stub = BytesStub  # a reconnect (after UNAVAILABLE) makes its stub from this too
            self._client = BytesStub(self._channel)

        def _translate_data(self, data: _Encoded) -> bytes:
            return data.body

        def _count_data(self, data: _Encoded) -> int:
            return data.spans

        def send(self, body: bytes, spans: int) -> bool:
            return self._export(_Encoded(body, spans)) == SpanExportResult.SUCCESS

    return GrpcTransport()


def _http_transport() -> Transport:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class HttpTransport(OTLPSpanExporter):
        def __init__(self) -> None:
            super().__init__()
            if not (hasattr(getattr(self, "_client", None), "export") and hasattr(self, "_metrics")):
                raise UnsupportedExporter("opentelemetry-exporter-otlp-proto-http too old for otel-moe (needs 1.45+)")

        def send(self, body: bytes, spans: int) -> bool:
            if self._shutdown:
                return False
            with self._metrics.export_operation(spans) as result:  # the SDK's own exporter metrics
                answer = self._client.export(body)  # compression, retries and backoff are the client's
                if not answer.success:
                    result.error = answer.error
                    return False
            return True

    return HttpTransport()
