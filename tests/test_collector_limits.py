"""The collector under a hostile client, on the real collector process: bounded
memory, bounded connections and threads, deadlines, strict bodies, a clean
SIGTERM with a request in flight."""
from __future__ import annotations

import gzip
import http.client
import json
import signal
import socket
import threading
from pathlib import Path

import grpc
import pytest
from conftest import CollectorProcess

from tools.hostile import EXPORT, empty_spans  # noqa: E402
from tools.hostile import big_request as valid_request

PROTOBUF = "application/x-protobuf"


def status_of(proc_pid: int, key: str) -> int:
    for line in Path(f"/proc/{proc_pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def post(c: CollectorProcess, body: bytes, content_type: str = PROTOBUF, **headers) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(c.host, c.http_port, timeout=60)
    conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": content_type, **headers})
    response = conn.getresponse()
    answer = (response.status, dict(response.getheaders()), response.read())
    conn.close()
    return answer


def raw_exchange(c: CollectorProcess, data: bytes, shut_write: bool = True) -> bytes:
    """Send bytes as they are, then read the answer until the server closes."""
    with socket.create_connection((c.host, c.http_port), timeout=30) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def lines(c: CollectorProcess) -> int:
    path = c.out_dir / "traces.json"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture()
def small(tmp_path):
    c = CollectorProcess(tmp_path / "out", "--memory-mb", "64", "--max-request-mb", "32", "--timeout-s", "1", "--max-connections", "8")
    yield c
    c.stop()


def test_a_gzip_bomb_of_empty_spans_is_refused_before_it_is_built(tmp_path):
    c = CollectorProcess(tmp_path / "out", "--max-request-mb", "64")  # the bomb's size passes: its cost must not
    try:
        before = status_of(c.proc.pid, "VmRSS")
        bomb = empty_spans(30_000_000)  # 60 MiB of protobuf, ~8 GiB once parsed and converted
        squeezed = gzip.compress(bomb, 9)
        assert len(squeezed) < 256 << 10
        status, _, body = post(c, squeezed, **{"Content-Encoding": "gzip"})
        assert status == 413 and b"memory budget" in body
        with grpc.insecure_channel(f"{c.host}:{c.grpc_port}", options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(EXPORT)(bomb, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the 60 MiB body itself, decompressed once (HTTP) and received once (gRPC), is all it cost
        assert status_of(c.proc.pid, "VmHWM") - before < 300 << 10, "KiB"
        assert post(c, valid_request())[0] == 200 and lines(c) == 1
    finally:
        c.stop()


def test_requests_of_many_spans_and_deep_values_are_measured_right(small):
    assert post(small, valid_request(spans=2000))[0] == 200  # siblings are not depth
    value = "{}"
    for _ in range(30):  # 60 levels of messages, under protobuf's 100
        value = f'{{"arrayValue": {{"values": [{value}]}}}}'
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "x", "attributes": [{"key": "deep", "value": json.loads(value)}]}
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()
    assert post(small, body, "application/json")[0] == 200
    assert lines(small) == 2


def test_parallel_requests_are_admitted_against_the_budget(small):
    before = status_of(small.proc.pid, "VmRSS")
    body = valid_request(attribute_bytes=4 << 20)  # ~28 MiB to hold and convert: two fit in 64 MiB
    results = []
    barrier = threading.Barrier(8)

    def send():
        barrier.wait()
        results.append(post(small, body))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
    assert all(headers.get("Retry-After") == "1" for status, headers, _ in results if status == 429)
    assert lines(small) == statuses.count(200)
    assert post(small, valid_request(attribute_bytes=16 << 20))[0] == 413  # more than the budget alone
    assert status_of(small.proc.pid, "VmHWM") - before < (64 + 100) << 10, "budget + a constant, KiB"


def test_connections_are_bounded_and_idle_ones_cut(small):
    threads_before = status_of(small.proc.pid, "Threads")
    idle = [socket.create_connection((small.host, small.http_port), timeout=30) for _ in range(8)]
    extra = socket.create_connection((small.host, small.http_port), timeout=30)
    assert extra.recv(200).startswith(b"HTTP/1.1 503")  # the 9th: refused at once, no thread for it
    extra.close()
    assert status_of(small.proc.pid, "Threads") <= threads_before + 8 + 8  # + deadline timers
    for s in idle:
        assert s.recv(10) == b""  # cut after --timeout-s of silence
        s.close()
    assert post(small, valid_request())[0] == 200


def test_slow_headers_are_cut(small):
    with socket.create_connection((small.host, small.http_port), timeout=30) as s:
        s.sendall(b"POST /v1/traces HTTP/1.1\r\n")
        closed = threading.Event()

        def trickle():  # one header byte every 0.2 s, forever
            while not closed.wait(0.2):
                try:
                    s.sendall(b"X")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        assert s.recv(10) == b""  # cut at the header deadline though bytes keep coming
        closed.set()


@pytest.mark.parametrize("name,data,answer", [
    ("short body", b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: 100\r\n\r\n" + b"x" * 50,
     b"body ended after 50 of its 100 bytes"),
    ("non-numeric length", b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: ten\r\n\r\n",
     b"Content-Length 'ten' is not a number"),
])
def test_bodies_must_be_whole(small, name, data, answer):
    reply = raw_exchange(small, data)
    assert reply.startswith(b"HTTP/1.1 400") and answer in reply, reply
    assert lines(small) == 0


def test_compressed_bodies_must_be_complete(small):
    whole = gzip.compress(valid_request())
    for body, answer in ((whole[:-8], b"incomplete gzip stream"), (whole + b"junk", b"bytes after the end")):
        status, _, text = post(small, body, **{"Content-Encoding": "gzip"})
        assert status == 400 and answer in text, text
    assert post(small, whole, **{"Content-Encoding": "gzip"})[0] == 200 and lines(small) == 1


def test_chunked_bodies_are_read(small):
    body = valid_request()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    reply = raw_exchange(small, b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
                                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert lines(small) == 1


def test_ids_of_the_wrong_length_are_refused_naming_the_field(small):
    status, _, text = post(small, valid_request(trace_id=b"ab"))
    assert status == 400 and b"spans[0].traceId: 16 bytes expected, got 2" in text
    status, _, text = post(small, valid_request(span_id=b"s"))
    assert status == 400 and b"spans[0].spanId: 8 bytes expected, got 1" in text
    as_json = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "ab" * 17, "spanId": "cd" * 8, "name": "x"}]}]}]}
    status, _, text = post(small, json.dumps(as_json).encode(), "application/json")
    assert status == 400 and b"traceId: 16 bytes expected, got 17" in text
    with grpc.insecure_channel(f"{small.host}:{small.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(EXPORT)(valid_request(span_id=b"s" * 9), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spanId" in err.value.details()
    deep = b"[" * 1000 + b"]" * 1000
    status, _, text = post(small, b'{"resourceSpans": ' + deep + b"}", "application/json")
    assert status == 400 and b"nested too deeply" in text
    assert lines(small) == 0
    assert not [line for line in small.output if "Traceback" in line]


@pytest.mark.parametrize("memory_mb,max_request_mb,taken", [("512", "8", 64), ("512", "64", 8), ("16", "8", 4)])
def test_grpc_takes_as_many_exports_at_once_as_the_memory_budget_holds(memory_mb, max_request_mb, taken):
    from otel_moe.collector.server import grpc_concurrency

    assert grpc_concurrency(int(memory_mb) << 20, int(max_request_mb) << 20) == taken


def test_fifty_exporters_at_once_are_all_acknowledged(tmp_path):
    """50 gRPC and 50 HTTP exports started together, within the default budget: every one
    answered OK / 200 and written, none refused for want of a thread."""
    c = CollectorProcess(tmp_path / "out")
    body = valid_request(256 << 10, spans=4)
    start = threading.Barrier(100)
    answers: list[str] = []

    def grpc_export() -> None:
        with grpc.insecure_channel(f"{c.host}:{c.grpc_port}") as channel:
            channel_ready = grpc.channel_ready_future(channel)
            channel_ready.result(timeout=30)
            start.wait()
            try:
                channel.unary_unary(EXPORT)(body, timeout=60)
                answers.append("OK")
            except grpc.RpcError as err:
                answers.append(err.code().name)

    def http_export() -> None:
        start.wait()
        answers.append(str(post(c, body)[0]))

    try:
        threads = [threading.Thread(target=grpc_export) for _ in range(50)] + [threading.Thread(target=http_export) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(answers) == ["200"] * 50 + ["OK"] * 50
        assert lines(c) == 100
    finally:
        assert c.stop() == 0


def test_sigterm_with_a_request_in_flight(tmp_path):
    """It finishes (200, written) if the collector had begun it, else it gets 503, or its
    connection is cut if its headers were not read yet, and nothing is written; either
    way the collector exits cleanly, no traceback."""
    c = CollectorProcess(tmp_path / "out")
    body = valid_request(spans=3)
    with socket.create_connection((c.host, c.http_port), timeout=30) as s:
        s.sendall(b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:20])
        c.proc.send_signal(signal.SIGTERM)
        try:
            s.sendall(body[20:])
            reply = b"".join(iter(lambda: s.recv(4096), b""))  # until the collector closes
        except ConnectionResetError:
            reply = b""
    assert c.proc.wait(timeout=30) == 0
    assert (reply.startswith(b"HTTP/1.1 200") and lines(c) == 1) or (
        reply.startswith(b"HTTP/1.1 503") and b"the collector is stopping" in reply and lines(c) == 0) or (
        reply == b"" and lines(c) == 0), reply
    assert not [line for line in c.output if "Traceback" in line]
