"""The sink's hand-written OTLP protobuf against the OpenTelemetry SDK's own encoder:
each request it sends, rebuilt as SDK spans and encoded by the SDK, must be the
same protobuf, field for field."""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from otlp_memory import MemoryTransport, attributes
from test_otlp_sink import make_record

from otel_moe import schema
from otel_moe.config import from_env
from otel_moe.exporter.sinks import otlp, otlp_protobuf
from otel_moe.exporter.sinks.otlp import OtlpSink


def _context(trace_id: bytes, span_id: bytes) -> SpanContext:
    return SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), is_remote=False,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _as_sdk(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """The same spans made as SDK spans, encoded by the SDK."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = Resource(attributes(resource_spans.resource.attributes))
        for scope_spans in resource_spans.scope_spans:
            scope = InstrumentationScope(scope_spans.scope.name, scope_spans.scope.version)
            for span in scope_spans.spans:
                assert not span.parent_span_id  # moe.step spans are roots
                spans.append(ReadableSpan(
                    name=span.name, context=_context(span.trace_id, span.span_id), parent=None, resource=resource,
                    attributes=attributes(span.attributes), kind=SpanKind.INTERNAL,
                    events=[Event(e.name, attributes(e.attributes), e.time_unix_nano) for e in span.events],
                    links=[Link(_context(link.trace_id, link.span_id)) for link in span.links],
                    start_time=span.start_time_unix_nano, end_time=span.end_time_unix_nano, instrumentation_scope=scope))
    return encode_spans(spans)


def _same(body: bytes) -> None:
    ours = ExportTraceServiceRequest.FromString(body)
    assert ours.SerializeToString(deterministic=True) == _as_sdk(ours).SerializeToString(deterministic=True)


def test_step_spans_of_both_modes_chunks_and_links_are_the_sdks(monkeypatch):
    monkeypatch.setattr(otlp, "SPAN_PAYLOAD_BYTES", 600)  # 600 // (3 layers x top-2 x 4 bytes): 25 tokens a span
    memory = MemoryTransport()
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {schema.RUN_ID: "r", "vllm.model": "m"}, transport=memory)
    record = make_record(0, requests=10, tokens_each=8, layers=3, top_k=2, experts=300)  # 80 tokens, <u2 ids
    sink.begin([(r, f"00-{i + 1:032x}-{i + 1:016x}-01", "", 0) for i, r in enumerate(record.request_ids)])
    sink.write(record)
    none = np.zeros(0, np.int64)
    window = dataclasses.replace(  # counts mode: steps 1-4 in one span, no requests
        make_record(1, requests=3, tokens_each=2, layers=3, top_k=2, experts=8), request_ids=[], request_tokens=none,
        positions=none, prompt_lens=none, ids=None, weights=None, counts=np.arange(24).reshape(3, 8), last_step=4,
        window_tokens=6)
    sink.write(window)
    sink.idle()
    steps = [s for s in memory.spans() if s.name == schema.STEP_SPAN]
    assert [s.attributes[schema.STEP_CHUNK] for s in steps] == [0, 1, 2, 3, 0]  # 80 tokens in four chunks, then the window
    assert len(steps[0].links) == 10 and not steps[1].links
    assert steps[4].attributes[schema.STEP_LAST_INDEX] == 4 and len(steps[4].events) == 3
    for body in memory.bodies:
        _same(body)


_values = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=6), st.binary(max_size=6))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.one_of(_values, st.lists(st.integers(-2**63, 2**63 - 1), max_size=4),
                                                      st.lists(st.text(max_size=4), max_size=3)), max_size=6))
def test_every_attribute_value_is_encoded_as_the_sdk_does(values):
    span = otlp_protobuf.span(2**128 - 1, 1, "s", 1, 2**64 - 1, values,
                              [otlp_protobuf.event_head("e", 3) + otlp_protobuf.attributes(3, values)],
                              [otlp_protobuf.link(5, 6)])
    body = otlp_protobuf.export_request(otlp_protobuf.resource({"service.name": "x", "n": 1.5}),
                                        otlp_protobuf.scope_spans_head("otel_moe", "1"), [span])
    _same(body)


def test_numpy_integers_are_ints():
    assert otlp_protobuf.any_value(np.int64(-3)) == otlp_protobuf.any_value(-3)


def test_bytes_attribute_is_a_key_value_of_bytes():
    key = otlp_protobuf.key_field("k")
    for size in (0, 1, 127, 128, 20000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert otlp_protobuf.bytes_attribute(3, key, data) == otlp_protobuf.attributes(3, {"k": data})
