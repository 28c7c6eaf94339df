"""The collector's memory budget: what a request may cost is known before it
is built, and requests are admitted against what is left.

A request's cost is its bytes (raw, then decompressed) plus its conversion:
parsing and re-encoding as OTLP/JSON costs ~6x the protobuf's bytes plus a
few hundred bytes per element (span, event, attribute, value), measured on
this machine. The elements are what makes small requests expensive (64 KiB of
gzip can hold 32 M empty spans: 8 GiB once converted), so they are counted on
the wire, along the OTLP trace schema, before anything is parsed.
"""
from __future__ import annotations

import functools
import threading

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

BYTES_FACTOR = 6  # converted size / protobuf size, for requests of few large attributes
ELEMENT_COST = 512  # bytes per element once parsed and converted (measured: ~250)
JSON_BYTES_FACTOR = 10  # OTLP/JSON bodies: json.loads, ParseDict, then back
MAX_DEPTH = 100  # nesting refused beyond protobuf's own limit


class TooLarge(Exception):
    """The request alone would exceed the budget: 413 / RESOURCE_EXHAUSTED."""


class Busy(Exception):
    """The budget is taken by requests in flight: 429 / UNAVAILABLE, retry later."""


class Malformed(ValueError):
    """Not a protobuf of the expected shape (the parser would refuse it too)."""


class MemoryBudget:
    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        if n > self.total:
            raise TooLarge(f"needs ~{n >> 20} MiB, more than the collector's memory budget ({self.total >> 20} MiB)")
        with self._lock:
            if self.used + n > self.total:
                raise Busy()
            self.used += n

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Reservation:
    """What one request holds of the budget; released as a whole at the end."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def grow_to(self, n: int) -> None:
        if n > self.held:
            self.budget.reserve(n - self.held)
            self.held = n

    def add(self, n: int) -> None:
        self.grow_to(self.held + n)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.budget.release(self.held)
        self.held = 0


@functools.lru_cache(maxsize=None)
def _nested(descriptor) -> dict:
    """Field number -> message descriptor, for a message's nested message fields."""
    return {f.number: f.message_type for f in descriptor.fields if f.message_type is not None}


def protobuf_cost(body: bytes, limit: int, root=ExportTraceServiceRequest.DESCRIPTOR) -> int:
    """Estimated bytes to parse and convert this request (``root``: its message
    descriptor, traces by default); stops counting (and raises TooLarge) as soon
    as it passes ``limit``. The walk follows the message descriptors: every
    nested message is an element, strings and bytes are skipped by length."""
    base = BYTES_FACTOR * len(body)
    if base > limit:
        raise TooLarge(f"~{base >> 20} MiB to convert, more than the budget ({limit >> 20} MiB)")
    most_elements = (limit - base) // ELEMENT_COST
    elements = 0
    stack = [(root, 0, len(body), 0)]  # messages still to walk, with their depth
    while stack:
        kind, pos, end, depth = stack.pop()
        nested = _nested(kind)
        if depth > MAX_DEPTH:
            raise Malformed("nested too deeply")
        while pos < end:
            key = body[pos]  # one-byte keys and lengths (most of them) without a call
            if key < 0x80:
                pos += 1
            else:
                key, pos = _varint(body, pos, end)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(body, pos, end)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size = body[pos] if pos < end else 0x80
                if size < 0x80:
                    pos += 1
                else:
                    size, pos = _varint(body, pos, end)
                if pos + size > end:
                    raise Malformed("a field runs past its message")
                if field in nested:
                    elements += 1
                    if elements > most_elements:
                        raise TooLarge(f"more than {most_elements} spans, events and attributes: more than the "
                                       f"memory budget ({limit >> 20} MiB) once converted")
                    stack.append((nested[field], pos, pos + size, depth + 1))
                pos += size
            else:
                raise Malformed(f"wire type {wire}")
        if pos != end:
            raise Malformed("a field runs past its message")
    return base + elements * ELEMENT_COST


def json_cost(body: bytes) -> int:
    """OTLP/JSON: every object or array is an element (an over-estimate: braces in strings count too)."""
    return JSON_BYTES_FACTOR * len(body) + (body.count(b"{") + body.count(b"[")) * ELEMENT_COST


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
