"""The report at a shape larger than any model's in both directions (94 layers, as
Qwen3-235B; 256 experts, as DeepSeek-V3; top-8), and ``otel-moe compare``."""
from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest
from test_report import GOLDEN, LAYER0, LAYER1, golden_otlp_line
from test_report_input_checks import cli, one_line_error

from otel_moe.report.main import build_report
from tools import synthetic

LAYERS, EXPERTS, TOP_K, STEPS, TOKENS, REQUESTS = 94, 256, 8, 3, 128, 8


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    records = list(synthetic.records(STEPS, TOKENS, LAYERS, TOP_K, EXPERTS, requests=REQUESTS))
    synthetic.write_collector_file(root / "in" / "traces.json", records)
    return root, records, build_report([str(root / "in")], str(root / "out"))


def test_large_model_counts_are_exact(large):
    _, records, summary = large
    assert list(summary["layers"]) == [str(n) for n in range(LAYERS)]
    for layer in (0, 47, 93):
        expected = np.bincount(np.concatenate([r.ids[:, layer].ravel() for r in records]), minlength=EXPERTS)
        assert summary["layers"][str(layer)]["counts"] == expected.tolist()
    assert len(summary["requests"]) == STEPS * REQUESTS
    assert {r["tokens"] for r in summary["requests"].values()} == {TOKENS // REQUESTS}
    assert all(len(r["hot_expert_share_by_layer"]) == LAYERS for r in summary["requests"].values())


def test_large_model_figures_are_few_bounded_and_linked(large):
    root, _, summary = large
    out = root / "out"
    images = {p.name for p in out.glob("*.png")}
    assert images == {"expert_heatmap.png", "imbalance_heatmap.png", "load_imbalance.png", "cooccurrence.png",
                      "position_expert.png", "router_confidence.png",
                      *(f"expert_hist_grid{page}.png" for page in range(4))}  # 94 layers, 24 a page; no per-layer files
    for name in images:
        width, height = png_size(out / name)
        assert 300 <= width <= 2000 and 200 <= height <= 2000, (name, width, height)
    html = (out / "report.html").read_text()
    assert set(re.findall(r'src="([^"]+)"', html)) == images
    for section in ("usage", "imbalance", "layers", "requests", "cooccurrence", "position", "confidence"):
        assert f"href='#{section}'" in html and f"id='{section}'" in html
    for layer in range(LAYERS):
        assert f"href='#layer-{layer}'" in html and f"id='layer-{layer}'" in html
    assert "requests.csv" in html and len((out / "requests.csv").read_text().splitlines()) == 1 + STEPS * REQUESTS


def test_compare_share_difference_and_divergence(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "traces.json").write_text(golden_otlp_line("A"))
    with open(tmp_path / "b.jsonl", "w") as f:  # the same run with experts 0 and 1 swapped in layer 0
        for step, request, position, phase, by_layer in GOLDEN:
            for layer, ids in by_layer.items():
                ids = [{0: 1, 1: 0}.get(i, i) for i in ids] if layer == 0 else ids
                f.write(json.dumps({"step": step, "layer": layer, "request_id": request, "position": position,
                                    "phase": phase, "expert_ids": ids, "expert_weights": [0.75, 0.25]}) + "\n")
    proc = cli("compare", str(tmp_path / "a"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    layer0, layer1 = result["layers"]
    p = [c / sum(LAYER0) for c in LAYER0]
    q = [p[1], p[0], p[2], p[3]]
    m = [(x + y) / 2 for x, y in zip(p, q)]
    js = sum(0.5 * x * math.log2(x / z) + 0.5 * y * math.log2(y / z) for x, y, z in zip(p, q, m))
    assert layer0["layer"] == 0 and layer0["js_divergence"] == pytest.approx(js)
    assert layer0["share_difference"] == pytest.approx([p[1] - p[0], p[0] - p[1], 0, 0])
    assert {c["expert"] for c in layer0["largest_changes"]} == {0, 1}
    assert layer1["js_divergence"] == 0 and layer1["assignments_a"] == layer1["assignments_b"] == sum(LAYER1)
    assert result["a"]["run"] == "A" and (tmp_path / "cmp" / "compare_heatmap.png").exists()
    assert "most changed: layer 0" in proc.stdout


def test_compare_wants_one_run_a_side(tmp_path):
    (tmp_path / "traces.json").write_text(golden_otlp_line("r1") + golden_otlp_line("r2"))
    one_line_error(cli("compare", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "c")),
                   "holds 2 runs (r1, r2): pick one with --run-a/--run-b")
    proc = cli("compare", str(tmp_path), str(tmp_path), "--run-a", "r1", "--run-b", "r2", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert [r["js_divergence"] for r in json.loads((tmp_path / "c" / "compare.json").read_text())["layers"]] == [0, 0]
