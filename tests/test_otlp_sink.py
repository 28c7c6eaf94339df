"""The OTLP sink with the real SDK exporters against the real collector:
large steps are cut under the gRPC limit, and a dead collector costs nothing."""
from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import CollectorProcess

from otel_moe import schema
from otel_moe.config import from_env
from otel_moe.exporter.records import StepRecord
from otel_moe.exporter.sinks.otlp import OtlpSink
from otel_moe.report import read


def make_record(step: int, requests: int, tokens_each: int, layers: int, top_k: int, experts: int, seed=0) -> StepRecord:
    rng = np.random.default_rng(seed + step)
    n = requests * tokens_each
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)]) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, layers, top_k), dtype=np.float32).astype(np.float16)  # as capture keeps them
    return StepRecord(
        step=step, start_ns=time.time_ns(), end_ns=time.time_ns() + 1000, layers=list(range(layers)),
        top_k=top_k, num_experts=experts, request_ids=[f"req-{step}-{r}" for r in range(requests)],
        request_tokens=np.full(requests, tokens_each), positions=np.tile(np.arange(tokens_each), requests),
        prompt_lens=np.full(requests, tokens_each // 2), ids=ids, weights=weights,
    )


def _sink(monkeypatch, endpoint: str, protocol: str = "grpc", **env) -> OtlpSink:
    for var, value in {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
                       "OTEL_EXPORTER_OTLP_INSECURE": "true", **env}.items():
        monkeypatch.setenv(var, value)
    return OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {schema.RUN_ID: "sink-test"})


def _through_collector(tmp_path, monkeypatch, record: StepRecord, *collector_args: str, protocol: str = "grpc",
                       **env) -> list:
    """The record's step and request spans through the real sink and collector, as read back."""
    c = CollectorProcess(tmp_path / "out", *collector_args)
    try:
        sink = _sink(monkeypatch, c.grpc_endpoint if protocol == "grpc" else c.http_endpoint, protocol, **env)
        sink.write(record)
        sink.finish(record.request_ids)
        sink.close(30)
        assert sink.failed_export_spans == 0
    finally:
        assert c.stop() == 0
    return list(read.iter_collector_spans([str(tmp_path / "out")]))


def test_a_huge_step_is_cut_under_the_4_mib_grpc_limit(tmp_path, monkeypatch):
    # 8192 tokens x 24 layers x top-8 of 64 experts: ~7.9 MB of ids and weights in one step.
    record = make_record(0, requests=16, tokens_each=512, layers=24, top_k=8, experts=64)
    spans = _through_collector(tmp_path, monkeypatch, record, "--max-request-mb", "4")
    steps = sorted((read.decode_step(s) for s in spans if s.name == schema.STEP_SPAN), key=lambda s: s.chunk)
    assert len(steps) > 1 and {s.chunk for s in steps} == set(range(len(steps)))
    for layer in range(24):
        assert np.array_equal(np.concatenate([s.ids[layer] for s in steps]), record.ids[:, layer])
        assert np.array_equal(np.concatenate([s.weights[layer] for s in steps]), record.weights[:, layer])
    assert np.array_equal(np.concatenate([s.positions() for s in steps]), record.positions)
    requests = [s for s in spans if s.name == schema.REQUEST_SPAN]
    assert sorted(s.attributes[schema.REQUEST_ID] for s in requests) == sorted(record.request_ids)
    for s in requests:
        counts = schema.decode_counts(s.attributes)
        assert counts.shape == (24, 64) and (counts.sum(axis=1) == 512 * 8).all()
    lines = (tmp_path / "out" / "traces.json").read_bytes().splitlines()
    assert len(lines) > 2  # several export requests


def test_dead_collector_never_raises_and_close_is_bounded(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = _sink(monkeypatch, f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    for step in range(3):
        sink.write(make_record(step, 2, 4, 2, 2, 8))
    sink.idle()
    assert sink.failed_export_spans >= 3
    start = time.monotonic()
    sink.close(2)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_counts_mode_spans(tmp_path, monkeypatch, protocol):
    c = CollectorProcess(tmp_path / "out")
    try:
        endpoint = c.grpc_endpoint if protocol == "grpc" else c.http_endpoint
        sink = _sink(monkeypatch, endpoint, protocol)
        sink.mode = "counts"
        record = make_record(3, 2, 5, 3, 2, 8)
        expected = record.layer_counts()
        record.ids, record.weights, record.counts = None, None, expected
        sink.write(record)
        sink.close(10)
    finally:
        assert c.stop() == 0
    [span] = [s for s in read.iter_collector_spans([str(tmp_path / "out")]) if s.name == schema.STEP_SPAN]
    step = read.decode_step(span)
    assert all(np.array_equal(step.counts[layer], expected[layer]) for layer in range(3))
    assert step.num_tokens == 10 and step.step == 3


def test_request_counts_go_in_the_narrowest_dtype_and_version_3_still_reads():
    import base64

    for largest, dtype in ((255, "|u1"), (256, "<u2"), (65535, "<u2"), (65536, "<u4")):
        counts = np.zeros((2, 3), np.int64)
        counts[1, 2] = largest
        data, named = schema.encode_counts(counts)
        assert named == dtype and len(data) == 6 * np.dtype(dtype).itemsize
        read_back = {schema.REQUEST_EXPERT_COUNTS: base64.b64encode(data).decode(),  # as OTLP/JSON carries bytes
                     schema.REQUEST_EXPERT_COUNTS_DTYPE: dtype, schema.NUM_EXPERTS: 3}
        assert schema.decode_counts(read_back).tolist() == counts.tolist()
    version_3 = {schema.REQUEST_EXPERT_COUNTS: np.arange(6, dtype="<u4").tobytes(), schema.NUM_EXPERTS: 3}
    assert schema.decode_counts(version_3).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="request counts dtype"):
        schema.decode_counts({**version_3, schema.REQUEST_EXPERT_COUNTS_DTYPE: "<f4"})


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_gzip_exports_of_encoded_spans_arrive_whole(tmp_path, monkeypatch, protocol):
    """The step spans go to the SDK's exporters as bytes: its compression still applies."""
    record = make_record(0, requests=4, tokens_each=3, layers=2, top_k=2, experts=8)
    spans = _through_collector(tmp_path, monkeypatch, record, protocol=protocol, OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="gzip")
    [step] = [read.decode_step(s) for s in spans if s.name == schema.STEP_SPAN]
    assert all(np.array_equal(step.ids[layer], record.ids[:, layer]) for layer in range(2))
    assert sorted(s.attributes[schema.REQUEST_ID] for s in spans if s.name == schema.REQUEST_SPAN) == sorted(record.request_ids)
