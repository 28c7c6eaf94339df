"""The report on golden inputs (hand-checkable counts), both input kinds, and on
a real end-to-end run."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from otel_moe import schema
from otel_moe.report.main import build_report

# Two steps of a 2-layer, top-2, 4-expert model; request "a" (prompt 2) and "b" (prompt 1).
# step 0: a@0 a@1 (prefill), b@0 (prefill); step 1: a@2 (decode), b@1 (decode)
GOLDEN = [
    (0, "a", 0, "prefill", {0: [0, 1], 1: [2, 3]}),
    (0, "a", 1, "prefill", {0: [0, 2], 1: [2, 0]}),
    (0, "b", 0, "prefill", {0: [0, 3], 1: [1, 2]}),
    (1, "a", 2, "decode", {0: [1, 0], 1: [3, 2]}),
    (1, "b", 1, "decode", {0: [3, 2], 1: [2, 1]}),
]
# by hand: layer 0 ids 0,1 0,2 0,3 1,0 3,2 -> e0:4 e1:2 e2:2 e3:2 ; layer 1 ids 2,3 2,0 1,2 3,2 2,1 -> e0:1 e1:2 e2:5 e3:2
LAYER0, LAYER1 = [4, 2, 2, 2], [1, 2, 5, 2]
LAYER0_PREFILL, LAYER0_DECODE = [3, 1, 1, 1], [1, 1, 1, 1]


def golden_jsonl(path):
    with open(path, "w") as f:
        for step, request, position, phase, by_layer in GOLDEN:
            for layer, ids in by_layer.items():
                f.write(json.dumps({"step": step, "layer": layer, "request_id": request, "position": position,
                                    "phase": phase, "expert_ids": ids, "expert_weights": [0.75, 0.25]}) + "\n")


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _attr(key, value):
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, str):
        return {"key": key, "value": {"stringValue": value}}
    if isinstance(value, bytes):
        return {"key": key, "value": {"bytesValue": _b64(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    inner = [_attr("", v)["value"] for v in value]
    return {"key": key, "value": {"arrayValue": {"values": inner}}}


def u32(values) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def golden_otlp_line(run="run-1", version=schema.SCHEMA_VERSION, e2e=(0.5, 0.25)) -> str:
    spans = []
    for step in (0, 1):
        rows = [g for g in GOLDEN if g[0] == step]
        requests = list(dict.fromkeys(r[1] for r in rows))
        events = []
        for layer in (0, 1):
            ids = bytes(i for r in rows for i in r[4][layer])
            if version == 1:  # float32 weights, their dtype not named
                weights, named = b"".join(struct.pack("<ff", 0.75, 0.25) for _ in rows), []
            else:
                weights = b"".join(struct.pack("<ee", 0.75, 0.25) for _ in rows)
                named = [_attr(schema.EXPERT_WEIGHTS_DTYPE, "<f2")]
            events.append({"name": schema.ROUTING_EVENT, "timeUnixNano": "2", "attributes": [
                _attr(schema.LAYER, layer), _attr(schema.EXPERT_IDS, ids), _attr(schema.EXPERT_IDS_DTYPE, "|u1"),
                _attr(schema.EXPERT_WEIGHTS, weights), *named]})
        attrs = {schema.SCHEMA: version, schema.STEP_INDEX: step, schema.MODE: "tokens", schema.LAYERS: [0, 1],
                 schema.TOP_K: 2, schema.NUM_EXPERTS: 4, schema.NUM_TOKENS: len(rows),
                 schema.REQUEST_IDS: schema.encode_request_ids(requests) if version >= 3 else requests,
                 schema.REQUEST_TOKENS: u32([sum(r[1] == q for r in rows) for q in requests]),
                 schema.REQUEST_FIRST_POSITIONS: u32([min(r[2] for r in rows if r[1] == q) for q in requests]),
                 schema.REQUEST_PROMPT_LENS: u32([{"a": 2, "b": 1}[q] for q in requests])}
        spans.append({"traceId": f"{step + 1:032x}", "spanId": f"{step + 1:016x}", "name": schema.STEP_SPAN, "kind": 1,
                      "startTimeUnixNano": "1", "endTimeUnixNano": "2",
                      "attributes": [_attr(k, v) for k, v in attrs.items()], "events": events})
    for request, latency in zip("ab", e2e):
        spans.append({"traceId": "f" * 32, "spanId": "e" * 16, "name": schema.VLLM_REQUEST_SPAN, "kind": 2,
                      "startTimeUnixNano": "1", "endTimeUnixNano": "2", "attributes": [
                          _attr(schema.REQUEST_ID, request), _attr(schema.VLLM_E2E, latency),
                          _attr(schema.VLLM_TTFT, 0.125), _attr(schema.VLLM_COMPLETION_TOKENS, 3)]})
    resource = {"attributes": [_attr("service.name", "vllm"), _attr(schema.RUN_ID, run)]}
    return json.dumps({"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": {"name": "otel_moe"}, "spans": spans}]}]}) + "\n"


def _check_golden(summary):
    assert summary["layers"]["0"]["counts"] == LAYER0
    assert summary["layers"]["1"]["counts"] == LAYER1
    assert summary["layers"]["0"]["prefill_counts"] == LAYER0_PREFILL
    assert summary["layers"]["0"]["decode_counts"] == LAYER0_DECODE
    assert summary["layers"]["0"]["tokens"] == 5
    assert summary["requests"]["a"]["tokens"] == 3 and summary["requests"]["b"]["tokens"] == 2
    assert summary["requests"]["a"]["prefill_tokens"] == 2 and summary["requests"]["a"]["decode_tokens"] == 1
    assert summary["layers"]["0"]["mean_top1_weight"] == pytest.approx(0.75)
    assert summary["layers"]["0"]["imbalance_max_over_mean"] == pytest.approx(4 / 2.5)


def test_golden_jsonl(tmp_path):
    golden_jsonl(tmp_path / "routing.jsonl")
    summary = build_report([str(tmp_path / "routing.jsonl")], str(tmp_path / "out"), figures=False)
    _check_golden(summary)
    assert not list((tmp_path / "out").glob("*.png")) and (tmp_path / "out" / "report.html").exists()
    assert summary["requests"]["a"]["e2e_s"] is None  # no llm_request span in a JSONL log


# 3: a moe.request's counts always uint32 (its steps as in 4); 2: request ids as a string array; 1: weights as float32 too
@pytest.mark.parametrize("version", [4, 3, 2, 1])
def test_golden_collector_file(tmp_path, version):
    (tmp_path / "traces.json").write_text(golden_otlp_line(version=version))
    summary = build_report([str(tmp_path)], str(tmp_path / "out"))
    _check_golden(summary)
    assert summary["requests"]["a"]["e2e_s"] == 0.5 and summary["requests"]["b"]["ttft_s"] == 0.125
    assert summary["requests"]["a"]["tpot_s"] == pytest.approx((0.5 - 0.125) / 2)
    assert (tmp_path / "out" / "latency.png").exists()


def test_corrupt_and_truncated_lines_are_skipped_and_counted(tmp_path):
    line = golden_otlp_line()
    (tmp_path / "traces-2026-01-01T00-00-00.000.json").write_text("garbage\n" + line)
    (tmp_path / "traces.json").write_text('{"resourceSpans": [' + "\n" + line[: len(line) // 2])  # live, partial
    summary = build_report([str(tmp_path)], str(tmp_path / "out"), figures=False)
    assert summary["inputs"]["bad_lines"] == 3 and summary["inputs"]["lines"] == 4
    _check_golden(summary)


def test_golden_analyses(tmp_path):
    """Every section of summary.json on input small enough to count by hand."""
    (tmp_path / "traces.json").write_text(golden_otlp_line())
    summary = build_report([str(tmp_path)], str(tmp_path / "out"))
    # layer 0 tokens: 0+1, 0+2, 0+3, 1+0, 3+2 -> pair 0+1 twice in 5 tokens
    assert summary["cooccurrence"]["layers"]["0"]["top_pairs"][0] == {"experts": [0, 1], "tokens": 2, "share": 0.4}
    assert sorted(tuple(p["experts"]) for p in summary["cooccurrence"]["layers"]["0"]["top_pairs"]) == [
        (0, 1), (0, 2), (0, 3), (2, 3)]
    # position buckets: 0 | 1 | 2-3; layer 0 prefill: positions 0 (a: 0+1, b: 0+3) and 1 (a: 0+2)
    prefill = {r["bucket"]: r for r in summary["position_expert"]["layers"]["0"]["prefill"]}
    decode = {r["bucket"]: r for r in summary["position_expert"]["layers"]["0"]["decode"]}
    assert (prefill[0]["assignments"], prefill[0]["top_expert"], prefill[0]["top_share"]) == (4, 0, 0.5)
    assert (prefill[1]["assignments"], prefill[1]["top_expert"]) == (2, 0)
    assert sorted(decode) == [1, 2] and decode[2]["assignments"] == 2  # a@2: 1+0; b@1: 3+2
    assert summary["position_expert"]["buckets"][:3] == [[0, 0], [1, 1], [2, 3]]
    # request a, layer 0: 0+1, 0+2, 1+0 -> expert 0 has 3 of 6; layer 1: 2+3, 2+0, 3+2 -> expert 2 has 3 of 6
    assert summary["requests"]["a"]["hot_expert_share_by_layer"] == [0.5, 0.5]
    assert summary["requests"]["b"]["hot_expert_share_by_layer"] == [0.5, 0.5]  # 0+3, 3+2 | 1+2, 2+1
    # e2e 500 and 250 ms, TTFT 125 ms both; TPOT (e2e - TTFT) / 2
    assert summary["latency"]["e2e_ms"] == {"count": 2, "p50": 375.0, "p90": 475.0, "p99": pytest.approx(497.5)}
    assert summary["latency"]["ttft_ms"]["p99"] == 125.0
    assert summary["latency"]["tpot_ms"]["p50"] == pytest.approx((187.5 + 62.5) / 2)
    assert [r["request_id"] for r in summary["slowest_requests"]] == ["a", "b"]
    confidence = summary["layers"]["0"]["router_confidence"]
    assert confidence == {"top1_weight": {"p10": 0.75, "p50": 0.75, "p90": 0.75},
                          "topk_weight_sum": {"p10": 1.0, "p50": 1.0, "p90": 1.0}}
    rows = (tmp_path / "out" / "requests.csv").read_text().splitlines()
    assert rows[0].startswith("request_id,tokens,prefill_tokens,decode_tokens,ttft_ms,tpot_ms,e2e_ms")
    assert rows[1].split(",")[:7] == ["a", "3", "2", "1", "125", "187.5", "500"]
    for image in ("expert_heatmap.png", "imbalance_heatmap.png", "load_imbalance.png", "expert_hist_grid0.png",
                  "latency.png", "cooccurrence.png", "position_expert.png", "router_confidence.png"):
        assert (tmp_path / "out" / image).exists(), image


def test_several_runs_are_reported_apart_never_pooled(tmp_path):
    (tmp_path / "traces.json").write_text(golden_otlp_line("r1", e2e=(1.0, 2.0)) + golden_otlp_line("r2", e2e=(3.0, 4.0)))
    out = tmp_path / "out"
    index = build_report([str(tmp_path)], str(out), figures=False)
    assert sorted(index["runs"]) == ["r1", "r2"]
    for run, e2e in (("r1", {"a": 1.0, "b": 2.0}), ("r2", {"a": 3.0, "b": 4.0})):
        summary = json.loads((out / f"run-{run}" / "summary.json").read_text())
        _check_golden(summary)  # each run alone, not the sum of both
        assert summary["run"] == run and summary["runs_found"] == ["r1", "r2"]
        assert {k: v["e2e_s"] for k, v in summary["requests"].items()} == e2e
    written = json.loads((out / "summary.json").read_text())
    assert {name: r["folder"] for name, r in written["runs"].items()} == {"r1": "run-r1", "r2": "run-r2"}
    assert "run-r1/report.html" in (out / "report.html").read_text()
    one = build_report([str(tmp_path)], str(tmp_path / "only-r2"), run="r2", figures=False)
    _check_golden(one)
    assert one["run"] == "r2" and (tmp_path / "only-r2" / "report.html").exists()
    proc = _report_cli(str(tmp_path), "--out", str(tmp_path / "o"), "--run", "r9")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "otel-moe report: error: no run 'r9' in the input; runs found: r1, r2")


def test_per_layer_files_for_the_layers_asked_for(tmp_path):
    golden_jsonl(tmp_path / "routing.jsonl")
    build_report([str(tmp_path / "routing.jsonl")], str(tmp_path / "auto"))  # 2 layers: every layer
    assert {p.name for p in (tmp_path / "auto").glob("expert_hist_layer*.png")} == {
        "expert_hist_layer0.png", "expert_hist_layer0_by_phase.png", "expert_hist_layer1.png", "expert_hist_layer1_by_phase.png"}
    proc = _report_cli(str(tmp_path / "routing.jsonl"), "--out", str(tmp_path / "one"), "--layers", "1")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "one").glob("expert_hist_layer*.png")} == {
        "expert_hist_layer1.png", "expert_hist_layer1_by_phase.png"}
    proc = _report_cli(str(tmp_path / "routing.jsonl"), "--out", str(tmp_path / "none"), "--no-per-layer-files")
    assert proc.returncode == 0 and not list((tmp_path / "none").glob("expert_hist_layer*.png"))


def _report_cli(*args):
    return subprocess.run([sys.executable, "-m", "otel_moe.cli", "report", *args], capture_output=True, text=True)


def test_empty_input_and_unknown_schema_fail_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = _report_cli(str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o1"))
    assert proc.returncode == 2 and "no otel-moe routing records in the input: read 1 file(s)" in proc.stderr
    assert str(tmp_path / "empty.jsonl") in proc.stderr and "collector's --out folder" in proc.stderr
    (tmp_path / "v9.json").write_text(golden_otlp_line(version=9))
    proc = _report_cli(str(tmp_path / "v9.json"), "--out", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "schema version 9 is not supported" in proc.stderr
    proc = _report_cli(str(tmp_path / "missing.json"), "--out", str(tmp_path / "o3"))
    assert proc.returncode == 2 and "no such input" in proc.stderr


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_end_to_end_run_feeds_the_report(grpc_pipeline, tmp_path):
    out = tmp_path / "report"
    proc = _report_cli(str(grpc_pipeline.files), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    records = grpc_pipeline.run.records()
    for layer in range(4):
        recount = np.bincount([e for r in records if r["layer"] == layer for e in r["expert_ids"]], minlength=8)
        assert summary["layers"][str(layer)]["counts"] == recount.tolist()
    assert set(summary["requests"]) == {o["request_id"] for o in grpc_pipeline.run.outputs}
    assert all(r["e2e_s"] > 0 and r["ttft_s"] > 0 for r in summary["requests"].values())
    images = sorted(p.name for p in out.glob("*.png"))
    assert {"expert_heatmap.png", "imbalance_heatmap.png", "load_imbalance.png", "latency.png", "expert_hist_grid0.png",
            "cooccurrence.png", "position_expert.png", "router_confidence.png"} <= set(images)
    assert {f"expert_hist_layer{layer}.png" for layer in range(4)} <= set(images)
    html = (out / "report.html").read_text()
    for name in images:
        width, height = _png_size(out / name)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (name, width, height)
        assert f'src="{name}"' in html


def test_jsonl_log_of_a_real_run_recounts_exactly(qwen2_compiled, tmp_path):
    summary = build_report([str(qwen2_compiled.routing)], str(tmp_path / "out"))
    records = qwen2_compiled.records()
    for layer in range(4):
        recount = np.bincount([e for r in records if r["layer"] == layer for e in r["expert_ids"]], minlength=8)
        assert summary["layers"][str(layer)]["counts"] == recount.tolist()
        assert summary["layers"][str(layer)]["tokens"] == sum(r["layer"] == layer for r in records)


def test_summary_command_prints_each_layer(tmp_path):
    golden_jsonl(tmp_path / "routing.jsonl")
    proc = subprocess.run([sys.executable, "-m", "otel_moe.cli", "summary", str(tmp_path / "routing.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [(r[0], r[1]) for r in rows] == [("0", "5"), ("1", "5")]  # layer, tokens
    assert "e0 40%" in proc.stdout and "e2 50%" in proc.stdout  # LAYER0 4/10, LAYER1 5/10


def test_counts_mode_windows(tmp_path):
    """Counts mode: one record per window of steps; imbalance per window, no per-token analyses."""
    rows = [{"step": 0, "last_step": 4, "layer": 0, "num_tokens": 10, "counts": [12, 4, 2, 2]},
            {"step": 0, "last_step": 4, "layer": 1, "num_tokens": 10, "counts": [5, 5, 5, 5]},
            {"step": 5, "last_step": 9, "layer": 0, "num_tokens": 6, "counts": [3, 3, 3, 3]},
            {"step": 5, "last_step": 9, "layer": 1, "num_tokens": 6, "counts": [0, 0, 6, 6]}]
    (tmp_path / "counts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = build_report([str(tmp_path / "counts.jsonl")], str(tmp_path / "out"))
    assert summary["steps"] == 2
    assert summary["layers"]["0"]["counts"] == [15, 7, 5, 5] and summary["layers"]["0"]["tokens"] == 16
    assert summary["layers"]["1"]["step_max_over_mean_mean"] == pytest.approx((1.0 + 2.0) / 2)
    assert summary["cooccurrence"]["layers"] == {} and summary["position_expert"]["layers"] == {}
    assert summary["layers"]["0"]["router_confidence"] == {"top1_weight": None, "topk_weight_sum": None}
    out = tmp_path / "out"
    assert (out / "imbalance_heatmap.png").exists() and not (out / "cooccurrence.png").exists()
    assert "Needs the tokens mode" in (out / "report.html").read_text()
