"""OTLP/JSON as the OpenTelemetry Collector writes it: camelCase fields, trace
and span ids in hex, 64-bit integers as strings, enums as numbers, bytes in
base64. protobuf's JSON mapping differs only in the ids (it writes base64), so
those are converted both ways here.
"""
from __future__ import annotations

import base64
import binascii
import json
import math

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
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
    try:
        as_dict = message_to_dict(request)
    except _NotPlain:  # a message type protobuf's own mapping must write
        as_dict = _convert_ids(json_format.MessageToDict(request, use_integers_for_enums=True), _b64_to_hex)
    return json.dumps(as_dict, separators=(",", ":")) + "\n"


# ---- protobuf's JSON mapping, for plain messages such as OTLP's ----------------
# json_format.MessageToDict walks every field through several generic calls; the
# collector spent ~0.7 ms per engine step there. This walks the same ListFields()
# with one converter per field, made once (and a message of one oneof, OTLP's AnyValue,
# without the walk); the output is the same (tested), with enums as numbers and the
# spans' and links' ids in hex as above.
_SPAN_TYPES = ("opentelemetry.proto.trace.v1.Span", "opentelemetry.proto.trace.v1.Span.Link")
_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
_FIELDS: dict = {}  # field descriptor -> (JSON name, converter of its value)


class _NotPlain(Exception):
    """A map, an extension or a well-known type: left to json_format."""


def message_to_dict(message) -> dict:
    out = {}
    for field, value in message.ListFields():
        known = _FIELDS.get(field)
        if known is None:
            known = _FIELDS[field] = (field.json_name, _converter(field))
        out[known[0]] = known[1](value)
    return out


def _converter(field):
    if field.is_extension:
        raise _NotPlain(field.full_name)
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        kind = field.message_type
        if kind.GetOptions().map_entry or kind.full_name.startswith("google.protobuf."):
            raise _NotPlain(kind.full_name)
        one = _one_of_converter(kind) or message_to_dict
    elif field.type == FieldDescriptor.TYPE_BYTES:
        if field.containing_type.full_name in _SPAN_TYPES and field.json_name in ID_BYTES:
            one = bytes.hex
        else:
            one = _base64
    elif field.cpp_type in _INT64:
        one = str
    elif field.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
        one = _double
    elif field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        one = _float
    else:  # string, bool, 32-bit integers, enums (as numbers)
        one = _same
    if field.is_repeated:
        return lambda values: [one(v) for v in values]
    return one


def _one_of_converter(kind):
    """A message whose every field lies in one oneof (OTLP's AnyValue: every attribute
    value, every element of a request-id array) holds at most one field: WhichOneof
    names it without ListFields' walk. ``None`` for other messages."""
    if len(kind.oneofs) != 1 or len(kind.oneofs[0].fields) != len(kind.fields):
        return None
    oneof = kind.oneofs[0].name
    fields: dict = {}  # field name -> (JSON name, converter), made on first sight (a field may hold this type again)

    def convert(message) -> dict:
        name = message.WhichOneof(oneof)
        if name is None:
            return {}
        known = fields.get(name)
        if known is None:
            field = kind.fields_by_name[name]
            known = fields[name] = (field.json_name, _converter(field))
        return {known[0]: known[1](getattr(message, name))}

    return convert


def _same(value):
    return value


def _base64(value: bytes) -> str:
    return binascii.b2a_base64(value, newline=False).decode("ascii")


def _double(value: float):
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _float(value: float):
    value = _double(value)
    return value if isinstance(value, str) else type_checkers.ToShortestFloat(value)


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
