"""The collector's OTLP/JSON writer against protobuf's own JSON mapping: the fast
walk must write exactly what json_format.MessageToDict (enums as numbers, the
spans' and links' ids in hex) writes, for whatever the collector may receive."""
from __future__ import annotations

import json
import math

from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp_memory import MemoryTransport

from otel_moe.collector import otlp_json
from otel_moe.collector.otlp_json import BadRequest, parse_protobuf, to_json_line
from otel_moe.config import from_env
from otel_moe.exporter.sinks.metrics import ExpertMetrics
from otel_moe.exporter.sinks.otlp import OtlpSink
from tools import synthetic


def reference_line(request) -> bytes:
    """protobuf's generic mapping, then the ids to hex, through json.dumps."""
    as_dict = json_format.MessageToDict(request, use_integers_for_enums=True)
    return (json.dumps(otlp_json._convert_ids(as_dict, otlp_json._b64_to_hex), separators=(",", ":")) + "\n").encode()


def test_otel_moe_spans_are_written_as_protobuf_would():
    """Step spans of both modes and request spans, as the sink makes them."""
    keep = MemoryTransport()
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {"otel_moe.run_id": "r"}, transport=keep)
    for record in synthetic.records(steps=6, tokens=64, layers=3, top_k=2, experts=300, requests=4):
        sink.write(record)
        sink.finish(record.request_ids[:2])
    sink.close(10)
    assert keep.requests
    for request in keep.requests:
        assert to_json_line(request) == reference_line(request)


def test_every_kind_of_value_and_field():
    request = json_format.ParseDict({"resourceSpans": [
        {"resource": {}, "schemaUrl": "s", "scopeSpans": [{"scope": {"name": "n", "version": "v"}, "spans": [{
            "traceId": "AAECAwQFBgcICQoLDA0ODw==", "spanId": "AAECAwQFBgc=", "parentSpanId": "BwYFBAMCAQA=",
            "traceState": "k=v", "flags": 257, "name": "x", "kind": 3,
            "startTimeUnixNano": "18446744073709551615", "endTimeUnixNano": "1",
            "attributes": [
                {"key": "s", "value": {"stringValue": "é\u2028\"\\"}}, {"key": "b", "value": {"boolValue": False}},
                {"key": "i", "value": {"intValue": "-9223372036854775808"}}, {"key": "d", "value": {"doubleValue": 0.1}},
                {"key": "nan", "value": {"doubleValue": "NaN"}}, {"key": "inf", "value": {"doubleValue": "-Infinity"}},
                {"key": "z", "value": {"doubleValue": -0.0}}, {"key": "bytes", "value": {"bytesValue": "AAH/"}},
                {"key": "empty", "value": {}},
                {"key": "a", "value": {"arrayValue": {"values": [{"intValue": "1"}, {"arrayValue": {}}]}}},
                {"key": "kv", "value": {"kvlistValue": {"values": [{"key": "in", "value": {"stringValue": ""}}]}}}],
            "droppedAttributesCount": 4, "events": [{"timeUnixNano": "5", "name": "e", "droppedAttributesCount": 1}],
            "links": [{"traceId": "AAECAwQFBgcICQoLDA0ODw==", "spanId": "AAECAwQFBgc=", "traceState": "t", "flags": 1}],
            "droppedLinksCount": 2, "status": {"code": 2, "message": "bad"}}]}]}]}, ExportTraceServiceRequest())
    line = to_json_line(request)
    assert line == reference_line(request)
    span = json.loads(line)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "000102030405060708090a0b0c0d0e0f" and span["links"][0]["spanId"] == "0001020304050607"
    assert span["startTimeUnixNano"] == "18446744073709551615" and span["attributes"][4]["value"]["doubleValue"] == "NaN"


def test_metrics_requests_too():
    """The SDK's own encoding of otel-moe's metrics: sums, gauges, resource, scope."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    metrics = ExpertMetrics({"otel_moe.run_id": "m"}, "experts", reader)
    for record in synthetic.records(steps=3, tokens=32, layers=2, top_k=2, experts=8, requests=4):
        metrics.add(record)
    request = encode_metrics(reader.get_metrics_data())
    assert isinstance(request, ExportMetricsServiceRequest) and request.resource_metrics
    assert to_json_line(request) == reference_line(request)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_whatever_parses_is_written_as_protobuf_would(body):
    try:
        request = parse_protobuf(body)
    except BadRequest:
        return
    assert to_json_line(request) == reference_line(request)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**63, 2**63 - 1),
                          st.text(max_size=8), st.booleans(), st.binary(max_size=8)), max_size=12))
def test_fuzz_attribute_values(values):
    keep = MemoryTransport()
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {"v": "x"}, transport=keep)
    span = sink.tracer.start_span("s", attributes={f"a{i}": v for i, v in enumerate(values)})
    span.end()
    sink.close(5)
    (request,) = keep.requests
    line = to_json_line(request)
    assert line == reference_line(request)
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(json.loads(line)))


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_a_map_or_well_known_type_is_left_to_protobuf():
    """Not in OTLP today; a message with one still gets protobuf's mapping."""
    from google.protobuf import struct_pb2

    message = struct_pb2.Struct()
    message.update({"a": 1.5, "b": [True, None]})
    assert to_json_line(message) == (json.dumps(json_format.MessageToDict(message), separators=(",", ":")) + "\n").encode()
