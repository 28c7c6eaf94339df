"""``otel-moe compare A B --out DIR``: what a prompt set, a model or a setting
changed in the routing. Per layer and expert the difference of shares (B - A),
per layer the Jensen-Shannon divergence; compare.json and compare_heatmap.png."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

from otel_moe.report.aggregate import RunStats, js_divergence_bits
from otel_moe.report.build import EmptyInput, aggregate, input_warnings, inputs_section
from otel_moe.report.read import LineStats, SchemaError

LARGEST_CHANGES = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="the baseline: a collector folder or file, or a JSONL routing log")
    parser.add_argument("b", help="the one compared with it")
    parser.add_argument("--out", required=True, help="folder for compare.json and compare_heatmap.png")
    parser.add_argument("--run-a", metavar="ID", help="the run of A to use when A holds several")
    parser.add_argument("--run-b", metavar="ID", help="the run of B to use when B holds several")


class CompareError(ValueError):
    pass


def one_run(path: str, run: Optional[str]) -> tuple[str, RunStats]:
    stats = LineStats()
    runs = aggregate([path], stats, only_run=run)
    for line in input_warnings(inputs_section(stats, [path])):
        print(f"otel-moe compare: {path}: {line}", file=sys.stderr)
    if len(runs) > 1:
        raise CompareError(f"{path} holds {len(runs)} runs ({', '.join(sorted(runs))}): pick one with --run-a/--run-b")
    return next(iter(runs.items()))


def _share(counts: np.ndarray, size: int) -> np.ndarray:
    c = np.pad(counts.astype(float), (0, size - len(counts)))
    return c / c.sum() if c.sum() else c


def compare(a: RunStats, b: RunStats) -> dict:
    layers = []
    for layer in sorted(set(a.layers) & set(b.layers)):
        ca, cb = a.layers[layer].counts, b.layers[layer].counts
        size = max(len(ca), len(cb))
        sa, sb = _share(ca, size), _share(cb, size)
        diff = sb - sa
        order = np.argsort(-np.abs(diff))[:LARGEST_CHANGES]
        layers.append({"layer": layer, "js_divergence": js_divergence_bits(ca, cb),
                       "assignments_a": int(ca.sum()), "assignments_b": int(cb.sum()),
                       "share_difference": [round(float(d), 6) for d in diff],
                       "largest_changes": [{"expert": int(e), "share_a": round(float(sa[e]), 6),
                                            "share_b": round(float(sb[e]), 6), "difference": round(float(diff[e]), 6)}
                                           for e in order if diff[e]]})
    return {"layers": layers, "layers_only_in_a": sorted(set(a.layers) - set(b.layers)),
            "layers_only_in_b": sorted(set(b.layers) - set(a.layers))}


def heatmap(out_dir: str, result: dict) -> Optional[str]:
    from otel_moe.report import plots

    rows = result["layers"]
    if not rows:
        return None
    width = max(len(r["share_difference"]) for r in rows)
    diff = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        diff[i, : len(r["share_difference"])] = r["share_difference"]
    limit = float(np.abs(diff).max()) or 1.0
    plt = plots.plt
    height = min(plots.MAX_INCHES, max(3.5, len(rows) * 0.16 + 1.8))
    fig, (left, right) = plt.subplots(1, 2, figsize=(min(plots.MAX_INCHES, max(8, width * 0.12 + 5)), height),
                                      gridspec_kw={"width_ratios": [4, 1]}, sharey=True)
    image = left.imshow(diff, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    names = [r["layer"] for r in rows]
    plots.layer_ticks(left, names)
    left.set_xlabel("expert")
    plots.expert_axis(left.xaxis)
    left.set_ylabel("layer")
    left.set_title(f"share in {result['b']['label']} minus share in {result['a']['label']}")
    fig.suptitle("\n".join(f"{result[k]['label']}: {result[k]['input']} (run {result[k]['run']})" for k in ("a", "b")),
                 fontsize="small", x=0.01, horizontalalignment="left")
    fig.colorbar(image, ax=left, label="share difference (red: more in B)", shrink=0.8)
    right.barh(range(len(rows)), [r["js_divergence"] or 0 for r in rows], color=plots.PURPLE)
    right.set_xlabel("Jensen-Shannon divergence (bits)")
    right.set_title("per layer")
    return plots.save(fig, out_dir, "compare_heatmap.png")


def run(args: argparse.Namespace) -> int:
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise CompareError(f"--out {args.out} is a file, not a folder")
        name_a, a = one_run(args.a, args.run_a)
        name_b, b = one_run(args.b, args.run_b)
        result = {"a": {"input": args.a, "run": name_a, "label": "A"}, "b": {"input": args.b, "run": name_b, "label": "B"},
                  **compare(a, b)}
        if not result["layers"]:
            raise CompareError(f"no layer in common: A has {sorted(a.layers)}, B has {sorted(b.layers)}")
        os.makedirs(args.out, exist_ok=True)
        result["image"] = heatmap(args.out, result)
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump(result, f, indent=1, allow_nan=False)
    except (EmptyInput, SchemaError, CompareError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"otel-moe compare: error: {err}", file=sys.stderr)
        return 2
    worst = max(result["layers"], key=lambda r: r["js_divergence"] or 0)
    print(f"otel-moe compare: {len(result['layers'])} layers; most changed: layer {worst['layer']} "
          f"(Jensen-Shannon {worst['js_divergence'] or 0:.4f} bits) -> {os.path.join(args.out, 'compare.json')}")
    return 0
