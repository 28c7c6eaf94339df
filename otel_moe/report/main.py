"""``otel-moe report INPUT... --out DIR``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from otel_moe.read import LineStats, SchemaError
from otel_moe.report import profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="collector files or folders, JSONL routing logs, "
                        "torch.profiler traces (*.pt.trace.json[.gz])")
    parser.add_argument("--out", required=True, help="folder for the PNGs, summary.json and report.html")
    parser.add_argument("--profile", action="append", default=[], metavar="TRACE",
                        help="a torch.profiler trace of the same run (Chrome JSON, .gz too) or a folder of them; "
                             "repeatable")
    parser.add_argument("--moe-kernels", default=profile.DEFAULT_MOE_KERNELS, metavar="REGEX",
                        help="GPU kernel names that are MoE work, for CUDA-graph replays (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")


def build_report(inputs: list[str], out_dir: str, progress: bool = False, traces: list[str] = (),
                 moe_kernels: str = profile.DEFAULT_MOE_KERNELS) -> dict:
    """``traces``: profiler traces to join (also picked out of ``inputs`` by name)."""
    from otel_moe.report import html, plots  # matplotlib: only when a report is made
    from otel_moe.report.build import aggregate, summary
    from otel_moe.report.inputs import input_files

    is_trace = [profile.is_trace(p) or (os.path.isdir(p) and bool(profile.trace_files([p]))) for p in inputs]
    traces = list(traces) + [p for p, t in zip(inputs, is_trace) if t]
    inputs = [p for p, t in zip(inputs, is_trace) if not t]
    join = profile.load(traces, moe_kernels) if traces else None
    stats = LineStats()
    files = input_files(inputs)
    runs = aggregate(inputs, stats, progress, profile=join)
    result = summary(runs, stats, files)
    if join is not None:
        result["profile"] = join.summary(set(runs))
    os.makedirs(out_dir, exist_ok=True)
    images = {"hist": {}, "phase": {}}
    for name, layer in result["layers"].items():
        images["hist"][name] = plots.expert_histogram(out_dir, name, layer["counts"])
        if sum(layer["prefill_counts"]) + sum(layer["decode_counts"]):
            images["phase"][name] = plots.phase_histogram(out_dir, name, layer["prefill_counts"], layer["decode_counts"])
    images["heatmap"] = plots.heatmap(out_dir, result["layers"])
    images["imbalance"] = plots.imbalance(out_dir, runs)
    images["latency"] = plots.latency(out_dir, result["requests"])
    images["profile"] = plots.profile(out_dir, result["profile"]) if "profile" in result else None
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(html.render(result, images))
    return result


def run(args: argparse.Namespace) -> int:
    from otel_moe.report.build import EmptyInput

    try:
        result = build_report(args.inputs, args.out, progress=not args.no_progress and sys.stderr.isatty(),
                              traces=args.profile, moe_kernels=args.moe_kernels)
    except (EmptyInput, SchemaError, FileNotFoundError, profile.TraceError) as err:
        print(f"otel-moe report: error: {err}", file=sys.stderr)
        return 2
    bad = result["inputs"]["bad_lines"]
    if bad:
        print(f"otel-moe report: skipped {bad} corrupt or truncated lines of {result['inputs']['lines']}", file=sys.stderr)
    if "profile" in result:
        p = result["profile"]
        print(f"otel-moe report: profiler trace: {p['steps_joined']} of {p['steps_in_trace']} profiled steps joined "
              f"({', '.join(p['time_source'])})")
    print(f"otel-moe report: {len(result['layers'])} layers, {len(result['requests'])} requests -> "
          f"{os.path.join(args.out, 'report.html')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-moe report", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
