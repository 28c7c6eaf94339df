"""What the OTLP sink sends, kept in memory: each export request parsed, and its
spans as plain objects (name, attributes, events, links, context, parent, start_time)."""
from __future__ import annotations

from types import SimpleNamespace

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class MemoryTransport:
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.bodies: list[bytes] = []

    def send(self, body: bytes, spans: int) -> bool:
        request = ExportTraceServiceRequest.FromString(body)
        assert sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans) == spans
        self.requests.append(request)
        self.bodies.append(body)
        return True

    def shutdown(self) -> None:
        pass

    def spans(self) -> list[SimpleNamespace]:
        return [plain(span) for request in self.requests for r in request.resource_spans
                for s in r.scope_spans for span in s.spans]


def value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return None if kind is None else getattr(any_value, kind)


def attributes(key_values) -> dict:
    return {kv.key: value(kv.value) for kv in key_values}


def _context(trace_id: bytes, span_id: bytes) -> SimpleNamespace:
    return SimpleNamespace(trace_id=int.from_bytes(trace_id, "big"), span_id=int.from_bytes(span_id, "big"))


def plain(span) -> SimpleNamespace:
    return SimpleNamespace(
        name=span.name, attributes=attributes(span.attributes), start_time=span.start_time_unix_nano,
        end_time=span.end_time_unix_nano, context=_context(span.trace_id, span.span_id),
        parent=SimpleNamespace(span_id=int.from_bytes(span.parent_span_id, "big")) if span.parent_span_id else None,
        events=[SimpleNamespace(name=e.name, attributes=attributes(e.attributes)) for e in span.events],
        links=[SimpleNamespace(context=_context(link.trace_id, link.span_id)) for link in span.links])
