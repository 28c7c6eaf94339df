"""OTLP trace protobuf written directly: ``moe.step`` spans as the bytes the SDK's
encoder would make of the same span, without the SDK's span objects.

A step's routing is already packed arrays; the SDK would check each attribute as
the span takes it, then build a protobuf object per attribute and event and copy
each array into it (most of the exporter's CPU at 256 experts). Here each span is
one ``bytes``: fixed parts (an event's name, a layer's key) are made once, the
arrays go in as they are. Its length is exact, so exports are cut by real size.

Field numbers are those of opentelemetry-proto's ``trace/v1/trace.proto``,
``common/v1/common.proto`` and ``resource/v1/resource.proto``; what the SDK's
encoder writes beside them (span kind, flags, an empty status) is written the
same way, which the tests check by parsing both.
"""
from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from typing import Any

_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")

SPAN_KIND_INTERNAL = 1
FLAGS_HAS_IS_REMOTE = 0x100  # SpanFlags: the SDK always says whether the parent (or linked span) was remote


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def varint(n: int) -> bytes:
    if 0 <= n < 0x80:  # tags, flags, short keys' lengths
        return _ONE_BYTE[n]
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: ten bytes
    if n < 0x4000:  # most lengths
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + varint(len(payload)) + payload


def _fixed64(number: int, value: int) -> bytes:
    return _tag(number, 1) + _FIXED64.pack(value)


def _fixed32(number: int, value: int) -> bytes:
    return _tag(number, 5) + _FIXED32.pack(value)


# ---- common.proto: AnyValue, KeyValue ---------------------------------------------
class EncodedValue(bytes):
    """An AnyValue encoded once, for a value repeated span after span (a step's layers)."""


def any_value(value: Any) -> bytes:
    """An attribute value as the SDK's encoder types it (bool before int: a bool is an int)."""
    if type(value) is EncodedValue:
        return value
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")  # bool_value = 2
    if isinstance(value, str):
        return length_delimited(1, value.encode())  # string_value
    if isinstance(value, int):
        return b"\x18" + varint(value)  # int_value = 3
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)  # double_value = 4
    if isinstance(value, (bytes, bytearray, memoryview)):
        return length_delimited(7, bytes(value))  # bytes_value
    if isinstance(value, Sequence):
        return length_delimited(5, b"".join(length_delimited(1, any_value(v)) for v in value))  # array_value
    return b"\x18" + varint(operator.index(value))  # a numpy integer (anything else: TypeError)


def key_value(key: str, value: Any) -> bytes:
    return length_delimited(1, key.encode()) + length_delimited(2, any_value(value))


def key_field(key: str) -> bytes:
    """A KeyValue's key, made once per attribute name."""
    return length_delimited(1, key.encode())


def bytes_attribute(number: int, key: bytes, data: bytes) -> bytes:
    """KeyValue(``key`` as :func:`key_field` made it, bytes_value=data) as field ``number``:
    ``data`` copied once (nesting it field by field would copy it at each level)."""
    any_len = 1 + len(varint(len(data))) + len(data)
    kv_len = len(key) + 1 + len(varint(any_len)) + any_len
    return b"".join((_tag(number, 2), varint(kv_len), key, b"\x12", varint(any_len), b"\x3a", varint(len(data)), data))


def attributes(number: int, items: dict) -> bytes:
    """``items`` as the repeated KeyValue field ``number`` of its message."""
    return b"".join(length_delimited(number, key_value(k, v)) for k, v in items.items())


# ---- trace.proto ------------------------------------------------------------------
def span(trace_id: int, span_id: int, name: str, start_ns: int, end_ns: int, span_attributes: dict,
         events: Sequence[bytes] = (), links: Sequence[bytes] = ()) -> bytes:
    """A root span of kind INTERNAL (a ``moe.step``); ``events`` and ``links`` as
    :func:`event` and :func:`link` make them."""
    return b"".join((
        length_delimited(1, trace_id.to_bytes(16, "big")),
        length_delimited(2, span_id.to_bytes(8, "big")),
        length_delimited(5, name.encode()),
        b"\x30" + varint(SPAN_KIND_INTERNAL),  # kind = 6
        _fixed64(7, start_ns),
        _fixed64(8, end_ns),
        attributes(9, span_attributes),
        *(length_delimited(11, e) for e in events),
        *(length_delimited(13, link_) for link_ in links),
        b"\x7a\x00",  # status = 15: UNSET, as the SDK writes it
        _fixed32(16, FLAGS_HAS_IS_REMOTE),  # a root: no remote parent
    ))


def event_head(name: str, time_ns: int) -> bytes:
    """An event's time and name; its attributes (field 3) follow."""
    return _fixed64(1, time_ns) + length_delimited(2, name.encode())


def link(trace_id: int, span_id: int) -> bytes:
    """A link to a span of this process (a ``moe.request``): not remote."""
    return b"".join((
        length_delimited(1, trace_id.to_bytes(16, "big")),
        length_delimited(2, span_id.to_bytes(8, "big")),
        _fixed32(6, FLAGS_HAS_IS_REMOTE),
    ))


def scope_spans_head(name: str, version: str) -> bytes:
    """A ScopeSpans' scope (field 1); its spans (field 2) follow."""
    return length_delimited(1, length_delimited(1, name.encode()) + length_delimited(2, version.encode()))


def resource(resource_attributes: dict) -> bytes:
    """A ResourceSpans' resource (field 1), made once per process."""
    return length_delimited(1, attributes(1, resource_attributes))


def export_request(resource_head: bytes, scope_head: bytes, spans: Sequence[bytes]) -> bytes:
    """An ExportTraceServiceRequest of one resource and one scope (heads as
    :func:`resource` and :func:`scope_spans_head` make them)."""
    scope_spans = scope_head + b"".join(length_delimited(2, s) for s in spans)
    return length_delimited(1, resource_head + length_delimited(2, scope_spans))


def framed_size(payload_len: int) -> int:
    """Bytes a length-delimited field of this payload takes (a one-byte tag)."""
    return 1 + len(varint(payload_len)) + payload_len
