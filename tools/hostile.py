"""Hostile clients of the collector, for `tools/bench.py --sections hostile_soak`:
each attack sends one request (or holds one connection) and says what came back."""
from __future__ import annotations

import gzip
import http.client
import os
import socket

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def empty_spans(n: int) -> bytes:
    """An ExportTraceServiceRequest of n empty spans: 2 bytes each on the wire."""
    return _field(1, _field(2, b"\x12\x00" * n))


def big_request(attribute_bytes: int = 16, spans: int = 1, trace_id: bytes = b"t" * 16, span_id: bytes = b"s" * 8) -> bytes:
    """A valid request: ``spans`` spans, each with one bytes attribute of that size."""
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for _ in range(spans):
        span = scope.spans.add(trace_id=trace_id, span_id=span_id, name="x")
        span.attributes.add(key="blob").value.bytes_value = os.urandom(attribute_bytes)
    return request.SerializeToString()


class Attacks:
    def __init__(self, host: str, http_port: int, grpc_port: int) -> None:
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.bomb = empty_spans(30_000_000)
        self.gzip_bomb = gzip.compress(self.bomb, 9)
        self.big = big_request(4 << 20)

    def all(self) -> list:
        return [self.http_gzip_bomb, self.grpc_bomb, self.big_valid, self.idle, self.slow_headers, self.short_body,
                self.garbage, self.deep_json, self.bad_ids]

    def _post(self, body: bytes, content_type: str = "application/x-protobuf", **headers) -> str:
        conn = http.client.HTTPConnection(self.host, self.http_port, timeout=120)
        try:
            conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": content_type, **headers})
            return str(conn.getresponse().status)
        except OSError as err:
            return type(err).__name__
        finally:
            conn.close()

    def _raw(self, data: bytes, trickle: bool = False, close_write: bool = True) -> str:
        try:
            with socket.create_connection((self.host, self.http_port), timeout=120) as s:
                if trickle:
                    s.sendall(b"POST /v1/traces HTTP/1.1\r\n")
                    while s.send(b"X"):  # until the collector cuts it
                        s.settimeout(0.5)
                        try:
                            if s.recv(1) == b"":
                                return "cut"
                        except TimeoutError:
                            continue
                s.sendall(data)
                if close_write:
                    s.shutdown(socket.SHUT_WR)
                reply = b"".join(iter(lambda: s.recv(65536), b""))
                return reply[9:12].decode() if reply else "closed"
        except OSError as err:
            return type(err).__name__

    def http_gzip_bomb(self) -> str:
        return self._post(self.gzip_bomb, **{"Content-Encoding": "gzip"})

    def grpc_bomb(self) -> str:
        with grpc.insecure_channel(f"{self.host}:{self.grpc_port}", options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
            try:
                ch.unary_unary(EXPORT)(self.bomb, timeout=120)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name

    def big_valid(self) -> str:
        return self._post(self.big)

    def idle(self) -> str:
        return self._raw(b"", close_write=False)  # held open until the collector's idle deadline

    def slow_headers(self) -> str:
        return self._raw(b"", trickle=True)

    def short_body(self) -> str:
        return self._raw(b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"x" * 50000)

    def garbage(self) -> str:
        return self._post(os.urandom(4096))

    def deep_json(self) -> str:
        return self._post(b'{"resourceSpans": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json")

    def bad_ids(self) -> str:
        return self._post(big_request(16, trace_id=b"ab"))
