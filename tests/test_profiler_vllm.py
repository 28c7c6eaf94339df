"""vLLM's torch profiler on real engines: routing ranges in its trace, and the
report's join of that trace with the routing records."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from otel_moe import schema
from otel_moe.report.main import build_report
from otel_moe.report.profile import load_events, trace_files


def _trace_events(run) -> list[dict]:
    files = trace_files([str(run.workdir / "profile")])
    assert len(files) == 1 and files[0].endswith(".pt.trace.json.gz")  # one worker, vLLM's gzip default
    return load_events(files[0])


def _steps_of(records: list[dict]) -> dict[int, dict]:
    """step -> tokens, requests, per-layer expert counts (from the JSONL rows)."""
    steps: dict[int, dict] = defaultdict(lambda: {"rows": defaultdict(list)})
    for r in records:
        steps[r["step"]]["rows"][r["layer"]].append(r)
    out = {}
    for step, s in steps.items():
        rows = next(iter(s["rows"].values()))
        out[step] = {
            "tokens": len(rows),
            "requests": len({r["request_id"] for r in rows}),
            "counts": {layer: np.bincount(np.ravel([r["expert_ids"] for r in layer_rows]), minlength=8)
                       for layer, layer_rows in s["rows"].items()},
        }
    return out


def _step_ranges(events: list[dict]) -> list[tuple[dict, dict]]:
    ranges = [(e, schema.parse_step_range(e["name"])) for e in events if e["name"].startswith(schema.STEP_RANGE)]
    assert all(fields is not None for _, fields in ranges), "every otel_moe.step range parses"
    return ranges


@pytest.mark.parametrize("fixture", ["qwen2_compiled", "qwen2_prefix_cached"])
def test_trace_has_one_step_range_per_recorded_step(fixture, request):
    run = request.getfixturevalue(fixture)
    records = run.records()
    steps = _steps_of(records)
    ranges = _step_ranges(_trace_events(run))
    profiled_requests = {o["request_id"] for o in (run.outputs if fixture == "qwen2_compiled" else run.outputs[1:])}
    expected = sorted(step for step, s in steps.items()
                      if {r["request_id"] for r in records if r["step"] == step} <= profiled_requests)
    assert sorted(fields["step"] for _, fields in ranges) == expected
    run_ids = {fields["run_id"] for _, fields in ranges}
    assert len(run_ids) == 1 and len(next(iter(run_ids))) == 16  # the run id the plugin named
    for _, fields in ranges:
        s = steps[fields["step"]]
        assert (fields["tokens"], fields["requests"]) == (s["tokens"], s["requests"])
        assert fields["moe_layers"] == [0, 1, 2, 3] and fields["dp_rank"] == 0


def test_eager_trace_has_each_moe_layer_inside_its_step(qwen2_prefix_cached):
    events = _trace_events(qwen2_prefix_cached)
    layers = sorted((e for e in events if e["name"].startswith(schema.LAYER_RANGE)), key=lambda e: e["ts"])
    for step, _ in _step_ranges(events):
        start, end = step["ts"], step["ts"] + step["dur"]
        inside = [schema.parse_layer_range(e["name"]) for e in layers
                  if start <= e["ts"] and e["ts"] + e["dur"] <= end and e["tid"] == step["tid"]]
        assert inside == [0, 1, 2, 3]  # forward order, once each
    assert len(layers) == 4 * len(_step_ranges(events))  # none outside a recorded step


def test_compiled_trace_has_no_layer_ranges(qwen2_compiled):
    # torch.compile traces the MoE layer into its graph on CPU: no Python per layer runs
    assert not [e for e in _trace_events(qwen2_compiled) if e["name"].startswith(schema.LAYER_RANGE)]


@pytest.mark.parametrize("fixture, source", [("qwen2_compiled", "cpu ops by order"),
                                             ("qwen2_prefix_cached", "layer ranges (cpu)")])
def test_report_joins_the_trace_to_the_routing(fixture, source, request, tmp_path):
    run = request.getfixturevalue(fixture)
    result = build_report([str(run.routing), str(run.workdir / "profile")], str(tmp_path))
    joined = result["profile"]
    ranges = _step_ranges(_trace_events(run))
    assert joined["steps_in_trace"] == joined["steps_joined"] == len(ranges)
    assert joined["steps_with_other_token_count"] == 0
    assert joined["time_source"] == [source]
    steps = _steps_of(run.records())
    for layer in range(4):
        entry = joined["layers"][str(layer)]
        assert entry["steps"] == len(ranges) and entry["moe_us_mean"] > 0
        imbalance = [steps[f["step"]]["counts"][layer].max() / steps[f["step"]]["counts"][layer].mean() for _, f in ranges]
        assert entry["imbalance_max_over_mean_mean"] == pytest.approx(float(np.mean(imbalance)), rel=1e-12)
    assert len(joined["points"]) == 4 * len(ranges)
    assert (tmp_path / "profile_moe_time.png").stat().st_size > 10_000
    html = (tmp_path / "report.html").read_text()
    assert "MoE time against load imbalance" in html and "profile_moe_time.png" in html
    assert json.loads((tmp_path / "summary.json").read_text())["profile"]["steps_joined"] == len(ranges)
