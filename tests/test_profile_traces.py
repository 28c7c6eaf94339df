"""The profiler-trace reader on real GPU traces: vLLM 0.26.0 on an H200 under its
torch profiler (tools/bench.py --device cuda --sections profile kept four steps
of each). Compiled: the prefill step ran the MoE layers' Python (layer ranges),
decode steps replayed CUDA graphs (no Python: kernels attributed by order)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from otel_moe import schema
from otel_moe.report.profile import DEFAULT_MOE_KERNELS, TraceError, load_events, profiled_steps, trace_files

DATA = Path(__file__).parent / "data"
COMPILED = DATA / "h200-vllm026-compiled.trace.json.gz"
EAGER = DATA / "h200-vllm026-eager.trace.json.gz"


def _moe_kernel_time(events: list[dict], step: dict) -> float:
    """Total time of MoE-named kernels launched inside one step range (from the raw events)."""
    import re

    matcher = re.compile(DEFAULT_MOE_KERNELS, re.IGNORECASE)
    end = step["ts"] + step["dur"]
    launched = {e["args"]["correlation"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in (e.get("args") or {})
                and step["ts"] <= e["ts"] <= end}
    return sum(e["dur"] for e in events if e.get("cat") == "kernel" and matcher.search(e["name"])
               and e["args"].get("correlation") in launched)


def test_compiled_trace_prefill_by_ranges_decode_by_kernel_order():
    events = load_events(str(COMPILED))
    # Kineto mirrors every range on the GPU timeline; those copies are not steps
    assert sum(e.get("cat") == "gpu_user_annotation" and e["name"].startswith(schema.STEP_RANGE) for e in events) > 0
    steps = profiled_steps(events)
    host_ranges = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(schema.STEP_RANGE)),
                         key=lambda e: e["ts"])
    assert [s.step for s in steps] == [schema.parse_step_range(e["name"])["step"] for e in host_ranges] == [6, 7, 10, 11]
    assert [s.source for s in steps] == ["gpu kernels in layer ranges"] + ["gpu kernels by order"] * 3
    for s, host in zip(steps, host_ranges):
        assert s.moe_layers == list(range(12)) and sorted(s.layer_us) == list(range(12))
        times = list(s.layer_us.values())
        assert max(times) < 1.5 * min(times)  # twelve layers of one shape, one batch
        if s.source == "gpu kernels by order":
            # every MoE kernel of the step went to some layer, none twice
            assert sum(times) == pytest.approx(_moe_kernel_time(events, host), rel=1e-9)


def test_eager_trace_every_step_by_layer_ranges():
    steps = profiled_steps(load_events(str(EAGER)))
    assert len(steps) == 4 and {s.source for s in steps} == {"gpu kernels in layer ranges"}
    for s in steps:
        assert sorted(s.layer_us) == list(range(12)) and min(s.layer_us.values()) > 0


def test_plain_json_and_folders_read_too(tmp_path):
    (tmp_path / "w0.pt.trace.json").write_bytes(gzip.decompress(COMPILED.read_bytes()))
    (tmp_path / "notes.txt").write_text("not a trace")
    [found] = trace_files([str(tmp_path)])
    assert len(profiled_steps(load_events(found))) == 4


def test_not_a_trace_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt.trace.json"
    bad.write_text(json.dumps({"resourceSpans": []}))
    with pytest.raises(TraceError, match="no traceEvents"):
        load_events(str(bad))
    bad.write_text("{truncated")
    with pytest.raises(TraceError, match="not a Chrome-trace JSON file"):
        load_events(str(bad))
