"""``otel-moe report INPUT... --out DIR``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from otel_moe.read import LineStats, SchemaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="collector files or folders, JSONL routing logs")
    parser.add_argument("--out", required=True, help="folder for the PNGs, summary.json and report.html")
    parser.add_argument("--no-progress", action="store_true")


def build_report(inputs: list[str], out_dir: str, progress: bool = False) -> dict:
    from otel_moe.report import html, plots  # matplotlib: only when a report is made
    from otel_moe.report.build import aggregate, summary
    from otel_moe.report.inputs import input_files

    stats = LineStats()
    files = input_files(inputs)
    runs = aggregate(inputs, stats, progress)
    result = summary(runs, stats, files)
    os.makedirs(out_dir, exist_ok=True)
    images = {"hist": {}, "phase": {}}
    for name, layer in result["layers"].items():
        images["hist"][name] = plots.expert_histogram(out_dir, name, layer["counts"])
        if sum(layer["prefill_counts"]) + sum(layer["decode_counts"]):
            images["phase"][name] = plots.phase_histogram(out_dir, name, layer["prefill_counts"], layer["decode_counts"])
    images["heatmap"] = plots.heatmap(out_dir, result["layers"])
    images["imbalance"] = plots.imbalance(out_dir, runs)
    images["latency"] = plots.latency(out_dir, result["requests"])
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(html.render(result, images))
    return result


def run(args: argparse.Namespace) -> int:
    from otel_moe.report.build import EmptyInput

    try:
        result = build_report(args.inputs, args.out, progress=not args.no_progress and sys.stderr.isatty())
    except (EmptyInput, SchemaError, FileNotFoundError) as err:
        print(f"otel-moe report: error: {err}", file=sys.stderr)
        return 2
    bad = result["inputs"]["bad_lines"]
    if bad:
        print(f"otel-moe report: skipped {bad} corrupt or truncated lines of {result['inputs']['lines']}", file=sys.stderr)
    print(f"otel-moe report: {len(result['layers'])} layers, {len(result['requests'])} requests -> "
          f"{os.path.join(args.out, 'report.html')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-moe report", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
