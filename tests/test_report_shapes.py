"""The readers at real models' routing shapes and in both modes, without an engine:
the same step records through the real JSONL and OTLP sinks (the OTLP side in the
collector's file format), then report, summary and compare on each. Their
per-layer, per-expert counts must equal what the records hold."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from otel_moe.exporter.records import StepRecord
from otel_moe.exporter.sinks.jsonl import JsonlSink
from otel_moe.report.compare import compare, one_run
from otel_moe.report.main import build_report
from otel_moe.report.summary import summarize
from tools import synthetic


def _write_both(tmp_path, records: list[StepRecord]):
    jsonl = tmp_path / "routing.jsonl"
    sink = JsonlSink(str(jsonl))
    for record in records:
        sink.write(record)
    sink.close(10)
    synthetic.write_collector_file(tmp_path / "collected" / "traces.json", records)
    return jsonl, tmp_path / "collected"


def _expected_counts(records: list[StepRecord]) -> dict[str, list[int]]:
    total: dict[int, np.ndarray] = {}
    for record in records:
        if record.ids is None and record.counts is None:
            continue
        for column, layer in enumerate(record.layers):
            counts = record.layer_counts()[column]
            total[layer] = total.get(layer, 0) + counts
    return {str(layer): c.tolist() for layer, c in sorted(total.items())}


def _counts_windows(windows: int, layers: list[int], experts: int, top_k: int, seed: int = 0) -> list[StepRecord]:
    """Counts mode as the exporter hands it to the sinks: per step a record of request
    tallies (no ids, no counts), and per window one of counts over its steps."""
    rng = np.random.default_rng(seed)
    records, step = [], 0
    for _ in range(windows):
        first, tokens = step, 0
        for _ in range(3):
            request_tokens = np.array([5, 1, 1])
            records.append(StepRecord(step=step, start_ns=time.time_ns(), end_ns=time.time_ns(), layers=layers,
                                      top_k=top_k, num_experts=experts, request_ids=["a", "b", "c"],
                                      request_tokens=request_tokens, positions=np.arange(7),
                                      prompt_lens=np.array([5, 1, 1])))
            tokens += int(request_tokens.sum())
            step += 1
        counts = rng.multinomial(tokens * top_k, np.ones(experts) / experts, size=len(layers)).astype(np.int64)
        records.append(StepRecord(step=first, start_ns=time.time_ns(), end_ns=time.time_ns(), layers=layers,
                                  top_k=top_k, num_experts=experts, request_ids=[], request_tokens=np.zeros(0, np.int64),
                                  positions=np.zeros(0, np.int64), prompt_lens=np.zeros(0, np.int64), counts=counts,
                                  last_step=step - 1, window_tokens=tokens))
    return records


# (layers, experts, top_k): DeepSeek-V3's MoE layers (3..60), Qwen3-MoE, OLMoE, Mixtral
SHAPES = {"deepseek-v3": (list(range(3, 61)), 256, 8), "qwen3-moe": (list(range(48)), 128, 8),
          "olmoe": (list(range(16)), 64, 8), "mixtral": (list(range(32)), 8, 2)}


def _token_records(layers: list[int], experts: int, top_k: int) -> list[StepRecord]:
    records = list(synthetic.records(3, 64, len(layers), top_k, experts, requests=8))
    for record in records:
        record.layers = layers  # decoder-layer numbers, dense layers absent
        # the last expert id must come through: it is the one a narrow id type loses
        record.ids[0, :, 0] = experts - 1
    return records


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_report_summary_and_compare_read_both_sinks_exactly(tmp_path, shape, mode):
    layers, experts, top_k = SHAPES[shape]
    records = _token_records(layers, experts, top_k) if mode == "tokens" else _counts_windows(4, layers, experts, top_k)
    jsonl, collected = _write_both(tmp_path, records)
    expected = _expected_counts(records)
    summaries = []
    for source in (jsonl, collected):
        [one] = summarize([str(source)])  # the report's summary.json, without its figures (drawn below, once)
        assert {n: layer["counts"] for n, layer in one["layers"].items()} == expected, source
        assert one["inputs"]["bad_lines"] == 0 and one["inputs"]["skipped_records"] == {}
        assert one["modes"] == [mode]
        summaries.append(one)
    # every analysis alike, whatever width the ids came in (the OTLP wire's uint8 ids once wrapped
    # expert-pair indices past 255)
    for key in ("cooccurrence", "position_expert"):
        assert summaries[0][key] == summaries[1][key], key
    if mode == "tokens" and experts <= 256:
        assert all(len(layer["top_pairs"]) == 10 for layer in summaries[1]["cooccurrence"]["layers"].values())
    compared = compare(one_run(str(jsonl), None)[1], one_run(str(collected), None)[1])
    assert [row["layer"] for row in compared["layers"]] == layers
    assert all(row["js_divergence"] == 0 and not any(row["share_difference"]) for row in compared["layers"])


def test_the_report_and_compare_draw_both_modes_at_the_smallest_shape(tmp_path):
    """(The largest shape's figures: test_report_scale.)"""
    layers, experts, top_k = SHAPES["mixtral"]
    records = _token_records(layers, experts, top_k) + _counts_windows(2, layers, experts, top_k)
    jsonl, collected = _write_both(tmp_path, records)
    result = build_report([str(collected)], str(tmp_path / "report"))
    assert {n: layer["counts"] for n, layer in result["layers"].items()} == _expected_counts(records)
    assert result["modes"] == ["counts", "tokens"]
    pictures = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert {"expert_heatmap.png", "imbalance_heatmap.png", "load_imbalance.png", "router_confidence.png",
            "expert_hist_grid0.png"} <= pictures
    proc = subprocess.run([sys.executable, "-m", "otel_moe.cli", "compare", str(jsonl), str(collected),
                           "--out", str(tmp_path / "compare")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["image"] == "compare_heatmap.png"


def test_counts_windows_over_otlp_keep_their_token_totals(tmp_path):
    layers, experts, top_k = [1, 3], 16, 2
    records = _counts_windows(5, layers, experts, top_k)
    _, collected = _write_both(tmp_path, records)
    result = build_report([str(collected)], str(tmp_path / "report"))
    window_tokens = sum(r.window_tokens for r in records if r.counts is not None)
    for layer in ("1", "3"):
        assert result["layers"][layer]["tokens"] == window_tokens
        assert sum(result["layers"][layer]["counts"]) == window_tokens * top_k
    # the request tallies of the windows' steps: 5 + 1 + 1 tokens a step, 3 steps a window
    assert result["requests"]["a"]["tokens"] == 5 * 3 * 5


def cli(*args):
    return subprocess.run([sys.executable, "-m", "otel_moe.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", [["report", "IN", "--out", "OUT"], ["summary", "IN"], ["compare", "A", "B", "--out", "O"],
                                     ["collector", "--out", "OUT"], ["control", "status"]])
def test_a_subcommands_usage_error_points_at_its_own_help(command):
    proc = cli(*command, "--frobnicate")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"otel-moe {command[0]}: error: unrecognized arguments: --frobnicate "
                                   f"(see otel-moe {command[0]} --help)")


def test_summary_warns_of_unreadable_lines_and_refuses_input_without_records(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    row = {"step": 0, "layer": 0, "request_id": "r", "position": 0, "phase": "prefill", "expert_ids": [1, 2],
           "expert_weights": [0.5, 0.25], "num_experts": 4}
    mixed.write_text("# a heading\nnot json\n" + json.dumps(row) + "\n")
    proc = cli("summary", str(mixed))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ("otel-moe summary: skipped 2 unreadable lines of 3 (not JSON objects of OTLP/JSON "
                                   "or otel-moe JSONL, or truncated)")
    assert "1 requests" in proc.stdout
    prose = tmp_path / "notes.md"
    prose.write_text("# notes\nnothing of routing here\n")
    proc = cli("summary", str(prose))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("otel-moe summary: error: no otel-moe routing records in the input")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_warns_of_layers_the_run_does_not_have(tmp_path):
    records = _token_records([1, 3], 8, 2)
    jsonl, _ = _write_both(tmp_path, records)
    proc = cli("report", str(jsonl), "--out", str(tmp_path / "r"), "--layers", "3,9-10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "otel-moe report: warning: --layers: run jsonl:routing.jsonl has no layer 9-10 (its layers: 1,3)"


def test_an_unforeseen_failure_is_one_line_naming_the_command_input_and_version(tmp_path):
    """A failure no check foresaw (here: summarize itself breaks) never shows a traceback,
    unless OTEL_MOE_DEBUG asks for it."""
    script = ("import sys, otel_moe.report.summary as s\n"
              "def broken(*a, **k): raise RuntimeError('disk on fire')\n"
              "s.summarize = broken\n"
              "from otel_moe.cli import main\n"
              "sys.exit(main(['summary', 'some/input.json']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("otel-moe summary: error: RuntimeError: disk on fire (on some/input.json; otel-moe ")
    assert line.endswith("OTEL_MOE_DEBUG=1 shows the traceback)")
    debug = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**__import__("os").environ, "OTEL_MOE_DEBUG": "1"})
    assert "Traceback" in debug.stderr and "disk on fire" in debug.stderr
