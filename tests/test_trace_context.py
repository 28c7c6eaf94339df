"""Each request's routing in its own trace, sampled the OpenTelemetry way: the
context the front end makes, what the exporter decides from it, and what the OTLP
sink then writes (the real SDK, spans kept in memory) and the report reads."""
from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from otlp_memory import MemoryTransport
from test_otlp_sink import make_record

from otel_moe import schema, trace_context
from otel_moe.config import from_env
from otel_moe.exporter.sinks.otlp import OtlpSink
from otel_moe.report.main import build_report

CLIENT_TRACE, CLIENT_SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


def client(sampled: bool) -> tuple[str, str, str, int]:
    return f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-{'01' if sampled else '00'}", "vendor=x", 0


def root(sampled: bool, trace_id: int, span_id: int, arrival_ns: int) -> tuple[str, str, str, int]:
    return (f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}",
            f"{trace_context.STATE_KEY}={trace_context.ROOT}", arrival_ns)


@pytest.mark.parametrize("value", ["", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-" + "a" * 32 + "-" + "0" * 16 + "-01",
                                   "ff-" + "a" * 32 + "-" + "b" * 16 + "-01", "00-" + "a" * 32 + "-" + "b" * 16 + "-01-extra",
                                   "00-" + "g" * 32 + "-" + "b" * 16 + "-01"])
def test_what_is_not_a_traceparent_is_none(value):
    assert trace_context.parse_traceparent(value) is None


def test_a_later_version_may_carry_more_fields():
    assert trace_context.parse_traceparent("01-" + "a" * 32 + "-" + "b" * 16 + "-01-more") == (int("a" * 32, 16), int("b" * 16, 16), 1)


def test_the_front_end_samples_new_roots_by_their_trace_id():
    """parentbased_traceidratio: a root is sampled when its trace id's low 64 bits fall
    under the ratio, the same rule the SDK applies wherever the id is seen."""
    sampler = ParentBasedTraceIdRatio(0.25)
    decisions = []
    for _ in range(4000):
        headers = trace_context.new_root_headers(sampler, schema.REQUEST_SPAN)
        trace_id, _, flags = trace_context.parse_traceparent(headers[trace_context.TRACEPARENT])
        assert headers[trace_context.TRACESTATE] == "otelmoe=root"
        assert bool(flags & 1) == ((trace_id & (2**64 - 1)) < round(0.25 * 2**64))
        decisions.append(bool(flags & 1))
    assert 0.2 < np.mean(decisions) < 0.3


def test_the_exporter_follows_the_parent_or_the_front_ends_decision():
    sampler = ParentBasedTraceIdRatio(0.25)
    parent = trace_context.request_trace(*client(True), sampler, schema.REQUEST_SPAN)
    assert parent.sampled and parent.trace_id == CLIENT_TRACE and parent.parent.span_id == CLIENT_SPAN
    assert parent.parent.trace_state.get("vendor") == "x" and parent.span_id not in (0, CLIENT_SPAN)  # its own, made now
    assert not trace_context.request_trace(*client(False), sampler, schema.REQUEST_SPAN).sampled
    made = trace_context.request_trace(*root(True, 5, 6, 123), sampler, schema.REQUEST_SPAN)
    assert made == trace_context.RequestTrace(5, None, 6, True, 123)  # the front end decided; its span id is the request's
    assert not trace_context.request_trace(*root(False, 5, 6, 123), sampler, schema.REQUEST_SPAN).sampled
    alone = trace_context.request_trace("", "", 0, sampler, schema.REQUEST_SPAN)  # no front end of otel-moe's
    assert alone.parent is None and alone.span_id
    assert alone.sampled == ((alone.trace_id & (2**64 - 1)) < round(0.25 * 2**64))


