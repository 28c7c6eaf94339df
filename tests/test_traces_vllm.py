"""Requests as traces on a real ``vllm serve`` (front end and engine core in their own
processes, as vLLM runs by default) with vLLM's own tracing on, the embedded
collector, and ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` at 0.25:

- a client's sampled ``traceparent``: ``moe.request`` is a child of the client's span,
  in the client's trace, beside vLLM's ``llm_request``;
- a client's unsampled one: nothing of the request per token, no ``moe.request``;
- no ``traceparent``: the front end starts the trace; sampled by trace id at 0.25,
  ``moe.request`` is its root and vLLM's ``llm_request`` its child;
- per-token routing exact for every sampled request (against the JSONL log, which
  records every token), and the metrics count every token, sampled or not."""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
from conftest import CollectorProcess, otlp_env
from serving import Server
from test_metrics_vllm import _scrape

from otel_moe import schema
from otel_moe.report import read
from otel_moe.report.main import build_report

RATIO = 0.25
GROUPS = {"parent-on": 4, "parent-off": 4, "none": 12}  # requests per kind of client


def _traceparent(group: str, index: int) -> tuple[int, int, str]:
    trace_id, span_id = int.from_bytes(os.urandom(16), "big") | 1, int.from_bytes(os.urandom(8), "big") | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-{'01' if group == 'parent-on' else '00'}"


def _name(request_id: str) -> str:
    """cmpl-<X-Request-Id>-<prompt index> -> the X-Request-Id."""
    return request_id.removeprefix("cmpl-").rsplit("-", 1)[0]


def _sampled_by_ratio(trace_id: int) -> bool:
    return (trace_id & (2**64 - 1)) < round(RATIO * 2**64)


@pytest.fixture(scope="session")
def traced_serve(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve_traces")
    collector = CollectorProcess(workdir / "collected", "--prometheus-port", "0")
    routing = workdir / "routing.jsonl"
    try:
        server = Server(models["qwen2_moe"], workdir,
                        {"VLLM_LOG_MOE": f"otlp,{routing}", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                         "OTEL_TRACES_SAMPLER_ARG": str(RATIO), **otlp_env(collector.grpc_endpoint)},
                        ["--otlp-traces-endpoint", collector.grpc_endpoint])
    except Exception:
        collector.stop()
        raise
    clients, usage = {}, {}
    try:
        for group, count in GROUPS.items():
            for index in range(count):
                name = f"{group}-{index}"
                headers = {"X-Request-Id": name}
                if group != "none":
                    trace_id, span_id, headers["traceparent"] = _traceparent(group, index)
                    clients[name] = (trace_id, span_id)
                body = {"model": server.model, "prompt": f"request {index} of the {group} clients, routed and traced",
                        "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
                status, answer = server.call("POST", "/v1/completions", body, headers=headers)
                assert status == 200, answer
                usage[name] = answer["usage"]
    finally:
        returncode = server.stop()
    try:
        metrics = _scrape(collector.prometheus_port)
    finally:
        assert collector.stop() == 0
    assert returncode == 0, "".join(server.lines[-40:])
    spans = list(read.iter_collector_spans([str(workdir / "collected")]))
    rows = [json.loads(line) for line in routing.read_text().splitlines()]
    return workdir, spans, rows, clients, usage, metrics


def _by_request(spans, name: str) -> dict[str, read.Span]:
    return {_name(s.attributes[schema.REQUEST_ID]): s for s in spans if s.name == name}


def test_each_request_is_recorded_exactly_in_the_jsonl_log(traced_serve):
    _, _, rows, _, usage, _ = traced_serve
    tokens = Counter(_name(r["request_id"]) for r in rows if r["layer"] == rows[0]["layer"])
    assert tokens == {name: u["prompt_tokens"] + u["completion_tokens"] - 1 for name, u in usage.items()}


def test_a_sampled_client_finds_the_routing_in_its_own_trace(traced_serve):
    _, spans, _, clients, _, _ = traced_serve
    ours, vllms = _by_request(spans, schema.REQUEST_SPAN), _by_request(spans, schema.VLLM_REQUEST_SPAN)
    for index in range(GROUPS["parent-on"]):
        name = f"parent-on-{index}"
        trace_id, span_id = clients[name]
        assert ours[name].trace_id == vllms[name].trace_id == f"{trace_id:032x}"
        assert ours[name].parent_span_id == vllms[name].parent_span_id == f"{span_id:016x}"  # both children of the client's span


def test_an_unsampled_client_gets_nothing_per_token(traced_serve):
    _, spans, _, clients, _, _ = traced_serve
    traces = {s.trace_id for s in spans}
    steps = [read.decode_step(s) for s in spans if s.name == schema.STEP_SPAN]
    named = {_name(r) for step in steps for r in step.request_ids}
    for index in range(GROUPS["parent-off"]):
        name = f"parent-off-{index}"
        assert f"{clients[name][0]:032x}" not in traces and name not in named


def test_without_a_traceparent_the_routing_is_the_root_of_the_requests_trace(traced_serve):
    _, spans, _, _, _, _ = traced_serve
    ours, vllms = _by_request(spans, schema.REQUEST_SPAN), _by_request(spans, schema.VLLM_REQUEST_SPAN)
    steps = [read.decode_step(s) for s in spans if s.name == schema.STEP_SPAN]
    named = {_name(r) for step in steps for r in step.request_ids}
    sampled = {name for name in ours if name.startswith("none-")}
    assert sampled == {name for name in named if name.startswith("none-")}
    assert {name for name in vllms if name.startswith("none-")} == sampled  # vLLM follows the same decision
    for name in sampled:
        root = ours[name]
        assert root.parent_span_id == "" and _sampled_by_ratio(int(root.trace_id, 16))
        assert vllms[name].trace_id == root.trace_id and vllms[name].parent_span_id == root.span_id
        assert root.start_ns <= vllms[name].start_ns  # the root spans the request from its arrival


def test_sampled_requests_are_exact_and_the_metrics_count_every_token(traced_serve):
    workdir, spans, rows, _, usage, metrics = traced_serve
    steps = sorted((read.decode_step(s) for s in spans if s.name == schema.STEP_SPAN), key=lambda s: (s.step, s.chunk))
    from_traces: dict[str, list] = defaultdict(list)  # request -> (position, layer, ids) of each token
    for step in steps:
        request_of = np.repeat(step.request_ids, step.request_tokens)
        for layer, ids in step.ids.items():
            for request, position, expert_ids in zip(request_of, step.positions(), ids.tolist()):
                from_traces[_name(request)].append((int(position), layer, expert_ids))
    from_log: dict[str, list] = defaultdict(list)
    for r in rows:
        from_log[_name(r["request_id"])].append((r["position"], r["layer"], r["expert_ids"]))
    sampled = set(from_traces)
    assert {f"parent-on-{i}" for i in range(GROUPS["parent-on"])} <= sampled
    assert not any(name.startswith("parent-off-") for name in sampled)
    for name in sampled:
        assert sorted(from_traces[name]) == sorted(from_log[name]), name
    unsampled_tokens = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for n, u in usage.items() if n not in sampled)
    assert sum(s.unsampled_tokens for s in steps) == unsampled_tokens
    top_k = len(rows[0]["expert_ids"])
    assert sum(metrics.values()) == len(rows) * top_k  # every token of every request, sampled or not
    summary = build_report([str(workdir / "collected")], str(workdir / "report"), figures=False)
    assert summary["unsampled_tokens"] == unsampled_tokens
    assert {_name(r) for r in summary["requests"]} == sampled
