"""OTLP/JSON as the OpenTelemetry Collector writes it: camelCase fields, trace
and span ids in hex, 64-bit integers as strings, enums as numbers, bytes in
base64. protobuf's JSON mapping differs only in the ids (it writes base64), so
those are converted both ways here.
"""
from __future__ import annotations

import base64
import binascii
import json

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class BadRequest(ValueError):
    """The body is not a valid OTLP traces request."""


def _convert_ids(request: dict, convert) -> dict:
    for resource_spans in request.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for item in [span, *span.get("links", [])]:
                    for field in _ID_FIELDS:
                        if item.get(field):
                            item[field] = convert(item[field])
    return request


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_to_b64(value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise BadRequest(f"invalid hex id {value[:40]!r}") from None


def to_json_line(request) -> str:
    """One request (traces or metrics) -> one line of OTLP/JSON, newline included.
    (Metric exemplars' ids would stay base64: otel-moe's metrics record none.)"""
    as_dict = json_format.MessageToDict(request, use_integers_for_enums=True)
    return json.dumps(_convert_ids(as_dict, _b64_to_hex), separators=(",", ":")) + "\n"


ID_BYTES = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


def check_ids(request: ExportTraceServiceRequest) -> None:
    """OTLP ids have fixed lengths (trace 16 bytes, span 8; a parent span id 8 or absent)."""
    for r, resource_spans in enumerate(request.resource_spans):
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for i, span in enumerate(scope_spans.spans):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                _check_id(where, "traceId", span.trace_id)
                _check_id(where, "spanId", span.span_id)
                if span.parent_span_id:
                    _check_id(where, "parentSpanId", span.parent_span_id)
                for j, link in enumerate(span.links):
                    _check_id(f"{where}.links[{j}]", "traceId", link.trace_id)
                    _check_id(f"{where}.links[{j}]", "spanId", link.span_id)


def _check_id(where: str, field: str, value: bytes) -> None:
    if len(value) != ID_BYTES[field]:
        raise BadRequest(f"{where}.{field}: {ID_BYTES[field]} bytes expected, got {len(value)}")


def parse_protobuf(body: bytes, message=ExportTraceServiceRequest):
    """``message``: ExportTraceServiceRequest (default) or ExportMetricsServiceRequest."""
    request = message()
    try:
        request.ParseFromString(body)
    except Exception as err:  # DecodeError, and RuntimeWarning-ish oddities from upb
        raise BadRequest(f"invalid protobuf: {err}") from None
    if message is ExportTraceServiceRequest:
        check_ids(request)
    return request


def parse_json(body: bytes, message=ExportTraceServiceRequest):
    try:
        as_dict = json.loads(body)
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"invalid JSON: {err}") from None
    if not isinstance(as_dict, dict):
        raise BadRequest("an OTLP/JSON request is an object")
    request = message()
    try:
        json_format.ParseDict(_convert_ids(as_dict, _hex_to_b64), request, ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error, TypeError, AttributeError, ValueError, RecursionError) as err:
        raise BadRequest(f"invalid OTLP/JSON: {err}") from None
    if message is ExportTraceServiceRequest:
        check_ids(request)
    return request


__all__ = ["BadRequest", "ExportMetricsServiceRequest", "ExportTraceServiceRequest", "check_ids", "parse_json",
           "parse_protobuf", "to_json_line"]