@pytest.fixture
def written(tmp_path):
    """Four requests through the real sink: a client's sampled and unsampled, a
    sampled and an unsampled root the front end made; two steps, then all finish."""
    memory = MemoryTransport()
    sink = OtlpSink(from_env({"VLLM_LOG_MOE": "otlp"}), {"vllm.model": "tiny-moe", schema.RUN_ID: "r"}, transport=memory)
    records = [make_record(step, requests=4, tokens_each=3, layers=2, top_k=2, experts=8) for step in range(2)]
    names = ["client-on", "client-off", "root-on", "root-off"]
    for record in records:
        record.request_ids = list(names)
    sink.begin([("client-on", *client(True)), ("client-off", *client(False)),
                ("root-on", *root(True, 0xAB, 0xCD, records[0].start_ns - 10**6)), ("root-off", *root(False, 0xEF, 0x12, 1))])
    for record in records:
        sink.write(record)
    sink.finish(names)
    sink.close(10)
    return memory, records


def test_sampled_requests_alone_get_spans_in_their_own_traces(written):
    memory, records = written
    spans = memory.spans()
    requests = {s.attributes[schema.REQUEST_ID]: s for s in spans if s.name == schema.REQUEST_SPAN}
    assert set(requests) == {"client-on", "root-on"}
    on = requests["client-on"]
    assert on.context.trace_id == CLIENT_TRACE and on.parent.span_id == CLIENT_SPAN  # a child of the client's span
    made = requests["root-on"]
    assert (made.context.trace_id, made.context.span_id, made.parent) == (0xAB, 0xCD, None)  # the root, vLLM's parent
    assert made.start_time == records[0].start_ns - 10**6  # from the request's arrival
    assert on.attributes[schema.GEN_AI_REQUEST_MODEL] == "tiny-moe"
    counts = schema.decode_counts(on.attributes)
    rows = np.r_[0:3]  # client-on: the first request of each step
    expected = sum(np.bincount((np.arange(2)[None, :, None] * 8 + r.ids[rows]).ravel(), minlength=16) for r in records)
    assert counts.ravel().tolist() == expected.tolist()


def test_a_step_and_the_requests_that_begin_in_it_link_each_other(written):
    memory, _ = written
    spans = memory.spans()
    steps = sorted((s for s in spans if s.name == schema.STEP_SPAN), key=lambda s: s.attributes[schema.STEP_INDEX])
    requests = [s for s in spans if s.name == schema.REQUEST_SPAN]
    assert {(link.context.trace_id, link.context.span_id) for link in steps[0].links} == {
        (s.context.trace_id, s.context.span_id) for s in requests}
    assert not steps[1].links  # no request began there
    for request in requests:
        assert [link.context.span_id for link in request.links] == [steps[0].context.span_id]


def test_steps_hold_only_sampled_tokens_and_count_the_rest(written):
    memory, records = written
    spans = memory.spans()
    steps = [s for s in spans if s.name == schema.STEP_SPAN]
    assert len(steps) == 2  # the engine's steps are always recorded
    for span, record in zip(sorted(steps, key=lambda s: s.attributes[schema.STEP_INDEX]), records):
        assert schema.decode_request_ids(span.attributes[schema.REQUEST_IDS]) == ["client-on", "root-on"]
        assert span.attributes[schema.STEP_UNSAMPLED_TOKENS] == 6
        kept = np.r_[0:3, 6:9]
        for event in span.events:
            column = record.layers.index(event.attributes[schema.LAYER])
            ids = schema.decode_ids(event.attributes[schema.EXPERT_IDS], event.attributes[schema.EXPERT_IDS_DTYPE], 2)
            assert np.array_equal(ids, record.ids[kept, column])


def test_the_report_says_what_sampling_left_out(written, tmp_path):
    """(the spans as the collector writes them)"""
    from otel_moe.collector.otlp_json import to_json_line

    memory, _ = written
    (tmp_path / "traces.json").write_bytes(b"".join(to_json_line(request) for request in memory.requests))
    summary = build_report([str(tmp_path)], str(tmp_path / "out"), figures=False)
    assert summary["unsampled_tokens"] == 12
    assert set(summary["requests"]) == {"client-on", "root-on"}
    assert summary["layers"]["0"]["tokens"] == 12
    assert "12 tokens of unsampled requests" in (tmp_path / "out" / "report.html").read_text()
