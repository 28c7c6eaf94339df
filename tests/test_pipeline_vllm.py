"""The whole pipeline on a real engine: vLLM -> OTLP (gRPC and HTTP) -> the real
embedded collector -> OTLP/JSON files -> the decoder."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from exactness import computed_tokens

from otel_moe import schema
from otel_moe.report import read


def _spans(pipeline):
    return list(read.iter_collector_spans([str(pipeline.files)]))


def _key(row):
    return row["step"], row["request_id"], row["position"], row["layer"]


@pytest.mark.parametrize("name", ["grpc_pipeline", "http_pipeline"])
def test_decoded_spans_equal_the_jsonl_records_of_the_same_run(name, request):
    pipeline = request.getfixturevalue(name)
    decoded = [row for s in _spans(pipeline) if s.name == schema.STEP_SPAN for row in read.decode_step(s).token_rows()]
    jsonl = pipeline.run.records()
    assert len(jsonl) > 0
    assert sorted(decoded, key=_key) == sorted(jsonl, key=_key)


@pytest.mark.parametrize("name", ["grpc_pipeline", "http_pipeline"])
def test_every_request_has_llm_request_and_moe_request_spans(name, request):
    pipeline = request.getfixturevalue(name)
    spans = _spans(pipeline)
    outputs = {o["request_id"]: o for o in pipeline.run.outputs}
    vllm_ids = Counter(s.attributes[schema.REQUEST_ID] for s in spans if s.name == schema.VLLM_REQUEST_SPAN)
    moe = {s.attributes[schema.REQUEST_ID]: s for s in spans if s.name == schema.REQUEST_SPAN}
    assert vllm_ids == Counter(list(outputs))  # exactly one llm_request each
    assert set(moe) == set(outputs)
    for request_id, span in moe.items():
        out = outputs[request_id]
        assert span.attributes[schema.PREFILL_TOKENS] == len(out["prompt_token_ids"])
        assert span.attributes[schema.DECODE_TOKENS] == len(out["output_token_ids"]) - 1
        counts = schema.decode_counts(span.attributes)
        assert counts.shape == (4, 8) and span.attributes[schema.LAYERS] == [0, 1, 2, 3]
        assert (counts.sum(axis=1) == computed_tokens(out) * 2).all()  # top_k 2 in every layer


def test_offline_each_requests_trace_holds_its_routing_and_vllms_span(grpc_pipeline):
    """LLM.generate passes no trace context: otel-moe's front end starts each request's
    trace, whose root is the request's moe.request and vLLM's llm_request its child."""
    spans = _spans(grpc_pipeline)
    vllm = {s.attributes[schema.REQUEST_ID]: s for s in spans if s.name == schema.VLLM_REQUEST_SPAN}
    moe = {s.attributes[schema.REQUEST_ID]: s for s in spans if s.name == schema.REQUEST_SPAN}
    assert set(moe) == set(vllm) and moe
    for request_id, root in moe.items():
        assert root.parent_span_id == "" and root.attributes[schema.GEN_AI_REQUEST_MODEL]
        assert (vllm[request_id].trace_id, vllm[request_id].parent_span_id) == (root.trace_id, root.span_id)
    assert len({s.trace_id for s in moe.values()}) == len(moe)  # a trace per request


def test_run_id_is_shared_by_vllm_spans_and_ours(grpc_pipeline):
    spans = _spans(grpc_pipeline)
    runs = {s.resource.get(schema.RUN_ID) for s in spans if s.name in (schema.VLLM_REQUEST_SPAN, schema.STEP_SPAN)}
    assert len(runs) == 1 and None not in runs


def test_files_are_otlp_json_as_the_collector_writes_it(grpc_pipeline):
    lines = (grpc_pipeline.files / "traces.json").read_text().splitlines()
    assert lines
    for line in lines:
        request = json.loads(line)
        for rs in request["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    assert re.fullmatch(r"[0-9a-f]{32}", span["traceId"])
                    assert re.fullmatch(r"[0-9a-f]{16}", span["spanId"])
                    assert isinstance(span["startTimeUnixNano"], str) and isinstance(span["kind"], int)


def test_step_spans_carry_the_service_name_and_schema(grpc_pipeline):
    steps = [s for s in _spans(grpc_pipeline) if s.name == schema.STEP_SPAN]
    assert steps and all(s.resource["service.name"] == "otel-moe-test" for s in steps)
    assert all(s.attributes[schema.SCHEMA] == schema.SCHEMA_VERSION for s in steps)
    assert all(s.end_ns >= s.start_ns > 0 for s in steps)


def test_step_spans_carry_the_engine_threads_growing_cost(grpc_pipeline):
    """otel_moe.engine_thread_ns is cumulative in step order: never shrinks, and grows
    from the first step to the last (every recorded step takes the engine thread some time)."""
    steps = sorted((s for s in _spans(grpc_pipeline) if s.name == schema.STEP_SPAN),
                   key=lambda s: s.attributes[schema.STEP_INDEX])
    costs = [s.attributes[schema.ENGINE_THREAD_NS] for s in steps]
    assert len(costs) > 2 and costs == sorted(costs) and costs[-1] > costs[0] > 0
