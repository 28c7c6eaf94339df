"""The embedded collector as a real process: both OTLP protocols from the real
SDK exporters, the file format, bad input, size limits, rotation, signals."""
from __future__ import annotations

import gzip
import json
import re
import signal
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import CollectorProcess
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_moe.collector.otlp_json import BadRequest, parse_json, parse_protobuf, to_json_line
from otel_moe.report import read

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _send_spans(exporter, names: list[str]) -> list:
    provider = TracerProvider(resource=Resource.create({"service.name": "collector-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    contexts = []
    for name in names:
        with tracer.start_as_current_span(name, attributes={"n": 1 << 40, "s": "x", "b": True}) as span:
            span.add_event("e", {"bytes_like": "AQID"})
            contexts.append(span.get_span_context())
    provider.shutdown()
    return contexts


def _lines(c: CollectorProcess) -> list[dict]:
    return [json.loads(line) for line in (c.out_dir / "traces.json").read_text().splitlines()]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_sdk_exporters_reach_the_file(collector, protocol):
    if protocol == "grpc":
        exporter = GrpcExporter(endpoint=collector.grpc_endpoint, insecure=True)
    else:
        exporter = HttpExporter(endpoint=f"{collector.http_endpoint}/v1/traces")
    contexts = _send_spans(exporter, ["a", "b", "c"])
    assert collector.stop() == 0
    spans = list(read.iter_collector_spans([str(collector.out_dir)]))
    assert [s.name for s in spans] == ["a", "b", "c"]
    assert [s.span_id for s in spans] == [format(c.span_id, "016x") for c in contexts]
    assert [s.trace_id for s in spans] == [format(c.trace_id, "032x") for c in contexts]
    assert spans[0].attributes == {"n": 1 << 40, "s": "x", "b": True}
    raw = _lines(collector)[0]["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert raw["attributes"][0] == {"key": "n", "value": {"intValue": str(1 << 40)}}  # int64 as a string


def test_otlp_json_body_round_trips(collector):
    line = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "j"}}]},
            "scopeSpans": [{"scope": {"name": "s"}, "spans": [{
                "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                "parentSpanId": "eee19b7ec3c1b173", "name": "json-span", "kind": 2,
                "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
                "attributes": [{"key": "k", "value": {"intValue": "7"}}], "status": {}}]}]}]}
    status, _ = _post(collector, json.dumps(line).encode(), "application/json")
    assert status == 200
    assert collector.stop() == 0
    assert _lines(collector) == [line]


def _post(c: CollectorProcess, body: bytes, content_type: str, path="/v1/traces", encoding=None):
    request = urllib.request.Request(f"{c.http_endpoint}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type, **({"Content-Encoding": encoding} if encoding else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _valid_request_bytes() -> bytes:
    line = to_json_line(parse_json(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "name": "ok"}]}]}]}).encode()))
    return parse_json(line).SerializeToString()


def test_bad_http_input_is_refused_and_serving_goes_on(collector):
    assert _post(collector, b"\xff\x00garbage" * 10, "application/x-protobuf")[0] == 400
    assert _post(collector, b"{not json", "application/json")[0] == 400
    assert _post(collector, b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}', "application/json")[0] == 400
    assert _post(collector, b"[]", "application/json")[0] == 400
    assert _post(collector, b"x", "text/plain")[0] == 415
    assert _post(collector, b"x", "application/x-protobuf", path="/v1/logs")[0] == 404
    assert _post(collector, b"not gzip", "application/x-protobuf", encoding="gzip")[0] == 400
    assert _post(collector, gzip.compress(_valid_request_bytes()), "application/x-protobuf", encoding="gzip")[0] == 200
    assert _post(collector, _valid_request_bytes(), "application/x-protobuf")[0] == 200
    assert collector.stop() == 0
    assert [s.name for s in read.iter_collector_spans([str(collector.out_dir)])] == ["ok", "ok"]


def test_bad_grpc_input_is_invalid_argument(collector):
    with grpc.insecure_channel(f"{collector.host}:{collector.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            export(b"\xff\xff\xff\xff garbage", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert export(_valid_request_bytes(), timeout=10) == b""  # still serving


def test_oversize_requests_are_refused(tmp_path):
    c = CollectorProcess(tmp_path / "out", "--max-request-mb", "0.01")
    try:
        big = b"\x00" * 20000
        assert _post(c, big, "application/x-protobuf")[0] == 413
        assert _post(c, gzip.compress(b"{" + b" " * 20000 + b"}"), "application/json", encoding="gzip")[0] == 413
        with grpc.insecure_channel(f"{c.host}:{c.grpc_port}") as channel:
            export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                export(big, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert export(_valid_request_bytes(), timeout=10) == b""
    finally:
        assert c.stop() == 0


def test_listens_on_loopback_by_default(collector):
    assert collector.host == "127.0.0.1"


def test_rotation_keeps_every_line_whole(tmp_path):
    c = CollectorProcess(tmp_path / "out", "--rotate-mb", "0.002")
    exporter = HttpExporter(endpoint=f"{c.http_endpoint}/v1/traces")
    _send_spans(exporter, [f"span-{i}" for i in range(60)])
    assert c.stop() == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) > 2 and "traces.json" in files
    assert all(re.fullmatch(r"traces(-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{3}(-\d+)?)?\.json", f) for f in files)
    stats = read.LineStats()
    names = [s.name for s in read.iter_collector_spans([str(tmp_path / "out")], stats)]
    assert stats.bad_lines == 0 and sorted(names) == sorted(f"span-{i}" for i in range(60))


def test_sigkill_leaves_only_whole_lines_but_the_last(tmp_path):
    c = CollectorProcess(tmp_path / "out")
    exporter = GrpcExporter(endpoint=c.grpc_endpoint, insecure=True)
    _send_spans(exporter, [f"k{i}" for i in range(20)])
    c.stop(signal.SIGKILL)
    lines = (tmp_path / "out" / "traces.json").read_bytes().split(b"\n")
    assert all(json.loads(line) for line in lines[:-1])
    assert len(lines) >= 21  # everything acknowledged was written before the kill


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoders_only_ever_raise_bad_request(body):
    for parse in (parse_protobuf, parse_json):
        try:
            request = parse(body)
        except BadRequest:
            continue
        assert isinstance(request, ExportTraceServiceRequest)
        to_json_line(request)  # whatever parses can be written


@settings(max_examples=1000, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(
                        st.sampled_from(["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "name", "attributes", "key", "value", "x"]),
                        children, max_size=4), max_leaves=20))
def test_fuzz_json_structures(value):
    try:
        parse_json(json.dumps(value).encode())
    except BadRequest:
        pass
